"""Name -> reward function registry, the ``name:weight`` list parser, and the checked
call that turns a misbehaving function into a named error (or a counted zero).

A reward function scores a batch of decoded text::

    fn(prompts: list[str], completions: list[str], **fields) -> list[float] | np.ndarray

``fields`` are the prompt records' other columns as lists aligned with the batch
(e.g. ``answer``), plus ``completion_length`` (tokens the sampler generated, EOS
included) that the RL scorer adds. A function's own settings are keyword-only
parameters with defaults (like a loss's hyperparameters); the caller binds them
(`jaxalign.train.rl_rewards` from the ``rl`` section). Unused fields must be
accepted (``**fields``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

RewardFn = Callable[..., Any]
ON_ERROR = ("raise", "zero")

_REGISTRY: dict[str, RewardFn] = {}


class RewardError(ValueError):
  """A reward function raised, returned a non-finite score or the wrong count.

  ``name``: the function's registry name; ``index``: the completion's index in the
  batch (None when no single completion is to blame)."""

  def __init__(self, name: str, index: int | None, message: str):
    where = "" if index is None else f" on completion {index}"
    super().__init__(f"reward function {name!r} failed{where}: {message}")
    self.name, self.index, self.detail = name, index, message


def register_reward(name: str, fn: RewardFn, *, overwrite: bool = False) -> RewardFn:
  """Adds ``fn`` under ``name`` (a ValueError if taken, unless ``overwrite``)."""
  if not name or any(c in name for c in ":,/ "):
    raise ValueError(f"register_reward: name {name!r} must be non-empty and hold no "
                     "':', ',', '/' or spaces (it is written in rl.reward_functions).")
  if not callable(fn):
    raise ValueError(f"register_reward({name!r}): {fn!r} is not callable.")
  if name in _REGISTRY and not overwrite:
    raise ValueError(f"register_reward: a reward named {name!r} already exists; pass "
                     "overwrite=True to replace it.")
  _REGISTRY[name] = fn
  return fn


def unregister_reward(name: str) -> None:
  get_reward(name)
  del _REGISTRY[name]


def list_rewards() -> list[str]:
  return sorted(_REGISTRY)


def get_reward(name: str) -> RewardFn:
  """The function registered under ``name``; a ValueError listing the names if none."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown reward function {name!r}; registered: "
                     f"{', '.join(list_rewards())} (add one with "
                     "jaxalign.rewards.register_reward).")
  return _REGISTRY[name]


def parse_weights(spec: str, key: str = "rl.reward_functions"
                  ) -> tuple[tuple[str, float], ...]:
  """``"accuracy:1.0,format:0.2"`` -> ``(("accuracy", 1.0), ("format", 0.2))``; a bare
  name weighs 1. Unknown names, bad or non-finite weights and repeats are errors
  naming ``key``."""
  out: list[tuple[str, float]] = []
  for part in spec.split(","):
    part = part.strip()
    if not part:
      continue
    name, _, weight = part.partition(":")
    name = name.strip()
    try:
      w = float(weight) if weight.strip() else 1.0
    except ValueError:
      raise ValueError(f"config.{key}: weight {weight!r} of {name!r} is not a number; "
                       "write name:weight, e.g. 'accuracy:1.0,format:0.2'.") from None
    if not math.isfinite(w):
      raise ValueError(f"config.{key}: weight of {name!r} must be finite, got {w}.")
    if name not in _REGISTRY:
      raise ValueError(f"config.{key}: unknown reward function {name!r}; registered: "
                       f"{', '.join(list_rewards())}.")
    if any(n == name for n, _ in out):
      raise ValueError(f"config.{key}: {name!r} is listed twice.")
    out.append((name, w))
  if not out:
    raise ValueError(f"config.{key}: empty; list name:weight pairs, e.g. "
                     "'accuracy:1.0,format:0.2'.")
  return tuple(out)


def _checked(name: str, raw: Any, n: int) -> np.ndarray:
  """[n] float64 scores, or a RewardError naming the first bad completion."""
  try:
    scores = np.asarray(raw, np.float64)
  except (TypeError, ValueError) as e:
    raise RewardError(name, None, f"returned {type(raw).__name__}, not numbers: {e}") \
        from None
  if scores.shape != (n,):
    raise RewardError(name, None, f"returned {scores.size} score(s) of shape "
                      f"{scores.shape} for {n} completion(s); return one float per "
                      "completion.")
  bad = np.flatnonzero(~np.isfinite(scores))
  if bad.size:
    raise RewardError(name, int(bad[0]), f"score {scores[bad[0]]} is not finite.")
  return scores


def _row(fields: Mapping[str, Sequence[Any]], i: int) -> dict[str, list[Any]]:
  return {k: [v[i]] for k, v in fields.items()}


def _one(name, fn, prompts, completions, fields, i) -> float:
  """Completion ``i`` alone (to find, or zero, the one that fails)."""
  try:
    raw = fn([prompts[i]], [completions[i]], **_row(fields, i))
  except Exception as e:  # pylint: disable=broad-except
    raise RewardError(name, i, f"{type(e).__name__}: {e}") from e
  try:
    return float(_checked(name, raw, 1)[0])
  except RewardError as e:
    raise RewardError(name, i, e.detail) from None


def call_reward(name: str, fn: RewardFn, prompts: Sequence[str],
                completions: Sequence[str], fields: Mapping[str, Sequence[Any]], *,
                on_error: str = "raise") -> tuple[np.ndarray, int]:
  """``fn`` over the batch, checked: ([B] float64 scores, failed completions).

  A call that raises or returns the wrong count is retried one completion at a time
  to find the culprit. ``on_error="raise"``: the first failure is a `RewardError`
  naming ``name`` and the completion's index. ``"zero"``: failing completions score
  0 and are counted.
  """
  if on_error not in ON_ERROR:
    raise ValueError(f"call_reward: on_error={on_error!r} is not one of {ON_ERROR}.")
  n = len(completions)
  try:
    return _checked(name, fn(list(prompts), list(completions), **fields), n), 0
  except RewardError as e:
    if e.index is not None and on_error == "raise":
      raise
    batch_error = e
  except Exception as e:  # pylint: disable=broad-except
    batch_error = RewardError(name, None, f"{type(e).__name__}: {e}")
  scores, failed = np.zeros((n,), np.float64), 0
  for i in range(n):
    try:
      scores[i] = _one(name, fn, prompts, completions, fields, i)
    except RewardError:
      if on_error == "raise":
        raise
      failed += 1
  if on_error == "raise":
    # Every completion passes alone, so the batch call itself is at fault.
    raise batch_error
  return scores, failed
