"""Online RL's pure functions: everything one iteration computes besides sampling and
the host driver (`jaxalign.train.rl`).

The rollout batch is the batch contract (docs/architecture.md, section 2) plus a
completion mask: ``tokens``, ``positions``, ``segment_ids`` ``[B, P + N]`` hold
left-padded prompts (bucket P, ``rl.prompt_len``) then N = ``rl.max_new_tokens``
completion slots (`jaxalign.models.sampling`), and ``mask`` ``[B, N]`` is 1 on
completion tokens (EOS included). The hidden state at row position ``P - 1 + t``
predicts completion token t, so log-probs, entropies and values are all read from
``hidden[:, P-1 : P+N-1]``.

An algorithm is a table entry of parts (`Algorithm`, `ALGORITHMS`): its advantage
function, its loss, whether it trains a value model, whether its KL term sits in the
loss (else in the rewards), and how minibatches are cut. `update_step` and the driver
read those parts; no function here branches on an algorithm's name. `build_programs`
jits the steps for one run (`Programs`, owned by the run object that asked for them).

* ``ppo``: per-token KL penalty (``rl.kl_estimator``) added to the rewards, the score
  at the last response token, GAE, whitened advantages, clipped policy and value
  losses; a value model with its own params and optimizer.
* ``grpo``: group-normalised scores as the advantage of every token, clipped policy
  loss plus ``kl_coef * k3`` in the loss.
* ``rloo``: scores minus ``kl_coef * sum_t kl`` per sequence, leave-one-out baseline,
  clipped policy loss.
* ``rrhf``: the ``group_size`` completions of a prompt ranked by score, the RRHF loss.
* ``online_dpo`` / ``gkd``: DPO on judged on-policy pairs, and on-policy distillation
  to a frozen teacher (`jaxalign.train.rl_distill`).

These are the defaults: where the KL sits (``rl.kl_placement``) and its estimator, the
clip (``epsilon_low`` / ``epsilon_high``, ``dual_clip_c``), the ratio (``importance_level``,
GSPO), the loss (``policy_loss``, CISPO), its reduction (``loss_agg``), the reward
scale, an entropy bonus, truncated-completion masks and TIS weights are options
(`policy_token_loss`, `loss_weights`; docs/losses.md, "Online RL options").

All loss maths come from ``jaxalign.losses`` (KL estimators, shaped rewards, GAE,
whitening, clipped losses, the GRPO family, group baselines, RRHF); policy-gradient
losses are reduced per ``rl.loss_agg`` (default: the minibatch token mean).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign import config as config_lib
from jaxalign import losses
from jaxalign.data import synthetic
from jaxalign.models import engine as engine_lib
from jaxalign.models import heads
from jaxalign.models import sampling
from jaxalign.models import transformer as tfm
from jaxalign.ops import logprobs as lp_lib
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import build
from jaxalign.train import rl_distill
from jaxalign.train import steps as steps_lib

Array = jax.Array
RLConfig = config_lib.RLConfig


# ----------------------------------------------------------------------------- batch


def left_pad(prompts: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
  """(prompts [B, length] left-padded with 0, lengths [B]); an over-long prompt keeps
  its end (the part next to the completion)."""
  out = np.zeros((len(prompts), length), np.int32)
  lens = np.zeros((len(prompts),), np.int32)
  for i, p in enumerate(prompts):
    p = np.asarray(p, np.int32)[-length:]
    out[i, length - p.size:] = p
    lens[i] = p.size
  return out, lens


def rollout_batch(prompt_BxP: Any, prompt_len_B: Any, out: sampling.SampleOutput
                  ) -> dict[str, Array]:
  """The rollout batch (module doc) of a sampler's output for those prompts."""
  segment_ids = sampling.sequence_segments(jnp.asarray(prompt_BxP),
                                           jnp.asarray(prompt_len_B), out.mask)
  return {"tokens": out.sequences, "positions": out.positions,
          "segment_ids": segment_ids, "mask": out.mask, "sampler_logp": out.logp}


def take_rows(rollout: dict[str, Array], idx: Array) -> dict[str, Array]:
  """The minibatch of rows ``idx`` (per-row arrays only; scalars stay behind)."""
  return {k: v[idx] for k, v in rollout.items() if v.ndim >= 1}


def epoch_order(key: Array, rows: int, group_size: int, keeps_groups: bool) -> np.ndarray:
  """[rows] shuffled row order of one epoch; cut in ``num_minibatches`` equal slices.
  With ``keeps_groups`` whole prompt groups are shuffled (rows of a group adjacent)."""
  if keeps_groups:
    perm = np.asarray(jax.random.permutation(key, rows // group_size))
    return (perm[:, None] * group_size + np.arange(group_size)).reshape(-1)
  return np.asarray(jax.random.permutation(key, rows))


# ----------------------------------------------------------------------------- scoring


@dataclasses.dataclass(frozen=True)
class Forwards:
  """The batch forwards of a run's models (`jaxalign.train.build.make_forward`):
  ``policy`` (also the reference's), ``scalar`` (the value and reward models: the
  policy's architecture with a scalar head; None when the run has neither), and the
  policy's final-logit soft cap. ``lora``: the policy and value params are adapters
  (+ the value head), run on the frozen base that the steps take as ``base``
  (`with_base`). ``teacher``: GKD's teacher forward and its soft cap (`rl_distill`)."""
  policy: Callable
  scalar: Callable | None = None
  logit_softcap: float | None = None
  lora: bool = False
  teacher: Callable | None = None
  teacher_softcap: float | None = None


def with_base(policy_params, value_params, base):
  """A LoRA run's trained trees on its frozen base: (``{**base, **adapters}``,
  ``{"model": base, **value adapters and head}``); unchanged when ``base`` is None.
  Only dict nodes are new: the buffers are the base's, not a copy."""
  if base is None:
    return policy_params, value_params
  return ({**base, **policy_params},
          None if value_params is None else {"model": base, **value_params})


def response_hidden(forward: Callable, params: Any, batch: dict, prompt_len: int
                    ) -> tuple[Array, Array]:
  """(hidden at the N slots predicting the completion [B, N, D], unembed [D, V])."""
  hidden, unembed = forward(params, batch)
  n = batch["mask"].shape[1]
  return hidden[:, prompt_len - 1:prompt_len - 1 + n], unembed


def response_logprobs(forward: Callable, params: Any, batch: dict, *, prompt_len: int,
                      temperature: float, chunk_size: int,
                      logit_softcap: float | None = None) -> tuple[Array, Array]:
  """Token log-probs and entropies [B, N] of the completions under the sampler's
  distribution: ``log_softmax(c * tanh(z / c) / T)`` of the logits z."""
  h, unembed = response_hidden(forward, params, batch, prompt_len)
  targets = batch["tokens"][:, prompt_len:]
  return lp_lib.token_logprobs(h, unembed, targets, chunk_size=chunk_size,
                               with_entropy=True, logit_softcap=logit_softcap,
                               temperature=temperature)


def response_values(forward: Callable, params: Any, batch: dict, *, prompt_len: int
                    ) -> Array:
  """Value-model outputs [B, N] at the states that emit each completion token
  (``forward``: the scalar model's, reading ``params["model"]``)."""
  h, _ = response_hidden(forward, params, batch, prompt_len)
  return heads.token_scores(h, params["head"])


def reward_scores(forward: Callable, params: Any, batch: dict) -> Array:
  """Scalar-head scores [B] at each sequence's last real token."""
  hidden, _ = forward(params, batch)
  b, t, _ = hidden.shape
  n = batch["mask"].shape[1]
  last_B = (t - n) + jnp.sum(batch["mask"], axis=1) - 1
  return heads.sequence_scores(hidden, params["head"], jnp.arange(b) * t + last_B)


def score_rollout(policy_params, ref_params, value_params, reward_params, batch,
                  base=None, *, fwd: Forwards, rl: RLConfig) -> dict[str, Array]:
  """Old and reference log-probs, entropies, values and (model) scores of a rollout;
  ``value_params`` / ``reward_params`` may be None (no value model / oracle reward).
  ``base``: a LoRA run's frozen base (`with_base`); its reference is the base itself."""
  policy_params, value_params = with_base(policy_params, value_params, base)
  kw = dict(prompt_len=rl.prompt_len, temperature=rl.temperature,
            chunk_size=rl.logprob_chunk_size, logit_softcap=fwd.logit_softcap)
  mask = batch["mask"].astype(jnp.float32)
  out = {}
  logp, ent = response_logprobs(fwd.policy, policy_params, batch, **kw)
  ref_logp = logp  # no reference (kl_coef = 0): no forward; the KL to it reads as 0
  if ref_params is not None:
    ref_logp, _ = response_logprobs(fwd.policy, ref_params, batch, **kw)
  out["old_logp"], out["entropy"], out["ref_logp"] = logp * mask, ent * mask, ref_logp * mask
  if value_params is not None:
    out["old_values"] = response_values(fwd.scalar, value_params, batch,
                                        prompt_len=rl.prompt_len) * mask
  if reward_params is not None:
    out["scores"] = reward_scores(fwd.scalar, reward_params, batch)
  return out


# ----------------------------------------------------------------------------- advantages


def needs_reference(rl: RLConfig) -> bool:
  """Whether the run builds a reference model: not with ``kl_coef = 0`` (nothing
  would read it but the KL metric)."""
  return rl.kl_coef > 0


def kl_in_loss(rl: RLConfig) -> bool:
  """Where the KL term sits: ``rl.kl_placement``, else the algorithm's own place."""
  if rl.kl_placement:
    return rl.kl_placement == "loss"
  return ALGORITHMS[rl.algorithm].kl_in_loss


def kl_estimator(rl: RLConfig) -> str:
  """``rl.kl_estimator``, else k3 in the loss (GRPO's, non-negative) and k1 in the
  rewards (PPO's / RLOO's)."""
  return rl.kl_estimator or ("k3" if kl_in_loss(rl) else "k1")


def clip_epsilons(rl: RLConfig) -> tuple[float, float]:
  """(epsilon_low, epsilon_high); 0 means ``rl.clip_eps``."""
  return rl.epsilon_low or rl.clip_eps, rl.epsilon_high or rl.clip_eps


def reward_scale(rl: RLConfig) -> str:
  """GRPO's advantage scale: ``rl.scale_rewards``, else ``grpo_scale_by_std``'s."""
  return rl.scale_rewards or ("group" if rl.grpo_scale_by_std else "none")


def ppo_advantages(rollout: dict, scores_B: Array, kl_coef: Array, *, rl: RLConfig
                   ) -> dict[str, Array]:
  """KL-penalised per-token rewards (no penalty when the KL sits in the loss), GAE,
  (whitened) advantages and returns."""
  mask = rollout["mask"]
  rewards, kl = losses.kl_penalized_rewards(rollout["old_logp"], rollout["ref_logp"], mask,
                                            scores_B,
                                            kl_coef=0.0 if kl_in_loss(rl) else kl_coef,
                                            estimator=kl_estimator(rl))
  adv, returns = losses.gae(rewards, rollout["old_values"], mask, gamma=rl.gamma, lam=rl.lam)
  if rl.whiten_advantages:
    adv = losses.masked_whiten(adv, mask)
  return {"adv": adv, "returns": returns, "kl": kl}


def _token_kl(rollout: dict, rl: RLConfig) -> tuple[Array, Array]:
  mask = rollout["mask"].astype(jnp.float32)
  kl = losses.KL_ESTIMATORS[kl_estimator(rl)](rollout["old_logp"], rollout["ref_logp"])
  return kl * mask, mask


def _sequence_rewards(rollout: dict, scores_B: Array, kl_coef: Array, rl: RLConfig
                      ) -> tuple[Array, Array, Array]:
  """(scores minus ``kl_coef * sum_t kl`` when the KL sits in the rewards, else the
  scores; the per-token KL; the mask)."""
  kl, mask = _token_kl(rollout, rl)
  if not kl_in_loss(rl):
    scores_B = scores_B - kl_coef * jnp.sum(kl, axis=1)
  return scores_B, kl, mask


def grpo_rollout_advantages(rollout: dict, scores_B: Array, kl_coef: Array, *,
                            rl: RLConfig) -> dict[str, Array]:
  """GRPO: group-relative (``rl.scale_rewards``) rewards on every token; the KL in the
  loss by default (else subtracted from the scores), reported per token."""
  rewards_B, kl, mask = _sequence_rewards(rollout, scores_B, kl_coef, rl)
  adv_NxG = losses.group_advantages(rewards_B.reshape(-1, rl.group_size),
                                    scale=reward_scale(rl))
  return {"adv": adv_NxG.reshape(-1)[:, None] * mask, "kl": kl}


def rloo_rollout_advantages(rollout: dict, scores_B: Array, kl_coef: Array, *,
                            rl: RLConfig) -> dict[str, Array]:
  """RLOO: scores minus ``kl_coef * sum_t kl`` by default (the KL may sit in the loss
  instead), leave-one-out baseline, on every token."""
  rewards_B, kl, mask = _sequence_rewards(rollout, scores_B, kl_coef, rl)
  adv_NxG = losses.rloo_advantages(rewards_B.reshape(-1, rl.group_size))
  return {"adv": adv_NxG.reshape(-1)[:, None] * mask, "kl": kl}


def loss_weights(rollout: dict, *, rl: RLConfig, stop_ids: tuple[int, ...]
                 ) -> dict[str, Array]:
  """What the policy loss weighs tokens with, from the whole rollout: ``loss_mask``
  [B, N] (the mask, zero on truncated rows with ``rl.mask_truncated``),
  ``batch_tokens`` [B] (each minibatch's share of the rollout's loss tokens: dapo's
  normaliser) and, with ``rl.tis_cap``, ``tis_weight`` [B, N]. A rollout's ``keep``
  [B] (``rl.dynamic_sampling``'s masked padding groups: 0, `rl_dynamic`) zeroes rows."""
  mask = rollout["mask"].astype(jnp.float32)
  if rl.mask_truncated:
    completion = rollout["tokens"][:, rl.prompt_len:]
    mask = mask * jnp.logical_not(losses.truncated_rows(completion, stop_ids))[:, None]
  if "keep" in rollout:
    mask = mask * rollout["keep"][:, None]
  rows = mask.shape[0]
  out = {"loss_mask": mask,
         "batch_tokens": jnp.full((rows,), jnp.sum(mask) / rl.num_minibatches)}
  if rl.tis_cap:
    out["tis_weight"] = losses.tis_weights(rollout["old_logp"], rollout["sampler_logp"],
                                           mask, cap=rl.tis_cap)
  return out


def rollout_advantages(rollout: dict, scores_B: Array, kl_coef: Array, *,
                       fn: Callable, rl: RLConfig, stop_ids: tuple[int, ...]
                       ) -> dict[str, Array]:
  """The algorithm's advantages ``fn`` plus the `loss_weights`."""
  return dict(fn(rollout, scores_B, kl_coef, rl=rl),
              **loss_weights(rollout, rl=rl, stop_ids=stop_ids))


# ----------------------------------------------------------------------------- losses


def masked_mean(x_BxN: Array, mask_BxN: Array) -> Array:
  m = mask_BxN.astype(jnp.float32)
  return jnp.sum(x_BxN * m) / jnp.maximum(jnp.sum(m), 1.0)


def policy_token_loss(logp: Array, mb: dict, rl: RLConfig
                      ) -> tuple[Array, dict[str, Array]]:
  """Per-token policy-gradient loss [B, N] of ``rl.policy_loss`` on the token or
  sequence (GSPO) ratio, times the TIS weight when the rollout has one; and its
  per-token metrics."""
  mask = mb["mask"]
  token_log_ratio = logp - mb["old_logp"]
  log_ratio = (losses.sequence_log_ratio(logp, mb["old_logp"], mask)
               if rl.importance_level == "sequence" else token_log_ratio)
  eps_low, eps_high = clip_epsilons(rl)
  if rl.policy_loss == "cispo":
    loss, metrics = losses.cispo_loss(logp, log_ratio, mb["adv"], mask,
                                      epsilon_low=eps_low, epsilon_high=eps_high)
  else:
    loss, metrics = losses.clipped_surrogate(log_ratio, mb["adv"], mask,
                                             epsilon_low=eps_low, epsilon_high=eps_high,
                                             dual_clip_c=rl.dual_clip_c)
  if "tis_weight" in mb:
    loss = loss * mb["tis_weight"]
  metrics["approxkl"] = jax.lax.stop_gradient(0.5 * jnp.square(token_log_ratio) * mask)
  return loss, metrics


def policy_value_loss(policy_params, value_params, mb, *, fwd: Forwards, rl: RLConfig,
                      kl_loss_coef: Array | None):
  """Policy loss (`policy_token_loss`; + ``kl_loss_coef`` times the KL estimate when
  given; - ``rl.entropy_coef`` times the entropy) reduced by ``rl.loss_agg`` over the
  ``loss_mask``, + ``vf_coef`` times the clipped value loss (token mean) with value
  params."""
  mask = mb["mask"]
  logp, ent = response_logprobs(fwd.policy, policy_params, mb, prompt_len=rl.prompt_len,
                                temperature=rl.temperature,
                                chunk_size=rl.logprob_chunk_size,
                                logit_softcap=fwd.logit_softcap)
  agg = functools.partial(losses.aggregate_token_loss, mask_BxT=mb.get("loss_mask", mask),
                          mode=rl.loss_agg, max_new_tokens=rl.max_new_tokens,
                          batch_tokens=mb["batch_tokens"][0] if "batch_tokens" in mb
                          else None)
  pl, pm = policy_token_loss(logp, mb, rl)
  loss = loss_policy = agg(pl)
  sg = jax.lax.stop_gradient
  metrics = {"loss/policy": loss_policy,
             "policy/clipfrac": masked_mean(pm["clipfrac"], mask),
             "policy/approxkl": masked_mean(pm["approxkl"], mask),
             "policy/entropy": sg(masked_mean(ent, mask))}
  if rl.dual_clip_c:
    metrics["policy/dualclipfrac"] = masked_mean(pm["dualclipfrac"], mask)
  if "tis_weight" in mb:
    metrics["policy/tis_weight"] = masked_mean(mb["tis_weight"], mask)
  if rl.mask_truncated:  # rows whose loss weight mask_truncated zeroed (not padding)
    kept = mb["keep"] > 0 if "keep" in mb else True
    metrics["policy/masked_truncated"] = jnp.mean(
        (jnp.sum(mask, 1) > 0) & (jnp.sum(mb["loss_mask"], 1) == 0) & kept)
  if rl.entropy_coef:
    loss = loss - rl.entropy_coef * agg(ent)
  if kl_loss_coef is not None:
    kl = agg(losses.KL_ESTIMATORS[kl_estimator(rl)](logp, mb["ref_logp"]))
    loss = loss + kl_loss_coef * kl
    metrics["loss/kl"] = sg(kl)
  if value_params is not None:
    v = response_values(fwd.scalar, value_params, mb, prompt_len=rl.prompt_len)
    vl, vm = losses.ppo_value_loss(v, mb["old_values"], mb["returns"], mask,
                                   clip_value=rl.clip_value)
    loss_value = masked_mean(vl, mask)
    loss = loss + rl.vf_coef * loss_value
    metrics["loss/value"] = loss_value
    metrics["value/clipfrac"] = masked_mean(vm["vf_clipfrac"], mask)
  return loss, metrics


def rrhf_loss(policy_params, value_params, mb, *, fwd: Forwards, rl: RLConfig,
              kl_loss_coef: Array | None):
  """RRHF on the K = ``group_size`` sampled completions of each prompt (sequence sums
  of temperature-1 token log-probs); no value model, no KL term."""
  del value_params, kl_loss_coef
  logp, _ = response_logprobs(fwd.policy, policy_params, mb, prompt_len=rl.prompt_len,
                              temperature=1.0, chunk_size=rl.logprob_chunk_size,
                              logit_softcap=fwd.logit_softcap)
  mask = mb["mask"].astype(jnp.float32)
  k = rl.group_size
  inputs = losses.RankedLogps(logps=jnp.sum(logp * mask, 1).reshape(-1, k),
                              tokens=jnp.maximum(jnp.sum(mask, 1), 1.0).reshape(-1, k),
                              scores=mb["scores"].reshape(-1, k))
  per_ex, m = losses.rrhf(inputs, rank_weight=rl.rrhf_rank_weight,
                          sft_weight=rl.rrhf_sft_weight,
                          length_penalty=rl.rrhf_length_penalty)
  return jnp.mean(per_ex), {"loss/rrhf": jnp.mean(per_ex),
                            "loss/rank": jnp.mean(m["rank_loss"]),
                            "loss/nll": jnp.mean(m["nll"])}


# ----------------------------------------------------------------------------- algorithms


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """An online algorithm as parts.

  Attributes:
    loss: ``(policy_params, value_params, mb, *, fwd, rl, kl_loss_coef) -> (loss,
      metrics)``; ``value_params`` is None without a value model.
    advantages: ``(rollout, scores_B, kl_coef, *, rl) -> dict`` of [B, N] arrays
      merged into the rollout (``adv``, ``kl``, ``returns``); None when the loss
      reads the scores itself (RRHF).
    uses_value: trains a value model beside the policy.
    kl_in_loss: the loss adds ``kl_coef * k3`` (else any KL term is in the rewards).
    compares_group: compares the ``group_size`` completions of a prompt (needs >= 2).
    keeps_groups: minibatches hold whole groups (the loss ranks within a group).
  """
  loss: Callable
  advantages: Callable | None = None
  uses_value: bool = False
  kl_in_loss: bool = False
  compares_group: bool = False
  keeps_groups: bool = False


ALGORITHMS: dict[str, Algorithm] = {
    "ppo": Algorithm(loss=policy_value_loss, advantages=ppo_advantages, uses_value=True),
    "grpo": Algorithm(loss=policy_value_loss, advantages=grpo_rollout_advantages,
                      kl_in_loss=True, compares_group=True),
    "rloo": Algorithm(loss=policy_value_loss, advantages=rloo_rollout_advantages,
                      compares_group=True),
    "rrhf": Algorithm(loss=rrhf_loss, compares_group=True, keeps_groups=True),
    "online_dpo": Algorithm(loss=rl_distill.online_dpo_loss, kl_in_loss=True,
                            compares_group=True, keeps_groups=True),
    "gkd": Algorithm(loss=rl_distill.gkd_loss),
}


def update_step(policy_state, value_state, mb, kl_coef, base=None, teacher=None, *,
                algorithm: Algorithm, fwd: Forwards, rl: RLConfig,
                optimizer: optax.GradientTransformation):
  """One optimiser step of the policy (and of the value model when ``value_state`` is
  not None) on a minibatch; ``kl_coef`` is traced (adaptive or swept). ``base``: a
  LoRA run's frozen base; the states then hold (and differentiate) only adapters
  (+ the value head). Metrics add the policy's ``update_norm`` and ``param_norm``
  (before the step) for the divergence guard (`hooks.check_iteration`). ``teacher``:
  GKD's frozen teacher params, an input of its loss, never differentiated."""
  fn = functools.partial(algorithm.loss, fwd=fwd, rl=rl,
                         kl_loss_coef=kl_coef if kl_in_loss(rl) and needs_reference(rl)
                         else None, **({} if teacher is None else {"teacher": teacher}))
  on_base = lambda p, v, b: fn(*with_base(p, v, base), b)  # noqa: E731
  if value_state is None:
    (loss, metrics), g_p = jax.value_and_grad(on_base, has_aux=True)(
        policy_state.params, None, mb)
    g_v = None
  else:
    (loss, metrics), (g_p, g_v) = jax.value_and_grad(on_base, argnums=(0, 1),
                                                     has_aux=True)(
        policy_state.params, value_state.params, mb)
  old_params = policy_state.params
  policy_state, skipped = steps_lib.apply_step(policy_state, g_p, loss, optimizer=optimizer)
  update = jax.tree.map(jnp.subtract, policy_state.params, old_params)
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(g_p),
                 skipped=skipped.astype(jnp.float32),
                 update_norm=optax.global_norm(update),
                 param_norm=optax.global_norm(old_params))
  if value_state is not None:
    value_state, _ = steps_lib.apply_step(value_state, g_v, loss, optimizer=optimizer)
  return policy_state, value_state, metrics


# ----------------------------------------------------------------------------- programs


@dataclasses.dataclass(frozen=True)
class Programs:
  """The compiled programs of a run. ``key``: what they were built for (`setup`
  refuses programs built for another architecture, RL section, optimizer or mesh)."""
  key: Any
  sampler: sampling.Sampler
  score: Callable  # (policy, ref, value, reward params, batch) -> scored rollout
  advantages: Callable | None  # (rollout, scores_B, kl_coef) -> adv, kl, (returns)
  update: Callable  # (policy state, value state, minibatch, kl_coef) -> states, metrics
  take: Callable  # (rollout, row indices) -> minibatch


def build_programs(policy: build.Model, scalar: build.Model | None, rl: RLConfig,
                   optimizer, *, rows: int, mesh=None, rules=None,
                   param_shardings: Any = None, key: Any = None,
                   stops: dict[str, Any] | None = None,
                   teacher: build.Model | None = None) -> Programs:
  """Jits the steps above for ``rows`` rollouts per iteration. Without a
  ``mesh`` they run unsharded; with one, activations and minibatches are pinned to
  the batch sharding and the sampler runs on the policy's ``param_shardings``.
  ``stops``: the sampler's stop fields (`jaxalign.generate.stop_tokens` of the run's
  tokenizer); the synthetic task's ids by default. ``teacher``: GKD's (`rl_distill`)."""
  act = None if mesh is None else tfm.ActivationSharding(mesh, rules)
  fwd = Forwards(policy=build.make_forward(policy, act),
                 scalar=None if scalar is None else build.make_forward(scalar, act),
                 logit_softcap=policy.arch.final_logit_softcap, lora=policy.uses_lora,
                 teacher=None if teacher is None else build.make_forward(teacher, act),
                 teacher_softcap=None if teacher is None
                 else teacher.arch.final_logit_softcap)
  algorithm = ALGORITHMS[rl.algorithm]
  score = jax.jit(functools.partial(score_rollout, fwd=fwd, rl=rl))
  stop_ids = sampling.SamplingConfig(**(stops or synthetic.SAMPLING_STOPS)).stop_ids
  advantages = (None if algorithm.advantages is None else jax.jit(functools.partial(
      rollout_advantages, fn=algorithm.advantages, rl=rl, stop_ids=stop_ids)))
  update = jax.jit(functools.partial(update_step, algorithm=algorithm, fwd=fwd,
                                     rl=rl, optimizer=optimizer), donate_argnums=(0, 1))
  take = (jax.jit(take_rows) if mesh is None else
          jax.jit(take_rows, out_shardings=mesh_lib.batch_sharding(mesh)))
  scfg = sampling.SamplingConfig(max_new_tokens=rl.max_new_tokens,
                                 temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p,
                                 **(stops or synthetic.SAMPLING_STOPS))
  sampler = engine_lib.for_rl(rl, policy.arch, scfg, rows=rows, mesh=mesh,
                              param_shardings=param_shardings,
                              lora=policy.lora if policy.uses_lora else None)
  return Programs(key=key, sampler=sampler, score=score, advantages=advantages,
                  update=update, take=take)
