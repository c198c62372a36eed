r"""Pairwise preference objectives: the DPO family, IPO, CPO, ORPO, SimPO.

All share one signature, ``loss(inputs: PairwiseLogps, *, beta, ...) ->
(losses [N], metrics)``, and one metric namespace (``rewards/chosen``,
``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/chosen``, ``logps/rejected``; all [N], gradient-free). Implicit rewards
are ``beta * (log pi - log pi_ref)`` of whatever quantity the loss compares
(sums, or length averages for IPO / SimPO / ORPO / sigmoid_norm).

Notation below: :math:`\rho^w = \log\pi(y_w) - \log\pi_{ref}(y_w)`,
:math:`\rho^l` likewise for the rejected completion (reference terms are 0 when
``reference_free=True``), :math:`h = \rho^w - \rho^l`, :math:`\epsilon` =
``label_smoothing``. Losses that sort over the batch (``aot``, ``aot_unpaired``)
make each example's loss depend on the rest of the batch, as in the paper.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxalign.losses._math import (capped_exp, check_nll_reduction, log1mexp,
                                   nll_per_example, pair_metrics)
from jaxalign.losses._types import PairwiseLogps

Array = jax.Array
LossOut = tuple[Array, dict[str, Array]]
_log_sigmoid = jax.nn.log_sigmoid


def _log_ratios(inputs: PairwiseLogps, reference_free: bool,
                loss_name: str) -> tuple[Array, Array]:
  """(rho_chosen, rho_rejected): policy minus reference log-prob sums."""
  if reference_free:
    return inputs.policy_chosen, inputs.policy_rejected
  if inputs.reference_chosen is None or inputs.reference_rejected is None:
    raise ValueError(
        f"loss '{loss_name}' needs reference log-probs: set "
        "PairwiseLogps.reference_chosen / reference_rejected, or pass "
        "reference_free=True to drop the reference model.")
  return (inputs.policy_chosen - inputs.reference_chosen,
          inputs.policy_rejected - inputs.reference_rejected)


def _tokens(inputs: PairwiseLogps) -> tuple[Array, Array]:
  dtype = jnp.result_type(inputs.policy_chosen, jnp.float32)
  return (jnp.asarray(inputs.chosen_tokens).astype(dtype),
          jnp.asarray(inputs.rejected_tokens).astype(dtype))


def _smoothed_sigmoid(logits: Array, label_smoothing) -> Array:
  """-(1 - eps) log sig(z) - eps log sig(-z): BCE with a noisy label (cDPO)."""
  return (-(1.0 - label_smoothing) * _log_sigmoid(logits)
          - label_smoothing * _log_sigmoid(-logits))


def _check_range(value, low: float, high: float, what: str,
                 include_low: bool = False) -> None:
  """Rejects a concrete (Python) hyperparameter outside (low, high) or [low, high).

  Traced values (e.g. under ``jax.vmap`` over a sweep) cannot be checked here.
  """
  if not isinstance(value, (int, float)):
    return
  above_low = value >= low if include_low else value > low
  if not (above_low and value < high):
    bracket = "[" if include_low else "("
    raise ValueError(f"{what}={value!r} must lie in {bracket}{low}, {high}).")


def _with_metrics(losses: Array, beta, rho_w: Array, rho_l: Array,
                  inputs: PairwiseLogps) -> LossOut:
  return losses, pair_metrics(beta * rho_w, beta * rho_l, inputs.policy_chosen,
                              inputs.policy_rejected)


def dpo(inputs: PairwiseLogps, *, beta: float = 0.1, label_smoothing: float = 0.0,
        reference_free: bool = False) -> LossOut:
  r"""Direct Preference Optimization, sigmoid loss with optional cDPO smoothing.

  .. math:: \ell = -(1-\epsilon)\log\sigma(\beta h) - \epsilon\log\sigma(-\beta h)

  Rafailov et al., 2023 (eq. 7); conservative DPO (label noise rate
  :math:`\epsilon`) from Mitchell, 2023, "A note on DPO with noisy preferences".
  Defaults: beta = 0.1, label_smoothing = 0 (plain DPO), as in TRL.

  >>> x = PairwiseLogps(jnp.array([-1.0]), jnp.array([-1.0]), jnp.array([1]),
  ...                   jnp.array([1]), jnp.array([-1.0]), jnp.array([-1.0]))
  >>> round(float(dpo(x)[0][0]), 6)  # h = 0: -log(1/2)
  0.693147
  """
  rho_w, rho_l = _log_ratios(inputs, reference_free, "dpo")
  losses = _smoothed_sigmoid(beta * (rho_w - rho_l), label_smoothing)
  return _with_metrics(losses, beta, rho_w, rho_l, inputs)


def ipo(inputs: PairwiseLogps, *, beta: float = 0.1,
        reference_free: bool = False) -> LossOut:
  r"""Identity Preference Optimisation (Azar et al., 2023, eq. 17).

  .. math:: \ell = \left(\bar h - \frac{1}{2\beta}\right)^2,\quad
     \bar h = \frac{\rho^w}{n_w} - \frac{\rho^l}{n_l}

  with length-averaged log ratios (as TRL does for IPO). The loss is minimal (zero)
  at :math:`\bar h = 1/(2\beta)`. Default beta = 0.1 (TRL; beta is the paper's tau).

  >>> x = PairwiseLogps(jnp.array([-1.0]), jnp.array([-4.0]), jnp.array([1]),
  ...                   jnp.array([2]), jnp.array([-2.0]), jnp.array([-2.0]))
  >>> float(ipo(x, beta=0.5)[0][0])  # (1 - (-1) - 1)^2
  1.0
  """
  rho_w, rho_l = _log_ratios(inputs, reference_free, "ipo")
  n_w, n_l = _tokens(inputs)
  avg_w, avg_l = rho_w / n_w, rho_l / n_l
  losses = jnp.square(avg_w - avg_l - 0.5 / beta)
  return _with_metrics(losses, beta, avg_w, avg_l, inputs)


def hinge(inputs: PairwiseLogps, *, beta: float = 0.1,
          reference_free: bool = False) -> LossOut:
  r"""SLiC-HF hinge loss on the DPO log ratio (Zhao et al., 2023; TRL "hinge").

  .. math:: \ell = \max(0, 1 - \beta h)

  beta is the inverse of SLiC's margin delta. Default beta = 0.1.
  """
  rho_w, rho_l = _log_ratios(inputs, reference_free, "hinge")
  losses = jax.nn.relu(1.0 - beta * (rho_w - rho_l))
  return _with_metrics(losses, beta, rho_w, rho_l, inputs)


def robust(inputs: PairwiseLogps, *, beta: float = 0.1, label_smoothing: float = 0.0,
           reference_free: bool = False) -> LossOut:
  r"""Robust DPO (Chowdhury et al., 2024, "Provably Robust DPO"), unbiased under
  preference flips with rate :math:`\epsilon < 1/2`.

  .. math:: \ell = \frac{-(1-\epsilon)\log\sigma(\beta h)
                   + \epsilon\log\sigma(-\beta h)}{1 - 2\epsilon}

  Equal to DPO at epsilon = 0. Defaults: beta = 0.1, label_smoothing = 0.
  """
  _check_range(label_smoothing, 0.0, 0.5, "robust: label_smoothing",
               include_low=True)
  rho_w, rho_l = _log_ratios(inputs, reference_free, "robust")
  z = beta * (rho_w - rho_l)
  losses = ((-(1.0 - label_smoothing) * _log_sigmoid(z)
             + label_smoothing * _log_sigmoid(-z)) / (1.0 - 2.0 * label_smoothing))
  return _with_metrics(losses, beta, rho_w, rho_l, inputs)


def exo_pair(inputs: PairwiseLogps, *, beta: float = 0.1,
             label_smoothing: float = 1e-3, reference_free: bool = False) -> LossOut:
  r"""EXO, pairwise form (Ji et al., 2024, "Towards Efficient Exact Optimization").

  Reverse KL between the model's pair distribution :math:`\sigma(\pm\beta h)` and
  the smoothed label distribution :math:`(1-\epsilon, \epsilon)`:

  .. math:: \ell = \sigma(\beta h)\,[\log\sigma(\beta h) - \log(1-\epsilon)]
     + \sigma(-\beta h)\,[\log\sigma(-\beta h) - \log\epsilon]

  epsilon must be in (0, 1); default 1e-3 (TRL's replacement for 0). beta = 0.1.
  """
  _check_range(label_smoothing, 0.0, 1.0, "exo_pair: label_smoothing")
  rho_w, rho_l = _log_ratios(inputs, reference_free, "exo_pair")
  z = beta * (rho_w - rho_l)
  losses = (jax.nn.sigmoid(z) * (_log_sigmoid(z) - jnp.log1p(-label_smoothing))
            + jax.nn.sigmoid(-z) * (_log_sigmoid(-z) - jnp.log(label_smoothing)))
  return _with_metrics(losses, beta, rho_w, rho_l, inputs)


def nca_pair(inputs: PairwiseLogps, *, beta: float = 0.1,
             reference_free: bool = False) -> LossOut:
  r"""NCA, pairwise form (Chen et al., 2024, "Noise Contrastive Alignment").

  .. math:: \ell = -\log\sigma(\beta\rho^w) - \tfrac12\log\sigma(-\beta\rho^w)
                   - \tfrac12\log\sigma(-\beta\rho^l)

  Default beta = 0.1.
  """
  rho_w, rho_l = _log_ratios(inputs, reference_free, "nca_pair")
  r_w, r_l = beta * rho_w, beta * rho_l
  losses = (-_log_sigmoid(r_w) - 0.5 * _log_sigmoid(-r_w)
            - 0.5 * _log_sigmoid(-r_l))
  return _with_metrics(losses, beta, rho_w, rho_l, inputs)


def bco_pair(inputs: PairwiseLogps, *, beta: float = 0.1, delta: float = 0.0,
             reference_free: bool = False) -> LossOut:
  r"""BCO, pairwise form (Jung et al., 2024, "Binary Classifier Optimization").

  .. math:: \ell = -\log\sigma(\beta\rho^w - \delta) - \log\sigma(-(\beta\rho^l
     - \delta))

  :math:`\delta` is the running mean of the implicit rewards over past batches. It
  is passed in explicitly (no hidden state): the training step keeps it in
  ``TrainState.loss_state`` (checkpointed), passes it as ``delta`` (a
  ``loss_hparams.delta`` in a config is an error) and updates it after each step from
  the batch's ``rewards/*`` (`jaxalign.train.objectives.update_loss_state`; by hand:
  ``bco_delta_update``).
  Defaults: beta = 0.1, delta = 0 (the first step). TRL <= 0.28 updated its running
  mean with the current batch's mean before computing the loss (one observation per
  batch); here delta covers past batches only, weighted by reward count. TRL >= 0.29
  dropped delta (always 0).
  """
  rho_w, rho_l = _log_ratios(inputs, reference_free, "bco_pair")
  losses = (-_log_sigmoid(beta * rho_w - delta)
            - _log_sigmoid(-(beta * rho_l - delta)))
  return _with_metrics(losses, beta, rho_w, rho_l, inputs)


def bco_delta_update(mean: Array, count: Array, chosen_rewards: Array,
                     rejected_rewards: Array) -> tuple[Array, Array]:
  """Running mean of all implicit rewards seen so far: (mean, count) in and out.

  Combines the stored mean of ``count`` rewards with this batch's 2N rewards
  (exact running mean, as TRL's ``RunningMoments`` mean). Pure; pass
  ``jax.lax.stop_gradient`` values.
  """
  batch = jnp.concatenate([chosen_rewards, rejected_rewards])
  return running_mean_update(mean, count, jnp.mean(batch), batch.shape[0])


def running_mean_update(mean: Array, count: Array, batch_mean: Array,
                        batch_count) -> tuple[Array, Array]:
  """(mean, count) of ``count`` values joined by ``batch_count`` values of mean
  ``batch_mean``: mean + (batch_mean - mean) * batch_count / (count + batch_count).
  A batch of 0 values leaves the mean unchanged."""
  total = count + batch_count
  weight = jnp.asarray(batch_count, jnp.float32) / jnp.maximum(
      jnp.asarray(total, jnp.float32), 1.0)
  return mean + (batch_mean - mean) * weight, total


def sppo_hard(inputs: PairwiseLogps, *, beta: float = 0.1,
              reference_free: bool = False) -> LossOut:
  r"""SPPO with hard (win = 1, loss = 0) probabilities (Wu et al., 2024).

  .. math:: \ell = \left(\rho^w - \frac{1}{2\beta}\right)^2
                   + \left(\rho^l + \frac{1}{2\beta}\right)^2

  beta is the inverse of the paper's eta. Default beta = 0.1.
  """
  rho_w, rho_l = _log_ratios(inputs, reference_free, "sppo_hard")
  losses = jnp.square(rho_w - 0.5 / beta) + jnp.square(rho_l + 0.5 / beta)
  return _with_metrics(losses, beta, rho_w, rho_l, inputs)


def aot(inputs: PairwiseLogps, *, beta: float = 0.1, label_smoothing: float = 0.0,
        reference_free: bool = False) -> LossOut:
  r"""AOT, paired (Melnyk et al., 2024, "Distributional Preference Alignment of
  LLMs via Optimal Transport").

  Sorts the policy log ratios :math:`\log\pi(y_w)-\log\pi(y_l)` and the reference
  log ratios separately over the batch and applies the (smoothed) sigmoid loss to
  the difference of the sorted vectors (first-order stochastic dominance via the
  1-D optimal transport map). Loss i refers to the i-th order statistics.
  """
  rho_w, rho_l = _log_ratios(inputs, reference_free, "aot")
  policy = inputs.policy_chosen - inputs.policy_rejected
  reference = policy - (rho_w - rho_l)
  z = beta * (jnp.sort(policy) - jnp.sort(reference))
  return _with_metrics(_smoothed_sigmoid(z, label_smoothing), beta, rho_w, rho_l,
                       inputs)


def aot_unpaired(inputs: PairwiseLogps, *, beta: float = 0.1,
                 label_smoothing: float = 0.0, reference_free: bool = False
                 ) -> LossOut:
  r"""AOT for unpaired data (TRL's ``aot_pair``): sorts :math:`\rho^w` and
  :math:`\rho^l` separately over the batch and applies the (smoothed) sigmoid loss
  to ``beta * (sort(rho_w) - sort(rho_l))``.
  """
  rho_w, rho_l = _log_ratios(inputs, reference_free, "aot_unpaired")
  z = beta * (jnp.sort(rho_w) - jnp.sort(rho_l))
  return _with_metrics(_smoothed_sigmoid(z, label_smoothing), beta, rho_w, rho_l,
                       inputs)


def apo_zero(inputs: PairwiseLogps, *, beta: float = 0.1,
             reference_free: bool = False) -> LossOut:
  r"""APO-zero (D'Oosterlinck et al., 2024, "Anchored Preference Optimization"):
  push chosen likelihood up and rejected down, for chosen outputs better than the
  model's.

  .. math:: \ell = 1 - \sigma(\beta\rho^w) + \sigma(\beta\rho^l)
  """
  rho_w, rho_l = _log_ratios(inputs, reference_free, "apo_zero")
  losses = 1.0 - jax.nn.sigmoid(beta * rho_w) + jax.nn.sigmoid(beta * rho_l)
  return _with_metrics(losses, beta, rho_w, rho_l, inputs)


def apo_down(inputs: PairwiseLogps, *, beta: float = 0.1,
             reference_free: bool = False) -> LossOut:
  r"""APO-down (D'Oosterlinck et al., 2024): both likelihoods go down, the
  rejected one more, for chosen outputs worse than the model's.

  .. math:: \ell = \sigma(\beta\rho^w) + 1 - \sigma(\beta(\rho^w - \rho^l))
  """
  rho_w, rho_l = _log_ratios(inputs, reference_free, "apo_down")
  losses = (jax.nn.sigmoid(beta * rho_w)
            + 1.0 - jax.nn.sigmoid(beta * (rho_w - rho_l)))
  return _with_metrics(losses, beta, rho_w, rho_l, inputs)


def discopop(inputs: PairwiseLogps, *, beta: float = 0.1, tau: float = 0.05,
             reference_free: bool = False) -> LossOut:
  r"""DiscoPOP, the log-ratio modulated loss (Chris Lu et al., 2024,
  "Discovering Preference Optimization Algorithms with LLMs").

  With :math:`z = \beta h` and :math:`m = \sigma(z/\tau)`:

  .. math:: \ell = (1 - m)\,(-\log\sigma(z)) + m\,e^{-z}

  :math:`m e^{-z}` is evaluated as :math:`\exp(\log\sigma(z/\tau) - z)` so it stays
  finite for large negative z (needs tau < 1). Defaults: beta = 0.1 (TRL; the
  paper used 0.05), tau = 0.05.
  """
  rho_w, rho_l = _log_ratios(inputs, reference_free, "discopop")
  z = beta * (rho_w - rho_l)
  modulation = jax.nn.sigmoid(z / tau)
  losses = ((1.0 - modulation) * -_log_sigmoid(z)
            + jnp.exp(_log_sigmoid(z / tau) - z))
  return _with_metrics(losses, beta, rho_w, rho_l, inputs)


def sigmoid_norm(inputs: PairwiseLogps, *, beta: float = 0.1,
                 reference_free: bool = False) -> LossOut:
  r"""DPO on length-normalised log ratios (TRL ``sigmoid_norm``).

  .. math:: \ell = -\log\sigma\left(\beta\left(\frac{\rho^w}{n_w}
     - \frac{\rho^l}{n_l}\right)\right)
  """
  rho_w, rho_l = _log_ratios(inputs, reference_free, "sigmoid_norm")
  n_w, n_l = _tokens(inputs)
  avg_w, avg_l = rho_w / n_w, rho_l / n_l
  losses = -_log_sigmoid(beta * (avg_w - avg_l))
  return _with_metrics(losses, beta, avg_w, avg_l, inputs)


# f'(u) for the f-divergences of Wang et al., 2023, written in terms of
# log u = rho, as a difference f'(u_w) - f'(u_l). The table selects a formula; it
# does not switch algorithms.
def _fprime_diff_reverse_kl(rho_w, rho_l, alpha):
  del alpha  # f'(u) = log u + 1
  return rho_w - rho_l


def _fprime_diff_forward_kl(rho_w, rho_l, alpha):
  del alpha  # f(u) = -log u, f'(u) = -1/u
  return capped_exp(-rho_l) - capped_exp(-rho_w)


def _fprime_diff_js(rho_w, rho_l, alpha):
  del alpha  # f'(u) = log(2u / (1 + u))
  return (rho_w - rho_l) - (jax.nn.softplus(rho_w) - jax.nn.softplus(rho_l))


def _fprime_diff_alpha(rho_w, rho_l, alpha):
  # f'(u) = (1 - u^-alpha) / alpha, 0 < alpha < 1.
  return (capped_exp(-alpha * rho_l) - capped_exp(-alpha * rho_w)) / alpha


F_DIVERGENCES: dict[str, Callable[[Array, Array, float], Array]] = {
    "reverse_kl": _fprime_diff_reverse_kl,
    "forward_kl": _fprime_diff_forward_kl,
    "js": _fprime_diff_js,
    "alpha": _fprime_diff_alpha,
}


def f_dpo(inputs: PairwiseLogps, *, beta: float = 0.1,
          divergence: str = "reverse_kl", alpha: float = 0.5,
          label_smoothing: float = 0.0, reference_free: bool = False) -> LossOut:
  r"""f-DPO: DPO under a general f-divergence (Wang et al., 2023, "Beyond Reverse
  KL", Theorem 1).

  .. math:: \ell = -\log\sigma\big(\beta f'(u_w) - \beta f'(u_l)\big),\quad
     u = \pi/\pi_{ref} = e^{\rho}

  ``divergence``: "reverse_kl" (f' = log u + 1: standard DPO), "forward_kl"
  (f' = -1/u), "js" (f' = log(2u/(1+u))), "alpha" (f' = (1 - u^-alpha)/alpha;
  alpha -> 0 gives reverse KL, alpha = 1 forward KL). Exponentials are capped at
  exp(50) so extreme log ratios stay finite. Defaults: beta = 0.1, alpha = 0.5.

  TRL's alpha is the other end: TRL >= 0.29 writes f'(t) = (t^(a-1) - 1)/(a-1)
  (``f_alpha_divergence_coef`` = a; a = 1 is reverse KL), which is this f' at
  alpha = 1 - a. TRL <= 0.28 used this convention ((u_l^-a - u_w^-a)/a). The two
  defaults (0.5) coincide.
  """
  if divergence not in F_DIVERGENCES:
    raise ValueError(f"f_dpo: divergence={divergence!r} is not one of "
                     f"{sorted(F_DIVERGENCES)}.")
  rho_w, rho_l = _log_ratios(inputs, reference_free, "f_dpo")
  z = beta * F_DIVERGENCES[divergence](rho_w, rho_l, alpha)
  return _with_metrics(_smoothed_sigmoid(z, label_smoothing), beta, rho_w, rho_l,
                       inputs)


def _chosen_nll(inputs: PairwiseLogps, reduction: str, length_power=1.0) -> Array:
  """The chosen completion's NLL term per pair, reduced as ``reduction`` says."""
  n_w, _ = _tokens(inputs)
  return nll_per_example(inputs.policy_chosen, n_w, reduction=reduction,
                         length_power=length_power, nll_tokens=inputs.nll_tokens,
                         num_examples=inputs.num_examples)


def nll(inputs: PairwiseLogps, *, length_power: float = 1.0,
        nll_reduction: str = "sequence") -> LossOut:
  r"""NLL of the chosen completion, for combinations such as RPO (DPO + NLL).

  "sequence" (default; the RPO paper, Pang et al., 2024, "Iterative Reasoning
  Preference Optimization", which normalises each sequence's NLL by its length):

  .. math:: \ell = -\log\pi(y_w) / n_w^{\,p}

  with p = ``length_power`` = 1, so the batch mean weighs every pair alike.
  "token": ``-log pi(y_w) * E / T`` with T the chosen tokens of the whole batch
  (``inputs.nll_tokens``) and E its pair count, so the batch mean is
  :math:`-\sum_i\log\pi(y_{w,i}) / T`: every chosen token weighs the same. TRL's
  ``rpo_alpha`` term (a cross-entropy over the chosen tokens) is this token form,
  not the default; see docs/losses.md.
  """
  check_nll_reduction(nll_reduction, length_power, "nll")
  n_w, _ = _tokens(inputs)
  losses = _chosen_nll(inputs, nll_reduction, length_power)
  metric = losses if nll_reduction == "token" else -inputs.policy_chosen / n_w
  return losses, {"nll": jax.lax.stop_gradient(metric)}


def cpo(inputs: PairwiseLogps, *, beta: float = 0.1, alpha: float = 1.0,
        label_smoothing: float = 0.0, nll_reduction: str = "sequence") -> LossOut:
  r"""Contrastive Preference Optimization (Xu et al., 2024), reference-free.

  .. math:: \ell = -(1-\epsilon)\log\sigma(\beta(\log\pi(y_w) - \log\pi(y_l)))
     - \epsilon\log\sigma(-\cdot) + \alpha\,\frac{-\log\pi(y_w)}{n_w}

  The preference term is reference-free DPO on log-prob sums; the behaviour-cloning
  term is the chosen completion's NLL weighted by alpha (TRL's ``cpo_alpha``):
  per-token mean per pair ("sequence", default), or with ``nll_reduction="token"``
  the batch token mean over chosen tokens (as TRL's cross-entropy; see `nll`).
  Defaults: beta = 0.1, alpha = 1.0, label_smoothing = 0. Metrics add ``nll``;
  rewards are ``beta * log pi``.
  """
  check_nll_reduction(nll_reduction, 1.0, "cpo")
  pref, metrics = dpo(inputs, beta=beta, label_smoothing=label_smoothing,
                      reference_free=True)
  chosen_nll = _chosen_nll(inputs, nll_reduction)
  metrics["nll"] = jax.lax.stop_gradient(chosen_nll)
  return pref + alpha * chosen_nll, metrics


def simpo(inputs: PairwiseLogps, *, beta: float = 2.0, gamma: float = 0.5
          ) -> LossOut:
  r"""SimPO (Meng et al., 2024): reference-free, length-averaged, with margin.

  .. math:: \ell = -\log\sigma\left(\frac{\beta}{n_w}\log\pi(y_w)
     - \frac{\beta}{n_l}\log\pi(y_l) - \gamma\right)

  Defaults: beta = 2.0 (paper range 2.0-2.5), gamma = 0.5 (TRL's ``simpo_gamma``,
  an absolute margin). Rewards are ``beta * log pi / n``.

  >>> x = PairwiseLogps(jnp.array([-2.0]), jnp.array([-2.0]), jnp.array([2]),
  ...                   jnp.array([2]))
  >>> round(float(simpo(x, gamma=0.0)[0][0]), 6)  # equal averages: -log(1/2)
  0.693147
  """
  n_w, n_l = _tokens(inputs)
  avg_w, avg_l = inputs.policy_chosen / n_w, inputs.policy_rejected / n_l
  losses = -_log_sigmoid(beta * (avg_w - avg_l) - gamma)
  return _with_metrics(losses, beta, avg_w, avg_l, inputs)


def orpo(inputs: PairwiseLogps, *, beta: float = 0.1,
         nll_reduction: str = "sequence") -> LossOut:
  r"""ORPO (Hong et al., 2024): NLL plus an odds-ratio preference term.

  With length-averaged log-probs :math:`a = \log\pi(y)/n` and
  :math:`\log\mathrm{odds}(y) = a - \log(1 - e^{a})`:

  .. math:: \ell = -a_w - \beta\log\sigma(\log\mathrm{odds}(y_w)
     - \log\mathrm{odds}(y_l))

  :math:`\log(1-e^a)` uses ``log1mexp``, finite as a -> 0^-. beta is the paper's
  lambda; default 0.1 (TRL). Metrics add ``nll``, ``log_odds_ratio`` (the
  log-sigmoid term) and ``log_odds_chosen`` (the log odds difference). Rewards are
  ``beta * a``. ``nll_reduction="token"`` replaces the NLL term :math:`-a_w` by the
  batch token mean over chosen tokens (TRL's cross-entropy; see `nll`); the odds
  stay on per-sequence averages.
  """
  check_nll_reduction(nll_reduction, 1.0, "orpo")
  n_w, n_l = _tokens(inputs)
  avg_w, avg_l = inputs.policy_chosen / n_w, inputs.policy_rejected / n_l
  log_odds = (avg_w - avg_l) - (log1mexp(avg_w) - log1mexp(avg_l))
  ratio = _log_sigmoid(log_odds)
  chosen_nll = _chosen_nll(inputs, nll_reduction)
  losses = chosen_nll - beta * ratio
  losses, metrics = _with_metrics(losses, beta, avg_w, avg_l, inputs)
  metrics["nll"] = jax.lax.stop_gradient(chosen_nll)
  metrics["log_odds_ratio"] = jax.lax.stop_gradient(ratio)
  metrics["log_odds_chosen"] = jax.lax.stop_gradient(log_odds)
  return losses, metrics
