"""Reward-model objective: Bradley-Terry pairwise logistic loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses._math import pair_metrics
from jaxalign.losses._types import RewardPair

Array = jax.Array


def bradley_terry(inputs: RewardPair, *, margin_scale: float = 1.0,
                  center_coef: float = 0.0) -> tuple[Array, dict[str, Array]]:
  r"""Bradley-Terry reward-model loss with optional margin and reward centring.

  .. math::
    \ell_i = -\log\sigma(r^w_i - r^l_i - s\,m_i) + c\,(r^w_i + r^l_i)^2

  The logistic term is the reward-model loss of InstructGPT (Ouyang et al., 2022,
  eq. 1); the margin :math:`m_i` (``inputs.margin``, scaled by ``margin_scale`` s)
  is Llama 2's (Touvron et al., 2023); the centring term with coefficient
  ``center_coef`` c (default 0, ~1e-2 in the paper) is the auxiliary loss of
  Eisenstein et al., 2023 ("Helping or Herding?"), which pins the rewards' mean
  near zero.

  Returns:
    ``(losses [N], metrics)``; ``rewards/*`` are the raw rewards, ``logps/*`` are
    also the rewards (a reward model has no log-probs; kept for one namespace).

  >>> x = RewardPair(chosen=jnp.array([1.0]), rejected=jnp.array([1.0]))
  >>> round(float(bradley_terry(x)[0][0]), 6)  # -log(1/2)
  0.693147
  """
  chosen, rejected = inputs.chosen, inputs.rejected
  logits = chosen - rejected
  if inputs.margin is not None:
    logits = logits - margin_scale * inputs.margin
  losses = -jax.nn.log_sigmoid(logits) + center_coef * jnp.square(chosen + rejected)
  return losses, pair_metrics(chosen, rejected, chosen, rejected)
