"""Issue 16 for online RL: ``model.lora.rank > 0`` trains adapters only, on one frozen
base that is also the reference (jaxalign/train/rl_lora.py).

Oracles: the base's own forward without adapters (teacher-forced log-probs), and the
merged weights W + (alpha / r) A B (`lora.merge`) run as a plain model for what the
sampler must draw from once the adapters are trained; XLA's compiled memory analysis
for the argument bytes of the update step."""

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign.models import lora as lora_lib
from jaxalign.models import sampling
from jaxalign.train import build
from jaxalign.train import objectives as obj_lib
from jaxalign.train import rl
from jaxalign.train import rl_steps

# Each test trains (or compiles) the tiny model's RL programs: minutes on CPU.
pytestmark = pytest.mark.slow

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")
TOL = 2e-5  # f32: the KV-cache decode vs a full teacher-forced forward


def _config(name, rank=2, lr=1e-2):
  spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS,
                                                                   f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("tiny,runlocal")
  c.num_steps = 1
  c.log.progress_bar = c.log.tensorboard = False
  c.checkpoint.async_save = False
  c.model.lora.rank = rank
  # A large step, so that one iteration moves the adapters visibly.
  c.optimizer.learning_rate = lr
  return c


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _base_logprobs(arch, rlc, params, batch):
  """Teacher-forced log-probs [B, N] of a plain model (no adapters), on the host."""
  fwd = obj_lib.model_forward_fn(build.graphdef(arch))
  batch = {k: np.asarray(v) for k, v in batch.items() if k != "sampler_logp"}
  lp, _ = rl_steps.response_logprobs(fwd, params, batch, prompt_len=rlc.prompt_len,
                                     temperature=rlc.temperature, chunk_size=256)
  return np.asarray(lp) * batch["mask"]


@pytest.fixture(scope="module")
def grpo(tmp_path_factory):
  """One LoRA GRPO iteration, with what it saw before and after."""
  c = _config("grpo")
  cfg, rlc = config_lib.validate_rl(c, jax.device_count())
  workdir = str(tmp_path_factory.mktemp("grpo_lora"))
  run = rl.setup(cfg, rlc, workdir, log=lambda m: None)
  t, s0 = run.trainer, run.state
  prompts = [p for p in t.prompts(0) for _ in range(rlc.group_size)]
  key = jax.random.fold_in(jax.random.fold_in(s0.rollout_key, 0), 0)
  batch0, out0 = rl._rollout(t, s0, prompts, key)  # pylint: disable=protected-access
  scored0, _ = rl._score(t, s0, batch0, prompts, out0)  # pylint: disable=protected-access
  mb = t.programs.take(scored0, jnp.arange(batch0["mask"].shape[0] // rlc.num_minibatches))
  before = {"base": _host(s0.base), "adapters": _host(s0.policy.params),
            "opt_state": _host(s0.policy.opt_state)}
  s1, metrics = rl.iteration(t, s0, 0)  # donates s0.policy
  batch1, out1 = rl._rollout(t, s1, prompts, key)  # pylint: disable=protected-access
  scored1, _ = rl._score(t, s1, batch1, prompts, out1)  # pylint: disable=protected-access
  run.ckpt.close()
  run.logger.close()
  return dict(cfg=cfg, rlc=rlc, run=run, before=before, s1=s1, metrics=metrics,
              batch0=_host(batch0), out0=_host(out0), batch1=_host(batch1),
              out1=_host(out1), scored1=_host(scored1), mb=mb, c=c)


def test_first_rollout_is_the_base_models(grpo):
  """B = 0: the sampler's log-probs of the first rollout are the base's own
  (teacher-forced, no adapters) and its scored policy log-probs equal the reference's."""
  g = grpo
  want = _base_logprobs(g["cfg"].model.arch, g["rlc"], g["before"]["base"], g["batch0"])
  np.testing.assert_allclose(g["out0"].logp, want, atol=TOL)
  assert all(np.all(ad["b"] == 0) for ad in g["before"]["adapters"]["lora"].values())


def test_an_iteration_trains_the_adapters_and_nothing_else(grpo):
  g = grpo
  s1, before = g["s1"], g["before"]
  base_after = _host(s1.base)
  for (path, x), y in zip(jax.tree.flatten_with_path(before["base"])[0],
                          jax.tree.leaves(base_after)):
    np.testing.assert_array_equal(x, y, err_msg=f"base weight {path} changed")
  # The reference is the base (the same buffers), not a copy.
  assert s1.ref_params is s1.base
  after = _host(s1.policy.params)
  assert set(after) == {"lora"}
  assert all(np.abs(ad["b"]).max() > 0 for ad in after["lora"].values())
  # With B = 0 the gradient of A, x^T (dL/dy) B^T (alpha / r), is exactly 0: the first
  # step moves B only (an analytic check that the gradients are the adapters' own).
  for n, ad in after["lora"].items():
    np.testing.assert_array_equal(ad["a"], before["adapters"]["lora"][n]["a"])
  # Optimizer state: Adam's two moments of the adapters, plus scalar counters.
  n_adapter = sum(x.size for x in jax.tree.leaves(after))
  n_opt = sum(x.size for x in jax.tree.leaves(_host(s1.policy.opt_state)))
  assert 2 * n_adapter <= n_opt <= 2 * n_adapter + 8, (n_adapter, n_opt)
  assert n_adapter < sum(x.size for x in jax.tree.leaves(base_after)) / 3
  assert g["metrics"]["update_norm"] > 0 and np.isfinite(g["metrics"]["loss"])


def test_sampler_decodes_with_the_trained_adapters(grpo):
  """After the iteration the sampler's log-probs are the merged model's
  (W + (alpha / r) A B, a plain forward), not the base's."""
  g = grpo
  arch, lcfg = g["cfg"].model.arch, g["cfg"].model.lora
  merged = lora_lib.merge(g["before"]["base"], _host(g["s1"].policy.params)["lora"], lcfg)
  want = _base_logprobs(arch, g["rlc"], merged, g["batch1"])
  np.testing.assert_allclose(g["out1"].logp, want, atol=TOL)
  base = _base_logprobs(arch, g["rlc"], g["before"]["base"], g["batch1"])
  assert np.abs(g["out1"].logp - base).max() > 100 * TOL


def test_reference_logprobs_are_the_base_models(grpo):
  g = grpo
  arch = g["cfg"].model.arch
  base = _base_logprobs(arch, g["rlc"], g["before"]["base"], g["batch1"])
  np.testing.assert_allclose(g["scored1"]["ref_logp"], base, atol=TOL)
  # ... while the policy's are the trained adapters' (the KL is not trivially 0).
  assert np.abs(g["scored1"]["old_logp"] - base).max() > 100 * TOL


def test_update_compiles_with_fewer_argument_bytes_than_a_full_fine_tune(grpo):
  """XLA's memory analysis of the compiled update step (per device, the same mesh):
  LoRA's arguments are the frozen base + adapters + their Adam moments, a full fine
  tune's the weights + their Adam moments (3x the weights)."""
  g = grpo
  cfg, rlc, s1 = g["cfg"], g["rlc"], g["s1"]
  t = g["run"].trainer
  lora_args = t.programs.update.lower(s1.policy, None, g["mb"], s1.kl.kl_coef,
                                      s1.base).compile().memory_analysis()
  full_model = dataclasses.replace(cfg.model, lora=lora_lib.LoraConfig())
  policy = build.build_model(full_model, cfg.model.arch.vocab_size)
  from jaxalign.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_mesh(cfg.mesh)
  optimizer = build.make_optimizer(cfg.optimizer, 0)
  state, sh = build.initial_state(policy, optimizer, mesh, cfg.mesh.rules,
                                  jax.random.key(0))
  programs = rl_steps.build_programs(policy, None, rlc, optimizer,
                                     rows=cfg.data.batch_size * rlc.group_size,
                                     mesh=mesh, rules=cfg.mesh.rules,
                                     param_shardings=sh.params)
  full_args = programs.update.lower(state, None, g["mb"], s1.kl.kl_coef
                                    ).compile().memory_analysis()
  weights = rl._bytes_per_device(state.params)  # pylint: disable=protected-access
  assert full_args.argument_size_in_bytes >= 3 * weights
  assert lora_args.argument_size_in_bytes < full_args.argument_size_in_bytes - weights, (
      lora_args.argument_size_in_bytes, full_args.argument_size_in_bytes, weights)


def test_checkpoint_holds_adapters_and_refuses_another_base(grpo, tmp_path):
  """A LoRA GRPO run through `run_rl`: its checkpoint has no base (nor reference) and
  names its base; a resume on another base (here another seed's init) is refused
  naming both."""
  g = grpo
  workdir = str(tmp_path / "run")
  res = rl.run_rl(g["c"], workdir, programs=g["run"].trainer.programs)
  assert res.status == "done" and np.isfinite(res.history[-1]["loss"])
  tree = rl.to_tree(res.state)
  assert tree["ref_params"] is None and set(tree["policy"]["params"]) == {"lora"}
  from jaxalign import checkpoint as ckpt_lib
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                             keep=5) as ck:
    meta = ck.read_meta(1)
  assert meta["lora_base_source"] == "random init (seed 0)"
  other = dataclasses.replace(g["cfg"], seed=7)
  with pytest.raises(ValueError, match=r"belong to the base random init \(seed 0\).*"
                     r"this run's base is random init \(seed 7\)"):
    rl.setup(other, g["rlc"], workdir, log=lambda m: None)


# ~65 s on 2 cores; the default run covers LoRA RL through GRPO's run_rl above.
@pytest.mark.heavy
def test_ppo_with_lora_trains_policy_and_value_adapters(tmp_path):
  """PPO: the value model is the same base with its own adapters and a fresh head;
  both sets of adapters (and the head) train, the base does not."""
  c = _config("ppo")
  res = rl.run_rl(c, str(tmp_path))
  assert res.status == "done"
  assert all(np.isfinite(v) for v in res.history[-1].values())
  value = _host(res.state.value.params)
  assert set(value) == {"lora", "head"}
  assert all(np.abs(ad["b"]).max() > 0 for ad in value["lora"].values())
  assert all(np.abs(ad["b"]).max() > 0
             for ad in _host(res.state.policy.params)["lora"].values())
  # The base after the run is the seed's init, rebuilt independently.
  from jaxalign.parallel import mesh as mesh_lib
  cfg, _ = config_lib.validate_rl(c, jax.device_count())
  k_policy = jax.random.split(jax.random.key(cfg.seed), 3)[0]
  fresh, _ = build.base_params(build.build_model(cfg.model, cfg.model.arch.vocab_size),
                               mesh_lib.make_mesh(cfg.mesh), cfg.mesh.rules, k_policy)
  for x, y in zip(jax.tree.leaves(_host(fresh)), jax.tree.leaves(_host(res.state.base))):
    np.testing.assert_array_equal(x, y)
