"""Fused attention kernels behind one switch: `TransformerConfig.attention_impl`.

  "xla"     the reference: `transformer.attention_core` on a dense [B, T, S] bool mask
            (optionally query-chunked). The CPU default.
  "cudnn"   `jax.nn.dot_product_attention(implementation="cudnn")` (FlashAttention on
            NVIDIA GPUs). Causal is passed as `is_causal`; packed rows, prefix-shared
            branches, sliding windows and caller masks as one explicit boolean mask
            (cuDNN turns it into a [B, 1, T, S] additive bias).
  "splash"  the Pallas TPU splash-attention kernel. Plain and packed rows use the static
            `CausalMask` / `LocalMask` with `SegmentIds` (blocks outside the mask are
            skipped at trace-time cost only); prefix-shared rows and caller masks use a
            per-row dynamic mask ([H/G, T, S] bools per row: exact, slower, more memory).
  "auto"    cudnn on GPU, splash on TPU, xla elsewhere; decided when the forward is traced.

Two test spellings run the kernel paths where the hardware is missing: "cudnn:xla" is the
cuDNN wrapper with `implementation="xla"` inside `jax.nn.dot_product_attention` (same
masks, same call), and "splash:interpret" the splash kernel in Pallas interpret mode.

The masks follow `ops.masks`: query i sees key j iff j <= i, segment_ids[i] ==
segment_ids[j] != 0, branch_ids[j] in (0, branch_ids[i]), and (sliding layers)
positions[i] - positions[j] < window. Rows that see nothing (padding) get finite,
meaningless outputs, as in the xla path (which averages all keys; the kernels let the
row attend to itself); nothing downstream reads them.

Splash windows count slots (`LocalMask`), which equals the position-id window whenever
positions advance by one per slot inside a segment (plain and packed rows); prefix-shared
rows, whose second branch restarts its positions, take the dynamic-mask path, which uses
position ids exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxalign.ops import masks
from jaxalign.parallel import mesh as mesh_lib

IMPLS = ("xla", "cudnn", "splash", "auto")
TEST_IMPLS = ("cudnn:xla", "splash:interpret")
_BACKEND_OF = {"cudnn": "gpu", "splash": "tpu"}
_SPLASH_BLOCKS = (512, 256, 128)


def check_impl(impl: str) -> None:
  """Raises a ValueError naming the config key unless `impl` is a known value."""
  if impl not in IMPLS + TEST_IMPLS:
    raise ValueError(
        f"TransformerConfig.attention_impl={impl!r}; choose one of {IMPLS} (or, to run a "
        f"kernel path on CPU in tests, {TEST_IMPLS}).")


def resolve_impl(impl: str, backend: str | None = None, dtype: str | None = None) -> str:
  """The implementation a forward traced now uses: "auto" picks by backend.

  `dtype`: the compute dtype name (TransformerConfig.dtype); cuDNN's flash attention
  takes only 16-bit inputs, so "auto" keeps xla for an f32 model on GPU. Raises (at
  trace time, before anything compiles) when a kernel is asked for on a backend it
  cannot run on.
  """
  check_impl(impl)
  backend = jax.default_backend() if backend is None else backend
  if impl == "auto":
    if backend == "gpu" and dtype not in (None, "bfloat16", "float16"):
      return "xla"
    return {"gpu": "cudnn", "tpu": "splash"}.get(backend, "xla")
  need = _BACKEND_OF.get(impl)
  if need is not None and backend != need:
    raise ValueError(
        f"TransformerConfig.attention_impl={impl!r} needs a {need.upper()} backend, but "
        f"JAX's default backend is {backend!r}; use 'auto' (picks by backend) or 'xla' "
        f"(tests on CPU may use {TEST_IMPLS}).")
  return impl


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["segment_ids", "branch_ids", "positions", "dense", "is_local"],
    meta_fields=["impl", "window", "mesh"])
@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """The attention mask of a kernel path, kept as ids instead of a dense [B, T, S] mask.

  impl: a resolved implementation other than "xla" (see `resolve_impl`).
  segment_ids, branch_ids, positions: [B, T] or None (None: one segment / no branches).
  dense: the caller's [B, T, T] bool mask (`attention_mask`) or None.
  window: the sliding window (q_pos - k_pos < window) or None.
  is_local: in a stack mixing sliding and full layers, this layer's traced flag; the
    window applies only where it is True (None: it always applies).
  mesh: the activations' mesh (`ActivationSharding.mesh`) or None. With a `context`
    axis (size > 1) attention is context-parallel (`ops/context_parallel.py`; its local
    attention is the xla core whatever `impl`); splash runs per shard under it.
  """

  impl: str
  segment_ids: jax.Array | None = None
  branch_ids: jax.Array | None = None
  positions: jax.Array | None = None
  dense: jax.Array | None = None
  window: int | None = None
  is_local: jax.Array | None = None
  mesh: jax.sharding.Mesh | None = None

  def with_window(self, window: int | None) -> "MaskSpec":
    if window is not None and self.positions is None:
      raise ValueError("MaskSpec: a sliding window needs the position ids.")
    return dataclasses.replace(self, window=window)

  def select(self, is_local: jax.Array, local: "MaskSpec") -> "MaskSpec":
    """The spec of a layer in a mixed stack: `local` (this spec plus the window), the
    window applying only where the traced `is_local` is True (`fused_attention`)."""
    return dataclasses.replace(local, is_local=is_local)

  def dense_mask(self, batch: int, length: int) -> jax.Array:
    """[B, T, T] bool (True = may attend), every row seeing at least itself."""
    mask = masks.make_attention_mask(
        batch, length, self.segment_ids, self.branch_ids, self.dense, self.positions,
        self.window)
    # A row that sees nothing would make the kernels divide 0 by 0; let it see itself.
    dead = ~jnp.any(mask, axis=-1, keepdims=True)
    return mask | (dead & jnp.eye(length, dtype=bool)[None])

  @property
  def plain_causal(self) -> bool:
    return self.segment_ids is None and self.branch_ids is None and (
        self.dense is None and self.window is None)


def fused_attention(q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
                    spec: MaskSpec, *, scale: float, softcap: float | None = None) -> jax.Array:
  """[B, T, H, K] attention through the kernel `spec.impl` names (self-attention, T = S).

  In a mixed sliding / full stack (`spec.is_local` set) the layer's kind is a traced flag,
  so both variants are staged and `lax.cond` runs the one this layer needs.
  """
  run = functools.partial(_run_kernel, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, scale=scale,
                          softcap=softcap)
  if spec.is_local is None or spec.window is None:
    return run(dataclasses.replace(spec, is_local=None))
  local = dataclasses.replace(spec, is_local=None)
  full = dataclasses.replace(local, window=None)
  return jax.lax.cond(spec.is_local, lambda: run(local), lambda: run(full))


def context_parallel(mesh: jax.sharding.Mesh | None) -> bool:
  """Whether a mesh splits sequences (has a `context` axis of size > 1)."""
  return mesh is not None and mesh.shape.get(mesh_lib.CONTEXT_AXIS, 1) > 1


def _run_kernel(q, k, v, spec: MaskSpec, *, scale, softcap):
  impl = spec.impl
  if context_parallel(spec.mesh):
    from jaxalign.ops import context_parallel as cp  # pylint: disable=g-import-not-at-top
    if spec.dense is not None:
      raise ValueError("context parallelism takes segment / branch ids, not an "
                       "attention_mask; drop the mask or the mesh's context axis.")
    return cp.context_parallel_attention(
        q, k, v, spec.mesh, segment_ids=spec.segment_ids, branch_ids=spec.branch_ids,
        positions=spec.positions, window=spec.window, scale=scale, softcap=softcap)
  if impl in ("cudnn", "cudnn:xla"):
    return cudnn_attention(q, k, v, spec, scale=scale, softcap=softcap,
                           implementation="cudnn" if impl == "cudnn" else "xla")
  if impl in ("splash", "splash:interpret"):
    return splash_attention(q, k, v, spec, scale=scale, softcap=softcap,
                            interpret=impl == "splash:interpret")
  raise ValueError(f"fused_attention: MaskSpec.impl={impl!r} is not a kernel path.")


def cudnn_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, spec: MaskSpec, *, scale: float,
                    softcap: float | None = None, implementation: str = "cudnn") -> jax.Array:
  """`jax.nn.dot_product_attention` with the mask of `spec` (grouped kv heads native).

  Causal always goes in as `is_causal` (cuDNN skips the blocks above the diagonal);
  anything more (segments, branches, window, caller mask) as one explicit bool mask.
  """
  if softcap is not None:
    raise ValueError(
        "TransformerConfig.attn_logit_softcap is set, which the cudnn attention kernel does "
        "not support; use attention_impl='xla' (or 'splash' on TPU) for soft-capped models.")
  if implementation == "cudnn" and q_BxTxHxK.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(
        f"attention_impl='cudnn' takes bfloat16 / float16 inputs, got {q_BxTxHxK.dtype}; "
        "set TransformerConfig.dtype='bfloat16' or use attention_impl='auto' / 'xla'.")
  b, t = q_BxTxHxK.shape[:2]
  mask = None if spec.plain_causal else spec.dense_mask(b, t)[:, None]
  return jax.nn.dot_product_attention(
      q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask, scale=scale, is_causal=True,
      implementation=implementation)


def splash_block(length: int) -> int:
  """The largest splash block size (512, 256 or 128) dividing `length`."""
  for block in _SPLASH_BLOCKS:
    if length % block == 0:
      return block
  raise ValueError(
      f"attention_impl='splash' needs sequence lengths that are multiples of 128, got "
      f"{length}; bucket lengths to multiples of 128 (data.bucket / max_len) or use "
      "attention_impl='xla'.")


def _splash_kernel(mask: Any, block: int, softcap: float | None, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  sizes = sk.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  kernel = sk.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              attn_logits_soft_cap=softcap, interpret=interpret)
  if isinstance(mask, jax.Array):
    # make_splash_* stores MaskInfo.is_dynamic_mask as an array, which is a tracer when
    # the kernel is built under jit / vmap and breaks its own `if`; it is a static fact.
    fix = lambda mi: None if mi is None else mi._replace(is_dynamic_mask=True)
    kernel.fwd_mask_info = fix(kernel.fwd_mask_info)
    kernel.dq_mask_info = fix(kernel.dq_mask_info)
    kernel.dkv_mask_info = fix(kernel.dkv_mask_info)
  return kernel


def _static_splash_mask(spec: MaskSpec, heads: int, length: int):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  shape = (length, length)
  if spec.window is None:
    head = sm.CausalMask(shape)
  else:
    head = sm.LocalMask(shape, window_size=(spec.window - 1, 0), offset=0)
  return sm.MultiHeadMask([head] * heads)


def splash_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, spec: MaskSpec, *, scale: float,
                     softcap: float | None = None, interpret: bool = False) -> jax.Array:
  """The splash kernel (multi-query form, vmapped over batch rows and kv groups).

  The R = H / G query heads of a kv group are the kernel's heads, sharing one k / v.
  q is pre-scaled (splash has no scale argument): softcap(scale q.k) as in the xla path.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  if spec.mesh is not None:
    return _splash_per_shard(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, spec, scale=scale,
                             softcap=softcap, interpret=interpret)
  b, t, h, kd = q_BxTxHxK.shape
  g = k_BxSxGxK.shape[2]
  r = h // g
  block = splash_block(t)
  q = (q_BxTxHxK * jnp.asarray(scale, q_BxTxHxK.dtype)).reshape(b, t, g, r, kd)
  q_BxGxRxTxK = q.transpose(0, 2, 3, 1, 4)
  k_BxGxSxK = k_BxSxGxK.transpose(0, 2, 1, 3)
  v_BxGxSxK = v_BxSxGxK.transpose(0, 2, 1, 3)
  dynamic = spec.branch_ids is not None or spec.dense is not None
  if dynamic:
    def row(mask_TxS, q_r, k_r, v_r):
      kernel = _splash_kernel(jnp.broadcast_to(mask_TxS, (r, t, t)), block, softcap, interpret)
      return jax.vmap(kernel)(q_r, k_r, v_r)
    out = jax.vmap(row)(spec.dense_mask(b, t), q_BxGxRxTxK, k_BxGxSxK, v_BxGxSxK)
  else:
    kernel = _splash_kernel(_static_splash_mask(spec, r, t), block, softcap, interpret)
    if spec.segment_ids is None:
      out = jax.vmap(jax.vmap(kernel))(q_BxGxRxTxK, k_BxGxSxK, v_BxGxSxK)
    else:
      def row(seg_T, q_r, k_r, v_r):
        ids = sk.SegmentIds(q=seg_T, kv=seg_T)
        return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=ids))(q_r, k_r, v_r)
      out = jax.vmap(row)(spec.segment_ids.astype(jnp.int32), q_BxGxRxTxK, k_BxGxSxK,
                          v_BxGxSxK)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, kd)


def _splash_per_shard(q, k, v, spec: MaskSpec, *, scale, softcap, interpret):
  """splash_attention inside `shard_map`: a Pallas call has no SPMD partitioning rule,
  so under a sharded jit the partitioner would gather q, k, v whole onto every device.
  Rows split over the batch axes that divide them, heads over `tensor` when it divides
  both the query and the kv heads (a query head's group then sits on the same shard).
  """
  mesh = spec.mesh
  b, h, g = q.shape[0], q.shape[2], k.shape[2]
  rows = ()
  for axis in mesh_lib.BATCH_AXES:
    size = mesh.shape.get(axis, 1)
    if size > 1 and b % (size * math.prod(mesh.shape[a] for a in rows)) == 0:
      rows += (axis,)
  tp = mesh.shape.get("tensor", 1)
  heads = "tensor" if tp > 1 and h % tp == 0 and g % tp == 0 else None
  row_spec = P(rows or None)
  qkv_spec = P(rows or None, None, heads)
  local = dataclasses.replace(spec, mesh=None)
  fn = lambda q, k, v, local: splash_attention(q, k, v, local, scale=scale, softcap=softcap,
                                               interpret=interpret)
  return jax.shard_map(fn, mesh=mesh, in_specs=(qkv_spec,) * 3 + (row_spec,),
                       out_specs=qkv_spec, check_vma=False)(q, k, v, local)
