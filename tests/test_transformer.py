"""Tests for the Llama-family transformer, attention masks and scalar heads.

Oracles: NumPy transcriptions (attention rule, softmax attention, head gather), algebraic
identities (packing / prefix sharing equal separate runs; remat does not change
gradients), and shape bookkeeping. Parity with transformers lives in test_hf.py.
"""

import functools

import jax
import jax.numpy as jnp
import jax.test_util  # noqa: F401  (check_grads; a submodule, not imported by jax)
import numpy as np
import pytest

from jaxalign.models import heads
from jaxalign.models import transformer as tm
from jaxalign.ops import masks

CFG = tm.TransformerConfig.tiny()
ALLOWED_AXES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", None}


@functools.lru_cache(maxsize=None)
def _model(cfg=CFG):
  return tm.init(cfg, jax.random.key(0))


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens, positions, segment_ids=None, branch_ids=None,
            attention_mask=None):
  return tm.logits(graphdef, params, tokens, positions, segment_ids, branch_ids, attention_mask)


def _run(tokens, positions, segment_ids=None, branch_ids=None, attention_mask=None, cfg=CFG):
  graphdef, params = _model(cfg)
  as_i32 = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  return np.asarray(_logits(graphdef, params, as_i32(tokens)[None], as_i32(positions)[None],
                            None if segment_ids is None else as_i32(segment_ids)[None],
                            None if branch_ids is None else as_i32(branch_ids)[None],
                            attention_mask))[0]


def _rand_tokens(n, seed):
  return np.random.default_rng(seed).integers(1, CFG.vocab_size, n)


# ----------------------------------------------------------------------------- masks


def _mask_oracle(seg, br):
  """Literal transcription of the attention rule in docs/architecture.md."""
  t = len(seg)
  m = np.zeros((t, t), bool)
  for i in range(t):
    for j in range(t):
      m[i, j] = seg[i] == seg[j] != 0 and j <= i and (br[j] == 0 or br[j] == br[i])
  return m


def test_mask_matches_rule():
  seg = np.array([1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0])
  br = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 0])
  got = masks.make_attention_mask(1, len(seg), jnp.asarray(seg)[None], jnp.asarray(br)[None])
  np.testing.assert_array_equal(np.asarray(got[0]), _mask_oracle(seg, br))
  # Omitted ids = plain causal.
  np.testing.assert_array_equal(np.asarray(masks.make_attention_mask(1, 4)[0]),
                                np.tril(np.ones((4, 4), bool)))
  # Sliding window of 2 over positions: query i sees keys i-1 and i only.
  pos = jnp.arange(5)[None]
  win = np.asarray(masks.make_attention_mask(1, 5, positions_BxT=pos, sliding_window=2)[0])
  np.testing.assert_array_equal(win, np.tril(np.ones((5, 5), bool)) & ~np.tril(
      np.ones((5, 5), bool), -2))
  with pytest.raises(ValueError, match="attention_mask has shape"):
    masks.make_attention_mask(1, 4, attention_mask_BxTxT=jnp.ones((1, 3, 3), bool))


def test_attention_core_matches_numpy():
  rng = np.random.default_rng(0)
  b, t, h, g, k = 2, 5, 4, 2, 8
  q = rng.normal(size=(b, t, h, k)).astype(np.float32)
  kk = rng.normal(size=(b, t, g, k)).astype(np.float32)
  v = rng.normal(size=(b, t, g, k)).astype(np.float32)
  mask = rng.random((b, t, t)) < 0.6
  mask[:, np.arange(t), np.arange(t)] = True
  got = np.asarray(tm.attention_core(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v),
                                     jnp.asarray(mask)))
  want = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      gi = hi // (h // g)  # query head hi uses kv head hi // group_size
      s = q[bi, :, hi] @ kk[bi, :, gi].T / np.sqrt(k)
      s = np.where(mask[bi], s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      want[bi, :, hi] = p @ v[bi, :, gi]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)  # f32 tolerance


def test_attention_core_gradients():
  """The hand-written backward against numerical differences (f64) and against autodiff
  through a plain softmax transcription; a fully masked (padding) row gets no gradient."""
  rng = np.random.default_rng(1)
  b, t, h, g, k = 2, 5, 4, 2, 8
  mask = rng.random((b, t, t)) < 0.6
  mask[:, np.arange(t), np.arange(t)] = True
  mask[1, 3] = False  # a padding query row: uniform attention, constant in q and k

  def plain(q, kk, v):
    r = h // g
    s = jnp.einsum("bthk,bshk->bhts", q, jnp.repeat(kk, r, axis=2)) / np.sqrt(k)
    s = jnp.where(jnp.asarray(mask)[:, None], s, -1e30)
    return jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(s, -1), jnp.repeat(v, r, axis=2))

  with jax.enable_x64(True):
    q, kk, v = (jnp.asarray(rng.normal(size=(b, t, n, k))) for n in (h, g, g))
    core = lambda q, kk, v: tm.attention_core(q, kk, v, jnp.asarray(mask))
    jax.test_util.check_grads(core, (q, kk, v), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
    cot = jnp.asarray(rng.normal(size=(b, t, h, k)))
    got = jax.grad(lambda *a: jnp.sum(core(*a) * cot), argnums=(0, 1, 2))(q, kk, v)
    want = jax.grad(lambda *a: jnp.sum(plain(*a) * cot), argnums=(0, 1, 2))(q, kk, v)
    for a, w in zip(got, want):
      np.testing.assert_allclose(a, w, atol=1e-12, rtol=1e-10)  # f64: same maths
    np.testing.assert_array_equal(got[0][1, 3], 0.0)


# ----------------------------------------------------------------------------- model identities


def test_causality():
  toks = _rand_tokens(12, 1)
  pos = np.arange(12)
  base = _run(toks, pos)
  changed = toks.copy()
  changed[8] = (changed[8] + 1) % CFG.vocab_size
  out = _run(changed, pos)
  np.testing.assert_array_equal(out[:8], base[:8])  # earlier positions bit-identical
  assert np.abs(out[8:] - base[8:]).max() > 1e-4  # the change is visible from position 8 on


def test_packing_equals_separate_runs():
  a, b = _rand_tokens(5, 2), _rand_tokens(7, 3)
  row = np.concatenate([a, b, np.zeros(4, int)])
  seg = np.array([1] * 5 + [2] * 7 + [0] * 4)
  pos = np.concatenate([np.arange(5), np.arange(7), np.zeros(4, int)])
  packed = _run(row, pos, segment_ids=seg)
  alone_a, alone_b = _run(a, np.arange(5)), _run(b, np.arange(7))
  np.testing.assert_allclose(packed[:5], alone_a, atol=1e-5, rtol=0)
  np.testing.assert_allclose(packed[5:12], alone_b, atol=1e-5, rtol=0)
  assert np.isfinite(packed).all()  # padding rows (nothing to attend to) stay finite


def test_prefix_sharing_equals_separate_runs():
  p_len, c_len, r_len = 6, 4, 5
  prompt, chosen, rejected = _rand_tokens(p_len, 4), _rand_tokens(c_len, 5), _rand_tokens(r_len, 6)
  row = np.concatenate([prompt, chosen, rejected])
  pos = np.concatenate([np.arange(p_len), p_len + np.arange(c_len), p_len + np.arange(r_len)])
  br = np.array([0] * p_len + [1] * c_len + [2] * r_len)
  shared = _run(row, pos, segment_ids=np.ones_like(row), branch_ids=br)
  alone_c = _run(np.concatenate([prompt, chosen]), np.arange(p_len + c_len))
  alone_r = _run(np.concatenate([prompt, rejected]), np.arange(p_len + r_len))
  np.testing.assert_allclose(shared[:p_len + c_len], alone_c, atol=1e-5, rtol=0)
  np.testing.assert_allclose(shared[p_len + c_len:], alone_r[p_len:], atol=1e-5, rtol=0)


def test_explicit_mask_is_anded():
  toks = _rand_tokens(8, 7)
  seg = np.array([1, 1, 1, 1, 2, 2, 2, 2])
  pos_packed = np.array([0, 1, 2, 3, 0, 1, 2, 3])
  via_ids = _run(toks, pos_packed, segment_ids=seg)
  mask = jnp.asarray(seg[:, None] == seg[None, :])[None]
  via_mask = _run(toks, pos_packed, attention_mask=mask)
  np.testing.assert_allclose(via_mask, via_ids, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- init / axes


def test_eval_shape_init_matches_real_init_and_allocates_nothing():
  key = jax.random.key(0)
  before = len(jax.live_arrays())
  abstract = jax.eval_shape(lambda k: tm.init(CFG, k)[1], key)
  assert len(jax.live_arrays()) == before
  leaves = jax.tree.leaves(abstract)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  _, params = _model()
  assert jax.tree.structure(abstract) == jax.tree.structure(params)
  jax.tree.map(lambda a, p: (a.shape, a.dtype) == (p.shape, p.dtype) or pytest.fail(str(a)),
               abstract, params)


@pytest.mark.parametrize(
    "cfg", [CFG, tm.TransformerConfig.tiny(qkv_bias=True, tie_embeddings=True)])
def test_logical_axes_cover_every_leaf(cfg):
  axes = tm.logical_axes(cfg)
  abstract = jax.eval_shape(lambda k: tm.init(cfg, k)[1], jax.random.key(0))
  flat_axes = jax.tree.leaves(axes, is_leaf=tm.is_axes_leaf)
  assert jax.tree.structure(axes, is_leaf=tm.is_axes_leaf) == jax.tree.structure(abstract)
  for ax, x in zip(flat_axes, jax.tree.leaves(abstract)):
    assert len(ax) == x.ndim and set(ax) <= ALLOWED_AXES
  layer_axes = jax.tree.leaves(axes["layers"], is_leaf=tm.is_axes_leaf)
  assert all(ax[0] == "layers" for ax in layer_axes)
  assert ("lm_head" in axes) == (not cfg.tie_embeddings)


def test_param_count_matches_formula():
  c = tm.TransformerConfig.small_30m()
  abstract = jax.eval_shape(lambda k: tm.init(c, k)[1], jax.random.key(0))
  d, f, v, l, k = c.d_model, c.mlp_dim, c.vocab_size, c.n_layers, c.head_dim
  attn = d * k * (c.n_heads * 2 + c.n_kv_heads * 2)
  per_layer = attn + 3 * d * f + 2 * d
  assert tm.param_count(abstract) == v * d + l * per_layer + d  # tied: no lm_head


def test_depth_does_not_grow_the_program():
  def n_eqns(cfg):
    graphdef, params = jax.eval_shape(lambda k: tm.init(cfg, k), jax.random.key(0))
    toks = jnp.zeros((1, 4), jnp.int32)
    return len(jax.make_jaxpr(lambda p: tm.forward(graphdef, p, toks, toks))(params).eqns)
  assert n_eqns(CFG) == n_eqns(CFG.replace(n_layers=6))


def test_unrolled_layers_equal_the_scan():
  """scan_unroll changes only the loop structure: same values and gradients."""
  cfg = CFG.replace(n_layers=3)
  _, params = _model(cfg)
  toks = jnp.asarray(_rand_tokens(10, 7), jnp.int32)[None]
  pos = jnp.arange(10)[None]

  def value_and_grad(unroll):
    graphdef = _graphdef_of(cfg.replace(scan_unroll=unroll))
    loss = lambda p: jnp.sum(jnp.sin(tm.logits(graphdef, p, toks, pos)))
    return jax.jit(jax.value_and_grad(loss))(params)

  ref = value_and_grad(1)
  for unroll in (2, 3):
    # Same ops in a different loop structure; f32 reassociation only.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 value_and_grad(unroll), ref)
  with pytest.raises(ValueError, match="scan_unroll must be an int >= 1"):
    cfg.replace(scan_unroll=0)


def test_rope_tables_are_exact_and_evaluated_once():
  """The materialised cos / sin tables: bit-identical values, one cos and one sin per step.

  Oracles: NumPy's f64 cos / sin of the same f32 angles (XLA's f32 cos / sin are within
  a few ulp: 1e-6 absolute); `_materialized` is the identity bit for bit (incl. -0.0 and
  the range ends); and the optimized HLO of an unrolled fwd+bwd, where XLA used to
  evaluate the tables inside every q / k fusion (18 cosines for these 3 layers, not 1).
  """
  x = jnp.asarray([-1.0, -0.0, 0.0, 1.0, 0.3, -0.999999, 1e-30], jnp.float32)
  np.testing.assert_array_equal(np.asarray(tm._materialized(x, -1.0)).view(np.int32),
                                np.asarray(x).view(np.int32))
  pos = jnp.asarray(np.random.default_rng(0).integers(0, 4096, (2, 9)), jnp.int32)
  inv_freq = tm.rope_inv_freq(CFG)
  cos, sin = jax.jit(tm.rope_tables)(pos, inv_freq)
  angles = np.asarray(pos, np.float32)[:, :, None] * np.asarray(inv_freq)[None, None]
  angles = np.concatenate([angles, angles], -1)[:, :, None, :].astype(np.float64)
  np.testing.assert_allclose(cos, np.cos(angles), atol=1e-6, rtol=0)
  np.testing.assert_allclose(sin, np.sin(angles), atol=1e-6, rtol=0)

  cfg = CFG.replace(n_layers=3, scan_unroll=3)
  graphdef, params = jax.eval_shape(lambda k: tm.init(cfg, k), jax.random.key(0))
  toks = jnp.zeros((2, 8), jnp.int32)
  loss = lambda p: jnp.sum(tm.logits(graphdef, p, toks, toks))
  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  assert hlo.count(" cosine(") == 1 and hlo.count(" sine(") == 1, (
      hlo.count(" cosine("), hlo.count(" sine("))


def _graphdef_of(cfg):
  return tm.init(cfg, jax.random.key(0))[0]


# ----------------------------------------------------------------------------- remat / dtypes


def test_remat_gives_equal_gradients():
  toks = jnp.asarray(_rand_tokens(10, 8), jnp.int32)[None]
  pos = jnp.arange(10)[None]
  _, params = _model()

  def grads(remat):
    cfg = CFG.replace(remat=remat)
    graphdef = _graphdef_of(cfg)

    def loss(p):
      lg = tm.logits(graphdef, p, toks, pos)
      return jnp.mean(jax.nn.log_softmax(lg)[0, :-1, :].take(toks[0, 1:], axis=-1).diagonal())
    return jax.jit(jax.grad(loss))(params)

  ref = grads("none")
  for policy in ("full", "dots"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                 grads(policy), ref)


def test_bf16_compute_runs_close_to_f32():
  toks = jnp.asarray(_rand_tokens(8, 9), jnp.int32)[None]
  pos = jnp.arange(8)[None]
  cfg16 = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
  graphdef16, _ = _model(cfg16)
  _, params32 = _model()
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
  hidden, unembed = jax.jit(tm.forward, static_argnums=0)(graphdef16, params16, toks, pos)
  assert hidden.dtype == jnp.bfloat16 and unembed.dtype == jnp.bfloat16
  lg16 = np.asarray(_logits(graphdef16, params16, toks, pos))
  lg32 = np.asarray(_logits(*_model(), toks, pos))
  # bf16 has an 8-bit mantissa (rel. eps 2^-8); logits here are O(1): allow 5e-2 abs.
  assert np.isfinite(lg16).all()
  np.testing.assert_allclose(lg16, lg32, atol=5e-2, rtol=0)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="n_heads=4 must be a multiple of n_kv_heads=3"):
    tm.TransformerConfig.tiny(n_kv_heads=3)
  with pytest.raises(ValueError, match="remat='sometimes'"):
    tm.TransformerConfig.tiny(remat="sometimes")
  with pytest.raises(ValueError, match="dtype='float8'"):
    tm.TransformerConfig.tiny(dtype="float8")
  with pytest.raises(ValueError, match="rope_type='yarn'"):
    tm.RopeScaling(rope_type="yarn")
  with pytest.raises(ValueError, match="rope_scaling=.*valid fields are"):
    tm.TransformerConfig.tiny(rope_scaling={"factr": 2.0})
  # Config files pass a mapping or a hashable tuple of pairs; both become RopeScaling.
  from_pairs = tm.TransformerConfig.tiny(rope_scaling=(("factor", 2.0), ("rope_type", "linear")))
  assert from_pairs.rope_scaling == tm.RopeScaling(rope_type="linear", factor=2.0)


# ----------------------------------------------------------------------------- heads


def test_sequence_scores_gather_oracle():
  rng = np.random.default_rng(0)
  b, t, d = 3, 5, 16
  hidden = rng.normal(size=(b, t, d)).astype(np.float32)
  hp = heads.init_head(d, jax.random.key(1))
  hp = {"w": hp["w"], "b": jnp.asarray(0.5, jnp.float32)}
  seq_last = np.array([4, 6, -1, 14], np.int32)  # row*T+pos; -1 = absent
  got = np.asarray(heads.sequence_scores(jnp.asarray(hidden), hp, jnp.asarray(seq_last)))
  w = np.asarray(hp["w"])
  want = [hidden[i // t, i % t] @ w + 0.5 if i >= 0 else 0.0 for i in seq_last]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  per_token = np.asarray(heads.token_scores(jnp.asarray(hidden), hp))
  np.testing.assert_allclose(per_token, hidden @ w + 0.5, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- KV cache


def _check_cached_equals_full(cfg, graphdef, params, t, pad, prefill, seeds, atol):
  """Prefill ``prefill`` tokens, then one-token steps through the KV cache, for a full
  row and one left-padded by ``pad`` slots (segment 0, positions restarting at 0):
  each equals the full forward of its unpadded sequence run alone (``atol``)."""
  seq0, seq1 = _rand_tokens(t, seeds[0]), _rand_tokens(t - pad, seeds[1])
  tokens = np.stack([seq0, np.concatenate([np.zeros(pad, int), seq1])])
  positions = np.stack([np.arange(t), np.concatenate([np.zeros(pad, int), np.arange(t - pad)])])
  segments = np.stack([np.ones(t, int),
                       np.concatenate([np.zeros(pad, int), np.ones(t - pad, int)])])
  step = jax.jit(tm.forward_cached, static_argnums=0)
  cache = tm.init_cache(cfg, batch=2, max_len=t)
  i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
  hidden, _, cache = step(graphdef, params, i32(tokens[:, :prefill]), i32(positions[:, :prefill]),
                          cache, 0, i32(segments[:, :prefill]))
  outs = [np.asarray(hidden)]
  for i in range(prefill, t):
    hidden, _, cache = step(graphdef, params, i32(tokens[:, i:i + 1]),
                            i32(positions[:, i:i + 1]), cache, jnp.int32(i),
                            i32(segments[:, i:i + 1]))
    outs.append(np.asarray(hidden))
  cached = np.concatenate(outs, axis=1)
  fwd = jax.jit(tm.forward, static_argnums=0)
  full0 = np.asarray(fwd(graphdef, params, i32(seq0)[None], i32(np.arange(t))[None])[0])[0]
  full1 = np.asarray(fwd(graphdef, params, i32(seq1)[None], i32(np.arange(t - pad))[None])[0])[0]
  np.testing.assert_allclose(cached[0], full0, atol=atol, rtol=0)
  np.testing.assert_allclose(cached[1, pad:], full1, atol=atol, rtol=0)


@pytest.mark.parametrize("cfg", [CFG, CFG.replace(sliding_window=3, qkv_bias=True)])
def test_cached_decoding_equals_full_forward(cfg):
  """Prefill + one-token steps through the KV cache == one full forward (1e-5).

  Row 1 is left-padded by two slots (segment 0), its positions starting at 0 after the
  padding: it must equal the unpadded sequence run alone.
  """
  graphdef, params = _model(cfg)
  if cfg.qkv_bias:  # zero-initialised biases would not test the bias path
    params = dict(params, layers=dict(params["layers"]))  # copy: _model is cached
    for name in ("bq", "bk", "bv"):
      params["layers"][name] = 0.1 * jax.random.normal(
          jax.random.key(3), params["layers"][name].shape)
  _check_cached_equals_full(cfg, graphdef, params, t=10, pad=2, prefill=6, seeds=(10, 11),
                            atol=1e-5)


# ----------------------------------------------------------------------------- sharding


def test_sharded_forward_equals_unsharded():
  """Params sharded by their logical axes (tensor parallel over heads / mlp / vocab, batch
  over data) on a 4x2 mesh of fake devices give the unsharded hidden states (1e-5)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: N817

  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  rules = {"vocab": "model", "heads": "model", "kv_heads": "model", "mlp": "model"}
  graphdef, params = _model()
  shardings = jax.tree.map(
      lambda axes: NamedSharding(mesh, P(*(rules.get(a) for a in axes))),
      tm.logical_axes(CFG), is_leaf=tm.is_axes_leaf)
  sharded_params = jax.device_put(params, shardings)
  assert sharded_params["layers"]["wq"].sharding.spec == P(None, None, "model", None)
  tokens = jnp.asarray(np.stack([_rand_tokens(8, s) for s in range(4)]), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(8), (4, 8))
  batch_sharding = NamedSharding(mesh, P("data", None))
  fwd = jax.jit(tm.forward, static_argnums=0)
  want = np.asarray(fwd(graphdef, params, tokens, positions)[0])
  got = fwd(graphdef, sharded_params, jax.device_put(tokens, batch_sharding),
            jax.device_put(positions, batch_sharding))[0]
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- chunked attention


def test_chunked_attention_equals_full_and_saves_memory():
  t = 256
  graphdef_full, params = _model(CFG)
  graphdef_chunk = _graphdef_of(CFG.replace(attention_chunk=32))
  tokens = jnp.asarray(np.stack([_rand_tokens(t, 12), _rand_tokens(t, 13)]), jnp.int32)
  seg = jnp.asarray(np.repeat([[1] * 100 + [2] * 150 + [0] * 6], 2, axis=0), jnp.int32)
  pos = jnp.asarray(np.repeat([list(range(100)) + list(range(150)) + [0] * 6], 2, axis=0))

  def compiled_grad(graphdef):
    def f(p):
      hidden, _ = tm.forward(graphdef, p, tokens, pos, seg)
      return jnp.mean(hidden.astype(jnp.float32) ** 2), hidden
    return jax.jit(jax.value_and_grad(f, has_aux=True)).lower(params).compile()

  full, chunked = compiled_grad(graphdef_full), compiled_grad(graphdef_chunk)
  (_, h_full), g_full = full(params)
  (_, h_chunk), g_chunk = chunked(params)
  np.testing.assert_allclose(h_chunk, h_full, atol=1e-5, rtol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), g_chunk, g_full)

  # XLA's own accounting of temporaries for the gradient. The full core keeps every layer's
  # [B, H, T, T] f32 probabilities for the backward pass; blocks of 32 queries keep one
  # [B, H, 32, T] block per layer at a time, so at least L * B * H * T * (T - 32) * 4 bytes
  # (3.7 MB here) must be saved. Measured: 18.0 MB -> 9.5 MB.
  temp = lambda c: c.memory_analysis().temp_size_in_bytes  # noqa: E731
  b = tokens.shape[0]
  assert temp(full) - temp(chunked) >= CFG.n_layers * b * CFG.n_heads * t * (t - 32) * 4

  with pytest.raises(ValueError, match="not a multiple of TransformerConfig.attention_chunk=32"):
    jax.eval_shape(lambda p: tm.forward(graphdef_chunk, p, tokens[:, :40], pos[:, :40]), params)


# ----------------------------------------------------------------------------- Qwen3 / Gemma 2-3 variants

# Every new option at once: layers sliding / full / sliding with a window shorter than the
# test sequences, Gemma-3-style local RoPE base, q/k norms, post norms with (1 + w),
# query_pre_attn_scalar, attention and final-logit soft caps, GeGLU and scaled embeddings.
MIXED = tm.TransformerConfig.tiny(
    n_layers=3, layer_types=("sliding_attention", "full_attention", "sliding_attention"),
    sliding_window=3, local_rope_theta=100.0, qk_norm=True, post_norms=True, norm_offset=1.0,
    query_pre_attn_scalar=12.0, attn_logit_softcap=1.5, final_logit_softcap=4.0,
    mlp_activation="gelu_tanh", embed_multiplier=8.0, head_dim=24, tie_embeddings=True)


@functools.lru_cache(maxsize=None)
def _mixed_params():
  """MIXED's params with norm weights randomised around the (1 + w) identity and the
  projections scaled up so both soft caps act (checked in the first test below)."""
  graphdef, params = tm.init(MIXED, jax.random.key(5))
  keys = iter(jax.random.split(jax.random.key(6), 16))

  def perturb(path, x):
    name = path[-1].key
    if name.endswith("norm"):
      return x + 0.3 * jax.random.normal(next(keys), x.shape)
    return x * {"wq": 8.0, "wk": 8.0, "embed": 30.0}.get(name, 1.0)
  return graphdef, jax.tree_util.tree_map_with_path(perturb, params)


def test_attention_softcap_and_scale_match_numpy():
  rng = np.random.default_rng(30)
  b, t, h, g, k = 2, 5, 4, 2, 8
  q, kk, v = (rng.normal(size=(b, t, n, k)).astype(np.float32) * 3 for n in (h, g, g))
  mask = rng.random((b, t, t)) < 0.6
  mask[:, np.arange(t), np.arange(t)] = True
  scale, cap = 0.2, 1.5
  got = np.asarray(tm.attention_core(*map(jnp.asarray, (q, kk, v, mask)), scale=scale,
                                     softcap=cap))
  want = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      gi = hi // (h // g)
      s = q[bi, :, hi].astype(np.float64) @ kk[bi, :, gi].T * scale
      assert np.abs(s).max() > 2 * cap  # the cap acts
      s = np.where(mask[bi], cap * np.tanh(s / cap), -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      want[bi, :, hi] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, gi]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_attention_softcap_gradients():
  """The hand-written backward with the tanh cap (dA = dS * (1 - tanh^2)) against finite
  differences (f64) and autodiff of a plain transcription; padding rows get no gradient."""
  rng = np.random.default_rng(31)
  b, t, h, g, k = 2, 5, 4, 2, 8
  scale, cap = 0.3, 1.2
  mask = rng.random((b, t, t)) < 0.6
  mask[:, np.arange(t), np.arange(t)] = True
  mask[1, 3] = False

  def plain(q, kk, v):
    r = h // g
    s = jnp.einsum("bthk,bshk->bhts", q, jnp.repeat(kk, r, axis=2)) * scale
    s = jnp.where(jnp.asarray(mask)[:, None], cap * jnp.tanh(s / cap), -1e30)
    return jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(s, -1), jnp.repeat(v, r, axis=2))

  with jax.enable_x64(True):
    q, kk, v = (2 * jnp.asarray(rng.normal(size=(b, t, n, k))) for n in (h, g, g))
    core = lambda q, kk, v: tm.attention_core(q, kk, v, jnp.asarray(mask), scale=scale,  # noqa: E731
                                              softcap=cap)
    jax.test_util.check_grads(core, (q, kk, v), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
    cot = jnp.asarray(rng.normal(size=(b, t, h, k)))
    got = jax.grad(lambda *a: jnp.sum(core(*a) * cot), argnums=(0, 1, 2))(q, kk, v)
    want = jax.grad(lambda *a: jnp.sum(plain(*a) * cot), argnums=(0, 1, 2))(q, kk, v)
    for a, w in zip(got, want):
      np.testing.assert_allclose(a, w, atol=1e-12, rtol=1e-10)
    np.testing.assert_array_equal(got[0][1, 3], 0.0)


def test_mixed_stack_equals_a_layer_by_layer_loop():
  """The scanned stack (per-layer flags select mask and RoPE tables) equals a plain Python
  loop over layers, each with its own mask from `masks` and its own RoPE base; both soft
  caps act on these inputs (so they are exercised)."""
  graphdef, params = _mixed_params()
  toks = jnp.asarray(_rand_tokens(10, 31), jnp.int32)[None]
  pos = jnp.arange(10)[None]
  got = np.asarray(_logits(graphdef, params, toks, pos))

  @jax.jit
  def loop(params):
    cfg = MIXED
    x = jnp.take(params["embed"], toks, axis=0) * cfg.embed_multiplier
    for i, kind in enumerate(cfg.layer_types):
      local = kind == "sliding_attention"
      mask = masks.make_attention_mask(1, 10, positions_BxT=pos,
                                       sliding_window=cfg.sliding_window if local else None)
      base = cfg.local_rope_theta if local else cfg.rope_theta
      rope = tm.rope_tables(pos, 1.0 / base ** (jnp.arange(0, 24, 2) / 24.0))
      x = tm.decoder_layer(cfg, jax.tree.map(lambda w: w[i], params["layers"]), x, rope, mask)
    h = tm.rms_norm(x, params["final_norm"], cfg.norm_eps, cfg.norm_offset)
    raw = jnp.einsum("btd,vd->btv", h, params["embed"])
    return cfg.final_logit_softcap * jnp.tanh(raw / cfg.final_logit_softcap), raw

  want, raw = loop(params)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(raw).max() > 2 * MIXED.final_logit_softcap
  no_attn_cap = _graphdef_of(MIXED.replace(attn_logit_softcap=None))
  assert np.abs(np.asarray(_logits(no_attn_cap, params, toks, pos)) - got).max() > 1e-2


def test_mixed_packing_and_prefix_sharing_equal_separate_runs():
  """One [5, 16] batch (one compile): packed, prefix-shared, then each sequence alone
  (right-padded with segment 0); every sequence is longer than the window of 3."""
  a, b = _rand_tokens(7, 32), _rand_tokens(6, 33)
  prompt, c, r = a[:4], a[4:], b

  def padded(x, pos=None, seg=None, br=None):
    pad = lambda y: np.concatenate([y, np.zeros(16 - len(x), int)])  # noqa: E731
    return (pad(x), pad(np.arange(len(x)) if pos is None else pos),
            pad(np.ones(len(x), int) if seg is None else seg),
            pad(np.zeros(len(x), int) if br is None else br))

  rows = [
      padded(np.concatenate([a, b]), pos=np.concatenate([np.arange(7), np.arange(6)]),
             seg=np.array([1] * 7 + [2] * 6)),
      padded(np.concatenate([prompt, c, r]), br=np.array([0] * 4 + [1] * 3 + [2] * 6),
             pos=np.concatenate([np.arange(4), 4 + np.arange(3), 4 + np.arange(6)])),
      padded(a), padded(b), padded(np.concatenate([prompt, r])),
  ]
  graphdef, params = _mixed_params()
  tok, pos, seg, br = (jnp.asarray(np.stack(col), jnp.int32) for col in zip(*rows))
  packed, shared, alone_a, alone_b, alone_pr = np.asarray(
      _logits(graphdef, params, tok, pos, seg, br))
  close = lambda x, y: np.testing.assert_allclose(x, y, atol=1e-4, rtol=0)  # noqa: E731
  close(packed[:7], alone_a[:7])
  close(packed[7:13], alone_b[:6])
  close(shared[:7], alone_a[:7])
  close(shared[7:13], alone_pr[4:10])


def test_mixed_stack_unroll_remat_and_chunked_attention_agree():
  """scan_unroll, remat and query-chunked attention change only the schedule: same values
  and gradients for the mixed stack (per-layer flags are scanned, not Python branches)."""
  _, params = _mixed_params()
  toks = jnp.asarray(_rand_tokens(8, 34), jnp.int32)[None]
  pos = jnp.arange(8)[None]

  def value_and_grad(cfg):
    graphdef = _graphdef_of(cfg)
    loss = lambda p: jnp.sum(jnp.sin(tm.logits(graphdef, p, toks, pos)))  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(params)

  ref = value_and_grad(MIXED)
  # Two variants (compile time): the fully unrolled stack, and remat + query chunks + a
  # partial unroll (2 does not divide 3 layers).
  for cfg in (MIXED.replace(scan_unroll=3),
              MIXED.replace(scan_unroll=2, remat="dots", attention_chunk=4)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
                 value_and_grad(cfg), ref)


def test_mixed_cached_decoding_equals_full_forward():
  graphdef, params = _mixed_params()
  _check_cached_equals_full(MIXED, graphdef, params, t=9, pad=2, prefill=5, seeds=(35, 36),
                            atol=1e-4)
