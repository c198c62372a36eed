"""Kahneman-Tversky Optimization (unpaired desirable / undesirable completions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses._types import UnpairedLogps

Array = jax.Array


def kto(inputs: UnpairedLogps, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> tuple[Array, dict[str, Array]]:
  r"""KTO loss (Ethayarajh et al., 2024, eq. 8; TRL's ``KTOTrainer``).

  With :math:`\rho_i = \log\pi(y_i|x_i) - \log\pi_{ref}(y_i|x_i)` and the reference
  point estimated on mismatched pairs :math:`(x_i, y_j)`:

  .. math:: z_0 = \mathrm{sg}\Big(\max\big(0, \tfrac1N\textstyle\sum_i
     \log\pi(y_j|x_i) - \log\pi_{ref}(y_j|x_i)\big)\Big)

  .. math:: \ell_i = \begin{cases}
     \lambda_D\,(1 - \sigma(\beta(\rho_i - z_0))) & y_i\ \text{desirable}\\
     \lambda_U\,(1 - \sigma(\beta(z_0 - \rho_i))) & \text{undesirable}\end{cases}

  The KL estimate is a batch mean (under ``jit`` on a sharded batch that is the
  global batch) over ``inputs.valid`` pairs (all when None); it is stop-gradient
  and clamped at 0, as in the paper. Defaults:
  beta = 0.1, desirable_weight = undesirable_weight = 1 (the paper suggests
  weights with lambda_D n_D / (lambda_U n_U) in [1, 4/3]).

  Returns:
    ``(losses [N], metrics)``. Metrics: ``rewards/chosen`` / ``rewards/rejected``
    and ``logps/chosen`` / ``logps/rejected`` are [N] arrays that are 0 where the
    example is of the other kind; ``mask/chosen`` / ``mask/rejected`` are the
    [N] indicators to average them with (sum(x) / sum(mask)). ``kl`` is the
    batch-level scalar :math:`z_0` (the one scalar metric).

  >>> x = UnpairedLogps(policy=jnp.array([-1.0]), reference=jnp.array([-1.0]),
  ...                   tokens=jnp.array([2.0]), desirable=jnp.array([True]),
  ...                   policy_kl=jnp.array([-3.0]), reference_kl=jnp.array([-3.0]))
  >>> float(kto(x)[0][0])  # rho = z0 = 0: 1 - sigmoid(0)
  0.5
  """
  policy, reference = inputs.policy, inputs.reference
  dtype = jnp.result_type(policy, jnp.float32)
  desirable = jnp.asarray(inputs.desirable).astype(dtype)
  undesirable = 1.0 - desirable
  kl_N = inputs.policy_kl - inputs.reference_kl
  if inputs.valid is None:
    kl = jnp.mean(kl_N)
  else:
    # where(), not a product: padding slots may hold inf / nan.
    valid = jnp.asarray(inputs.valid) > 0
    kl = (jnp.sum(jnp.where(valid, kl_N, 0.0))
          / jnp.maximum(jnp.sum(valid), 1).astype(kl_N.dtype))
  kl = jnp.maximum(kl, 0.0)
  kl = jax.lax.stop_gradient(kl)
  rho = policy - reference
  chosen_losses = 1.0 - jax.nn.sigmoid(beta * (rho - kl))
  rejected_losses = 1.0 - jax.nn.sigmoid(beta * (kl - rho))
  losses = (desirable * desirable_weight * chosen_losses
            + undesirable * undesirable_weight * rejected_losses)
  rewards = jax.lax.stop_gradient(beta * rho)
  logps = jax.lax.stop_gradient(policy)
  metrics = {
      "rewards/chosen": rewards * desirable,
      "rewards/rejected": rewards * undesirable,
      "logps/chosen": logps * desirable,
      "logps/rejected": logps * undesirable,
      "mask/chosen": desirable,
      "mask/rejected": undesirable,
      "kl": kl,
  }
  return losses, metrics
