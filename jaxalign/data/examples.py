"""Typed, tokenized examples: the hand-off from record parsing to batch layout.

Token arrays are 1-D int32 numpy arrays. ``prompt`` holds the rendered prompt tokens
(with BOS if the tokenizer adds one); completions hold only completion tokens (with EOS
when the tokenizer appends one, or the chat template's end-of-turn token). Only
completion tokens are ever scored, and of an SFT completion only those its
``loss_mask`` marks (a multi-turn conversation: the assistant turns, not the user
turns between them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class SFTExample:
  """A prompt and the completion to learn.

  ``loss_mask``: None scores every completion token; else a bool array with the
  completion's length, True on the tokens to score (at least one).
  """

  prompt: np.ndarray
  completion: np.ndarray
  loss_mask: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class PairExample:
  """A preference pair. ``margin``: how much better chosen is than rejected (a
  record's ``data.margin_field``; the reward model's Llama 2 margin), or None."""

  prompt: np.ndarray
  chosen: np.ndarray
  rejected: np.ndarray
  margin: float | None = None


@dataclasses.dataclass(frozen=True)
class UnpairedExample:
  prompt: np.ndarray
  completion: np.ndarray
  label: bool  # True = desirable (KTO)


@dataclasses.dataclass(frozen=True)
class RankedExample:
  prompt: np.ndarray
  responses: tuple[np.ndarray, ...]
  scores: np.ndarray  # [K] float32, higher is better


@dataclasses.dataclass(frozen=True)
class PromptExample:
  """A prompt for online RL (the sampler writes the completions).

  ``fields``: the record's other fields (e.g. a reference ``answer``), a read-only
  mapping of JSON values that reward functions may read; None when there are none.
  Batch layouts do not take prompt examples.
  """

  prompt: np.ndarray
  fields: Mapping[str, Any] | None = None


Example = SFTExample | PairExample | UnpairedExample | RankedExample | PromptExample
