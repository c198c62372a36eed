"""DAPO's dynamic sampling for `jaxalign.train.rl` (Yu et al. 2025, "DAPO: An
Open-Source LLM Reinforcement Learning System at Scale", section 3.2, Algorithm 1).

A group whose G completions all get the same score has zero group-relative advantage
(GRPO's mean and RLOO's leave-one-out baseline both equal every score): it adds no
policy gradient, only KL / entropy terms and tokens to the loss normalisers, so the
effective batch shrinks as accuracy nears 0 or 1. With ``rl.dynamic_sampling`` an
iteration keeps only *informative* groups (scores not all equal: max > min of the
host scores, before any KL penalty) and, while it has fewer than ``data.batch_size``
of them, samples another round of ``data.batch_size`` fresh prompts with the same
policy, up to ``rl.max_sampling_rounds`` rounds (the first included). Surplus groups
of the last round are dropped (the first ones found are kept).

Shapes stay static (the programs compile once): the rollout always has
``batch_size * group_size`` rows. An iteration still short after the last round
trains on the informative groups it found and fills the rest with the earliest
filtered groups as *masked* groups: their rows carry ``keep = 0``, so
`rl_steps.loss_weights` gives them no loss weight (no policy-gradient, KL-in-loss or
entropy term, no tokens in ``bnpo`` / ``dapo``'s normalisers). ``loss_agg`` grpo and
dr_grpo still count their rows in B (their normaliser is a row count), as does the
``scale_rewards="batch"`` std. Every rollout of such a run carries ``keep``.

Logged per iteration: ``sampling/rounds``, ``sampling/filtered_groups`` (groups
sampled whose scores were all equal), ``sampling/kept_fraction`` (informative /
sampled groups), ``sampling/padded_groups`` (masked groups in the batch) and
``sampling/scores`` (the mean score of every completion sampled: the policy's score,
whereas ``objective/scores`` is that of the groups trained on).

Extra round r of iteration i draws its prompts as the prompt source's "iteration"
``rl_rewards.prompt_draw(i, r)`` (a stream no real iteration uses) and samples with
``fold_in(fold_in(iteration key, 0), r)``; round 0 is the iteration's own batch and
key, so a run whose groups are all informative equals the run without the option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxalign.models import sampling
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import rl_rewards
from jaxalign.train import rl_steps


def informative(scores_B: np.ndarray, group_size: int) -> np.ndarray:
  """[B / group_size] bool: the groups (adjacent rows) whose scores are not all equal
  (max > min: exact, unlike a variance of identical f32 values)."""
  s = np.asarray(scores_B).reshape(-1, group_size)
  return s.max(1) > s.min(1)


def choose(kept_per_round: Sequence[np.ndarray], n_groups: int
           ) -> tuple[list[tuple[int, int]], int]:
  """((round, group) of the batch's ``n_groups`` groups: the informative ones in
  sampling order, then the earliest filtered ones as padding; how many are padding)."""
  good = [(r, g) for r, k in enumerate(kept_per_round) for g in np.flatnonzero(k)]
  bad = [(r, g) for r, k in enumerate(kept_per_round) for g in np.flatnonzero(~k)]
  chosen = good[:n_groups]
  pad = n_groups - len(chosen)
  return chosen + bad[:pad], pad


@dataclasses.dataclass
class _Round:
  """One generation round on the host: prompts (one per row), sampler output as
  NumPy, scores [B] and the reward metrics."""
  prompts: list
  out: sampling.SampleOutput
  scores: np.ndarray
  metrics: dict


def _host_out(out: sampling.SampleOutput) -> sampling.SampleOutput:
  return sampling.SampleOutput(*(np.asarray(x) for x in out))  # replicated: readable


def _sample(t: Any, state: Any, it: int, r: int, key: Any) -> _Round:
  """Round ``r`` (>= 1) of iteration ``it``: fresh prompts, sampled and scored."""
  rl = t.rl
  draw = rl_rewards.prompt_draw(it, r)
  prompts = [p for p in t.prompts(draw) for _ in range(rl.group_size)]
  prompt_BxP, len_B = rl_steps.left_pad(prompts, rl.prompt_len)
  params, _ = rl_steps.with_base(state.policy.params, None, state.base)
  out = _host_out(t.programs.sampler(params, prompt_BxP, len_B, key))
  scores, metrics = rl_rewards.host_scores(t.oracle, t.text_reward, it, prompts, out,
                                           round_=r)
  return _Round(prompts, out, np.asarray(scores, np.float32), metrics)


def _reward_metrics(rounds: Sequence[_Round]) -> dict[str, float]:
  """Each reward metric over every round: failure counts summed, means averaged
  (rounds have equal row counts)."""
  out = {}
  for k in rounds[0].metrics:
    vals = [rd.metrics[k] for rd in rounds]
    out[k] = float(np.sum(vals) if k.endswith("/failures") else np.mean(vals))
  return out


def _assemble(t: Any, rounds: Sequence[_Round], chosen: Sequence[tuple[int, int]],
              pad: int) -> tuple[dict, sampling.SampleOutput, list, np.ndarray]:
  """(rollout batch with ``keep`` placed on the rows' sharding, host sampler output,
  prompts and scores) of the ``chosen`` groups; the last ``pad`` are masked."""
  g = t.rl.group_size
  rows = [(r, i) for r, grp in chosen for i in range(grp * g, (grp + 1) * g)]
  prompts = [rounds[r].prompts[i] for r, i in rows]
  out = sampling.SampleOutput(*(np.stack([rounds[r].out[f][i] for r, i in rows])
                                for f in range(len(sampling.SampleOutput._fields))))
  scores = np.asarray([rounds[r].scores[i] for r, i in rows], np.float32)
  keep = np.ones((len(rows),), np.float32)
  keep[len(rows) - pad * g:] = 0.0
  prompt_BxP, len_B = rl_steps.left_pad(prompts, t.rl.prompt_len)
  batch = jax.tree.map(np.asarray, rl_steps.rollout_batch(prompt_BxP, len_B, out))
  batch["keep"] = keep
  if t.rows_sharding is not None:
    batch = mesh_lib.put(batch, t.rows_sharding)  # identical on every process
  return batch, out, prompts, scores


def fill(t: Any, state: Any, it: int, it_key: Any, prompts: list, out: Any
         ) -> tuple[dict, sampling.SampleOutput, list, tuple[np.ndarray, dict]]:
  """Iteration ``it``'s batch under dynamic sampling (module doc), from its first
  round (``prompts``, one per row, and the sampler's ``out``): (rollout batch,
  sampler output, prompts of the batch, (scores [B], host metrics))."""
  rl = t.rl
  n_groups = len(prompts) // rl.group_size
  out = _host_out(out)
  scores, metrics = rl_rewards.host_scores(t.oracle, t.text_reward, it, prompts, out)
  rounds = [_Round(list(prompts), out, np.asarray(scores, np.float32), metrics)]
  kept = [informative(rounds[0].scores, rl.group_size)]
  key0 = jax.random.fold_in(it_key, 0)  # round 0's sampling key (rl.iteration)
  while sum(int(k.sum()) for k in kept) < n_groups and len(rounds) < rl.max_sampling_rounds:
    rounds.append(_sample(t, state, it, len(rounds), jax.random.fold_in(key0, len(rounds))))
    kept.append(informative(rounds[-1].scores, rl.group_size))
  chosen, pad = choose(kept, n_groups)
  batch, out, prompts, scores = _assemble(t, rounds, chosen, pad)
  sampled = len(rounds) * n_groups
  informative_groups = sum(int(k.sum()) for k in kept)
  metrics = dict(_reward_metrics(rounds), **{
      "sampling/rounds": float(len(rounds)),
      "sampling/filtered_groups": float(sampled - informative_groups),
      "sampling/kept_fraction": informative_groups / sampled,
      "sampling/padded_groups": float(pad),
      "sampling/scores": float(np.mean([rd.scores.mean() for rd in rounds]))})
  return batch, out, prompts, (scores, metrics)
