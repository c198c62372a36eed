"""KV-cache sampler: equality with full re-forward decoding, teacher-forced log-probs,
per-row EOS stop, top-k / top-p support, sharded == unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models import sampling as S
from jaxalign.models import transformer as tfm
from jaxalign.ops import logprobs
from jaxalign.parallel import mesh as mesh_lib

B, P, N = 8, 8, 10
CFGS = {
    "plain": tfm.TransformerConfig.tiny(vocab_size=64, d_model=32, mlp_dim=64),
    "window_bias_tied": tfm.TransformerConfig.tiny(
        vocab_size=64, d_model=32, mlp_dim=64, sliding_window=4, qkv_bias=True,
        tie_embeddings=True),
}


def _prompts(seed=0):
  rng = np.random.default_rng(seed)
  lens = np.array([8, 3, 5, 1, 7, 2, 8, 4], np.int32)
  prompt = np.zeros((B, P), np.int32)
  for i, l in enumerate(lens):
    prompt[i, P - l:] = rng.integers(4, 64, l)
  return prompt, lens


def _params(cfg, seed=0):
  g, p = tfm.init(cfg, jax.random.key(seed))
  # Random init is near-uniform; sharpen it so greedy paths are not decided by ties.
  p = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, p)
  if "layers" in p and cfg.qkv_bias:
    p["layers"]["bk"] = 0.1 * jax.random.normal(jax.random.key(5), p["layers"]["bk"].shape)
  return g, p


def _teacher_forced(g, p, out, prompt, lens, temperature=1.0):
  seg = S.sequence_segments(jnp.asarray(prompt), jnp.asarray(lens), out.mask)
  h, u = tfm.forward(g, p, out.sequences, out.positions, seg)
  return logprobs.token_logprobs(h[:, P - 1:-1] / temperature, u, out.sequences[:, P:])


@pytest.mark.parametrize("name", sorted(CFGS))
def test_greedy_cached_equals_full_reforward(name):
  cfg = CFGS[name]
  g, p = _params(cfg)
  prompt, lens = _prompts()
  key = jax.random.key(1)
  # Pick as EOS a token greedy emits first at step j >= 1 of row 0: row 0 must stop there.
  probe = S.SamplingConfig(max_new_tokens=N, greedy=True, eos_id=-1)
  first = np.asarray(
      S.generate_uncached(g, p, probe, jnp.asarray(prompt), jnp.asarray(lens), key)[0])[0]
  j = next(i for i in range(1, N) if first[i] not in first[:i])
  eos = int(first[j])
  scfg = S.SamplingConfig(max_new_tokens=N, greedy=True, eos_id=eos)
  out = S.Sampler(cfg, scfg, batch=B, prompt_len=P)(p, prompt, lens, key)
  ref_t, ref_m, ref_lp = jax.jit(
      lambda pp: S.generate_uncached(g, pp, scfg, jnp.asarray(prompt), jnp.asarray(lens),
                                     key))(p)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref_t))
  np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(ref_m))
  np.testing.assert_allclose(np.asarray(out.logp), np.asarray(ref_lp), atol=1e-5)
  toks, mask = np.asarray(out.tokens), np.asarray(out.mask)
  assert mask[0, :j + 1].all() and not mask[0, j + 1:].any() and toks[0, j] == eos
  # Every row: after its first EOS only pad, mask 0, log-prob 0.
  for r in range(B):
    hits = np.nonzero(toks[r] == eos)[0]
    stop = hits[0] + 1 if hits.size else N
    assert mask[r, :stop].all() and not mask[r, stop:].any()
    assert (toks[r, stop:] == scfg.pad_id).all()
    assert (np.asarray(out.logp)[r, stop:] == 0).all()
  # Greedy log-probs are the teacher-forced log-probs (1e-5).
  tf = np.asarray(_teacher_forced(g, p, out, prompt, lens)) * mask
  np.testing.assert_allclose(np.asarray(out.logp), tf, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_teacher_forced(temperature):
  cfg = CFGS["plain"]
  g, p = _params(cfg)
  prompt, lens = _prompts(1)
  scfg = S.SamplingConfig(max_new_tokens=N, temperature=temperature, eos_id=3)
  sampler = S.Sampler(cfg, scfg, batch=B, prompt_len=P)
  out = sampler(p, prompt, lens, jax.random.key(7))
  tf = np.asarray(_teacher_forced(g, p, out, prompt, lens, temperature))
  mask = np.asarray(out.mask)
  np.testing.assert_allclose(np.asarray(out.logp), tf * mask, atol=1e-5)
  # Same key -> same sample; another key -> another sample (the key is used).
  again = sampler(p, prompt, lens, jax.random.key(7))
  np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(out.tokens))
  other = sampler(p, prompt, lens, jax.random.key(8))
  assert not np.array_equal(np.asarray(other.tokens), np.asarray(out.tokens))
  # Sampling with the cache equals the re-forward sampler draw for draw.
  ref_t = S.generate_uncached(g, p, scfg, jnp.asarray(prompt), jnp.asarray(lens),
                              jax.random.key(7))[0]
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref_t))


def _allowed_np(logits, top_k, top_p):
  """NumPy oracle of the kept set: top-k by rank, then the nucleus of the rest."""
  order = np.argsort(-logits, kind="stable")
  keep = np.zeros(logits.size, bool)
  keep[order[:top_k] if top_k else order] = True
  if top_p < 1.0:
    lg = np.where(keep, logits, -np.inf)
    pr = np.exp(lg - lg.max())
    pr /= pr.sum()
    mass = 0.0
    nucleus = np.zeros_like(keep)
    for i in np.argsort(-lg, kind="stable"):
      if mass >= top_p:
        break
      nucleus[i] = True
      mass += pr[i]
    keep &= nucleus
  return keep


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (6, 0.8)])
def test_top_k_top_p_sample_only_allowed(top_k, top_p):
  v = 20
  logits = np.log(np.linspace(1.0, 3.0, v) ** 3)  # distinct, smooth probabilities
  logits = np.random.default_rng(0).permutation(logits).astype(np.float32)
  allowed = _allowed_np(logits.astype(np.float64), top_k, top_p)
  scfg = S.SamplingConfig(top_k=top_k, top_p=top_p)
  rows = 20000
  toks, _ = jax.jit(lambda k: S.sample_token(
      k, jnp.broadcast_to(jnp.asarray(logits), (rows, v)), scfg))(jax.random.key(0))
  counts = np.bincount(np.asarray(toks), minlength=v)
  assert counts[~allowed].sum() == 0
  # Within the allowed set, frequencies follow the renormalised probabilities:
  # 5 standard errors of a binomial proportion with 20000 draws.
  pr = np.where(allowed, np.exp(logits - logits.max()), 0.0)
  pr /= pr.sum()
  freq = counts / rows
  se = np.sqrt(pr * (1 - pr) / rows)
  assert np.all(np.abs(freq - pr) <= 5 * se + 1e-12)


def test_sharded_sampler_equals_unsharded():
  cfg = CFGS["plain"]
  g, p = _params(cfg)
  prompt, lens = _prompts(2)
  scfg = S.SamplingConfig(max_new_tokens=N, temperature=1.0, eos_id=3)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  shapes = jax.eval_shape(lambda: p)
  sh = mesh_lib.param_shardings(tfm.logical_axes(cfg), mesh, shapes_tree=shapes)
  p_sh = jax.device_put(p, sh)
  sharded = S.Sampler(cfg, scfg, batch=B, prompt_len=P, mesh=mesh, param_shardings=sh)
  out_sh = sharded(p_sh, prompt, lens, jax.random.key(3))
  out = S.Sampler(cfg, scfg, batch=B, prompt_len=P)(p, prompt, lens, jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(out_sh.tokens), np.asarray(out.tokens))
  np.testing.assert_allclose(np.asarray(out_sh.logp), np.asarray(out.logp), atol=1e-5)
  # The cache is sharded over rows and kv heads; a second call reuses the program.
  assert sharded._cache.k.sharding.spec == jax.sharding.PartitionSpec(
      None, mesh_lib.BATCH_AXES, None, "tensor", None)
  sharded(p_sh, prompt, lens, jax.random.key(4))
  assert sharded._decode._cache_size() == 1 and sharded._prefill._cache_size() == 1


def test_bad_inputs_raise():
  cfg = CFGS["plain"]
  _, p = _params(cfg)
  sampler = S.Sampler(cfg, S.SamplingConfig(max_new_tokens=2), batch=B, prompt_len=P)
  prompt, lens = _prompts()
  with pytest.raises(ValueError, match="prompt_len=8"):
    sampler(p, prompt[:, :5], lens, jax.random.key(0))
  with pytest.raises(ValueError, match=r"in \[1, 8\]"):
    sampler(p, prompt, np.full((B,), 9), jax.random.key(0))
  with pytest.raises(ValueError, match="temperature"):
    S.SamplingConfig(temperature=0.0)
  with pytest.raises(ValueError, match="top_p"):
    S.SamplingConfig(top_p=1.5)
