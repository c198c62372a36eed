"""Rollout engine (continuous batching, group-shared prefill): greedy equals the full
re-forward, sampled log-probs equal teacher-forced ones, completions do not depend on
the slot count, one compilation, finish reasons; the Sampler's group-shared prefill
equals its plain prefill."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models import engine as E
from jaxalign.models import sampling as S
from jaxalign.models import transformer as tfm
from jaxalign.ops import logprobs
from jaxalign.parallel import mesh as mesh_lib

B, P, N = 8, 8, 10
CFG = tfm.TransformerConfig.tiny(vocab_size=64, d_model=32, mlp_dim=64)
CFG_WINDOW = tfm.TransformerConfig.tiny(vocab_size=64, d_model=32, mlp_dim=64,
                                        sliding_window=4, qkv_bias=True,
                                        tie_embeddings=True)


def _prompts(seed=0, group=1):
  rng = np.random.default_rng(seed)
  lens = np.array([8, 3, 5, 1, 7, 2, 8, 4], np.int32)[:B // group]
  prompt = np.zeros((B // group, P), np.int32)
  for i, l in enumerate(lens):
    prompt[i, P - l:] = rng.integers(4, 64, l)
  return np.repeat(prompt, group, 0), np.repeat(lens, group, 0)


def _params(cfg, seed=0):
  g, p = tfm.init(cfg, jax.random.key(seed))
  # Random init is near-uniform; sharpen it so greedy paths are not decided by ties.
  p = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, p)
  return g, p


def _teacher_forced(g, p, out, prompt, lens, temperature=1.0):
  seg = S.sequence_segments(jnp.asarray(prompt), jnp.asarray(lens), out.mask)
  h, u = tfm.forward(g, p, out.sequences, out.positions, seg)
  return logprobs.token_logprobs(h[:, P - 1:-1] / temperature, u, out.sequences[:, P:])


def _greedy_eos(g, p, prompt, lens):
  """A token greedy emits first at step j >= 1 of row 0 (so row 0 stops there)."""
  probe = S.SamplingConfig(max_new_tokens=N, greedy=True, eos_id=-1)
  first = np.asarray(S.generate_uncached(g, p, probe, jnp.asarray(prompt),
                                         jnp.asarray(lens), jax.random.key(0))[0])[0]
  j = next(i for i in range(1, N) if first[i] not in first[:i])
  return int(first[j]), j


@pytest.mark.parametrize("cfg,slots", [(CFG, 3), (CFG_WINDOW, 8)])
def test_greedy_engine_equals_full_reforward(cfg, slots):
  g, p = _params(cfg)
  prompt, lens = _prompts()
  eos, j = _greedy_eos(g, p, prompt, lens)
  scfg = S.SamplingConfig(max_new_tokens=N, greedy=True, eos_id=eos)
  out = E.Engine(cfg, scfg, batch=B, prompt_len=P, slots=slots).generate(
      p, prompt, lens, jax.random.key(1))
  ref_t, ref_m, ref_lp = jax.jit(lambda pp: S.generate_uncached(
      g, pp, scfg, jnp.asarray(prompt), jnp.asarray(lens), jax.random.key(1)))(p)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref_t))
  np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(ref_m))
  np.testing.assert_allclose(np.asarray(out.logp), np.asarray(ref_lp), atol=1e-5)
  toks, mask, finish = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.finish)
  assert mask[0, :j + 1].all() and not mask[0, j + 1:].any() and toks[0, j] == eos
  # Finish reasons from the tokens: EOS iff the completion holds the stop id.
  has_eos = (toks == eos).any(1)
  np.testing.assert_array_equal(finish, np.where(has_eos, E.FINISH_EOS, E.FINISH_LENGTH))
  assert has_eos.any() and not has_eos.all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_teacher_forced(temperature):
  g, p = _params(CFG)
  prompt, lens = _prompts(1)
  scfg = S.SamplingConfig(max_new_tokens=N, temperature=temperature, eos_id=3)
  eng = E.Engine(CFG, scfg, batch=B, prompt_len=P, slots=3)
  out = eng.generate(p, prompt, lens, jax.random.key(7))
  tf = np.asarray(_teacher_forced(g, p, out, prompt, lens, temperature))
  mask = np.asarray(out.mask)
  np.testing.assert_allclose(np.asarray(out.logp), tf * mask, atol=1e-5)
  # Another key, another sample; same key, same sample; one compiled program.
  other = eng.generate(p, prompt, lens, jax.random.key(8))
  assert not np.array_equal(np.asarray(other.tokens), np.asarray(out.tokens))
  eng.generate(p, prompt[::-1].copy(), lens[::-1].copy(), jax.random.key(7))
  assert eng._run._cache_size() == 1  # new prompts / keys: no new lowering


def test_completions_do_not_depend_on_slot_count():
  _, p = _params(CFG)
  prompt, lens = _prompts(2)
  scfg = S.SamplingConfig(max_new_tokens=N, temperature=1.0, eos_id=5)
  outs = [E.Engine(CFG, scfg, batch=B, prompt_len=P, slots=s).generate(
      p, prompt, lens, jax.random.key(3)) for s in (2, 5, 8)]
  for o in outs[1:]:
    np.testing.assert_array_equal(np.asarray(o.tokens), np.asarray(outs[0].tokens))
    np.testing.assert_array_equal(np.asarray(o.finish), np.asarray(outs[0].finish))
    np.testing.assert_allclose(np.asarray(o.logp), np.asarray(outs[0].logp), atol=1e-6)
  # Lengths vary (else no slot is ever reused mid-run).
  assert len(set(np.asarray(outs[0].mask).sum(1).tolist())) > 1


def test_group_shared_prefill_equals_plain_prefill():
  """G = 4 adjacent copies of each prompt: prefilled once and broadcast, outputs equal
  the per-row prefill's with the same key (Sampler: its [B, V] draw per step; Engine:
  per-completion keys)."""
  _, p = _params(CFG)
  prompt, lens = _prompts(3, group=4)
  scfg = S.SamplingConfig(max_new_tokens=N, temperature=1.0, eos_id=5)
  key = jax.random.key(4)
  plain = S.Sampler(CFG, scfg, batch=B, prompt_len=P)(p, prompt, lens, key)
  shared = S.Sampler(CFG, scfg, batch=B, prompt_len=P, group_size=4)(p, prompt, lens, key)
  np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(plain.tokens))
  np.testing.assert_allclose(np.asarray(shared.logp), np.asarray(plain.logp), atol=1e-6)
  e_plain = E.Engine(CFG, scfg, batch=B, prompt_len=P, slots=4).generate(p, prompt, lens, key)
  e_shared = E.Engine(CFG, scfg, batch=B, prompt_len=P, slots=4, group_size=4).generate(
      p, prompt, lens, key)
  np.testing.assert_array_equal(np.asarray(e_shared.tokens), np.asarray(e_plain.tokens))
  np.testing.assert_allclose(np.asarray(e_shared.logp), np.asarray(e_plain.logp), atol=1e-6)
  # The group's samples differ from each other (per-completion keys).
  assert len({tuple(r) for r in np.asarray(e_shared.tokens)[:4]}) > 1
  with pytest.raises(ValueError, match="adjacent rows"):
    S.Sampler(CFG, scfg, batch=B, prompt_len=P, group_size=4)(
        p, np.roll(prompt, 1, 0), np.roll(lens, 1, 0), key)


def test_bf16_cache_and_sharded_engine():
  """A bf16 KV cache under the f32 model: half the bytes, log-probs within bf16
  rounding of the f32 cache's; sharded over (data, fsdp, tensor) == unsharded."""
  g, p = _params(CFG)
  prompt, lens = _prompts(4)
  scfg = S.SamplingConfig(max_new_tokens=N, greedy=True, eos_id=-1)
  key = jax.random.key(0)
  f32 = E.Engine(CFG, scfg, batch=B, prompt_len=P, slots=4)
  bf16 = E.Engine(CFG, scfg, batch=B, prompt_len=P, slots=4, cache_dtype=jnp.bfloat16)
  assert bf16._cache.k.dtype == jnp.bfloat16
  assert 2 * bf16.kv_cache_bytes() - f32.kv_cache_bytes() <= 2 * 4 * 4 * (P + N)  # kpos
  o32, o16 = f32.generate(p, prompt, lens, key), bf16.generate(p, prompt, lens, key)
  # Oracle: teacher-forced log-probs of the bf16 run's own tokens (f32 model, no cache);
  # the bf16 cache rounds k / v to 8 bits of mantissa (relative 2^-8).
  tf = np.asarray(_teacher_forced(g, p, o16, prompt, lens))
  np.testing.assert_allclose(np.asarray(o16.logp), tf, atol=5e-2)
  assert np.abs(np.asarray(o16.logp) - tf).max() > 0  # the rounding is there
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  sh = mesh_lib.param_shardings(tfm.logical_axes(CFG), mesh,
                                shapes_tree=jax.eval_shape(lambda: p))
  eng = E.Engine(CFG, scfg, batch=B, prompt_len=P, slots=4, mesh=mesh, param_shardings=sh)
  out = eng.generate(jax.device_put(p, sh), prompt, lens, key)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(o32.tokens))
  np.testing.assert_allclose(np.asarray(out.logp), np.asarray(o32.logp), atol=1e-5)
  assert eng._cache.k.sharding.spec == jax.sharding.PartitionSpec(
      None, mesh_lib.BATCH_AXES, None, "tensor", None)


def _grpo(steps, **rl_keys):
  import importlib.util, os  # pylint: disable=g-import-not-at-top,multiple-imports
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "grpo.py")
  spec = importlib.util.spec_from_file_location("grpo_cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("tiny,runlocal")
  c.num_steps = steps
  c.log.progress_bar = False
  c.log.tensorboard = False
  c.checkpoint.async_save = False
  for k, v in rl_keys.items():
    c.rl[k] = v
  return c


def test_grpo_runs_on_the_engine(tmp_path):
  """rl.engine='continuous' (half the rows as slots, bf16 cache): GRPO iterations run
  with the engine's rollouts downstream; the memory plan shows its cache bytes."""
  from jaxalign.train import rl  # pylint: disable=g-import-not-at-top
  c = _grpo(2, engine="continuous", engine_slots=16, kv_cache_dtype="bfloat16")
  lines = []
  res = rl.run_rl(c, str(tmp_path), log=lines.append)
  eng = res.programs.sampler
  assert isinstance(eng, E.Engine) and eng.slots == 16 and eng.group_size == c.rl.group_size
  assert eng._cache.k.dtype == jnp.bfloat16
  assert res.iteration == 2 and res.status == "done"
  for metrics in res.history:
    values = [float(v) for v in metrics.values() if np.ndim(v) == 0]
    assert values and np.all(np.isfinite(values)), metrics
  plan = next(l for l in lines if l.startswith("memory plan"))
  assert f"sampler/kv_cache={eng.kv_cache_bytes():,}" in plan


@pytest.mark.heavy
def test_grpo_on_the_engine_raises_oracle_reward(tmp_path):
  """As test_rl's static-sampler GRPO test: the oracle score rises over 24 iterations."""
  from jaxalign.train import rl  # pylint: disable=g-import-not-at-top
  c = _grpo(24, engine="continuous", engine_slots=16)
  c.mesh.data, c.mesh.fsdp = 8, 1
  hist = rl.run_rl(c, str(tmp_path)).history
  score = lambda h: np.mean([float(x["objective/oracle"]) for x in h])
  assert score(hist[-4:]) - score(hist[:4]) >= 0.3, (score(hist[:4]), score(hist[-4:]))


@pytest.mark.parametrize("key,value,match", [
    ("engine", "paged", r"config\.rl\.engine: 'paged' is not one of"),
    ("engine_slots", 4, r"config\.rl\.engine_slots: is read only with"),
    ("kv_cache_dtype", "fp8", r"config\.rl\.kv_cache_dtype"),
])
def test_engine_config_errors_name_the_key(key, value, match):
  from jaxalign import config as config_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=match):
    config_lib.validate_rl(_grpo(1, **{key: value}), 8)
  with pytest.raises(ValueError, match=r"engine_slots: must be in \[0, rows=32\]"):
    config_lib.validate_rl(_grpo(1, engine="continuous", engine_slots=33), 8)
