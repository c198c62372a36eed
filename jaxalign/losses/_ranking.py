"""RRHF: rank responses with a hinge over all score-ordered pairs, plus SFT."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses._types import RankedLogps

Array = jax.Array


def rrhf(inputs: RankedLogps, *, rank_weight: float = 1.0, sft_weight: float = 1.0,
         length_penalty: float = 1.0) -> tuple[Array, dict[str, Array]]:
  r"""RRHF (Yuan et al., 2023, eqs. 1-3).

  The model scores response k by its length-penalised log-prob
  :math:`p_k = \log\pi(y_k|x) / n_k^{\,\lambda}` (``length_penalty`` lambda = 1: the
  average log-prob). With external scores :math:`r_k`:

  .. math:: L_{rank} = \sum_{r_i < r_j} \max(0, p_i - p_j),\quad
     L_{ft} = -\frac{\log\pi(y_{i'}|x)}{n_{i'}},\ i' = \arg\max_k r_k

  .. math:: \ell = w_{rank} L_{rank} + w_{sft} L_{ft}

  Ties in r contribute nothing; on a score tie for the best response the first is
  used. L_ft is the per-token mean NLL of the best response (the RRHF code averages
  over tokens). Defaults: all weights 1, length_penalty = 1.

  Returns:
    ``(losses [N], metrics)``: ``nll``, ``rank_loss``, and the preference namespace
    with chosen = best-scored and rejected = worst-scored response (rewards are the
    model scores p).

  >>> x = RankedLogps(logps=jnp.array([[-4.0, -1.0]]), tokens=jnp.array([[2, 1]]),
  ...                 scores=jnp.array([[1.0, 0.0]]))
  >>> float(rrhf(x)[0][0])  # p = [-2, -1] ranked the wrong way: 1 + NLL 4/2
  3.0
  """
  logps = inputs.logps
  tokens = jnp.asarray(inputs.tokens).astype(jnp.result_type(logps, jnp.float32))
  scores = inputs.scores
  p_NxK = logps / tokens**length_penalty
  # worse_NxKxK[n, i, j]: response i is ranked strictly below response j.
  worse_NxKxK = scores[:, :, None] < scores[:, None, :]
  hinge_NxKxK = jax.nn.relu(p_NxK[:, :, None] - p_NxK[:, None, :])
  rank_loss = jnp.sum(jnp.where(worse_NxKxK, hinge_NxKxK, 0.0), axis=(1, 2))
  best = jnp.argmax(scores, axis=1)
  worst = jnp.argmin(scores, axis=1)
  take = lambda x, idx: jnp.take_along_axis(x, idx[:, None], axis=1)[:, 0]
  best_nll = -take(logps, best) / take(tokens, best)
  losses = rank_weight * rank_loss + sft_weight * best_nll
  sg = jax.lax.stop_gradient
  chosen_r, rejected_r = sg(take(p_NxK, best)), sg(take(p_NxK, worst))
  metrics = {
      "rewards/chosen": chosen_r,
      "rewards/rejected": rejected_r,
      "rewards/margins": chosen_r - rejected_r,
      "rewards/accuracies": (chosen_r > rejected_r).astype(chosen_r.dtype),
      "logps/chosen": sg(take(logps, best)),
      "logps/rejected": sg(take(logps, worst)),
      "nll": sg(best_nll),
      "rank_loss": sg(rank_loss),
  }
  return losses, metrics
