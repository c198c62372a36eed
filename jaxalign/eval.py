"""Held-out evaluation: implicit-reward accuracy and margins, KL and oracle reward.

What is measured (all on held-out data the run never trains on):

* **Pairs** (every task): per held-out pair, a score per response -- the *implicit
  reward* ``beta * (log pi(y|x) - log pi_ref(y|x))`` when a reference exists (DPO's
  reward; ``beta`` is the loss's, default 1), the policy log-prob sum when there is no
  reference, or the head's scalar for a reward model. ``pair_accuracy`` is the
  fraction of pairs whose chosen response scores higher (ties count half);
  ``pair_margin`` the mean score difference chosen - rejected.
* **Candidate sets** (ground-truth task only; no sampler is involved): per held-out
  prompt, ``K`` behaviour responses with known oracle rewards ``r_k``. Restricting the
  policy to the set gives ``p_k = softmax_k(log pi(y_k|x))``, likewise ``q_k`` for the
  reference. Reported: ``oracle_expected = sum_k p_k r_k`` (expected oracle reward of
  the policy restricted to the candidates), ``oracle_preferred = r_argmax_k p_k`` (the
  oracle reward of the response the policy prefers), ``oracle_reference`` (the same
  expectation under ``q``), ``oracle_best`` (the best candidate, an upper bound) and
  ``kl_to_reference = KL(p || q)`` over the set -- an exact KL of the restricted
  distributions, not a sampled estimate of the full-sequence KL. A reward model
  uses its scores as the logits of ``p``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def _log_softmax(x_NxK: np.ndarray) -> np.ndarray:
  x = np.asarray(x_NxK, np.float64)
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def pair_metrics(chosen_N: np.ndarray, rejected_N: np.ndarray,
                 valid_N: np.ndarray | None = None) -> dict[str, float]:
  """Accuracy (ties count half) and mean margin of per-pair scores."""
  c = np.asarray(chosen_N, np.float64)
  r = np.asarray(rejected_N, np.float64)
  v = np.ones_like(c) if valid_N is None else np.asarray(valid_N, np.float64)
  n = max(v.sum(), 1.0)
  wins = (c > r) + 0.5 * (c == r)
  return {"pair_accuracy": float((wins * v).sum() / n),
          "pair_margin": float(((c - r) * v).sum() / n)}


def candidate_metrics(policy_NxK: np.ndarray, reference_NxK: np.ndarray | None,
                      rewards_NxK: np.ndarray,
                      valid_N: np.ndarray | None = None) -> dict[str, float]:
  """Oracle reward of the policy restricted to each candidate set, and KL (see module)."""
  r = np.asarray(rewards_NxK, np.float64)
  v = np.ones(r.shape[0]) if valid_N is None else np.asarray(valid_N, np.float64)
  n = max(v.sum(), 1.0)
  logp = _log_softmax(policy_NxK)
  p = np.exp(logp)
  out = {
      "oracle_expected": float(((p * r).sum(-1) * v).sum() / n),
      "oracle_preferred": float(
          (np.take_along_axis(r, np.argmax(logp, -1)[:, None], -1)[:, 0] * v).sum() / n),
      "oracle_best": float((r.max(-1) * v).sum() / n),
  }
  if reference_NxK is not None:
    logq = _log_softmax(reference_NxK)
    out["oracle_reference"] = float(((np.exp(logq) * r).sum(-1) * v).sum() / n)
    out["kl_to_reference"] = float(((p * (logp - logq)).sum(-1) * v).sum() / n)
  return out


@dataclasses.dataclass
class EvalSet:
  """Laid-out held-out batches.

  ``pair_batches``: pairwise batches (pair i -> sequences 2i, 2i+1).
  ``candidate_batches``: ranked batches (example i, response k -> i*K + k) whose
  ``scores`` extra holds the oracle rewards; empty when the task has no oracle.
  """
  pair_batches: list[dict]
  candidate_batches: list[dict]


ScoreFn = Callable[[Any, dict], np.ndarray]  # (params, batch) -> [S] scores


def evaluate(score_fn: ScoreFn, params: Any, ref_params: Any, eval_set: EvalSet, *,
             beta: float = 1.0, implicit: bool = True) -> dict[str, float]:
  """Runs the metrics of the module docstring over ``eval_set``.

  Args:
    score_fn: per-sequence scores (log-prob sums for a policy, head scores for a
      reward model); jitted by the caller.
    params: the policy (or reward model) params.
    ref_params: the reference params, or None (no implicit reward, no KL).
    eval_set: the held-out batches.
    beta: scale of the implicit reward.
    implicit: score pairs by ``beta * (policy - reference)`` when a reference exists
      (False: raw scores, e.g. for a reward model).
  """
  sums: dict[str, list] = {"c": [], "r": [], "v": []}
  for batch in eval_set.pair_batches:
    pol = np.asarray(score_fn(params, batch), np.float64)
    if implicit and ref_params is not None:
      pol = beta * (pol - np.asarray(score_fn(ref_params, batch), np.float64))
    n = batch["example_valid"].shape[0]
    sums["c"].append(pol[0:2 * n:2])
    sums["r"].append(pol[1:2 * n:2])
    sums["v"].append(batch["example_valid"])
  out = {}
  if sums["c"]:
    out.update(pair_metrics(np.concatenate(sums["c"]), np.concatenate(sums["r"]),
                            np.concatenate(sums["v"])))
  pol_l, ref_l, rew_l, val_l = [], [], [], []
  for batch in eval_set.candidate_batches:
    n, k = batch["scores"].shape
    pol_l.append(np.asarray(score_fn(params, batch), np.float64)[:n * k].reshape(n, k))
    if implicit and ref_params is not None:
      ref_l.append(np.asarray(score_fn(ref_params, batch),
                              np.float64)[:n * k].reshape(n, k))
    rew_l.append(batch["scores"])
    val_l.append(batch["example_valid"])
  if pol_l:
    out.update(candidate_metrics(np.concatenate(pol_l),
                                 np.concatenate(ref_l) if ref_l else None,
                                 np.concatenate(rew_l), np.concatenate(val_l)))
  return out


def layout_eval_set(pairs: Sequence[Any], candidates: Sequence[Any],
                    make_batches: Callable[[Sequence[Any]], list[dict]]) -> EvalSet:
  """Lays out held-out ``PairExample``s and ``RankedExample``s with ``make_batches``."""
  return EvalSet(pair_batches=make_batches(pairs) if pairs else [],
                 candidate_batches=make_batches(candidates) if candidates else [])
