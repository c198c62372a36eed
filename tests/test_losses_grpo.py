"""The GRPO loss family (`jaxalign.losses._grpo`) against NumPy float64 transcriptions
of each paper's formula, limit identities between the variants, and jax.grad against
analytic gradients. Inputs are random f32; tolerances: rtol 1e-5 / atol 1e-6 on values
and gradients (f32 rounding of sums of ~30 terms)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses as L

TOL = dict(rtol=1e-5, atol=1e-6)


def _inputs(seed, B=6, T=9, equal_lengths=False):
  """Random log-probs, old log-probs (|log ratio| up to ~0.6, so clips are active),
  per-row advantages broadcast on tokens, and a right-padded mask."""
  rng = np.random.default_rng(seed)
  lengths = np.full(B, T) if equal_lengths else rng.integers(1, T + 1, size=B)
  lengths[0] = T
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
  logp = rng.uniform(-3, -0.1, size=(B, T)).astype(np.float32)
  old = (logp + rng.normal(0, 0.3, size=(B, T))).astype(np.float32)
  adv = np.repeat(rng.normal(size=(B, 1)), T, 1).astype(np.float32)
  return logp, old, adv, mask


# ----------------------------------------------------------------------------- NumPy f64


def np_aggregate(loss, mask, mode, max_new_tokens=None, batch_tokens=None):
  loss, mask = loss.astype(np.float64), mask.astype(np.float64)
  if mode == "grpo":  # DeepSeekMath eq. 3: 1/G sum_i 1/|o_i| sum_t
    return np.mean([(loss[i] * mask[i]).sum() / max(mask[i].sum(), 1)
                    for i in range(len(loss))])
  total = (loss * mask).sum()
  if mode == "dapo":  # DAPO eq. 8: 1/sum_i |o_i| sum_i sum_t
    return total / (mask.sum() if batch_tokens is None else batch_tokens)
  if mode == "dr_grpo":  # Dr. GRPO: constant normaliser rows * max length
    return total / (loss.shape[0] * max_new_tokens)
  return total / mask.sum()  # bnpo: local-batch token mean


def np_clip_loss(ratio, adv, el, eh, c=0.0):
  """-min(r A, clip(r, 1-el, 1+eh) A), then for A < 0 the dual clip -max(., c A)."""
  ratio, adv = ratio.astype(np.float64), adv.astype(np.float64)
  obj = np.minimum(ratio * adv, np.clip(ratio, 1 - el, 1 + eh) * adv)
  if c:
    obj = np.where(adv < 0, np.maximum(obj, c * adv), obj)
  return -obj


@pytest.mark.parametrize("mode", L.LOSS_AGGREGATIONS)
def test_aggregations_match_numpy(mode):
  rng = np.random.default_rng(1)
  _, _, _, mask = _inputs(1)
  mask[3] = 0  # a row with no scored token (e.g. a masked truncated completion)
  loss = rng.normal(size=mask.shape).astype(np.float32)
  got = L.aggregate_token_loss(loss, mask, mode=mode, max_new_tokens=12)
  np.testing.assert_allclose(got, np_aggregate(loss, mask, mode, 12), **TOL)
  if mode == "dapo":  # the whole batch's count, given for a slice of it
    got = L.aggregate_token_loss(loss, mask, mode=mode, batch_tokens=jnp.float32(40.0))
    np.testing.assert_allclose(got, np_aggregate(loss, mask, mode, batch_tokens=40.0),
                               **TOL)


def test_aggregation_identities():
  rng = np.random.default_rng(2)
  _, _, _, mask = _inputs(2)
  loss = rng.normal(size=mask.shape).astype(np.float32)
  agg = lambda mode, m=mask: float(L.aggregate_token_loss(loss, m, mode=mode,
                                                          max_new_tokens=12))
  # dr_grpo = dapo * tokens / (rows * max_new_tokens).
  np.testing.assert_allclose(agg("dr_grpo"),
                             agg("dapo") * mask.sum() / (mask.shape[0] * 12), **TOL)
  assert abs(agg("dapo") - agg("grpo")) > 1e-3  # unequal lengths: they differ
  equal = np.ones_like(mask)
  np.testing.assert_allclose(agg("dapo", equal), agg("grpo", equal), **TOL)
  np.testing.assert_allclose(agg("bnpo"), agg("dapo"), **TOL)  # one batch: the same
  with pytest.raises(ValueError, match="not one of"):
    L.aggregate_token_loss(loss, mask, mode="seq_mean")


@pytest.mark.parametrize("el,eh,c", [(0.2, 0.2, 0.0), (0.2, 0.28, 0.0), (0.1, 0.3, 1.3)])
def test_clipped_surrogate_matches_numpy(el, eh, c):
  logp, old, adv, mask = _inputs(3)
  loss, m = L.clipped_surrogate(jnp.asarray(logp - old), adv, mask, epsilon_low=el,
                                epsilon_high=eh, dual_clip_c=c)
  ratio = np.exp(logp.astype(np.float64) - old)
  want = np_clip_loss(ratio, adv, el, eh, c) * mask
  np.testing.assert_allclose(loss, want, **TOL)
  clipped = -adv * np.clip(ratio, 1 - el, 1 + eh) > -adv * ratio
  np.testing.assert_array_equal(np.asarray(m["clipfrac"]), clipped * mask)
  if c:  # the dual clip binds somewhere in this draw (else the case tests nothing)
    assert np.asarray(m["dualclipfrac"]).sum() > 0


def test_equal_epsilons_are_the_symmetric_ppo_clip():
  logp, old, adv, mask = _inputs(4)
  got, _ = L.clipped_surrogate(jnp.asarray(logp - old), adv, mask, epsilon_low=0.2,
                               epsilon_high=0.2)
  want, _ = L.ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
  np.testing.assert_allclose(got, want, rtol=1e-7, atol=0)


@pytest.mark.parametrize("c", [0.0, 1.3])
def test_clipped_surrogate_gradient_is_analytic(c):
  """d l_t / d log pi_t = -A_t rho_t where the unclipped branch is the active one (and
  the dual clip does not bind), else 0; through a token mean."""
  logp, old, adv, mask = _inputs(5)

  def f(lp):
    loss, _ = L.clipped_surrogate(lp - old, adv, mask, epsilon_low=0.2, epsilon_high=0.28,
                                  dual_clip_c=c)
    return L.aggregate_token_loss(loss, mask, mode="dapo")

  g = jax.grad(f)(jnp.asarray(logp))
  ratio = np.exp(logp.astype(np.float64) - old)
  unclipped_active = -adv * ratio >= -adv * np.clip(ratio, 0.8, 1.28)
  if c:
    unclipped_active &= ~((adv < 0) & (np_clip_loss(ratio, adv, 0.2, 0.28) > -c * adv))
  want = np.where(unclipped_active, -adv * ratio, 0.0) * mask / mask.sum()
  assert (want != 0).any() and ((want == 0) & (mask > 0)).any()  # both branches seen
  np.testing.assert_allclose(g, want, **TOL)


def test_gspo_sequence_ratio_value_and_gradient():
  """Value: log s_i = mean_t log ratio on every token (Zheng et al. 2025, eq. 7). With
  grpo aggregation, the gradient of the token form equals that of GSPO's sequence
  objective 1/B sum_i max(-A_i s_i, -A_i clip(s_i)): -A_i s_i / (B |y_i|) per token
  when unclipped, else 0."""
  logp, old, adv, mask = _inputs(6)
  log_s = ((logp.astype(np.float64) - old) * mask).sum(1) / mask.sum(1)
  got = L.sequence_log_ratio(logp, old, mask)
  np.testing.assert_allclose(got, log_s[:, None] * mask, **TOL)

  def f(lp):
    loss, _ = L.clipped_surrogate(L.sequence_log_ratio(lp, old, mask), adv, mask,
                                  epsilon_low=0.05, epsilon_high=0.05)
    return L.aggregate_token_loss(loss, mask, mode="grpo")

  s, a = np.exp(log_s), adv[:, 0].astype(np.float64)
  seq_loss = np_clip_loss(s, a, 0.05, 0.05)
  np.testing.assert_allclose(f(jnp.asarray(logp)), seq_loss.mean(), **TOL)
  active = -a * s >= -a * np.clip(s, 0.95, 1.05)
  assert active.any() and not active.all()
  want = (np.where(active, -a * s, 0.0) / (len(s) * mask.sum(1)))[:, None] * mask
  np.testing.assert_allclose(jax.grad(f)(jnp.asarray(logp)), want, **TOL)


def test_gspo_ratio_is_the_token_ratio_for_one_token_completions():
  logp, old, _, _ = _inputs(7)
  mask = np.zeros_like(logp)
  mask[:, 0] = 1
  np.testing.assert_allclose(L.sequence_log_ratio(logp, old, mask),
                             (logp - old) * mask, rtol=1e-6, atol=0)


def test_cispo_matches_numpy_with_analytic_gradient():
  """MiniMax-M1 eq. 4: -sg(clip(r, 1-el, 1+eh)) A log pi; gradient -w A per token."""
  logp, old, adv, mask = _inputs(8)

  def f(lp):
    loss, _ = L.cispo_loss(lp, lp - old, adv, mask, epsilon_low=1.0, epsilon_high=0.2)
    return L.aggregate_token_loss(loss, mask, mode="dapo"), loss

  (_, loss), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
  w = np.clip(np.exp(logp.astype(np.float64) - old), 0.0, 1.2)
  np.testing.assert_allclose(loss, -w * adv * logp * mask, **TOL)
  np.testing.assert_allclose(g, -w * adv * mask / mask.sum(), **TOL)
  assert (w == 1.2).any() and (w < 1.2).any()  # the clip binds on some tokens only


@pytest.mark.parametrize("scale", L.REWARD_SCALINGS)
def test_group_advantages_match_numpy(scale):
  r = np.random.default_rng(9).normal(size=(5, 4)).astype(np.float32)
  r64 = r.astype(np.float64)
  centred = r64 - r64.mean(1, keepdims=True)
  want = {"group": centred / (r64.std(1, ddof=1, keepdims=True) + 1e-4),
          "batch": centred / (r64.std(ddof=1) + 1e-4), "none": centred}[scale]
  np.testing.assert_allclose(L.group_advantages(r, scale=scale), want, **TOL)
  if scale != "batch":  # the older function's two settings are the same numbers
    np.testing.assert_allclose(L.grpo_advantages(r, scale_by_std=scale == "group"),
                               L.group_advantages(r, scale=scale), rtol=1e-7)


def test_tis_weights_and_truncated_rows():
  logp, old, _, mask = _inputs(10)
  w = L.tis_weights(old, logp, mask, cap=1.1)
  want = np.minimum(np.exp(old.astype(np.float64) - logp), 1.1) * mask
  np.testing.assert_allclose(w, want, **TOL)
  assert (want == 1.1).any() and ((want < 1.1) & (mask > 0)).any()
  toks = np.array([[5, 6, 7], [5, 3, 0], [9, 9, 4]], np.int32)  # stops: 3 and 4
  np.testing.assert_array_equal(L.truncated_rows(toks, (3, 4)), [True, False, False])
