"""Small numerically careful helpers shared by the losses."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

# Exponents above this are capped (f-divergence DPO): exp(50) ~ 5e21 keeps
# products with beta and the following log-sigmoid finite in float32.
EXP_CAP = 50.0


def log1mexp(x: Array) -> Array:
  """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x.

  Uses log(-expm1(x)) for x > -log 2 and log1p(-exp(x)) otherwise (Maechler,
  "Accurately Computing log(1 - exp(-|a|))", 2012). Each branch only sees inputs
  from its own region, so the discarded branch cannot inject NaN gradients. x is
  capped at -1e-30 (x = 0 would be log 0 = -inf).

  >>> float(log1mexp(jnp.float32(-1e-9)))  # log(1e-9)
  -20.723...
  """
  x = jnp.minimum(x, -1e-30)
  near_zero = x > -math.log(2.0)
  x_near = jnp.where(near_zero, x, -1.0)
  x_far = jnp.where(near_zero, -1.0, x)
  return jnp.where(near_zero, jnp.log(-jnp.expm1(x_near)),
                   jnp.log1p(-jnp.exp(x_far)))


def capped_exp(x: Array, cap: float = EXP_CAP) -> Array:
  """exp(min(x, cap)): finite for any input; zero gradient above the cap."""
  return jnp.exp(jnp.minimum(x, cap))


def as_float(x, like: Array) -> Array:
  return jnp.asarray(x).astype(jnp.result_type(like, jnp.float32))


def pair_metrics(chosen_rewards: Array, rejected_rewards: Array,
                 policy_chosen: Array, policy_rejected: Array) -> dict[str, Array]:
  """The shared metric namespace of every preference loss (all [N], no gradient)."""
  chosen_rewards = jax.lax.stop_gradient(chosen_rewards)
  rejected_rewards = jax.lax.stop_gradient(rejected_rewards)
  return {
      "rewards/chosen": chosen_rewards,
      "rewards/rejected": rejected_rewards,
      "rewards/margins": chosen_rewards - rejected_rewards,
      "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(
          chosen_rewards.dtype),
      "logps/chosen": jax.lax.stop_gradient(policy_chosen),
      "logps/rejected": jax.lax.stop_gradient(policy_rejected),
  }


NLL_REDUCTIONS = ("sequence", "token")


def check_nll_reduction(reduction, length_power, loss_name: str) -> None:
  """Rejects an unknown ``nll_reduction`` or a length power the token form ignores."""
  if not isinstance(reduction, str):
    return  # traced (e.g. vmapped over a sweep): cannot be checked here
  if reduction not in NLL_REDUCTIONS:
    raise ValueError(f"{loss_name}: nll_reduction={reduction!r} is not one of "
                     f"{NLL_REDUCTIONS} ('sequence': mean of per-sequence token means; "
                     "'token': batch token mean).")
  if reduction == "token" and isinstance(length_power, (int, float)) and (
      length_power != 1.0):
    raise ValueError(f"{loss_name}: length_power={length_power!r} has no meaning with "
                     "nll_reduction='token' (every token weighs the same); leave "
                     "length_power at 1.0 or use nll_reduction='sequence'.")


def nll_per_example(logps: Array, tokens: Array, *, reduction: str,
                    length_power=1.0, nll_tokens: Array | None = None,
                    num_examples: Array | None = None) -> Array:
  r"""Per-example NLL terms whose mean over ``num_examples`` is the chosen reduction.

  "sequence": :math:`-\log\pi(y_i) / n_i^{\,p}`, so the caller's mean is the mean of
  per-sequence token means (p = 1). "token": :math:`-\log\pi(y_i)\,E / T`, with E
  = ``num_examples`` and T = ``nll_tokens`` (the whole batch's tokens), so the
  caller's mean over E examples is :math:`-\sum_i \log\pi(y_i) / T`, the token mean
  of the batch. Defaults when None: E = N, T = sum(tokens).
  """
  if reduction == "sequence":
    return -logps / tokens**length_power
  total = jnp.sum(tokens) if nll_tokens is None else as_float(nll_tokens, logps)
  count = logps.shape[0] if num_examples is None else as_float(num_examples, logps)
  return -logps * (count / jnp.maximum(total, 1.0))
