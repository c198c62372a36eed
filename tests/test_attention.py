"""Fused attention paths (ops/attention.py) against the xla reference path.

Oracle: `transformer.attention_core` on the dense mask of `ops.masks` (itself checked
against a NumPy transcription in test_transformer.py). Tolerance 1e-5 in f32, forward and
gradients, compared on rows that see at least one key (padding rows are meaningless in
every path). The cuDNN wrapper runs with `implementation="xla"` inside
`jax.nn.dot_product_attention` (no GPU here); splash runs in Pallas interpret mode.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models import transformer as tfm
from jaxalign.ops import attention as att
from jaxalign.ops import masks

B, T, H, G, K = 2, 128, 4, 2, 16
SCALE = K ** -0.5
TOL = 1e-5


def _layout(name: str):
  """(segment_ids, branch_ids, positions, window) of one [B, T] layout."""
  seg = bra = None
  pos = np.tile(np.arange(T), (B, 1))
  window = None
  if name in ("packed", "packed_window"):
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for row, lengths in enumerate([(50, 60), (30, 41, 40)]):
      start = 0
      for i, n in enumerate(lengths):
        seg[row, start:start + n] = i + 1
        pos[row, start:start + n] = np.arange(n)
        start += n
    window = 16 if name == "packed_window" else None
  elif name in ("prefix_shared", "prefix_shared_window"):
    # Two examples per row: [prompt | chosen | rejected], both branches continuing the
    # prompt's positions; the tail is padding (segment 0).
    seg = np.zeros((B, T), np.int32)
    bra = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for row, examples in enumerate([[(20, 15, 25), (30, 10, 12)], [(40, 30, 20), (10, 9, 9)]]):
      start = 0
      for i, (p, c, r) in enumerate(examples):
        seg[row, start:start + p + c + r] = i + 1
        pos[row, start:start + p] = np.arange(p)
        pos[row, start + p:start + p + c] = p + np.arange(c)
        pos[row, start + p + c:start + p + c + r] = p + np.arange(r)
        bra[row, start + p:start + p + c] = 1
        bra[row, start + p + c:start + p + c + r] = 2
        start += p + c + r
    window = 12 if name == "prefix_shared_window" else None
  elif name == "window":
    window = 24
  as_j = lambda x: None if x is None else jnp.asarray(x)
  return as_j(seg), as_j(bra), jnp.asarray(pos), window


def _qkv(seed=0, t=T):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, t, H, K), jnp.float32)
  k = jax.random.normal(ks[1], (B, t, G, K), jnp.float32)
  v = jax.random.normal(ks[2], (B, t, G, K), jnp.float32)
  w = jax.random.normal(ks[3], (B, t, H, K), jnp.float32)
  return q, k, v, w


def _reference(layout, softcap=None):
  seg, bra, pos, window = _layout(layout)
  mask = masks.make_attention_mask(B, T, seg, bra, None, pos, window)
  live = jnp.any(mask, axis=-1)[:, :, None, None]
  fn = lambda q, k, v: tfm.attention_core(q, k, v, mask, scale=SCALE, softcap=softcap)
  return fn, live, att.MaskSpec("xla", seg, bra, pos, None, window)


def _compare(layout, impl, softcap=None):
  ref, live, spec = _reference(layout, softcap)
  spec = dataclasses.replace(spec, impl=impl)
  fused = lambda q, k, v: att.fused_attention(q, k, v, spec, scale=SCALE, softcap=softcap)
  q, k, v, w = _qkv()

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.where(live, fn(q, k, v) * w, 0.0))

  out_ref, out = jax.jit(ref)(q, k, v), jax.jit(fused)(q, k, v)
  np.testing.assert_allclose(np.where(live, out, 0), np.where(live, out_ref, 0), atol=TOL,
                             rtol=TOL)
  g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
  g = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2)))(q, k, v)
  for name, a, b in zip("qkv", g, g_ref):
    np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL, err_msg=f"d{name} ({layout})")


LAYOUTS = ("causal", "packed", "window", "packed_window", "prefix_shared",
           "prefix_shared_window")


def _heavy_except(*default):
  # Compiling each layout's grads costs seconds on a shared 2-core box: the default run
  # keeps the layouts that exercise every mask ingredient, the rest run with -m heavy.
  return [l if l in default else pytest.param(l, marks=pytest.mark.heavy) for l in LAYOUTS]


@pytest.mark.parametrize("layout", _heavy_except("packed_window", "prefix_shared_window"))
def test_cudnn_wrapper_matches_xla(layout):
  _compare(layout, "cudnn:xla")


@pytest.mark.parametrize("layout", _heavy_except("packed_window", "prefix_shared"))
def test_splash_interpret_matches_xla(layout):
  # Default run: one static-mask layout (causal + segments + window) and one dynamic
  # (prefix-shared) one; the rest are the same two code paths with other masks.
  _compare(layout, "splash:interpret")


@pytest.mark.heavy
def test_splash_softcap_matches_xla():
  _compare("packed", "splash:interpret", softcap=5.0)


def test_cudnn_rejects_softcap():
  spec = att.MaskSpec("cudnn:xla")
  q, k, v, _ = _qkv()
  with pytest.raises(ValueError, match="attn_logit_softcap"):
    att.fused_attention(q, k, v, spec, scale=SCALE, softcap=5.0)


def test_cudnn_rejects_float32_before_lowering():
  spec = att.MaskSpec("cudnn")
  q, k, v, _ = _qkv()
  with pytest.raises(ValueError, match="TransformerConfig.dtype='bfloat16'"):
    att.cudnn_attention(q, k, v, spec, scale=SCALE)


def test_splash_rejects_unaligned_length():
  spec = att.MaskSpec("splash:interpret")
  q = jnp.zeros((B, 96, H, K))
  k = v = jnp.zeros((B, 96, G, K))
  with pytest.raises(ValueError, match="multiples of 128"):
    att.fused_attention(q, k, v, spec, scale=SCALE)


def test_impl_switch_validation_and_auto():
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    tfm.TransformerConfig.tiny(attention_impl="flash")
  assert att.resolve_impl("auto", "cpu") == "xla"
  assert att.resolve_impl("auto", "gpu") == "cudnn"
  assert att.resolve_impl("auto", "gpu", dtype="bfloat16") == "cudnn"
  assert att.resolve_impl("auto", "gpu", dtype="float32") == "xla"  # cuDNN: 16-bit only
  assert att.resolve_impl("auto", "tpu") == "splash"
  for impl in ("cudnn", "splash"):
    with pytest.raises(ValueError, match=f"attention_impl='{impl}' needs a"):
      att.resolve_impl(impl, "cpu")


def _model_batch():
  seg, bra, pos, _ = _layout("prefix_shared")
  tokens = jax.random.randint(jax.random.key(3), (B, T), 0, 256)
  live = masks.make_attention_mask(B, T, seg, bra).any(-1)
  return tokens, pos, seg, bra, live


def _model_compare(impl, **cfg_overrides):
  """Transformer forward and param grads with `impl` vs "xla", prefix-shared rows."""
  cfg = tfm.TransformerConfig.tiny(**cfg_overrides)
  graphdef, params = tfm.init(cfg, jax.random.key(0))
  tokens, pos, seg, bra, live = _model_batch()
  w = jax.random.normal(jax.random.key(4), (B, T, cfg.d_model))

  def loss(params, cfg):
    model = nnx.merge(graphdef, params)
    object.__setattr__(model, "cfg", cfg)
    object.__setattr__(model.layers, "cfg", cfg)
    hidden = model(tokens, pos, seg, bra)
    return jnp.sum(jnp.where(live[..., None], hidden * w, 0.0)), hidden

  run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, h_ref), g_ref = run(params, cfg)
  (_, h), g = run(params, cfg.replace(attention_impl=impl))
  m = live[..., None]
  np.testing.assert_allclose(np.where(m, h, 0), np.where(m, h_ref, 0), atol=TOL, rtol=TOL)
  # Param grads sum over all 256 tokens (entries up to ~100): each leaf's error is measured
  # against its largest entry, at the same 1e-5.
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g),
                        jax.tree.leaves(g_ref)):
    err = float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))  # lm_head: 0
    assert err < TOL, (jax.tree_util.keystr(path[0]), err)


@pytest.mark.heavy  # 25 s cold on the shared 2-core box; the default run has the next test
def test_transformer_cudnn_path_matches_xla_mixed_layers():
  # Sliding and full layers in one scan: the kernel path switches the window by lax.cond.
  _model_compare("cudnn:xla", sliding_window=12,
                 layer_types=("sliding_attention", "full_attention"))


def test_mixed_stack_flag_switches_the_window():
  """In a mixed sliding / full stack the layer kind is a traced flag: fused_attention
  stages both variants and lax.cond picks the one the flag names."""
  ref_local, live, spec = _reference("packed_window")
  ref_full, _, _ = _reference("packed")
  spec = dataclasses.replace(spec, impl="cudnn:xla")
  q, k, v, _ = _qkv()
  run = jax.jit(lambda flag: att.fused_attention(
      q, k, v, dataclasses.replace(spec, is_local=flag), scale=SCALE))
  for flag, ref in ((True, ref_local), (False, ref_full)):
    np.testing.assert_allclose(np.where(live, run(jnp.asarray(flag)), 0),
                               np.where(live, jax.jit(ref)(q, k, v), 0), atol=TOL, rtol=TOL)


@pytest.mark.heavy
def test_transformer_splash_path_matches_xla():
  _model_compare("splash:interpret", sliding_window=12,
                 layer_types=("sliding_attention", "full_attention"))


def test_transformer_rejects_cudnn_on_cpu_before_compiling():
  cfg = tfm.TransformerConfig.tiny(attention_impl="cudnn")
  graphdef, params = tfm.init(cfg, jax.random.key(0))
  tokens = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="attention_impl='cudnn' needs a GPU"):
    jax.eval_shape(lambda p: tfm.forward(graphdef, p, tokens, tokens)[0], params)


@pytest.mark.parametrize("layout,data,context", [
    ("causal", 1, 8), ("packed_window", 2, 4), ("prefix_shared", 2, 4)])
def test_context_parallel_matches_single_device(layout, data, context):
  """All-gather context parallelism over 8 fake devices == attention_core on one."""
  from jaxalign.ops import context_parallel
  from jaxalign.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_context_mesh(mesh_lib.MeshConfig(data=data, fsdp=1), context)
  assert dict(mesh.shape) == {"data": data, "fsdp": 1, "context": context, "tensor": 1}
  ref, live, spec = _reference(layout)
  q, k, v, w = _qkv(seed=1)

  def cp(q, k, v):
    return context_parallel.context_parallel_attention(
        q, k, v, mesh, segment_ids=spec.segment_ids, branch_ids=spec.branch_ids,
        positions=spec.positions, window=spec.window, scale=SCALE)

  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.where(live, fn(q, k, v) * w, 0.0))
  np.testing.assert_allclose(np.where(live, jax.jit(cp)(q, k, v), 0),
                             np.where(live, jax.jit(ref)(q, k, v), 0), atol=TOL, rtol=TOL)
  g = jax.jit(jax.grad(loss(cp), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
  for name, a, b in zip("qkv", g, g_ref):
    np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL, err_msg=f"d{name} ({layout})")


def test_context_rules_shard_the_residual_stream_over_length():
  from jax.sharding import PartitionSpec as P
  from jaxalign.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_context_mesh(mesh_lib.MeshConfig(data=2, fsdp=1), 4)
  spec = mesh_lib.logical_to_spec(tfm.RESIDUAL_AXES, mesh_lib.CONTEXT_RULES, (4, 128, 64), mesh)
  assert spec == P("data", "context")
  # A mesh without the axis (make_mesh) ignores the rule.
  plain = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=4))
  assert mesh_lib.logical_to_spec(tfm.RESIDUAL_AXES, mesh_lib.CONTEXT_RULES, (8, 128, 64),
                                  plain) == P(("data", "fsdp"))


def test_splash_per_shard_under_a_mesh_matches_xla():
  """Under a sharded jit, splash runs per shard in shard_map (rows over data, heads over
  tensor); same numbers as the xla path."""
  from jaxalign.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  ref, live, spec = _reference("packed_window")
  spec = dataclasses.replace(spec, impl="splash:interpret", mesh=mesh)
  q, k, v, _ = _qkv()
  out = jax.jit(lambda q, k, v: att.fused_attention(q, k, v, spec, scale=SCALE))(q, k, v)
  np.testing.assert_allclose(np.where(live, out, 0), np.where(live, jax.jit(ref)(q, k, v), 0),
                             atol=TOL, rtol=TOL)


def test_transformer_context_parallel_matches_single_device():
  """The model's forward on a mesh with a context axis (each row's 128 tokens over 4
  devices, rows over data=2) equals the unsharded forward: hidden states and grads."""
  from jaxalign.parallel import mesh as mesh_lib
  cfg = tfm.TransformerConfig.tiny()
  graphdef, params = tfm.init(cfg, jax.random.key(0))
  tokens, pos, seg, bra, live = _model_batch()
  mesh = mesh_lib.make_context_mesh(mesh_lib.MeshConfig(data=2, fsdp=1), 4)
  act = tfm.ActivationSharding(mesh, mesh_lib.CONTEXT_RULES)
  w = jax.random.normal(jax.random.key(4), (B, T, cfg.d_model))

  def loss(params, act):
    hidden, _ = tfm.forward(graphdef, params, tokens, pos, seg, bra, activation_sharding=act)
    return jnp.sum(jnp.where(live[..., None], hidden * w, 0.0)), hidden

  run = lambda act: jax.jit(jax.value_and_grad(lambda p: loss(p, act), has_aux=True))(params)
  (_, h_ref), g_ref = run(None)
  (_, h), g = run(act)
  m = live[..., None]
  np.testing.assert_allclose(np.where(m, h, 0), np.where(m, h_ref, 0), atol=TOL, rtol=TOL)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    err = float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))
    assert err < TOL, err
