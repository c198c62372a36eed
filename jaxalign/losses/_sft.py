"""Supervised fine-tuning: masked negative log-likelihood."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses._types import SequenceLogps

Array = jax.Array


def sft(inputs: SequenceLogps, *, length_power: float = 1.0
        ) -> tuple[Array, dict[str, Array]]:
  r"""Negative log-likelihood of the completion tokens, per sequence.

  .. math::
    \ell_i = -\frac{\sum_t \log \pi(y_{i,t} \mid x_i, y_{i,<t})}{n_i^{\,p}}

  where :math:`n_i` is the completion token count and :math:`p` = ``length_power``:
  p = 1 (default) is the per-sequence token mean; p = 0 the sum. For the
  token-weighted batch mean of standard SFT, use p = 0 and divide the summed losses
  by the total token count in the caller.

  Args:
    inputs: ``SequenceLogps`` with log-prob sums ``logps`` [N] and ``tokens`` [N]
      (build one from [B, T] token log-probs and a mask with
      ``sequence_logps_from_tokens``).
    length_power: exponent p of the length normaliser.

  Returns:
    ``(losses [N], {"nll": [N] per-token mean NLL, "logps": [N] sums})``.

  >>> x = SequenceLogps(logps=jnp.array([-6.0]), tokens=jnp.array([3.0]))
  >>> float(sft(x)[0][0])
  2.0
  """
  logps = inputs.logps
  tokens = jnp.asarray(inputs.tokens).astype(logps.dtype)
  losses = -logps / tokens**length_power
  metrics = {"nll": jax.lax.stop_gradient(-logps / tokens),
             "logps": jax.lax.stop_gradient(logps)}
  return losses, metrics
