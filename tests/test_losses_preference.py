"""Pairwise preference losses: hand values, NumPy oracles, gradients, identities."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxalign import losses as L

# ---------------------------------------------------------------------------
# Independent NumPy transcriptions of each paper's formula (float64).


def np_logsig(x):
  return -np.logaddexp(0.0, -x)


def np_sig(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def _rho(d):
  return d["pc"] - d["rc"], d["pr"] - d["rr"]


def np_dpo(d, beta=0.1, label_smoothing=0.0):
  h = (d["pc"] - d["pr"]) - (d["rc"] - d["rr"])
  return (-(1 - label_smoothing) * np_logsig(beta * h)
          - label_smoothing * np_logsig(-beta * h))


def np_ipo(d, beta=0.1):
  h = (d["pc"] / d["nc"] - d["pr"] / d["nr"]) - (d["rc"] / d["nc"] - d["rr"] / d["nr"])
  return (h - 1 / (2 * beta)) ** 2


def np_hinge(d, beta=0.1):
  h = (d["pc"] - d["pr"]) - (d["rc"] - d["rr"])
  return np.maximum(0.0, 1 - beta * h)


def np_robust(d, beta=0.1, label_smoothing=0.0):
  h = (d["pc"] - d["pr"]) - (d["rc"] - d["rr"])
  e = label_smoothing
  return ((1 - e) * -np_logsig(beta * h) - e * -np_logsig(-beta * h)) / (1 - 2 * e)


def np_exo_pair(d, beta=0.1, label_smoothing=1e-3):
  h = (d["pc"] - d["pr"]) - (d["rc"] - d["rr"])
  p = np_sig(beta * h)  # model's probability that chosen wins
  q = 1 - label_smoothing
  return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))


def np_nca_pair(d, beta=0.1):
  rw, rl = _rho(d)
  return (-np_logsig(beta * rw) - 0.5 * np_logsig(-beta * rw)
          - 0.5 * np_logsig(-beta * rl))


def np_bco_pair(d, beta=0.1, delta=0.0):
  rw, rl = _rho(d)
  return -np_logsig(beta * rw - delta) - np_logsig(delta - beta * rl)


def np_sppo_hard(d, beta=0.1):
  rw, rl = _rho(d)
  return (rw - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2


def np_aot(d, beta=0.1, label_smoothing=0.0):
  delta = np.sort(d["pc"] - d["pr"]) - np.sort(d["rc"] - d["rr"])
  return (-(1 - label_smoothing) * np_logsig(beta * delta)
          - label_smoothing * np_logsig(-beta * delta))


def np_aot_unpaired(d, beta=0.1, label_smoothing=0.0):
  rw, rl = _rho(d)
  delta = np.sort(rw) - np.sort(rl)
  return (-(1 - label_smoothing) * np_logsig(beta * delta)
          - label_smoothing * np_logsig(-beta * delta))


def np_apo_zero(d, beta=0.1):
  rw, rl = _rho(d)
  return (1 - np_sig(beta * rw)) + np_sig(beta * rl)


def np_apo_down(d, beta=0.1):
  rw, rl = _rho(d)
  return np_sig(beta * rw) + (1 - np_sig(beta * (rw - rl)))


def np_discopop(d, beta=0.1, tau=0.05):
  rw, rl = _rho(d)
  z = beta * (rw - rl)
  m = np_sig(z / tau)
  return (1 - m) * -np_logsig(z) + m * np.exp(-z)


def np_sigmoid_norm(d, beta=0.1):
  rw, rl = _rho(d)
  return -np_logsig(beta * (rw / d["nc"] - rl / d["nr"]))


def np_f_dpo(d, beta=0.1, divergence="reverse_kl", alpha=0.5, label_smoothing=0.0):
  uw, ul = np.exp(_rho(d)[0]), np.exp(_rho(d)[1])
  fprime = {  # f'(u) from Wang et al. 2023, Table 1
      "reverse_kl": lambda u: np.log(u) + 1,
      "forward_kl": lambda u: -1 / u,
      "js": lambda u: np.log(2 * u / (1 + u)),
      "alpha": lambda u: (1 - u ** (-alpha)) / alpha,
  }[divergence]
  z = beta * (fprime(uw) - fprime(ul))
  return -(1 - label_smoothing) * np_logsig(z) - label_smoothing * np_logsig(-z)


def np_nll(d, length_power=1.0):
  return -d["pc"] / d["nc"] ** length_power


def np_cpo(d, beta=0.1, alpha=1.0, label_smoothing=0.0):
  z = beta * (d["pc"] - d["pr"])
  return (-(1 - label_smoothing) * np_logsig(z) - label_smoothing * np_logsig(-z)
          - alpha * d["pc"] / d["nc"])


def np_simpo(d, beta=2.0, gamma=0.5):
  return -np_logsig(beta * d["pc"] / d["nc"] - beta * d["pr"] / d["nr"] - gamma)


def np_orpo(d, beta=0.1):
  pw, pl = np.exp(d["pc"] / d["nc"]), np.exp(d["pr"] / d["nr"])  # average probs
  odds_w, odds_l = pw / (1 - pw), pl / (1 - pl)
  return -d["pc"] / d["nc"] - beta * np_logsig(np.log(odds_w / odds_l))


ORACLES = {
    "dpo": (np_dpo, {"beta": 0.3, "label_smoothing": 0.1}),
    "ipo": (np_ipo, {"beta": 0.3}),
    "hinge": (np_hinge, {"beta": 0.3}),
    "robust": (np_robust, {"beta": 0.3, "label_smoothing": 0.2}),
    "exo_pair": (np_exo_pair, {"beta": 0.3, "label_smoothing": 0.05}),
    "nca_pair": (np_nca_pair, {"beta": 0.3}),
    "bco_pair": (np_bco_pair, {"beta": 0.3, "delta": 0.2}),
    "sppo_hard": (np_sppo_hard, {"beta": 0.3}),
    "aot": (np_aot, {"beta": 0.3, "label_smoothing": 0.1}),
    "aot_unpaired": (np_aot_unpaired, {"beta": 0.3, "label_smoothing": 0.1}),
    "apo_zero": (np_apo_zero, {"beta": 0.3}),
    "apo_down": (np_apo_down, {"beta": 0.3}),
    "discopop": (np_discopop, {"beta": 0.3, "tau": 0.5}),
    "sigmoid_norm": (np_sigmoid_norm, {"beta": 0.3}),
    "f_dpo/reverse_kl": (np_f_dpo, {"beta": 0.3, "divergence": "reverse_kl"}),
    "f_dpo/forward_kl": (np_f_dpo, {"beta": 0.3, "divergence": "forward_kl"}),
    "f_dpo/js": (np_f_dpo, {"beta": 0.3, "divergence": "js"}),
    "f_dpo/alpha": (np_f_dpo, {"beta": 0.3, "divergence": "alpha", "alpha": 0.3,
                               "label_smoothing": 0.1}),
    "nll": (np_nll, {"length_power": 0.5}),
    "cpo": (np_cpo, {"beta": 0.3, "alpha": 0.7, "label_smoothing": 0.1}),
    "simpo": (np_simpo, {"beta": 2.5, "gamma": 0.8}),
    "orpo": (np_orpo, {"beta": 0.3}),
}


def random_pairs(seed, n=6):
  rng = np.random.default_rng(seed)
  nc = rng.integers(1, 9, n).astype(np.float64)
  nr = rng.integers(1, 9, n).astype(np.float64)
  # Average log-probs in (-3, -0.05) so ORPO's odds are well defined.
  d = {"pc": -rng.uniform(0.05, 3, n) * nc, "pr": -rng.uniform(0.05, 3, n) * nr,
       "nc": nc, "nr": nr}
  d["rc"] = d["pc"] + rng.normal(0, 1.5, n)
  d["rr"] = d["pr"] + rng.normal(0, 1.5, n)
  return d


def to_inputs(d):
  return L.PairwiseLogps(
      policy_chosen=jnp.asarray(d["pc"]), policy_rejected=jnp.asarray(d["pr"]),
      chosen_tokens=jnp.asarray(d["nc"]), rejected_tokens=jnp.asarray(d["nr"]),
      reference_chosen=jnp.asarray(d["rc"]), reference_rejected=jnp.asarray(d["rr"]))


def _fn(key):
  return L.get_loss(key.split("/")[0]).fn


@pytest.mark.parametrize("key", sorted(ORACLES))
def test_matches_numpy_oracle_and_grads_float64(key):
  oracle, hp = ORACLES[key]
  fn = _fn(key)
  with jax.enable_x64(True):
    d = random_pairs(seed=len(key))
    inputs = to_inputs(d)
    got, metrics = jax.jit(lambda x: fn(x, **hp))(inputs)
    assert got.dtype == jnp.float64
    # Tolerance: rtol 1e-6 in float64 (the two are algebraically equal).
    np.testing.assert_allclose(np.asarray(got), oracle(d, **hp), rtol=1e-6,
                               atol=1e-12)
    for value in metrics.values():
      assert value.shape == (6,)

    def loss_of_policy(pc, pr):
      x = inputs.replace(policy_chosen=pc, policy_rejected=pr)
      return jnp.sum(fn(x, **hp)[0])

    # Finite differences vs autodiff, float64 (check_grads' default tolerances).
    check_grads(jax.jit(loss_of_policy), (inputs.policy_chosen, inputs.policy_rejected),
                order=1, modes=("rev",), eps=1e-6)


# One hand-worked example: policy chosen/rejected sums -1 / -3, reference -2 / -2,
# chosen 1 token, rejected 2 tokens, so rho_w = 1, rho_l = -1, h = 2.
HAND = dict(pc=-1.0, pr=-3.0, rc=-2.0, rr=-2.0, nc=1.0, nr=2.0)
sig = lambda x: 1 / (1 + math.exp(-x))
sp = lambda x: math.log1p(math.exp(x))  # softplus; -log sig(x) = sp(-x)
HAND_CASES = {
    # beta h = 1: -log sig(1) = log(1 + e^-1)
    "dpo": ({"beta": 0.5}, sp(-1)),
    # cDPO: 0.9 * log(1+e^-1) + 0.1 * log(1+e^1)
    "dpo_cdpo": ({"beta": 0.5, "label_smoothing": 0.1}, 0.9 * sp(-1) + 0.1 * sp(1)),
    # averaged: 1/1 - (-1)/2 = 1.5; 1/(2 beta) = 1; (1.5 - 1)^2
    "ipo": ({"beta": 0.5}, 0.25),
    # 1 - 0.25 * 2 = 0.5
    "hinge": ({"beta": 0.25}, 0.5),
    # (0.9 * sp(-1) - 0.1 * sp(1)) / 0.8
    "robust": ({"beta": 0.5, "label_smoothing": 0.1}, (0.9 * sp(-1) - 0.1 * sp(1)) / 0.8),
    # sig(1)(log sig(1) - log .9) + sig(-1)(log sig(-1) - log .1)
    "exo_pair": ({"beta": 0.5, "label_smoothing": 0.1},
                 sig(1) * (math.log(sig(1)) - math.log(0.9))
                 + sig(-1) * (math.log(sig(-1)) - math.log(0.1))),
    # r_w = .5, r_l = -.5: sp(-.5) + .5 sp(.5) + .5 sp(-.5)
    "nca_pair": ({"beta": 0.5}, 1.5 * sp(-0.5) + 0.5 * sp(0.5)),
    # -log sig(.5 - .25) - log sig(-(-.5 - .25)) = sp(-.25) + sp(-.75)
    "bco_pair": ({"beta": 0.5, "delta": 0.25}, sp(-0.25) + sp(-0.75)),
    # (1 - .5)^2 + (-1 + .5)^2
    "sppo_hard": ({"beta": 1.0}, 0.5),
    # 1 - sig(.5) + sig(-.5) = 2 sig(-.5)
    "apo_zero": ({"beta": 0.5}, 2 * sig(-0.5)),
    # sig(.5) + 1 - sig(1)
    "apo_down": ({"beta": 0.5}, sig(0.5) + 1 - sig(1)),
    # z = 1, m = sig(1 / .5) = sig(2): (1 - m) sp(-1) + m e^-1
    "discopop": ({"beta": 0.5, "tau": 0.5}, (1 - sig(2)) * sp(-1) + sig(2) * math.exp(-1)),
    # 0.5 * (1/1 + 1/2) = .75
    "sigmoid_norm": ({"beta": 0.5}, sp(-0.75)),
    # f'(u_w) - f'(u_l) = -e^-1 + e^1; z = .5 (e - 1/e)
    "f_dpo_fkl": ({"beta": 0.5, "divergence": "forward_kl"}, sp(-0.5 * (math.e - 1 / math.e))),
    # (1 - -1) - (sp(1) - sp(-1)) = 2 - 1 = 1; z = .5
    "f_dpo_js": ({"beta": 0.5, "divergence": "js"}, sp(-0.5)),
    # (e^{.5} - e^{-.5}) / .5; z = .5 * that
    "f_dpo_alpha": ({"beta": 0.5, "divergence": "alpha", "alpha": 0.5},
                    sp(-0.5 * (math.exp(0.5) - math.exp(-0.5)) / 0.5)),
    # -(-1)/1
    "nll": ({}, 1.0),
    # -log sig(.5 * (-1 + 3)) + 1 * (1/1)
    "cpo": ({"beta": 0.5, "alpha": 1.0}, sp(-1) + 1.0),
    # 2 * (-1 - -1.5) - .5 = .5
    "simpo": ({"beta": 2.0, "gamma": 0.5}, sp(-0.5)),
    # a_w = -1, a_l = -1.5; log odds = a - log(1 - e^a)
    "orpo": ({"beta": 0.5}, 1.0 + 0.5 * sp(-(
        (-1 - math.log(1 - math.exp(-1))) - (-1.5 - math.log(1 - math.exp(-1.5)))))),
}


@pytest.mark.parametrize("case", sorted(HAND_CASES))
def test_hand_computed_value_through_jit(case):
  hp, expected = HAND_CASES[case]
  name = {"dpo_cdpo": "dpo", "f_dpo_fkl": "f_dpo", "f_dpo_js": "f_dpo",
          "f_dpo_alpha": "f_dpo"}.get(case, case)
  fn = L.get_loss(name).fn
  inputs = to_inputs({k: np.array([v], np.float32) for k, v in HAND.items()})
  got, _ = jax.jit(lambda x: fn(x, **hp))(inputs)
  np.testing.assert_allclose(float(got[0]), expected, rtol=1e-5)  # f32


def test_aot_hand_computed_sorting():
  # Policy log ratios pc - pr = [2, -1], reference [0, 1]: sorted [-1, 2] - [0, 1]
  # = [-1, 1]; beta = 1: losses [sp(1), sp(-1)].
  x = L.PairwiseLogps(jnp.array([0.0, 0.0]), jnp.array([-2.0, 1.0]),
                      jnp.array([1, 1]), jnp.array([1, 1]),
                      jnp.array([0.0, 1.0]), jnp.array([0.0, 0.0]))
  got, _ = jax.jit(lambda x: L.aot(x, beta=1.0))(x)
  np.testing.assert_allclose(got, [sp(1), sp(-1)], rtol=1e-5)
  # Unpaired: rho_w = [0, -1], rho_l = [-2, 1]; sorted [-1, 0] - [-2, 1] = [1, -1].
  got, _ = jax.jit(lambda x: L.aot_unpaired(x, beta=1.0))(x)
  np.testing.assert_allclose(got, [sp(-1), sp(1)], rtol=1e-5)


def test_preference_metrics_namespace():
  inputs = to_inputs({k: np.array([v], np.float32) for k, v in HAND.items()})
  _, m = L.dpo(inputs, beta=0.5)
  # rewards = beta * rho: 0.5 * 1, 0.5 * -1.
  np.testing.assert_allclose(m["rewards/chosen"], [0.5])
  np.testing.assert_allclose(m["rewards/rejected"], [-0.5])
  np.testing.assert_allclose(m["rewards/margins"], [1.0])
  np.testing.assert_allclose(m["rewards/accuracies"], [1.0])
  np.testing.assert_allclose(m["logps/chosen"], [-1.0])
  np.testing.assert_allclose(m["logps/rejected"], [-3.0])
  _, m = L.orpo(inputs, beta=0.5)
  assert {"nll", "log_odds_ratio"} <= set(m)
  np.testing.assert_allclose(m["nll"], [1.0])
  assert "nll" in L.cpo(inputs)[1]


# ---------------------------------------------------------------------------
# Identities.


def test_identities_float64():
  with jax.enable_x64(True):
    d = random_pairs(seed=7)
    x = to_inputs(d)
    free = x.replace(reference_chosen=None, reference_rejected=None)
    dpo_free = lambda inp, **k: L.dpo(inp, reference_free=True, **k)[0]
    # cDPO with eps = 0 equals DPO; robust with eps = 0 equals DPO.
    np.testing.assert_allclose(L.dpo(x, beta=0.2, label_smoothing=0.0)[0],
                               np_dpo(d, beta=0.2), rtol=1e-12)
    np.testing.assert_allclose(L.robust(x, beta=0.2)[0], L.dpo(x, beta=0.2)[0],
                               rtol=1e-12)
    # f-DPO with reverse KL equals DPO.
    np.testing.assert_allclose(L.f_dpo(x, beta=0.2)[0], L.dpo(x, beta=0.2)[0],
                               rtol=1e-12)
    # CPO = reference-free DPO + alpha * NLL(chosen).
    np.testing.assert_allclose(
        L.cpo(free, beta=0.2, alpha=0.7)[0],
        dpo_free(free, beta=0.2) + 0.7 * L.nll(free)[0], rtol=1e-12)
    # SimPO with gamma = 0 = reference-free DPO on length-averaged log-probs.
    avg = free.replace(policy_chosen=free.policy_chosen / free.chosen_tokens,
                       policy_rejected=free.policy_rejected / free.rejected_tokens)
    np.testing.assert_allclose(L.simpo(free, beta=2.0, gamma=0.0)[0],
                               dpo_free(avg, beta=2.0), rtol=1e-12)
    # alpha-divergence: alpha -> 0 approaches reverse KL (error O(alpha)).
    np.testing.assert_allclose(
        L.f_dpo(x, beta=0.2, divergence="alpha", alpha=1e-7)[0],
        L.dpo(x, beta=0.2)[0], rtol=1e-5)
    # alpha = 1 is forward KL.
    np.testing.assert_allclose(
        L.f_dpo(x, beta=0.2, divergence="alpha", alpha=1.0)[0],
        L.f_dpo(x, beta=0.2, divergence="forward_kl")[0], rtol=1e-12)


def test_ipo_minimum_at_half_inverse_beta():
  with jax.enable_x64(True):
    beta = 0.25
    # chosen 2 tokens, rejected 4 tokens, reference averages -1 / -1; choose the
    # policy so that (pc/2 - pr/4) - 0 = 1/(2 beta) = 2.
    def loss(pc, pr):
      x = L.PairwiseLogps(pc, pr, jnp.array([2.0]), jnp.array([4.0]),
                          jnp.array([-2.0]), jnp.array([-4.0]))
      return jnp.sum(L.ipo(x, beta=beta)[0])
    pc, pr = jnp.array([-2.0 + 2 * 1.0]), jnp.array([-4.0 - 4 * 1.0])
    assert float(loss(pc, pr)) == pytest.approx(0.0, abs=1e-15)
    g = jax.grad(loss, argnums=(0, 1))(pc, pr)
    np.testing.assert_allclose(np.concatenate(g), [0.0, 0.0], atol=1e-15)
    for delta in (-0.1, 0.1):
      assert float(loss(pc + delta, pr)) > 0.0


def test_dpo_gradient_matches_paper_closed_form():
  # grad_theta L = -beta sig(r_l - r_w) (grad log pi_w - grad log pi_l), with a
  # linear "model" log pi_w = a . theta, log pi_l = b . theta (Rafailov et al. eq. 7).
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    a, b, theta = (jnp.asarray(rng.normal(size=5)) for _ in range(3))
    ref_w, ref_l, beta = -1.3, -0.4, 0.3

    def loss(theta):
      x = L.PairwiseLogps(jnp.array([a @ theta]), jnp.array([b @ theta]),
                          jnp.array([3.0]), jnp.array([3.0]),
                          jnp.array([ref_w]), jnp.array([ref_l]))
      return L.dpo(x, beta=beta)[0][0]

    r_w = beta * (float(a @ theta) - ref_w)
    r_l = beta * (float(b @ theta) - ref_l)
    expected = -beta * np_sig(r_l - r_w) * (np.asarray(a) - np.asarray(b))
    np.testing.assert_allclose(jax.grad(loss)(theta), expected, rtol=1e-12)


# ---------------------------------------------------------------------------
# Extremes and bad input.


@pytest.mark.parametrize("name", [n for n in L.list_losses()
                                  if L.get_loss(n).input_kind == "pairwise"])
def test_no_nan_or_inf_at_extremes(name):
  fn = L.get_loss(name).fn
  n = jnp.array([5.0, 5.0, 1.0, 3.0])
  cases = [
      # log-probs of -1e4 against ordinary ones, both ways round.
      (jnp.array([-1e4, -1.0, -1e4, -2.0]), jnp.array([-1.0, -1e4, -1e4, -3.0]),
       jnp.array([-2.0, -1e4, -1.0, -1e4]), jnp.array([-1e4, -2.0, -1.0, -1e4])),
      # average log-probs of -1e-9 (probability ~1): ORPO's log(1 - p) regime.
      (-1e-9 * n, jnp.array([-1e-9 * 5, -3.0, -1e-9, -1e-9 * 3]), -1e-9 * n,
       jnp.array([-2.0, -1e-9 * 5, -1.0, -1e-9 * 3])),
  ]
  for pc, pr, rc, rr in cases:
    def total(pc, pr):
      x = L.PairwiseLogps(pc, pr, n, n, rc, rr)
      return jnp.sum(fn(x)[0])
    value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(pc, pr)
    assert np.isfinite(float(value)), (name, pc, pr)
    assert np.all(np.isfinite(np.asarray(grads))), (name, grads)


def test_log1mexp_accuracy_float64():
  with jax.enable_x64(True):
    x = jnp.array([-1e-12, -1e-9, -0.3, -0.69, -0.7, -5.0, -50.0, -1e4])
    # Oracle: mpmath-free exact forms valid in each regime.
    expected = np.where(np.asarray(x) > -0.5, np.log(-np.expm1(x)),
                        np.log1p(-np.exp(x)))
    np.testing.assert_allclose(L.log1mexp(x), expected, rtol=1e-12)
    check_grads(jax.jit(L.log1mexp), (jnp.array([-1e-2, -0.5, -0.8, -3.0]),), order=1,
                eps=1e-6)


def test_missing_reference_is_a_clear_error():
  x = L.PairwiseLogps(jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([1]),
                      jnp.array([1]))
  with pytest.raises(ValueError, match="reference_chosen"):
    L.dpo(x)
  with pytest.raises(ValueError, match="exo_pair: label_smoothing=0.0"):
    L.exo_pair(x, label_smoothing=0.0, reference_free=True)
  with pytest.raises(ValueError, match="robust: label_smoothing=0.5"):
    L.robust(x, label_smoothing=0.5, reference_free=True)
  with pytest.raises(ValueError, match="divergence"):
    L.f_dpo(x, divergence="hellinger", reference_free=True)


def test_zero_length_completion_rejected_before_the_loss():
  with pytest.raises(ValueError, match=r"rejected_tokens\[1\].*no scored tokens"):
    L.check_pairwise_inputs(np.array([3, 2, 4]), np.array([1, 0, 2]))
  with pytest.raises(ValueError, match=r"chosen_tokens\[0\]"):
    L.check_pairwise_inputs(np.array([0, 2]), np.array([1, 1]))
  with pytest.raises(ValueError, match="policy_chosen"):
    L.check_pairwise_inputs(np.array([1, 2]), np.array([1, 1]),
                            policy_chosen=np.array([-1.0, np.nan]))
  with pytest.raises(ValueError, match="shape"):
    L.check_pairwise_inputs(np.array([1, 2]), np.array([1, 1, 1]))
  L.check_pairwise_inputs(np.array([1, 2]), np.array([1, 1]),
                          policy_chosen=np.array([-1.0, -2.0]))  # valid: no error


def test_bco_delta_update_is_running_mean():
  rng = np.random.default_rng(3)
  batches = [(rng.normal(size=4), rng.normal(size=4)) for _ in range(3)]
  mean, count = jnp.float32(0.0), jnp.float32(0.0)
  for c, r in batches:
    mean, count = L.bco_delta_update(mean, count, jnp.asarray(c), jnp.asarray(r))
  everything = np.concatenate([np.concatenate(b) for b in batches])
  np.testing.assert_allclose(float(mean), everything.mean(), rtol=1e-5)
  assert float(count) == everything.size
