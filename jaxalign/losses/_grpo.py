"""The GRPO loss family: loss aggregations, asymmetric and dual clipping, GSPO's
sequence-level ratio, CISPO, reward scaling, truncated importance sampling and
truncated-completion masks.

Token-level arguments are [B, T] arrays with a completion mask ``mask_BxT`` (1 =
scored token); per-token outputs are 0 outside the mask and the caller reduces them
with `aggregate_token_loss`. ``log_ratio`` is always log pi_theta - log pi_old.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
sg = jax.lax.stop_gradient

LOSS_AGGREGATIONS = ("grpo", "dapo", "dr_grpo", "bnpo")
REWARD_SCALINGS = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")
POLICY_LOSSES = ("ppo_clip", "cispo")


def aggregate_token_loss(loss_BxT: Array, mask_BxT: Array, *, mode: str,
                         max_new_tokens: int | None = None,
                         batch_tokens: Array | None = None) -> Array:
  r"""Reduces per-token losses l_{i,t} (mask m_{i,t}) to a scalar.

  * ``grpo`` (Shao et al. 2024, DeepSeekMath, eq. 3): mean over sequences of
    per-sequence token means, :math:`\frac1B\sum_i \frac{\sum_t m_{it} l_{it}}
    {\max(1, \sum_t m_{it})}`; a row with no scored token adds 0 and still counts in B
    (as TRL's ``loss_type="grpo"``).
  * ``dapo`` (Yu et al. 2025, DAPO, eq. 8, token-level policy gradient):
    :math:`\sum_{i,t} m_{it} l_{it} / N_{tok}` with N_tok the token count of the whole
    sampled batch. ``batch_tokens``: that count's share for this slice of it (the
    rollout's tokens / number of minibatches); None = this batch's own count.
  * ``dr_grpo`` (Liu et al. 2025, "Understanding R1-Zero-like training", Dr. GRPO):
    :math:`\sum_{i,t} m_{it} l_{it} / (B \cdot T_{max})`, T_max = ``max_new_tokens``
    (a constant: no length bias).
  * ``bnpo``: :math:`\sum_{i,t} m_{it} l_{it} / \max(1, \sum_{i,t} m_{it})` over this
    (mini)batch only -- TRL's and ms-swift's ``loss_type="bnpo"`` (the local-batch
    token mean). Xiao et al. 2025 ("BNPO: Beta Normalization Policy Optimization")
    normalise *rewards* with a Beta distribution; that part is not implemented here.
    This is the reduction every online algorithm used before these options existed.
  """
  m = mask_BxT.astype(loss_BxT.dtype)
  total = jnp.sum(loss_BxT * m)
  if mode == "grpo":
    per_seq = jnp.sum(loss_BxT * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    return jnp.mean(per_seq)
  if mode == "dapo":
    n = jnp.sum(m) if batch_tokens is None else batch_tokens
    return total / jnp.maximum(n, 1.0)
  if mode == "dr_grpo":
    if max_new_tokens is None:
      raise ValueError("aggregate_token_loss(mode='dr_grpo') needs max_new_tokens.")
    return total / (loss_BxT.shape[0] * max_new_tokens)
  if mode == "bnpo":
    return total / jnp.maximum(jnp.sum(m), 1.0)
  raise ValueError(f"loss aggregation {mode!r} is not one of {LOSS_AGGREGATIONS}.")


def sequence_log_ratio(logp_BxT: Array, old_logp_BxT: Array, mask_BxT: Array) -> Array:
  r"""GSPO's sequence-level log ratio in its token-level gradient form (Zheng et al.
  2025, "Group Sequence Policy Optimization", eqs. 7 and 13-14):

  .. math:: \log s_i = \frac{1}{|y_i|}\sum_t (\log\pi_\theta - \log\pi_{old})_{i,t},\quad
     \log s_{i,t} = \mathrm{sg}[\log s_i] + \log\pi_\theta(y_{i,t}) -
     \mathrm{sg}[\log\pi_\theta(y_{i,t})]

  Its value is log s_i on every token of row i; its gradient is that of log pi_theta
  per token, so the clipped surrogate on it, reduced with ``grpo`` aggregation, has
  GSPO's gradient s_i A_i / |y_i| sum_t grad log pi (GSPO-token with shared advantages).
  """
  m = mask_BxT.astype(logp_BxT.dtype)
  log_s = jnp.sum((logp_BxT - old_logp_BxT) * m, axis=1) / jnp.maximum(jnp.sum(m, 1), 1.0)
  return (sg(log_s)[:, None] + logp_BxT - sg(logp_BxT)) * m


def clipped_surrogate(log_ratio_BxT: Array, advantages_BxT: Array, mask_BxT: Array, *,
                      epsilon_low: float, epsilon_high: float, dual_clip_c: float = 0.0
                      ) -> tuple[Array, dict[str, Array]]:
  r"""PPO's clipped surrogate (Schulman et al. 2017, eq. 7) with clip-higher (DAPO, Yu
  et al. 2025, eq. 10) and dual clip (Ye et al. 2020, "Mastering Complex Control in
  MOBA Games with Deep RL", eq. 5), per token:

  .. math:: \ell_t = \max(-A_t\rho_t,\ -A_t\,\mathrm{clip}(\rho_t, 1-\epsilon_{low},
     1+\epsilon_{high})),\qquad \ell_t \leftarrow \min(\ell_t, -c A_t)\ \text{if }
     A_t < 0 \text{ and } c > 1

  with :math:`\rho_t = e^{\text{log\_ratio}_t}`. ``dual_clip_c = 0`` turns the dual
  clip off (else it must be > 1). Equal epsilons give PPO's symmetric clip.

  Returns ``(loss_BxT, {"clipfrac", "dualclipfrac"})``, [B, T], 0 outside the mask.
  """
  m = mask_BxT.astype(log_ratio_BxT.dtype)
  ratio = jnp.exp(log_ratio_BxT)
  unclipped = -advantages_BxT * ratio
  clipped = -advantages_BxT * jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  loss = jnp.maximum(unclipped, clipped)
  dual = jnp.zeros_like(loss)
  if dual_clip_c:
    cap = -dual_clip_c * advantages_BxT
    dual = ((advantages_BxT < 0) & (loss > cap)).astype(m.dtype)
    loss = jnp.where(dual > 0, cap, loss)
  metrics = {"clipfrac": sg((clipped > unclipped).astype(m.dtype) * m),
             "dualclipfrac": sg(dual * m)}
  return loss * m, metrics


def cispo_loss(logp_BxT: Array, log_ratio_BxT: Array, advantages_BxT: Array,
               mask_BxT: Array, *, epsilon_low: float, epsilon_high: float
               ) -> tuple[Array, dict[str, Array]]:
  r"""CISPO (MiniMax-M1, MiniMax 2025, eq. 4-5): REINFORCE with a clipped,
  stop-gradient importance-sampling weight, so every token keeps a gradient:

  .. math:: \ell_t = -\mathrm{sg}[\mathrm{clip}(\rho_t, 1-\epsilon_{low},
     1+\epsilon_{high})]\, A_t \log\pi_\theta(y_t)

  The paper sets epsilon_low large (no lower bound): use ``rl.epsilon_low >= 1``.

  Returns ``(loss_BxT, {"clipfrac": tokens whose weight was clipped})``.
  """
  m = mask_BxT.astype(logp_BxT.dtype)
  ratio = sg(jnp.exp(log_ratio_BxT))
  weight = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  loss = -weight * advantages_BxT * logp_BxT
  return loss * m, {"clipfrac": sg((weight != ratio).astype(m.dtype) * m)}


def group_advantages(rewards_NxG: Array, *, scale: str = "group", eps: float = 1e-4
                     ) -> Array:
  r"""Group-relative advantages with a choice of scale (GRPO, Shao et al. 2024;
  Dr. GRPO drops the std, Liu et al. 2025; batch std as in REINFORCE++, Hu 2025):

  .. math:: A_{n,g} = \frac{r_{n,g} - \mathrm{mean}_g(r_n)}{\sigma + \epsilon},\quad
     \sigma = \mathrm{std}_g(r_n)\ (\text{group}),\ \mathrm{std}(r)\ (\text{batch}),\
     \sigma + \epsilon := 1\ (\text{none})

  Standard deviations are the unbiased (ddof = 1) estimates, as TRL's.
  """
  if rewards_NxG.shape[1] < 2:
    raise ValueError(f"group_advantages: need at least 2 completions per prompt "
                     f"(axis 1); got rewards of shape {rewards_NxG.shape}.")
  centred = rewards_NxG - jnp.mean(rewards_NxG, axis=1, keepdims=True)
  if scale == "none":
    return centred
  if scale == "group":
    return centred / (jnp.std(rewards_NxG, axis=1, keepdims=True, ddof=1) + eps)
  if scale == "batch":
    return centred / (jnp.std(rewards_NxG, ddof=1) + eps)
  raise ValueError(f"reward scaling {scale!r} is not one of {REWARD_SCALINGS}.")


def tis_weights(old_logp_BxT: Array, sampler_logp_BxT: Array, mask_BxT: Array, *,
                cap: float) -> Array:
  r"""Truncated importance sampling between the sampler and the learner (Yao et al.
  2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"):

  .. math:: w_t = \min\big(e^{\log\pi_{learner,old}(y_t) - \log\pi_{sampler}(y_t)},
     C\big)

  a constant per-token weight on the policy-gradient loss; 0 outside the mask.
  """
  m = mask_BxT.astype(old_logp_BxT.dtype)
  return sg(jnp.minimum(jnp.exp(old_logp_BxT - sampler_logp_BxT), cap) * m)


def truncated_rows(tokens_BxT: Array, stop_ids: tuple[int, ...]) -> Array:
  """[B] bool: completions with no stop token (they ran into ``max_new_tokens``);
  DAPO's overlong filtering gives them zero loss weight (Yu et al. 2025, 3.4)."""
  stops = jnp.isin(tokens_BxT, jnp.asarray(stop_ids, tokens_BxT.dtype))
  return jnp.logical_not(jnp.any(stops, axis=1))
