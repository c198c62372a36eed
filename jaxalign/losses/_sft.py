"""Supervised fine-tuning: masked negative log-likelihood."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses._math import check_nll_reduction, nll_per_example
from jaxalign.losses._types import SequenceLogps

Array = jax.Array


def sft(inputs: SequenceLogps, *, length_power: float = 1.0,
        nll_reduction: str = "sequence") -> tuple[Array, dict[str, Array]]:
  r"""Negative log-likelihood of the completion tokens, per sequence.

  ``nll_reduction="sequence"`` (default):

  .. math::
    \ell_i = -\frac{\sum_t \log \pi(y_{i,t} \mid x_i, y_{i,<t})}{n_i^{\,p}}

  where :math:`n_i` is the completion token count and :math:`p` = ``length_power``:
  p = 1 (default) is the per-sequence token mean, so the caller's mean over sequences
  weighs every sequence alike; p = 0 the sum.

  ``nll_reduction="token"``: :math:`\ell_i = -\sum_t \log\pi(y_{i,t}) \cdot E / T`
  with T the completion tokens of the whole batch (``inputs.nll_tokens``) and E its
  example count (``inputs.num_examples``), so the caller's mean over the E examples
  is the batch token mean :math:`-\sum_{i,t}\log\pi(y_{i,t}) / T` (every token weighs
  the same: TRL's SFT loss, the cross-entropy over the batch). The training step
  fills T and E for the whole global batch, so micro-batching and sharding do not
  change it.

  Args:
    inputs: ``SequenceLogps`` with log-prob sums ``logps`` [N] and ``tokens`` [N]
      (build one from [B, T] token log-probs and a mask with
      ``sequence_logps_from_tokens``).
    length_power: exponent p of the length normaliser ("sequence" only).
    nll_reduction: "sequence" or "token".

  Returns:
    ``(losses [N], {"nll": [N], "logps": [N] sums})``; ``nll`` is the per-token NLL
    as the reduction weighs it (its mean is the reported NLL).

  >>> x = SequenceLogps(logps=jnp.array([-6.0]), tokens=jnp.array([3.0]))
  >>> float(sft(x)[0][0])
  2.0
  """
  check_nll_reduction(nll_reduction, length_power, "sft")
  logps = inputs.logps
  tokens = jnp.asarray(inputs.tokens).astype(logps.dtype)
  losses = nll_per_example(logps, tokens, reduction=nll_reduction,
                           length_power=length_power, nll_tokens=inputs.nll_tokens,
                           num_examples=inputs.num_examples)
  nll = losses if nll_reduction == "token" else -logps / tokens
  metrics = {"nll": jax.lax.stop_gradient(nll),
             "logps": jax.lax.stop_gradient(logps)}
  return losses, metrics
