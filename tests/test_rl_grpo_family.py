"""The GRPO family inside online RL: the default options reproduce the policy loss
used before they existed, KL placement / estimator / masks / TIS reach the loss as
documented, conflicting configs are refused naming the key, ``kl_coef = 0`` compiles
no reference into the scoring program, and one iteration of each recipe of
experiments/grpo.py (dapo, dr_grpo, gspo, cispo) runs with finite metrics."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign import losses
from jaxalign.train import rl
from jaxalign.train import rl_steps

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")
TOL = dict(rtol=1e-5, atol=1e-6)
P, N, D, V, G = 3, 5, 8, 11, 4  # prompt slots, completion slots, width, vocab, group


def _grpo(arg="tiny"):
  spec = importlib.util.spec_from_file_location(
      "grpo", os.path.join(EXPERIMENTS, "grpo.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


# ----------------------------------------------------------------------------- the loss


def _fake_rollout(seed, rows=8):
  """A rollout of a fake 'model' whose hidden states are a parameter: forward(params,
  batch) = (params["h"] [B, P+N, D], params["w"] [D, V]). Row 1 is truncated (no stop
  token, id 2); the others stop."""
  rng = np.random.default_rng(seed)
  lengths = np.array([3, N, 2, 4, 1, 5, 3, 2])[:rows]
  mask = (np.arange(N)[None] < lengths[:, None]).astype(np.int32)
  comp = rng.integers(3, V, size=(rows, N)).astype(np.int32)
  comp[np.arange(rows), lengths - 1] = 2
  comp[1, -1] = 7  # no stop: truncated
  comp = np.where(mask > 0, comp, 0)
  tokens = np.concatenate([np.ones((rows, P), np.int32), comp], 1)
  params = {"h": jnp.asarray(rng.normal(size=(rows, P + N, D)), jnp.float32),
            "w": jnp.asarray(rng.normal(size=(D, V)), jnp.float32)}
  ro = {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask),
        "old_logp": jnp.asarray(rng.normal(-2, .3, size=(rows, N)) * mask, jnp.float32),
        "ref_logp": jnp.asarray(rng.normal(-2, .3, size=(rows, N)) * mask, jnp.float32),
        "sampler_logp": jnp.asarray(rng.normal(-2, .3, size=(rows, N)) * mask,
                                    jnp.float32)}
  return params, ro, jnp.asarray(rng.normal(size=(rows,)), jnp.float32)


def _np_logp(params, ro, temperature=1.0):
  """Independent log-probs / entropies of the fake model: log_softmax(h W / T)."""
  h = np.asarray(params["h"], np.float64)[:, P - 1:P - 1 + N]
  z = h @ np.asarray(params["w"], np.float64) / temperature
  logz = z - z.max(-1, keepdims=True)
  logz = logz - np.log(np.exp(logz).sum(-1, keepdims=True))
  tgt = np.asarray(ro["tokens"])[:, P:]
  logp = np.take_along_axis(logz, tgt[..., None], -1)[..., 0]
  return logp, -(np.exp(logz) * logz).sum(-1)


_FWD = rl_steps.Forwards(policy=lambda prm, batch: (prm["h"], prm["w"]))


def _loss(params, ro, scores, kl_coef=0.1, **rl_kw):
  kw = dict(algorithm="grpo", group_size=G, prompt_len=P, max_new_tokens=N,
            num_minibatches=1)
  rlc = config_lib.RLConfig(**dict(kw, **rl_kw))
  fn = rl_steps.ALGORITHMS[rlc.algorithm].advantages
  mb = dict(ro, **rl_steps.rollout_advantages(ro, scores, kl_coef, fn=fn, rl=rlc,
                                              stop_ids=(2,)))
  coef = kl_coef if rl_steps.kl_in_loss(rlc) else None
  loss, metrics = rl_steps.policy_value_loss(params, None, mb, fwd=_FWD, rl=rlc,
                                             kl_loss_coef=coef)
  return loss, metrics, mb


def test_default_grpo_loss_is_the_loss_before_the_options():
  """Defaults (bnpo, clip_eps both sides, token ratio, k3 in the loss, group std):
  the clipped PPO loss (`losses.ppo_policy_loss`) token mean + 0.1 * mean k3."""
  params, ro, scores = _fake_rollout(0)
  loss, metrics, mb = _loss(params, ro, scores)
  logp, ent = _np_logp(params, ro)
  m = np.asarray(ro["mask"], np.float64)
  adv = np.asarray(losses.grpo_advantages(scores.reshape(-1, G))).reshape(-1)[:, None] * m
  np.testing.assert_allclose(mb["adv"], adv, **TOL)
  pl, _ = losses.ppo_policy_loss(jnp.asarray(logp, jnp.float32), ro["old_logp"],
                                 jnp.asarray(adv, jnp.float32), ro["mask"], clip_eps=0.2)
  ref = np.asarray(ro["ref_logp"], np.float64)
  k3 = np.expm1(ref - logp) - (ref - logp)
  want = np.sum(np.asarray(pl) * m) / m.sum() + 0.1 * np.sum(k3 * m) / m.sum()
  np.testing.assert_allclose(loss, want, **TOL)
  np.testing.assert_allclose(metrics["policy/entropy"], np.sum(ent * m) / m.sum(), **TOL)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_estimator_and_placement(est):
  params, ro, scores = _fake_rollout(1)
  logp, _ = _np_logp(params, ro)
  m = np.asarray(ro["mask"], np.float64)
  ref = np.asarray(ro["ref_logp"], np.float64)
  kl_np = {"k1": lambda lp, r: lp - r, "k2": lambda lp, r: 0.5 * (lp - r) ** 2,
           "k3": lambda lp, r: np.expm1(r - lp) - (r - lp)}[est]
  # In the loss: the configured estimator on the learner's log-probs, token mean.
  _, metrics, _ = _loss(params, ro, scores, kl_estimator=est, kl_placement="loss")
  np.testing.assert_allclose(metrics["loss/kl"], np.sum(kl_np(logp, ref) * m) / m.sum(),
                             **TOL)
  # In the rewards: scores - 0.1 * sum_t kl(old, ref), then the group normalisation;
  # no KL term in the loss.
  _, metrics, mb = _loss(params, ro, scores, kl_estimator=est, kl_placement="reward")
  assert "loss/kl" not in metrics
  old = np.asarray(ro["old_logp"], np.float64)
  r = (np.asarray(scores, np.float64) - 0.1 * (kl_np(old, ref) * m).sum(1)).reshape(-1, G)
  adv = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
  np.testing.assert_allclose(mb["adv"], adv.reshape(-1)[:, None] * m, rtol=1e-4,
                             atol=1e-5)


def test_masks_tis_entropy_and_aggregation_reach_the_loss():
  """mask_truncated + tis_cap + entropy_coef + dr_grpo + symmetric clip wide enough to
  never bind, KL off: loss = sum_t (-A w_t rho_t - c H_t) m'_t / (B N), m' the mask
  without the truncated row 1."""
  params, ro, scores = _fake_rollout(2)
  loss, metrics, mb = _loss(params, ro, scores, kl_coef=0.0, loss_agg="dr_grpo",
                            mask_truncated=True, tis_cap=1.2, entropy_coef=0.01,
                            clip_eps=50.0)
  logp, ent = _np_logp(params, ro)
  m = np.asarray(ro["mask"], np.float64)
  m2 = m.copy()
  m2[1] = 0
  np.testing.assert_array_equal(mb["loss_mask"], m2)
  old = np.asarray(ro["old_logp"], np.float64)
  w = np.minimum(np.exp(old - np.asarray(ro["sampler_logp"], np.float64)), 1.2) * m2
  assert (w == 1.2).any() and ((w < 1.2) & (m2 > 0)).any()
  adv = np.asarray(mb["adv"], np.float64)
  per_tok = -adv * np.exp(logp - old) * w - 0.01 * ent
  np.testing.assert_allclose(loss, np.sum(per_tok * m2) / (8 * N), **TOL)
  np.testing.assert_allclose(metrics["policy/tis_weight"], np.sum(w * m) / m.sum(), **TOL)
  np.testing.assert_allclose(metrics["policy/masked_truncated"], 1 / 8)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides,key", [
    (dict(grpo_scale_by_std=False, scale_rewards="group"), "rl.scale_rewards"),
    (dict(policy_loss="cispo", dual_clip_c=3.0), "rl.dual_clip_c"),
    (dict(dual_clip_c=0.5), "rl.dual_clip_c"),
    (dict(loss_agg="seq_mean"), "rl.loss_agg"),
    (dict(importance_level="segment"), "rl.importance_level"),
    (dict(kl_placement="value"), "rl.kl_placement"),
    (dict(epsilon_high=-0.1), "rl.epsilon_high"),
    (dict(adaptive_kl=True, kl_coef=0.0), "rl.adaptive_kl"),
    (dict(algorithm="rloo", scale_rewards="batch"), "rl.scale_rewards"),
    (dict(algorithm="rrhf", policy_loss="cispo"), "rl.policy_loss"),
])
def test_conflicting_settings_are_refused_naming_the_key(overrides, key):
  c = _grpo().to_dict()
  c["rl"].update(overrides)
  with pytest.raises(ValueError, match=r"config\." + key.replace(".", r"\.") + ":"):
    config_lib.validate_rl(c, 8)


def test_recipes_validate_and_unknown_recipes_are_named():
  for name in ("dapo", "dr_grpo", "gspo", "cispo"):
    _, rlc = config_lib.validate_rl(_grpo(name), 8)
    assert rlc.kl_coef == 0.0 and not rl_steps.needs_reference(rlc)
  _, rlc = config_lib.validate_rl(_grpo("hh,path=/x.jsonl,reward_path=/rm,recipe=gspo"), 8)
  assert rlc.importance_level == "sequence" and rlc.reward == "checkpoint"
  with pytest.raises(ValueError, match="recipe='ppo2'"):
    _grpo("tiny,recipe=ppo2")


# ----------------------------------------------------------------------------- runs


NEW = 6  # completion slots of the runs below (prompt_len stays 8)


def _run(name, tmp_path):
  c = _grpo(f"{name},runlocal")
  c.num_steps = 1
  # A smaller model than the tiny task's and short completions: compiling dominates.
  c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64)
  c.rl.max_new_tokens = NEW
  c.log.progress_bar = c.log.tensorboard = c.checkpoint.async_save = False
  lines = []
  res = rl.run_rl(c, str(tmp_path / name), log=lines.append)
  return res, next(l for l in lines if l.startswith("memory plan"))


# dapo (token-mean aggregation, clip-higher, the memory-plan check) runs by default; the
# other recipes differ only in the loss options the fast tests above check directly.
@pytest.mark.slow
@pytest.mark.parametrize("name", [
    "dapo", pytest.param("dr_grpo", marks=pytest.mark.heavy),
    pytest.param("gspo", marks=pytest.mark.heavy),
    pytest.param("cispo", marks=pytest.mark.heavy)])
def test_one_iteration_per_recipe_has_finite_metrics_and_no_reference(name, tmp_path):
  res, plan = _run(name, tmp_path)
  (metrics,) = res.history
  assert np.all(np.isfinite([float(v) for v in metrics.values()])), metrics
  assert metrics["policy/entropy"] > 0 and metrics["objective/entropy"] > 0
  # kl_coef = 0 in every recipe: no reference params built, planned or compiled.
  assert res.state.ref_params is None and "reference" not in plan
  if name != "dapo":
    return
  params = res.state.policy.params
  rows = 8 * 4  # runlocal: 8 prompts x group 4
  batch = {k: jax.ShapeDtypeStruct((rows, 8 + NEW), jnp.int32)
           for k in ("tokens", "positions", "segment_ids")}
  batch["mask"] = jax.ShapeDtypeStruct((rows, NEW), jnp.int32)
  batch["sampler_logp"] = jax.ShapeDtypeStruct((rows, NEW), jnp.float32)
  arg_bytes = lambda ref: res.programs.score.lower(params, ref, None, None, batch
                                                   ).compile().memory_analysis(
                                                   ).argument_size_in_bytes
  without, with_ref = arg_bytes(None), arg_bytes(params)
  # The reference would add one copy of the policy's params (per device).
  assert with_ref - without == rl._bytes_per_device(params), (with_ref, without)
