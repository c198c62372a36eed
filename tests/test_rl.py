"""Online RL: PPO / GRPO raise the ground-truth task's oracle reward with bounded KL,
PPO checkpoints resume bit-exactly, config validation, advantage and scoring pieces."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import checkpoint as ckpt_lib
from jaxalign.data import synthetic
from jaxalign.models import heads
from jaxalign.models import sampling
from jaxalign.models import transformer as tfm
from jaxalign.train import rl

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


def _experiment(name, arg="tiny"):
  spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _quiet(c, steps):
  c.num_steps = steps
  c.log.progress_bar = False
  c.log.tensorboard = False
  c.checkpoint.async_save = False
  return c


def _ppo_config(steps):
  c = _quiet(_experiment("ppo"), steps)
  c.rl.adaptive_kl = True  # the controller's state changes, so resume must restore it
  c.mesh.data, c.mesh.fsdp = 2, 4  # data parallel x parameter sharding on 8 devices
  return c


def _evaluate(state, cfg, rlc, n_prompts=64, seed=12345):
  """Independent check on fresh prompts: oracle reward of samples from the trained
  policy and from the initial policy (the reference), and the k1 estimate of
  KL(policy || reference) = E[sum_t log pi - log pi_ref] from teacher-forced log-probs."""
  task = synthetic.SyntheticTaskConfig(vocab_size=cfg.data.task.vocab_size,
                                       target_len=cfg.data.task.target_len)
  prompts = synthetic.make_prompts(np.random.default_rng(seed), n_prompts, task)
  p_BxP, len_B = rl._left_pad(prompts, rlc.prompt_len)
  scfg = sampling.SamplingConfig(max_new_tokens=rlc.max_new_tokens, eos_id=synthetic.EOS_ID)
  arch = cfg.model.arch
  sampler = sampling.Sampler(arch, scfg, batch=n_prompts, prompt_len=rlc.prompt_len)
  host = lambda t: jax.device_get(t)
  pol, ref = host(state.policy.params), host(state.ref_params)
  out_pol = sampler(pol, p_BxP, len_B, jax.random.key(1))
  out_ref = sampler(ref, p_BxP, len_B, jax.random.key(1))
  r_pol = synthetic.oracle_reward(prompts, np.asarray(out_pol.tokens), task).mean()
  r_ref = synthetic.oracle_reward(prompts, np.asarray(out_ref.tokens), task).mean()
  fwd = rl._fwd(rl._graphdef(arch))
  batch = {"sequences": out_pol.sequences, "positions": out_pol.positions,
           "segments": sampling.sequence_segments(jnp.asarray(p_BxP), jnp.asarray(len_B),
                                                  out_pol.mask),
           "mask": out_pol.mask}
  logprobs = jax.jit(lambda params: rl.response_logprobs(
      fwd, params, batch, prompt_len=rlc.prompt_len, temperature=1.0, chunk_size=256)[0])
  lp, ref_lp = logprobs(pol), logprobs(ref)
  kl = float(jnp.mean(jnp.sum((lp - ref_lp) * out_pol.mask, axis=1)))
  return r_pol, r_ref, kl


def test_ppo_raises_oracle_reward_with_bounded_kl(tmp_path):
  c = _ppo_config(24)
  lines = []
  res = rl.run_rl(c, str(tmp_path / "ppo"), log=lines.append)
  cfg, rlc = rl.validate_rl(c, jax.device_count())
  r_pol, r_ref, kl = _evaluate(res.state, cfg, rlc)
  # The initial policy is near uniform (oracle ~0.3); 24 PPO iterations reach ~1.2.
  # Margin asked: +0.5 on 64 fresh prompts, well above sampling noise (sd ~0.06).
  assert r_pol - r_ref >= 0.5, (r_pol, r_ref)
  # KL(policy || reference) stays bounded under the KL penalty (observed ~4-6 nats).
  assert 0.0 < kl < 12.0, kl
  for name in ("objective/kl", "objective/entropy", "objective/scores",
               "objective/rlhf_reward", "policy/clipfrac", "policy/approxkl", "loss/policy",
               "loss/value", "response_length", "eos_rate"):
    assert np.isfinite(res.history[-1][name]), name
  # The in-loop score metric is the oracle on the rollouts: it rises too.
  first = np.mean([h["objective/scores"] for h in res.history[:3]])
  last = np.mean([h["objective/scores"] for h in res.history[-3:]])
  assert last - first >= 0.4, (first, last)
  # The memory plan names every role; the policy's params are split over fsdp=4.
  plan = next(l for l in lines if l.startswith("memory plan"))
  for role in ("policy/params", "policy/opt_state", "reference/params", "value/params",
               "sampler/kv_cache"):
    assert role in plan
  n_bytes = 4 * tfm.param_count(jax.device_get(res.state.policy.params))
  per_dev = rl._bytes_per_device(res.state.policy.params)
  assert n_bytes / 4 <= per_dev < n_bytes / 2, (per_dev, n_bytes)


def test_ppo_checkpoint_resumes_bit_exactly(tmp_path):
  full = rl.run_rl(_ppo_config(3), str(tmp_path / "full"))
  part_dir = str(tmp_path / "part")
  first = rl.run_rl(_ppo_config(3), part_dir, stop_after=2)
  assert first.iteration == 2
  resumed = rl.run_rl(_ppo_config(3), part_dir)
  assert resumed.iteration == 3 and len(resumed.history) == 1
  a = jax.device_get(rl._to_tree(full.state))
  b = jax.device_get(rl._to_tree(resumed.state))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree.flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
  # The adaptive KL coefficient moved away from its initial value and was restored.
  assert float(a["kl_coef"]) != 0.05
  assert full.history[-1]["objective/scores"] == resumed.history[-1]["objective/scores"]


def test_grpo_raises_oracle_reward(tmp_path):
  c = _quiet(_experiment("grpo"), 24)
  c.mesh.data, c.mesh.fsdp = 8, 1
  res = rl.run_rl(c, str(tmp_path / "grpo"))
  cfg, rlc = rl.validate_rl(c, jax.device_count())
  r_pol, r_ref, kl = _evaluate(res.state, cfg, rlc)
  # Observed ~0.3 -> ~0.9 in 24 iterations of 8 prompts x 4 completions.
  assert r_pol - r_ref >= 0.3, (r_pol, r_ref)
  assert 0.0 < kl < 12.0, kl


def test_group_advantages_match_numpy():
  rng = np.random.default_rng(0)
  b, n, g = 8, 5, 4
  mask = (rng.uniform(size=(b, n)) < 0.8).astype(np.int32)
  logp = rng.normal(size=(b, n)).astype(np.float32) * mask
  ref = rng.normal(size=(b, n)).astype(np.float32) * mask
  scores = rng.normal(size=(b,)).astype(np.float32)
  roll = {"mask": mask, "old_logp": logp, "ref_logp": ref}
  # RLOO: r = score - beta * sum_t k1; A = r - mean of the other G-1 in the group.
  r = rl.RLConfig(algorithm="rloo", group_size=g, kl_estimator="k1")
  out = rl.group_advantages(roll, jnp.asarray(scores), 0.1, rl=r)
  rew = (scores - 0.1 * ((logp - ref) * mask).sum(1)).reshape(-1, g)
  loo = rew - (rew.sum(1, keepdims=True) - rew) / (g - 1)
  np.testing.assert_allclose(np.asarray(out["adv"]), loo.reshape(-1)[:, None] * mask,
                             rtol=1e-5, atol=1e-6)
  # GRPO: (score - group mean) / (unbiased group std + 1e-4); KL stays out of it.
  r = rl.RLConfig(algorithm="grpo", group_size=g)
  out = rl.group_advantages(roll, jnp.asarray(scores), 0.1, rl=r)
  s = scores.reshape(-1, g).astype(np.float64)
  adv = (s - s.mean(1, keepdims=True)) / (s.std(1, ddof=1, keepdims=True) + 1e-4)
  np.testing.assert_allclose(np.asarray(out["adv"]), adv.reshape(-1)[:, None] * mask,
                             rtol=1e-4, atol=1e-5)


def test_reward_and_value_read_the_right_positions():
  arch = tfm.TransformerConfig.tiny(vocab_size=32, d_model=32, mlp_dim=64)
  g, p = tfm.init(arch, jax.random.key(0))
  params = {"model": p, "head": heads.init_head(arch.d_model, jax.random.key(1))}
  prompts = [np.array([2, 5, 6]), np.array([2, 7, 8, 9, 10])]
  p_BxP, len_B = rl._left_pad(prompts, 6)
  comp = np.array([[4, 5, 3, 0], [6, 7, 8, 9]], np.int32)
  mask = sampling.completion_mask(jnp.asarray(comp), sampling.SamplingConfig(eos_id=3))
  seq, pos = sampling.assemble(jnp.asarray(p_BxP), jnp.asarray(len_B), jnp.asarray(comp),
                               mask)
  batch = {"sequences": seq, "positions": pos, "mask": mask,
           "segments": sampling.sequence_segments(jnp.asarray(p_BxP), jnp.asarray(len_B),
                                                  mask)}
  fwd = rl._fwd(g)
  scores, values = jax.jit(lambda prm, bt: (
      rl.reward_scores(fwd, prm, bt), rl.response_values(fwd, prm, bt, prompt_len=6)))(
          params, batch)
  scores, values = np.asarray(scores), np.asarray(values)
  per_token = jax.jit(lambda prm, toks: heads.token_scores(
      tfm.forward(g, prm["model"], toks, jnp.arange(toks.shape[1])[None])[0],
      prm["head"])[0])
  # Oracle: each row run alone, unpadded, through the model and the per-token head.
  for i in range(2):
    toks = np.concatenate([prompts[i], comp[i][np.asarray(mask[i]) > 0]])
    per_tok = np.asarray(per_token(params, jnp.asarray(toks)[None]))
    np.testing.assert_allclose(scores[i], per_tok[-1], rtol=1e-5, atol=1e-5)
    m = int(np.asarray(mask[i]).sum())
    # Value t = the state that emits completion token t (prompt end, then each token).
    np.testing.assert_allclose(values[i, :m], per_tok[len(prompts[i]) - 1:-1],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ppo", "grpo", "rloo", "rrhf_online"])
def test_experiment_configs_validate(name):
  cfg, rlc = rl.validate_rl(_experiment(name), 8)
  assert rlc.algorithm == {"rrhf_online": "rrhf"}.get(name, name)
  cfg, rlc = rl.validate_rl(_experiment(name, "hh,path=/x.jsonl,reward_path=/rm"), 8)
  assert rlc.reward == "checkpoint" and cfg.data.source == "file"
  with pytest.raises(ValueError, match="reward_path"):
    _experiment(name, "hh,path=/x.jsonl")


@pytest.mark.parametrize("key,value,match", [
    ("bogus", 1, r"config\.rl\.bogus: unknown key"),
    ("algorithm", "a2c", r"config\.rl\.algorithm"),
    ("kl_estimator", "k9", r"config\.rl\.kl_estimator"),
    ("value_init", "reward", r"config\.rl\.value_init"),
    ("num_minibatches", 3, r"config\.rl\.num_minibatches"),
    ("prompt_len", 4, r"config\.rl\.prompt_len"),
    ("temperature", 0.0, r"config\.rl\.temperature"),
    ("ppo_epochs", "2", r"config\.rl\.ppo_epochs: expected an int"),
])
def test_validate_rl_errors_name_the_key(key, value, match):
  c = _experiment("ppo").to_dict()
  c["rl"][key] = value
  with pytest.raises(ValueError, match=match):
    rl.validate_rl(c, 8)


def test_group_algorithms_need_groups():
  c = _experiment("grpo").to_dict()
  c["rl"]["group_size"] = 1
  with pytest.raises(ValueError, match=r"config\.rl\.group_size"):
    rl.validate_rl(c, 8)
  c = _experiment("ppo").to_dict()
  del c["rl"]
  with pytest.raises(ValueError, match=r"config\.rl"):
    rl.validate_rl(c, 8)


def test_reward_model_loads_from_a_reward_run_and_seeds_the_value_model(tmp_path):
  import dataclasses  # pylint: disable=g-import-not-at-top
  from jaxalign.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from jaxalign.train import loop  # pylint: disable=g-import-not-at-top
  from jaxalign.train import state as state_lib  # pylint: disable=g-import-not-at-top
  c = _experiment("ppo")
  c.rl.reward, c.rl.reward_path, c.rl.value_init = "checkpoint", str(tmp_path), "reward"
  with pytest.raises(ValueError, match=r"config\.rl\.value_init"):  # no reward model
    rl.validate_rl(dict(c.to_dict(), rl=dict(c.rl.to_dict(), reward="oracle")), 8)
  cfg, rlc = rl.validate_rl(c, 8)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  optimizer = rl._optimizer((cfg.optimizer, 0))
  with pytest.raises(ValueError, match="checkpoints/"):
    rl._load_reward(cfg, rlc, mesh, optimizer)
  # A checkpoint written the way the training loop writes a reward-model run.
  rcfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, head="scalar"))
  model = loop.build_model(rcfg, cfg.model.arch.vocab_size)
  state, _ = state_lib.init_train_state(model.init_params, optimizer, model.logical_axes,
                                        mesh, jax.random.key(3))
  with ckpt_lib.Checkpointer(tmp_path / "checkpoints", save_every=1, keep=1,
                             async_save=False) as ck:
    ck.save(7, loop._state_to_tree(state), None, force=True)
  _, reward = rl._load_reward(cfg, rlc, mesh, optimizer)
  want = jax.device_get(state.params)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(jax.device_get(reward))):
    np.testing.assert_array_equal(x, y)
  arch = cfg.model.arch
  value, _ = rl._init_value_state(rlc, arch, tfm.logical_axes(arch), optimizer, mesh,
                                  cfg.mesh.rules, None, reward, None, None,
                                  jax.random.key(0))
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(jax.device_get(value.params))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", ["rloo", "rrhf_online"])
def test_remaining_rl_configs_run_a_few_iterations(tmp_path, name):
  """Every online config in the README's table runs (ppo / grpo train in tests above):
  two iterations through `run_rl`, with finite losses and the metrics the issue names."""
  result = rl.run_rl(_quiet(_experiment(name, "tiny,runlocal"), 2), str(tmp_path))
  assert result.iteration == 2 and result.status == "done"
  assert len(result.history) == 2
  for metrics in result.history:
    values = [float(v) for v in metrics.values() if np.ndim(v) == 0]
    assert values and np.all(np.isfinite(values)), metrics
