r"""Objectives of on-policy preference learning and distillation (online RL sampler).

* `online_dpo`: DPO on two completions per prompt sampled from the current policy
  and labelled by a judge (Guo et al. 2024, "Direct Language Model Alignment from
  Online AI Feedback", OAIF).
* `generalized_jsd`: the token-level generalised Jensen-Shannon divergence between
  teacher and student next-token distributions (Agarwal et al. 2024, "On-Policy
  Distillation of Language Models: Learning from Self-Generated Mistakes", GKD).

Both are array functions: per-example (per-pair, per-token) values and metrics; the
caller reduces. `jaxalign.ops.divergence` evaluates `generalized_jsd` chunk by
chunk over the sequence from hidden states, so ``[B, T, V]`` is never materialised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def online_dpo(policy_logps_Px2: Array, ref_logps_Px2: Array, scores_Px2: Array, *,
               beta: float | Array) -> tuple[Array, dict[str, Array]]:
  r"""Online DPO (OAIF, Guo et al. 2024) on P sampled pairs.

  The judge's scores order each pair: :math:`y_w` is the higher-scored completion,
  :math:`y_l` the other, and with :math:`\rho = \log\pi_\theta(y) - \log\pi_{ref}(y)`
  (sequence sums; the reference is the initial policy)

  .. math::
    \ell = -\log\sigma\big(\beta(\rho_w - \rho_l)\big)\cdot[s_w \ne s_l]

  Equal scores carry no preference: those pairs' loss is 0 and they are counted
  in ``tie``. Reduce with ``sum(loss) / max(sum(1 - tie), 1)``.

  Args:
    policy_logps_Px2: policy log-prob sums of the two completions of each prompt.
    ref_logps_Px2: the reference's, same layout.
    scores_Px2: the judge's scores (reward function, oracle or reward model).
    beta: DPO's inverse temperature (the KL coefficient of the objective).

  Returns:
    (loss [P], metrics: ``tie`` [P] (1 for a tie), ``margin`` [P] (the implicit
    reward margin :math:`\beta(\rho_w - \rho_l)`), ``accuracy`` [P] (margin > 0),
    ``chosen_reward`` / ``rejected_reward`` [P]; all gradient-free).

  >>> import jax.numpy as jnp
  >>> loss, m = online_dpo(jnp.array([[-1., -2.]]), jnp.array([[-1., -1.]]),
  ...                      jnp.array([[1., 0.]]), beta=1.0)
  >>> round(float(loss[0]), 4)  # -log sigmoid(0 - (-1)) = log(1 + e^-1)
  0.3133
  """
  if policy_logps_Px2.shape[-1] != 2 or ref_logps_Px2.shape != policy_logps_Px2.shape \
      or scores_Px2.shape != policy_logps_Px2.shape:
    raise ValueError(f"online_dpo: expected [P, 2] policy / reference log-probs and "
                     f"scores; got {policy_logps_Px2.shape}, {ref_logps_Px2.shape}, "
                     f"{scores_Px2.shape}.")
  first_wins = scores_Px2[:, 0] > scores_Px2[:, 1]
  valid = (scores_Px2[:, 0] != scores_Px2[:, 1]).astype(policy_logps_Px2.dtype)
  rho = policy_logps_Px2 - ref_logps_Px2
  rho_w = jnp.where(first_wins, rho[:, 0], rho[:, 1])
  rho_l = jnp.where(first_wins, rho[:, 1], rho[:, 0])
  margin = beta * (rho_w - rho_l)
  loss = -jax.nn.log_sigmoid(margin) * valid
  sg = jax.lax.stop_gradient
  return loss, {"tie": 1.0 - valid, "margin": sg(margin),
                "accuracy": (sg(margin) > 0).astype(loss.dtype),
                "chosen_reward": sg(beta * rho_w), "rejected_reward": sg(beta * rho_l)}


def best_worst_pairs(policy_logps_PxG: Array, ref_logps_PxG: Array, scores_PxG: Array
                     ) -> tuple[Array, Array, Array]:
  """Each prompt's highest- and lowest-scored of its G samples as a pair ([P, 2]
  policy log-probs, reference log-probs, scores; column 0 the best), for `online_dpo`
  with G > 2 (OAIF's pairs, picked by the judge as in best-of-G / worst-of-G
  rejection). First index on equal scores; all-equal groups become ties."""
  idx = jnp.stack([jnp.argmax(scores_PxG, 1), jnp.argmin(scores_PxG, 1)], 1)
  take = lambda x: jnp.take_along_axis(x, idx, axis=1)  # noqa: E731
  return take(policy_logps_PxG), take(ref_logps_PxG), take(scores_PxG)


def generalized_jsd(student_logits: Array, teacher_logits: Array, *,
                    beta: float) -> Array:
  r"""Generalised JSD (GKD, Agarwal et al. 2024, eq. 2) over the last axis.

  With teacher :math:`P`, student :math:`Q` and :math:`M = \beta P + (1-\beta) Q`:

  .. math::
    D_{JSD(\beta)}(P \| Q) = \beta\,KL(P \| M) + (1-\beta)\,KL(Q \| M)

  The formula is 0 at :math:`\beta \in \{0, 1\}`; its scaled limits are the two
  KLs (:math:`D/\beta \to KL(P\|Q)` as :math:`\beta \to 0`, :math:`D/(1-\beta) \to
  KL(Q\|P)` as :math:`\beta \to 1`), and those endpoints are what ``beta = 0``
  (forward KL, teacher to student: mode covering) and ``beta = 1`` (reverse KL:
  mode seeking) compute. This is TRL's ``GKDTrainer`` convention
  (``generalized_jsd_loss``: ``beta=0`` -> ``KL(teacher || student)``, ``beta=1``
  -> ``KL(student || teacher)``, mixture ``beta * teacher + (1 - beta) * student``);
  ``beta = 0.5`` is the symmetric JSD. Default in `RLConfig`: ``gkd_beta = 0.5``
  (TRL's default).

  Args:
    student_logits: [..., V] student logits (the distribution trained).
    teacher_logits: [..., V] teacher logits (held fixed by the caller).
    beta: in [0, 1], a Python float (the endpoints are separate formulas).

  Returns:
    [...] the divergence at each position (nats).
  """
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}.")
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  kl = lambda log_a, log_b: jnp.sum(jnp.exp(log_a) * (log_a - log_b), axis=-1)  # noqa: E731
  if beta == 0.0:
    return kl(log_p, log_q)
  if beta == 1.0:
    return kl(log_q, log_p)
  log_m = jnp.logaddexp(log_p + jnp.log(beta), log_q + jnp.log1p(-beta))
  return beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m)
