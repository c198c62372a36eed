"""SFT, Bradley-Terry, KTO and RRHF: hand values, NumPy oracles, gradients."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxalign import losses as L

sig = lambda x: 1 / (1 + math.exp(-x))
sp = lambda x: math.log1p(math.exp(x))  # -log sig(x) = sp(-x)


def np_logsig(x):
  return -np.logaddexp(0.0, -x)


def np_sig(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


# --- SFT ---------------------------------------------------------------------


def test_sft_hand_values_and_mask_equals_slice():
  # Tokens log-probs [-1, -2, -3, (pad)] -> sum -6 over 3 tokens: mean NLL 2, sum 6.
  logp = jnp.array([[-1.0, -2.0, -3.0, -99.0]])
  mask = jnp.array([[1, 1, 1, 0]])
  seq = jax.jit(L.sequence_logps_from_tokens)(logp, mask)
  np.testing.assert_allclose(seq.logps, [-6.0])
  np.testing.assert_allclose(seq.tokens, [3.0])
  np.testing.assert_allclose(jax.jit(L.sft)(seq)[0], [2.0])
  np.testing.assert_allclose(L.sft(seq, length_power=0.0)[0], [6.0])
  # Masking equals slicing the padding away.
  sliced = L.sequence_logps_from_tokens(logp[:, :3], jnp.ones((1, 3)))
  np.testing.assert_allclose(L.sft(sliced)[0], L.sft(seq)[0])


def test_sft_numpy_oracle_and_grads_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    logp = -rng.exponential(size=(4, 7))
    mask = (rng.uniform(size=(4, 7)) < 0.7).astype(np.float64)
    mask[:, 0] = 1.0
    expected = -(logp * mask).sum(1) / mask.sum(1) ** 0.5
    f = jax.jit(lambda lp: L.sft(L.sequence_logps_from_tokens(lp, mask),
                                 length_power=0.5)[0])
    np.testing.assert_allclose(f(jnp.asarray(logp)), expected, rtol=1e-6)
    check_grads(jax.jit(lambda lp: jnp.sum(f(lp))), (jnp.asarray(logp),), order=1,
                modes=("rev",))


# --- Bradley-Terry -----------------------------------------------------------


def test_bradley_terry_hand_value():
  # r_w = 2, r_l = 1, margin 0.5: -log sig(2 - 1 - 0.5) + 0.1 (2 + 1)^2
  x = L.RewardPair(jnp.array([2.0]), jnp.array([1.0]), jnp.array([0.5]))
  got, m = jax.jit(lambda x: L.bradley_terry(x, center_coef=0.1))(x)
  np.testing.assert_allclose(got, [sp(-0.5) + 0.9], rtol=1e-6)
  np.testing.assert_allclose(m["rewards/margins"], [1.0])
  np.testing.assert_allclose(m["rewards/accuracies"], [1.0])


def test_bradley_terry_oracle_and_grads_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    c, r, mg = rng.normal(size=(3, 5))
    expected = -np_logsig(c - r - 0.7 * mg) + 0.05 * (c + r) ** 2
    f = lambda c, r: L.bradley_terry(L.RewardPair(c, r, jnp.asarray(mg)),
                                     margin_scale=0.7, center_coef=0.05)[0]
    np.testing.assert_allclose(jax.jit(f)(jnp.asarray(c), jnp.asarray(r)), expected,
                               rtol=1e-6)
    check_grads(jax.jit(lambda c, r: jnp.sum(f(c, r))),
                (jnp.asarray(c), jnp.asarray(r)), order=1, modes=("rev",))


# --- KTO ---------------------------------------------------------------------


def _kto_inputs(policy, reference, desirable, policy_kl, reference_kl, tokens=None):
  policy = jnp.asarray(policy)
  return L.UnpairedLogps(
      policy=policy, reference=jnp.asarray(reference),
      tokens=jnp.ones_like(policy) if tokens is None else jnp.asarray(tokens),
      desirable=jnp.asarray(desirable), policy_kl=jnp.asarray(policy_kl),
      reference_kl=jnp.asarray(reference_kl))


def test_kto_hand_value():
  # rho = [-1 - -2, -3 - -2] = [1, -1]; KL pairs: mean([-2 - -3, -4 - -4]) = 0.5.
  # beta = 1: desirable: 2 * (1 - sig(1 - 0.5)); undesirable: 3 * (1 - sig(0.5 + 1)).
  x = _kto_inputs([-1.0, -3.0], [-2.0, -2.0], [True, False], [-2.0, -4.0],
                  [-3.0, -4.0])
  got, m = jax.jit(lambda x: L.kto(x, beta=1.0, desirable_weight=2.0,
                                   undesirable_weight=3.0))(x)
  np.testing.assert_allclose(got, [2 * sig(-0.5), 3 * sig(-1.5)], rtol=1e-6)
  assert float(m["kl"]) == pytest.approx(0.5)
  np.testing.assert_allclose(m["rewards/chosen"], [1.0, 0.0])
  np.testing.assert_allclose(m["rewards/rejected"], [0.0, -1.0])
  np.testing.assert_allclose(m["mask/chosen"], [1.0, 0.0])
  # Padding slots (valid = 0) do not enter the KL estimate, even if non-finite.
  padded = L.UnpairedLogps(
      policy=jnp.array([-1.0, -3.0, 0.0]), reference=jnp.array([-2.0, -2.0, 0.0]),
      tokens=jnp.ones(3), desirable=jnp.array([1.0, 0.0, 0.0]),
      policy_kl=jnp.array([-2.0, -4.0, jnp.inf]),
      reference_kl=jnp.array([-3.0, -4.0, 0.0]), valid=jnp.array([1, 1, 0]))
  got_padded, m_padded = L.kto(padded, beta=1.0, desirable_weight=2.0,
                               undesirable_weight=3.0)
  np.testing.assert_allclose(got_padded[:2], got, rtol=1e-6)
  assert float(m_padded["kl"]) == pytest.approx(0.5)
  # A negative KL estimate is clamped at 0: mean([-1, -3]) < 0 -> z0 = 0.
  x = x.replace(policy_kl=jnp.array([-4.0, -7.0]))
  got, m = L.kto(x, beta=1.0)
  assert float(m["kl"]) == 0.0
  np.testing.assert_allclose(got, [sig(-1.0), sig(-1.0)], rtol=1e-6)


def test_kto_oracle_grads_and_stop_gradient_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    pol, ref, pkl = -rng.uniform(1, 5, (3, 6))
    rkl = pkl - rng.normal(0.5, 0.3, 6)
    lab = np.array([1, 0, 1, 1, 0, 0], bool)
    beta, wd, wu = 0.4, 1.3, 0.8
    z0 = max(0.0, np.mean(pkl - rkl))
    rho = pol - ref
    expected = np.where(lab, wd * (1 - np_sig(beta * (rho - z0))),
                        wu * (1 - np_sig(beta * (z0 - rho))))
    def f(pol, pkl):
      x = _kto_inputs(pol, ref, lab, pkl, rkl)
      return L.kto(x, beta=beta, desirable_weight=wd, undesirable_weight=wu)[0]
    np.testing.assert_allclose(jax.jit(f)(jnp.asarray(pol), jnp.asarray(pkl)),
                               expected, rtol=1e-6)
    check_grads(jax.jit(lambda p: jnp.sum(f(p, jnp.asarray(pkl)))),
                (jnp.asarray(pol),), order=1, modes=("rev",))
    # The KL reference point carries no gradient.
    g = jax.grad(lambda k: jnp.sum(f(jnp.asarray(pol), k)))(jnp.asarray(pkl))
    np.testing.assert_array_equal(g, np.zeros(6))


def test_kto_extremes_finite():
  x = _kto_inputs([-1e4, -1.0], [-1.0, -1e4], [True, False], [-1e4, -1.0],
                  [-1.0, -1e4])
  val, g = jax.value_and_grad(lambda p: jnp.sum(L.kto(x.replace(policy=p))[0]))(
      x.policy)
  assert np.isfinite(float(val)) and np.all(np.isfinite(g))


def test_unpaired_and_ranked_checks():
  with pytest.raises(ValueError, match=r"tokens\[2\]"):
    L.check_unpaired_inputs(np.array([1, 3, 0]), np.array([True, False, True]))
  with pytest.raises(ValueError, match="desirable"):
    L.check_unpaired_inputs(np.array([1, 3]), np.array([0.5, 1.0]))
  with pytest.raises(ValueError, match=r"tokens\[\(1, 0\)\]"):
    L.check_ranked_inputs(np.array([[1, 2], [0, 4]]), np.zeros((2, 2)))
  with pytest.raises(ValueError, match="K >= 2"):
    L.check_ranked_inputs(np.array([[1], [2]]), np.zeros((2, 1)))


# --- RRHF --------------------------------------------------------------------


def np_rrhf(logps, tokens, scores, rank_weight=1.0, sft_weight=1.0,
            length_penalty=1.0):
  """Loop transcription of Yuan et al. 2023, eqs. 1-3."""
  out = []
  for lp, n, r in zip(logps, tokens, scores):
    p = lp / n ** length_penalty
    rank = sum(max(0.0, p[i] - p[j])
               for i, j in itertools.product(range(len(r)), repeat=2) if r[i] < r[j])
    best = int(np.argmax(r))
    out.append(rank_weight * rank + sft_weight * (-lp[best] / n[best]))
  return np.array(out)


def test_rrhf_hand_value():
  # p = [-2/1, -6/2, -3/3] = [-2, -3, -1]; scores [1, 2, 3].
  # pairs r_i < r_j: (0,1): max(0, -2 + 3) = 1; (0,2): 0; (1,2): 0 -> rank 1.
  # best = 2: NLL = 3 / 3 = 1. Total 1 + 1 = 2.
  x = L.RankedLogps(jnp.array([[-2.0, -6.0, -3.0]]), jnp.array([[1, 2, 3]]),
                    jnp.array([[1.0, 2.0, 3.0]]))
  got, m = jax.jit(L.rrhf)(x)
  np.testing.assert_allclose(got, [2.0])
  np.testing.assert_allclose(m["rank_loss"], [1.0])
  np.testing.assert_allclose(m["nll"], [1.0])
  np.testing.assert_allclose(m["rewards/chosen"], [-1.0])
  np.testing.assert_allclose(m["rewards/rejected"], [-2.0])


def test_rrhf_oracle_grads_and_consistent_ranking_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    tokens = rng.integers(1, 6, (3, 4)).astype(np.float64)
    logps = -rng.uniform(0.1, 3, (3, 4)) * tokens
    scores = rng.permutation(12).reshape(3, 4).astype(np.float64)
    scores[0, 1] = scores[0, 2]  # a tie contributes nothing
    hp = dict(rank_weight=0.7, sft_weight=0.3, length_penalty=0.8)
    f = lambda lp: L.rrhf(L.RankedLogps(lp, jnp.asarray(tokens),
                                        jnp.asarray(scores)), **hp)[0]
    np.testing.assert_allclose(jax.jit(f)(jnp.asarray(logps)),
                               np_rrhf(logps, tokens, scores, **hp), rtol=1e-6)
    check_grads(jax.jit(lambda lp: jnp.sum(f(lp))), (jnp.asarray(logps),), order=1,
                modes=("rev",))
    # Model scores ordered like the external scores: zero loss without SFT term.
    p = np.sort(-rng.uniform(0.1, 3, (3, 4)), axis=1)  # increasing along K
    consistent = L.RankedLogps(jnp.asarray(p * tokens), jnp.asarray(tokens),
                               jnp.asarray(np.tile(np.arange(4.0), (3, 1))))
    np.testing.assert_array_equal(L.rrhf(consistent, sft_weight=0.0)[0],
                                  np.zeros(3))
    # ... and positive once two are swapped.
    swapped = consistent.replace(scores=jnp.array([[1.0, 0, 2, 3]] * 3))
    assert np.all(np.asarray(L.rrhf(swapped, sft_weight=0.0)[0]) > 0)
