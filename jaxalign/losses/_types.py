"""Input pytrees for the losses, and host-side checks the data code runs on them.

Every log-prob field is a *sum* of completion-token log-probs per sequence (see
docs/architecture.md section 3); every ``*_tokens`` field is the number of completion
tokens in that sum. Losses that want length-averaged log-probs divide inside.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ArrayLike = Any


@flax.struct.dataclass
class SequenceLogps:
  """Per-sequence log-prob sums for SFT.

  Attributes:
    logps: [N] sums of completion-token log-probs.
    tokens: [N] completion token counts.
    nll_tokens: for ``nll_reduction="token"``: the completion tokens of the whole
      batch the caller averages over (every micro-batch and shard, valid examples
      only); None = ``sum(tokens)``, i.e. these N examples are the whole batch.
    num_examples: the number of examples the caller's mean divides by (the valid
      examples of the whole batch); None = N.
  """

  logps: Array
  tokens: Array
  nll_tokens: Array | None = None
  num_examples: Array | None = None


@flax.struct.dataclass
class PairwiseLogps:
  """Per-pair log-prob sums for the DPO family, CPO, ORPO, SimPO.

  Attributes:
    policy_chosen: [N] policy log-prob sum of the chosen completion.
    policy_rejected: [N] policy log-prob sum of the rejected completion.
    chosen_tokens: [N] completion token count of the chosen completion.
    rejected_tokens: [N] completion token count of the rejected completion.
    reference_chosen: [N] reference-model sums, or None for reference-free losses.
    reference_rejected: [N] reference-model sums, or None.
    nll_tokens: for an NLL term with ``nll_reduction="token"``: the *chosen*
      completion tokens of the whole batch (every micro-batch and shard, valid pairs
      only); None = ``sum(chosen_tokens)``.
    num_examples: the number of pairs the caller's mean divides by; None = N.
  """

  policy_chosen: Array
  policy_rejected: Array
  chosen_tokens: Array
  rejected_tokens: Array
  reference_chosen: Array | None = None
  reference_rejected: Array | None = None
  nll_tokens: Array | None = None
  num_examples: Array | None = None


@flax.struct.dataclass
class UnpairedLogps:
  """Per-example log-prob sums for KTO.

  Attributes:
    policy: [N] policy log-prob sums of the completions.
    reference: [N] reference log-prob sums of the completions.
    tokens: [N] completion token counts.
    desirable: [N] bool / {0, 1} float: 1 = desirable completion.
    policy_kl: [N] policy sums for the mismatched (prompt_i, completion_j) pairs.
    reference_kl: [N] reference sums for the mismatched pairs.
    valid: optional [N] {0, 1}: which mismatched pairs enter the batch-level KL
      estimate (pass the example-valid mask when the batch has padding slots);
      None = all.
  """

  policy: Array
  reference: Array
  tokens: Array
  desirable: Array
  policy_kl: Array
  reference_kl: Array
  valid: Array | None = None


@flax.struct.dataclass
class RankedLogps:
  """K responses per prompt, for RRHF.

  Attributes:
    logps: [N, K] policy log-prob sums.
    tokens: [N, K] completion token counts.
    scores: [N, K] external (human / reward model) scores, higher is better.
  """

  logps: Array
  tokens: Array
  scores: Array


@flax.struct.dataclass
class RewardPair:
  """Scalar reward-model outputs for a preference pair (Bradley-Terry).

  Attributes:
    chosen: [N] reward of the chosen completion.
    rejected: [N] reward of the rejected completion.
    margin: [N] optional preference margin (Llama 2 style), or None.
  """

  chosen: Array
  rejected: Array
  margin: Array | None = None


def sequence_logps_from_tokens(logp_BxT: ArrayLike,
                               mask_BxT: ArrayLike) -> SequenceLogps:
  """Reduces token log-probs [B, T] and a completion mask to sums and counts."""
  logp_BxT = jnp.asarray(logp_BxT)
  mask_BxT = jnp.asarray(mask_BxT).astype(logp_BxT.dtype)
  return SequenceLogps(logps=jnp.sum(logp_BxT * mask_BxT, axis=-1),
                       tokens=jnp.sum(mask_BxT, axis=-1))


# ----------------------------------------------------------------------------
# Host-side validation (numpy; called by the data / training code, never traced).


def check_token_counts(counts: ArrayLike, field: str) -> None:
  """Raises ValueError if any token count is not a positive finite number.

  A zero-length completion has a log-prob sum of 0 (probability 1) and makes every
  length-averaged loss divide by zero, so it must be stopped before any loss sees it.
  """
  counts = np.asarray(counts)
  if counts.size == 0:
    raise ValueError(f"{field}: got an empty array of token counts.")
  bad = np.argwhere(~(np.isfinite(counts) & (counts > 0)))
  if bad.size:
    first = tuple(int(i) for i in bad[0])
    index = first[0] if len(first) == 1 else first
    raise ValueError(
        f"{field}[{index}] = {counts[first]!r}: {len(bad)} completion(s) have no "
        "scored tokens (token count must be >= 1). Drop these examples or fix "
        "truncation (e.g. a prompt longer than the maximum length leaves an empty "
        "completion) before computing the loss.")


def _check_same_shape(named: dict[str, ArrayLike]) -> None:
  shapes = {k: np.shape(v) for k, v in named.items() if v is not None}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"Input arrays must share one shape; got {shapes}.")


def check_pairwise_inputs(chosen_tokens: ArrayLike,
                          rejected_tokens: ArrayLike,
                          **logps: ArrayLike | None) -> None:
  """Host-side check of a pairwise batch: positive token counts, equal shapes.

  Args:
    chosen_tokens: [N] completion token counts of the chosen responses.
    rejected_tokens: [N] completion token counts of the rejected responses.
    **logps: optional [N] log-prob arrays (any names) that must share the shape
      and be finite, e.g. ``policy_chosen=...``.

  Raises:
    ValueError: naming the field and index of the first offending example.
  """
  check_token_counts(chosen_tokens, "chosen_tokens")
  check_token_counts(rejected_tokens, "rejected_tokens")
  _check_same_shape({"chosen_tokens": chosen_tokens,
                     "rejected_tokens": rejected_tokens, **logps})
  for name, value in logps.items():
    if value is None:
      continue
    value = np.asarray(value)
    bad = np.argwhere(~np.isfinite(value))
    if bad.size:
      raise ValueError(f"{name}[{int(bad[0][0])}] = {value[tuple(bad[0])]!r} is not "
                       "finite; check the log-prob computation for this example.")


def check_unpaired_inputs(tokens: ArrayLike, desirable: ArrayLike) -> None:
  """Host-side check of a KTO batch: positive token counts, boolean labels."""
  check_token_counts(tokens, "tokens")
  labels = np.asarray(desirable)
  _check_same_shape({"tokens": tokens, "desirable": labels})
  if not np.all((labels == 0) | (labels == 1)):
    raise ValueError("desirable: labels must be booleans or 0/1; got values "
                     f"{np.unique(labels)[:5]!r}.")


def check_ranked_inputs(tokens: ArrayLike, scores: ArrayLike) -> None:
  """Host-side check of an RRHF batch: positive counts, [N, K] with K >= 2."""
  check_token_counts(tokens, "tokens")
  _check_same_shape({"tokens": tokens, "scores": scores})
  if np.ndim(tokens) != 2 or np.shape(tokens)[1] < 2:
    raise ValueError(f"tokens: ranked inputs must be [N, K] with K >= 2 responses; "
                     f"got shape {np.shape(tokens)}.")
