"""PPO / RLHF pieces: KL estimators, shaped rewards, GAE, clipped losses, KL control,
and group baselines (GRPO, RLOO).

Token-level functions take [B, T] arrays with a completion mask ``mask_BxT`` (1 =
response token) and return [B, T] arrays that are 0 outside the mask; the caller
reduces (masked mean). This is the one place where per-example outputs are
per-token, because PPO's objective is a token-level average.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


# ---------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL Divergence", 2020). With
# log r = log pi_ref - log pi on samples from pi: k1 = -log r,
# k2 = (log r)^2 / 2, k3 = (r - 1) - log r. k1 and k3 are unbiased for KL(pi||ref);
# k3 is also non-negative.


def kl_k1(logp: Array, ref_logp: Array) -> Array:
  """k1 = log pi - log pi_ref (unbiased, high variance, can be negative)."""
  return logp - ref_logp


def kl_k2(logp: Array, ref_logp: Array) -> Array:
  """k2 = (log pi - log pi_ref)^2 / 2 (biased, low variance, >= 0)."""
  return 0.5 * jnp.square(logp - ref_logp)


def kl_k3(logp: Array, ref_logp: Array) -> Array:
  """k3 = exp(log pi_ref - log pi) - 1 - (log pi_ref - log pi) (unbiased, >= 0)."""
  log_r = ref_logp - logp
  return jnp.expm1(log_r) - log_r


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def last_token_index(mask_BxT: Array) -> Array:
  """[B] index of the last response token of each row (0 for an empty row)."""
  T = mask_BxT.shape[-1]
  pos_BxT = jnp.where(mask_BxT > 0, jnp.arange(T), -1)
  return jnp.maximum(jnp.max(pos_BxT, axis=-1), 0)


def kl_penalized_rewards(logp_BxT: Array, ref_logp_BxT: Array, mask_BxT: Array,
                         scores_B: Array, *, kl_coef: float,
                         estimator: str = "k1") -> tuple[Array, Array]:
  r"""Per-token rewards of RLHF PPO (Ziegler et al., 2019; InstructGPT):

  .. math:: r_t = -\beta\,\mathrm{KL}_t + [t = t_{last}]\; R(x, y)

  The reward-model score is added at the last response token of each row.

  Returns:
    ``(rewards_BxT, kl_BxT)``, both 0 outside the mask.
  """
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"kl estimator {estimator!r} is not one of "
                     f"{sorted(KL_ESTIMATORS)}.")
  mask = mask_BxT.astype(logp_BxT.dtype)
  kl_BxT = KL_ESTIMATORS[estimator](logp_BxT, ref_logp_BxT) * mask
  T = logp_BxT.shape[-1]
  is_last_BxT = (jnp.arange(T) == last_token_index(mask_BxT)[:, None]) * mask
  rewards_BxT = -kl_coef * kl_BxT + is_last_BxT * scores_B[:, None]
  return rewards_BxT, kl_BxT


def gae(rewards_BxT: Array, values_BxT: Array, mask_BxT: Array, *,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[Array, Array]:
  r"""Generalised advantage estimation (Schulman et al., 2016) as a reverse scan.

  .. math:: \delta_t = r_t + \gamma V_{t'} - V_t,\quad
     A_t = \delta_t + \gamma\lambda A_{t'}

  where t' is the next *valid* token of the row (V = A = 0 past the last one).
  Masked-out tokens are skipped, not treated as episode ends: GAE runs over each
  row's subsequence of valid tokens, so left padding and masked-out
  environment tokens (multi-turn) are both handled. Defaults gamma = 1,
  lam = 0.95 (InstructGPT / TRL PPO).

  Returns:
    ``(advantages_BxT, returns_BxT)`` with returns = advantages + values; both 0
    outside the mask.

  >>> adv, _ = gae(jnp.array([[0.0, 1.0]]), jnp.array([[0.5, 0.25]]),
  ...              jnp.array([[1, 1]]), gamma=1.0, lam=0.5)
  >>> adv.tolist()  # A_1 = 1 - .25; A_0 = (0 + .25 - .5) + .5 * .75
  [[0.125, 0.75]]
  """
  mask = mask_BxT.astype(rewards_BxT.dtype)
  B = rewards_BxT.shape[0]

  def step(carry, xs):
    next_value, next_adv = carry
    r, v, m = xs
    delta = r + gamma * next_value - v
    adv = delta + gamma * lam * next_adv
    valid = m > 0
    carry = (jnp.where(valid, v, next_value), jnp.where(valid, adv, next_adv))
    return carry, jnp.where(valid, adv, 0.0)

  zeros = jnp.zeros((B,), rewards_BxT.dtype)
  xs = (rewards_BxT.T, values_BxT.T, mask.T)
  _, adv_TxB = jax.lax.scan(step, (zeros, zeros), xs, reverse=True)
  advantages = adv_TxB.T
  return advantages, (advantages + values_BxT) * mask


def masked_whiten(x_BxT: Array, mask_BxT: Array, *, shift_mean: bool = True,
                  eps: float = 1e-8) -> Array:
  """(x - mean) / sqrt(var + eps) with mean and (population) variance over valid
  tokens only; 0 outside the mask. ``shift_mean=False`` adds the mean back (TRL)."""
  mask = mask_BxT.astype(x_BxT.dtype)
  count = jnp.sum(mask)
  mean = jnp.sum(x_BxT * mask) / count
  var = jnp.sum(jnp.square(x_BxT - mean) * mask) / count
  white = (x_BxT - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    white = white + mean
  return white * mask


def ppo_policy_loss(logp_BxT: Array, old_logp_BxT: Array, advantages_BxT: Array,
                    mask_BxT: Array, *, clip_eps: float = 0.2
                    ) -> tuple[Array, dict[str, Array]]:
  r"""PPO clipped surrogate (Schulman et al., 2017, eq. 7), per token.

  .. math:: \ell_t = \max(-A_t\,\rho_t,\ -A_t\,\mathrm{clip}(\rho_t, 1-\epsilon,
     1+\epsilon)),\quad \rho_t = e^{\log\pi - \log\pi_{old}}

  Returns:
    ``(loss_BxT, {"clipfrac": [B,T] 1 where the clipped branch is active,
    "approxkl": [B,T] (log rho)^2 / 2})``; all 0 outside the mask.
  """
  mask = mask_BxT.astype(logp_BxT.dtype)
  log_ratio = logp_BxT - old_logp_BxT
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages_BxT * ratio
  clipped = -advantages_BxT * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = jnp.maximum(unclipped, clipped) * mask
  sg = jax.lax.stop_gradient
  metrics = {
      "clipfrac": sg((clipped > unclipped).astype(mask.dtype) * mask),
      "approxkl": sg(0.5 * jnp.square(log_ratio) * mask),
  }
  return loss, metrics


def ppo_value_loss(values_BxT: Array, old_values_BxT: Array, returns_BxT: Array,
                   mask_BxT: Array, *, clip_value: float = 0.2
                   ) -> tuple[Array, dict[str, Array]]:
  r"""Clipped value loss (as in OpenAI baselines / TRL PPO), per token.

  .. math:: \ell_t = \tfrac12\max\big((V_t - G_t)^2,\ (V^{old}_t +
     \mathrm{clip}(V_t - V^{old}_t, -c, c) - G_t)^2\big)

  Returns ``(loss_BxT, {"vf_clipfrac": [B,T]})``, 0 outside the mask.
  """
  mask = mask_BxT.astype(values_BxT.dtype)
  clipped_values = old_values_BxT + jnp.clip(values_BxT - old_values_BxT,
                                             -clip_value, clip_value)
  loss_unclipped = jnp.square(values_BxT - returns_BxT)
  loss_clipped = jnp.square(clipped_values - returns_BxT)
  loss = 0.5 * jnp.maximum(loss_unclipped, loss_clipped) * mask
  clipfrac = (loss_clipped > loss_unclipped).astype(mask.dtype) * mask
  return loss, {"vf_clipfrac": jax.lax.stop_gradient(clipfrac)}


@flax.struct.dataclass
class KLControllerState:
  """State of the adaptive KL controller: the current KL coefficient beta."""

  kl_coef: Array


def adaptive_kl_init(init_kl_coef: float = 0.2) -> KLControllerState:
  return KLControllerState(kl_coef=jnp.asarray(init_kl_coef, jnp.float32))


def adaptive_kl_update(state: KLControllerState, current_kl: Array, n_steps: int,
                       *, target: float = 6.0, horizon: float = 10000.0
                       ) -> KLControllerState:
  r"""Adaptive KL coefficient (Ziegler et al., 2019, section 2.2). Pure.

  .. math:: e_t = \mathrm{clip}(KL_t / KL_{target} - 1, -0.2, 0.2),\quad
     \beta_{t+1} = \beta_t\,(1 + K_\beta\, e_t),\ K_\beta = n_{steps} / horizon

  ``n_steps`` is the number of samples (episodes) since the last update. Defaults
  target = 6, horizon = 10000, initial beta 0.2 (TRL's PPO defaults).
  """
  error = jnp.clip(current_kl / target - 1.0, -0.2, 0.2)
  return KLControllerState(kl_coef=state.kl_coef * (1.0 + error * n_steps / horizon))


def grpo_advantages(rewards_NxG: Array, *, scale_by_std: bool = True,
                    eps: float = 1e-4) -> Array:
  r"""GRPO group-normalised advantages (Shao et al., 2024, DeepSeekMath, 4.1.2).

  .. math:: A_{n,g} = \frac{r_{n,g} - \mathrm{mean}_g(r_n)}{\mathrm{std}_g(r_n)
     + \epsilon}

  G completions per prompt along axis 1; std is the unbiased (G - 1) estimate, as
  TRL's ``GRPOTrainer``. ``scale_by_std=False`` gives Dr. GRPO's unscaled form.
  """
  G = rewards_NxG.shape[1]
  if G < 2:
    raise ValueError(f"grpo_advantages: need at least 2 completions per prompt "
                     f"(axis 1); got rewards of shape {rewards_NxG.shape}.")
  centred = rewards_NxG - jnp.mean(rewards_NxG, axis=1, keepdims=True)
  if not scale_by_std:
    return centred
  std = jnp.std(rewards_NxG, axis=1, keepdims=True, ddof=1)
  return centred / (std + eps)


def rloo_advantages(rewards_NxG: Array) -> Array:
  r"""RLOO leave-one-out baseline (Kool et al., 2019; Ahmadian et al., 2024).

  .. math:: A_{n,g} = r_{n,g} - \frac{1}{G-1}\sum_{g' \ne g} r_{n,g'}

  >>> rloo_advantages(jnp.array([[1.0, 2.0, 6.0]])).tolist()
  [[-3.0, -1.5, 4.5]]
  """
  G = rewards_NxG.shape[1]
  if G < 2:
    raise ValueError(f"rloo_advantages: need at least 2 completions per prompt "
                     f"(axis 1); got rewards of shape {rewards_NxG.shape}.")
  total = jnp.sum(rewards_NxG, axis=1, keepdims=True)
  return rewards_NxG - (total - rewards_NxG) / (G - 1)
