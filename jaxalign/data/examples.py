"""Typed, tokenized examples: the hand-off from record parsing to batch layout.

Token arrays are 1-D int32 numpy arrays. ``prompt`` holds the rendered prompt tokens
(with BOS if the tokenizer adds one); completions hold only completion tokens (with EOS
when the tokenizer appends one). Only completion tokens are ever scored.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SFTExample:
  prompt: np.ndarray
  completion: np.ndarray


@dataclasses.dataclass(frozen=True)
class PairExample:
  prompt: np.ndarray
  chosen: np.ndarray
  rejected: np.ndarray


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


Example = SFTExample | PairExample | UnpairedExample | RankedExample
