"""PPO pieces against plain-Python / NumPy transcriptions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxalign import losses as L


def _random_rollout(seed, B=3, T=7, holes=True):
  rng = np.random.default_rng(seed)
  mask = np.zeros((B, T))
  starts, ends = [0, 2, 1], [5, 7, 3]  # right padding, left padding, both
  for b in range(B):
    mask[b, starts[b]:ends[b]] = 1
  if holes:
    mask[1, 4] = 0  # a masked-out (e.g. tool-output) token inside the response
  rewards = rng.normal(size=(B, T)) * mask
  values = rng.normal(size=(B, T))
  return rewards, values, mask


def loop_gae(rewards, values, mask, gamma, lam):
  """Textbook GAE loop over each row's valid tokens (Schulman et al. 2016)."""
  adv = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    idx = np.flatnonzero(mask[b])
    last = 0.0
    for k in reversed(range(len(idx))):
      t = idx[k]
      next_v = values[b, idx[k + 1]] if k + 1 < len(idx) else 0.0
      delta = rewards[b, t] + gamma * next_v - values[b, t]
      last = delta + gamma * lam * last
      adv[b, t] = last
  return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7)])
def test_gae_matches_python_loop_float64(gamma, lam):
  with jax.enable_x64(True):
    r, v, m = _random_rollout(seed=int(gamma * 10))
    adv, ret = jax.jit(lambda r, v, m: L.gae(r, v, m, gamma=gamma, lam=lam))(r, v, m)
    exp_adv, exp_ret = loop_gae(r, v, m, gamma, lam)
    np.testing.assert_allclose(adv, exp_adv, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ret, exp_ret, rtol=1e-12, atol=1e-12)


def test_gae_hand_value():
  # Two tokens, gamma = 1, lam = 0.5, r = [0, 1], V = [0.5, 0.25]:
  # delta_1 = 1 - 0.25 = 0.75, A_1 = 0.75; delta_0 = 0 + 0.25 - 0.5 = -0.25,
  # A_0 = -0.25 + 0.5 * 0.75 = 0.125.
  adv, ret = L.gae(jnp.array([[0.0, 1.0]]), jnp.array([[0.5, 0.25]]),
                   jnp.array([[1, 1]]), gamma=1.0, lam=0.5)
  np.testing.assert_allclose(adv, [[0.125, 0.75]])
  np.testing.assert_allclose(ret, [[0.625, 1.0]])


def test_kl_estimators_against_numpy_and_unbiasedness():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    lp, ref = -rng.exponential(size=(2, 5)), -rng.exponential(size=(2, 5))
    np.testing.assert_allclose(L.kl_k1(lp, ref), lp - ref, rtol=1e-12)
    np.testing.assert_allclose(L.kl_k2(lp, ref), 0.5 * (np.log(np.exp(lp) / np.exp(ref))) ** 2,
                               rtol=1e-10)
    ratio = np.exp(ref) / np.exp(lp)
    np.testing.assert_allclose(L.kl_k3(lp, ref), ratio - 1 - np.log(ratio),
                               rtol=1e-10)
    # k1 and k3 are unbiased for KL(p || q): exact expectation over a small
    # categorical distribution (sum_x p(x) k(x)) equals the true KL.
    p = np.array([0.5, 0.3, 0.2]); q = np.array([0.2, 0.2, 0.6])
    kl = np.sum(p * np.log(p / q))
    for k in (L.kl_k1, L.kl_k3):
      np.testing.assert_allclose(np.sum(p * k(np.log(p), np.log(q))), kl, rtol=1e-12)


def test_kl_penalized_rewards():
  # Row 0: response tokens 0..2; row 1: tokens 1..3. Score added at the last one.
  lp = jnp.array([[-1.0, -2.0, -1.5, 0.0], [0.0, -1.0, -1.0, -2.0]])
  ref = jnp.array([[-1.5, -1.0, -1.5, 0.0], [0.0, -2.0, -1.0, -1.0]])
  mask = jnp.array([[1, 1, 1, 0], [0, 1, 1, 1]])
  rewards, kl = L.kl_penalized_rewards(lp, ref, mask, jnp.array([2.0, -1.0]),
                                       kl_coef=0.1)
  # k1 = lp - ref masked: [[.5, -1, 0, 0], [0, 1, 0, -1]]
  np.testing.assert_allclose(kl, [[0.5, -1.0, 0.0, 0.0], [0.0, 1.0, 0.0, -1.0]])
  np.testing.assert_allclose(rewards, [[-0.05, 0.1, 2.0, 0.0],
                                       [0.0, -0.1, 0.0, 0.1 - 1.0]], rtol=1e-6)
  with pytest.raises(ValueError, match="k4"):
    L.kl_penalized_rewards(lp, ref, mask, jnp.zeros(2), kl_coef=0.1, estimator="k4")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalized_rewards_against_loop_float64(estimator):
  with jax.enable_x64(True):
    rng = np.random.default_rng(len(estimator) + ord(estimator[1]))
    lp, ref = -rng.exponential(size=(2, 3, 6))
    _, _, mask = _random_rollout(seed=9, B=3, T=6, holes=False)
    scores = rng.normal(size=3)
    k = {"k1": lambda a, b: a - b, "k2": lambda a, b: 0.5 * (a - b) ** 2,
         "k3": lambda a, b: np.exp(b - a) - 1 - (b - a)}[estimator]
    expected = np.zeros_like(lp)
    for b in range(3):
      valid = np.flatnonzero(mask[b])
      for t in valid:
        expected[b, t] = -0.05 * k(lp[b, t], ref[b, t])
      expected[b, valid[-1]] += scores[b]
    rewards, _ = jax.jit(lambda a: L.kl_penalized_rewards(
        a, ref, mask, scores, kl_coef=0.05, estimator=estimator))(lp)
    np.testing.assert_allclose(rewards, expected, rtol=1e-10, atol=1e-14)


def test_masked_whiten_uses_valid_tokens_only():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 6)).astype(np.float32)
  mask = (rng.uniform(size=(3, 6)) < 0.6).astype(np.float32)
  mask[0, 0] = 1
  valid = x[mask > 0]
  expected = (x - valid.mean()) / np.sqrt(valid.var() + 1e-8) * mask
  got = jax.jit(L.masked_whiten)(x, mask)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # Garbage in the padding does not change the result.
  np.testing.assert_allclose(L.masked_whiten(np.where(mask > 0, x, 1e6), mask), got,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(L.masked_whiten(x, mask, shift_mean=False),
                             expected + valid.mean() * mask, rtol=1e-5, atol=1e-6)


def test_ppo_policy_and_value_loss_against_numpy_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    lp, old = -rng.exponential(size=(2, 2, 5))
    adv = rng.normal(size=(2, 5))
    mask = np.array([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]], np.float64)
    ratio = np.exp(lp - old)
    exp_loss = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2)) * mask
    loss, m = jax.jit(lambda a: L.ppo_policy_loss(a, old, adv, mask))(lp)
    np.testing.assert_allclose(loss, exp_loss, rtol=1e-12)
    exp_clip = ((-adv * np.clip(ratio, 0.8, 1.2)) > (-adv * ratio)) * mask
    np.testing.assert_array_equal(m["clipfrac"], exp_clip)
    np.testing.assert_allclose(m["approxkl"], 0.5 * (lp - old) ** 2 * mask, rtol=1e-12)
    check_grads(jax.jit(lambda a: jnp.sum(L.ppo_policy_loss(a, old, adv, mask)[0])),
                (jnp.asarray(lp),), order=1, modes=("rev",))

    v, old_v, ret = rng.normal(size=(3, 2, 5))
    vclip = old_v + np.clip(v - old_v, -0.3, 0.3)
    exp_v = 0.5 * np.maximum((v - ret) ** 2, (vclip - ret) ** 2) * mask
    vloss, vm = L.ppo_value_loss(v, old_v, ret, mask, clip_value=0.3)
    np.testing.assert_allclose(vloss, exp_v, rtol=1e-12)
    np.testing.assert_array_equal(vm["vf_clipfrac"],
                                  ((vclip - ret) ** 2 > (v - ret) ** 2) * mask)
    check_grads(jax.jit(lambda v: jnp.sum(L.ppo_value_loss(v, old_v, ret, mask,
                                                           clip_value=0.3)[0])),
                (jnp.asarray(v),), order=1, modes=("rev",))


def test_ppo_policy_loss_hand_value():
  # ratio = e^{log 1.5} = 1.5, A = 2, eps = 0.2: max(-3, -2 * 1.2) = -2.4, clipped.
  loss, m = L.ppo_policy_loss(jnp.log(jnp.array([[1.5]])), jnp.zeros((1, 1)),
                              jnp.array([[2.0]]), jnp.ones((1, 1)))
  np.testing.assert_allclose(loss, [[-2.4]], rtol=1e-6)
  np.testing.assert_allclose(m["clipfrac"], [[1.0]])


def test_adaptive_kl_controller_follows_ziegler_update():
  state = L.adaptive_kl_init(0.2)
  update = jax.jit(lambda s, kl: L.adaptive_kl_update(s, kl, 256, target=6.0,
                                                      horizon=10000.0))
  beta = 0.2
  for kl in (3.0, 6.0, 9.0, 20.0, 0.0):
    state = update(state, jnp.float32(kl))
    # Ziegler et al. 2019: e = clip(KL/target - 1, -.2, .2); beta *= 1 + e n / H.
    beta *= 1 + min(max(kl / 6.0 - 1, -0.2), 0.2) * 256 / 10000.0
    np.testing.assert_allclose(float(state.kl_coef), beta, rtol=1e-6)


def test_group_baselines_against_loops():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    r = rng.normal(size=(3, 4))
    exp_grpo = np.empty_like(r)
    exp_rloo = np.empty_like(r)
    for n in range(3):
      mean = sum(r[n]) / 4
      std = np.sqrt(sum((x - mean) ** 2 for x in r[n]) / 3)
      for g in range(4):
        exp_grpo[n, g] = (r[n, g] - mean) / (std + 1e-4)
        others = [r[n, j] for j in range(4) if j != g]
        exp_rloo[n, g] = r[n, g] - sum(others) / 3
    np.testing.assert_allclose(jax.jit(L.grpo_advantages)(r), exp_grpo, rtol=1e-12)
    np.testing.assert_allclose(L.grpo_advantages(r, scale_by_std=False),
                               r - r.mean(1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(jax.jit(L.rloo_advantages)(r), exp_rloo, rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
      L.rloo_advantages(r[:, :1])
