"""Llama-family decoder-only transformer in Flax NNX, used functionally.

RMSNorm, RoPE (HF `rotate_half` layout, optional Llama-3 / linear scaling), grouped-query
attention, SwiGLU MLP (GeGLU and an embedding multiplier for Gemma), optional q/k/v bias
(Qwen2), optional tied embeddings, optional sliding window, optional query-chunked
attention or a fused kernel (`attention_impl`: cuDNN / splash, `ops/attention.py`).
Layer parameters are stored stacked along a leading `layers` axis and applied with one
`jax.lax.scan`, so compile time does not grow with depth.

Qwen3 / Gemma 2 / Gemma 3 options (all off by default, leaving the Llama block as it was):
q/k RMSNorm over head_dim (`qk_norm`), norms on the attention and MLP outputs
(`post_norms`), Gemma's (1 + w) norm weights (`norm_offset`), the attention scale
`query_pre_attn_scalar ** -0.5`, attention-score and final-logit soft caps
`c * tanh(x / c)`, and per-layer sliding / full attention (`layer_types`) with a separate
RoPE base for sliding layers (`local_rope_theta`). Per-layer differences stay inside the
one scan: a [L] bool of layer kinds is scanned beside the params and selects that layer's
mask and RoPE tables (`LayerInputs`); a stack of one kind scans no flags at all.

Functional API (docs/architecture.md, section 1):

  graphdef, params = init(cfg, key)            # params: nested dict of arrays
  hidden_BxTxD, unembed_DxV = forward(graphdef, params, tokens, positions, ...)
  axes = logical_axes(cfg)                      # same structure; tuple leaves (is_axes_leaf)

Under an fsdp mesh pass `activation_sharding=ActivationSharding(mesh, rules)`: the
embedding output, every layer's input and output (the scan carry) and the final hidden
states are pinned to batch sharding (logical axes "batch", "length", "embed" through the
same rules as the params), so the SPMD partitioner all-gathers each layer's weights
instead of the whole batch's activations (docs/scale_out.md, section 8). None (default):
no constraint, identical numerics.

For generation: `cache = init_cache(cfg, batch, max_len)` and
`hidden, unembed, cache = forward_cached(graphdef, params, tokens, positions, cache, index)`.
Logits are `final_logits(cfg, hidden, unembed)` (soft-capped when configured); token
log-probs take `logit_softcap=cfg.final_logit_softcap` (`ops.logprobs`).

Weight layouts (the HF checkpoint converter in `hf.py` relies on them):
  embed        [V, D]            (vocab, embed)
  layers/wq    [L, D, H, K]      (layers, embed, heads, head_dim)
  layers/wk,wv [L, D, KV, K]     (layers, embed, kv_heads, head_dim)
  layers/bq    [L, H, K]; bk, bv [L, KV, K]   (only when qkv_bias)
  layers/wo    [L, H, K, D]      (layers, heads, head_dim, embed)
  layers/w_gate, w_up [L, D, F]  (layers, embed, mlp); w_down [L, F, D]
  layers/attn_norm, mlp_norm [L, D]; final_norm [D]
  layers/q_norm, k_norm [L, K]  (layers, head_dim; only when qk_norm)
  layers/post_attn_norm, post_mlp_norm [L, D]  (only when post_norms)
  lm_head      [D, V]            (embed, vocab; absent when tie_embeddings)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxalign.models import lora as lora_lib
from jaxalign.ops import attention as attention_ops
from jaxalign.ops import masks
from jaxalign.parallel import mesh as mesh_lib

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}
_REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
_ACTIVATIONS = {
    "silu": jax.nn.silu,  # SwiGLU (Llama, Mistral, Qwen2)
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GeGLU (Gemma)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

AxisNames = tuple[str | None, ...]
# TransformerConfig.layer_types entries (HF's names).
LAYER_TYPES = ("full_attention", "sliding_attention")

# Logical axes of the residual stream [B, T, D]; mapped through the same rules as the
# params ("batch" -> (data, fsdp); "embed" then finds fsdp taken and stays replicated).
RESIDUAL_AXES: AxisNames = ("batch", "length", "embed")


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
  """Where activations live: a mesh and the logical-axis rules of the params.

  Passed explicitly to `forward`; `constrain` applies `jax.lax.with_sharding_constraint`
  with the spec the rules give for the array's logical axes. A mesh axis the dimension
  does not divide is left out (as for params), so tiny batches never fail to place.
  """

  mesh: jax.sharding.Mesh
  rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES

  def spec(self, shape: tuple[int, ...], logical: AxisNames) -> jax.sharding.PartitionSpec:
    if len(shape) != len(logical):
      raise ValueError(
          f"ActivationSharding: logical axes {logical} have {len(logical)} names but the "
          f"activation has shape {tuple(shape)}."
      )
    return mesh_lib.logical_to_spec(logical, self.rules, shape, self.mesh)

  def constrain(self, x: jax.Array, logical: AxisNames = RESIDUAL_AXES) -> jax.Array:
    sharding = jax.sharding.NamedSharding(self.mesh, self.spec(x.shape, logical))
    return jax.lax.with_sharding_constraint(x, sharding)


def _constrain(sharding: ActivationSharding | None, x: jax.Array,
               logical: AxisNames = RESIDUAL_AXES) -> jax.Array:
  return x if sharding is None else sharding.constrain(x, logical)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling.

  rope_type "llama3": the Llama-3.1 piecewise rescaling of inverse frequencies
  (uses factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
  rope_type "linear": position interpolation, inverse frequencies divided by factor.
  """

  rope_type: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ("llama3", "linear"):
      raise ValueError(
          f"RopeScaling.rope_type={self.rope_type!r} is not supported; use 'llama3' or "
          "'linear' (or rope_scaling=None for plain RoPE)."
      )
    if self.factor <= 0:
      raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor}.")
    if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
      raise ValueError(
          "RopeScaling.high_freq_factor must exceed low_freq_factor for llama3 scaling, got "
          f"{self.high_freq_factor} <= {self.low_freq_factor}."
      )


def _check_sizes(cfg: TransformerConfig) -> None:
  """Positive sizes; head_dim (default d_model // n_heads) even, heads a multiple of kv_heads."""
  for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim"):
    if getattr(cfg, name) <= 0:
      raise ValueError(f"TransformerConfig.{name} must be positive, got {getattr(cfg, name)}.")
  if cfg.head_dim is None:
    if cfg.d_model % cfg.n_heads:
      raise ValueError(
          f"TransformerConfig.d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}; "
          "set head_dim explicitly."
      )
    object.__setattr__(cfg, "head_dim", cfg.d_model // cfg.n_heads)
  if cfg.head_dim % 2:
    raise ValueError(f"TransformerConfig.head_dim must be even for RoPE, got {cfg.head_dim}.")
  if cfg.n_heads % cfg.n_kv_heads:
    raise ValueError(
        f"TransformerConfig.n_heads={cfg.n_heads} must be a multiple of "
        f"n_kv_heads={cfg.n_kv_heads} (grouped-query attention)."
    )


def _check_numerics(cfg: TransformerConfig) -> None:
  """dtype names, MLP activation and remat policy are among the known ones."""
  for name in ("param_dtype", "dtype"):
    if getattr(cfg, name) not in _DTYPES:
      raise ValueError(
          f"TransformerConfig.{name}={getattr(cfg, name)!r}; choose one of {sorted(_DTYPES)}."
      )
  if cfg.mlp_activation not in _ACTIVATIONS:
    raise ValueError(
        f"TransformerConfig.mlp_activation={cfg.mlp_activation!r}; choose one of "
        f"{sorted(_ACTIVATIONS)}."
    )
  if cfg.remat not in _REMAT_POLICIES:
    raise ValueError(
        f"TransformerConfig.remat={cfg.remat!r}; choose one of {_REMAT_POLICIES}."
    )


def _coerce_rope_scaling(cfg: TransformerConfig) -> None:
  """rope_scaling becomes a RopeScaling (or stays None)."""
  # Config files give a mapping (or, hashable, a tuple of (key, value) pairs).
  if isinstance(cfg.rope_scaling, (dict, tuple, list)):
    try:
      object.__setattr__(cfg, "rope_scaling", RopeScaling(**dict(cfg.rope_scaling)))
    except TypeError as e:
      raise ValueError(
          f"TransformerConfig.rope_scaling={cfg.rope_scaling!r}: {e}; valid fields are "
          f"{[f.name for f in dataclasses.fields(RopeScaling)]}."
      ) from None
  if cfg.rope_scaling is not None and not isinstance(cfg.rope_scaling, RopeScaling):
    raise ValueError(
        f"TransformerConfig.rope_scaling={cfg.rope_scaling!r}; give a RopeScaling, a mapping "
        "of its fields, or None."
    )


def _check_scan_and_chunking(cfg: TransformerConfig) -> None:
  """scan_unroll and attention_chunk, the knobs of how the stack is executed."""
  if isinstance(cfg.scan_unroll, bool) or not isinstance(cfg.scan_unroll, int) or (
      cfg.scan_unroll < 1):
    raise ValueError(
        f"TransformerConfig.scan_unroll must be an int >= 1 (layers per scan step; n_layers "
        f"unrolls fully), got {cfg.scan_unroll!r}."
    )
  if cfg.attention_chunk is not None and cfg.attention_chunk <= 0:
    raise ValueError(
        f"TransformerConfig.attention_chunk must be positive or None, got {cfg.attention_chunk}."
    )


def _check_layer_kinds(cfg: TransformerConfig) -> None:
  """sliding_window and layer_types (stored as a tuple)."""
  if cfg.sliding_window is not None and cfg.sliding_window <= 0:
    raise ValueError(
        f"TransformerConfig.sliding_window must be positive or None, got {cfg.sliding_window}."
    )
  if cfg.layer_types is not None:
    # Config files give a list; a tuple keeps the config hashable (a static jit argument).
    object.__setattr__(cfg, "layer_types", tuple(cfg.layer_types))
    bad = sorted(set(cfg.layer_types) - set(LAYER_TYPES))
    if bad or len(cfg.layer_types) != cfg.n_layers:
      raise ValueError(
          f"TransformerConfig.layer_types={list(cfg.layer_types)}: give n_layers="
          f"{cfg.n_layers} entries, each one of {LAYER_TYPES} (or None: all layers alike)."
      )


def _check_optional_positives(cfg: TransformerConfig) -> None:
  """The optional scalars of the Gemma / Qwen3 variants are None or > 0."""
  for name in ("local_rope_theta", "query_pre_attn_scalar", "attn_logit_softcap",
               "final_logit_softcap"):
    value = getattr(cfg, name)
    if value is not None and not value > 0:
      raise ValueError(f"TransformerConfig.{name} must be positive or None, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Shape and numerics of a Llama-family decoder. Frozen, hashable (usable as a static arg)."""

  vocab_size: int = 256
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int | None = None  # None -> d_model // n_heads
  mlp_dim: int = 128
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  tie_embeddings: bool = False
  sliding_window: int | None = None  # attend only to the last `sliding_window` positions
  mlp_activation: str = "silu"  # gate activation of the gated MLP, one of _ACTIVATIONS
  embed_multiplier: float = 1.0  # token embeddings are scaled by this (Gemma: sqrt(d_model))
  # Architecture variants (Qwen3, Gemma 2 / 3). The defaults are the Llama block, bit for bit.
  # Per-layer kinds, e.g. ("sliding_attention", "full_attention", ...) (HF `layer_types`):
  # sliding layers use `sliding_window` and `local_rope_theta`, full ones attend to everything
  # and use `rope_theta` / `rope_scaling`. None: every layer is sliding when sliding_window is
  # set, else every layer is full.
  layer_types: tuple[str, ...] | None = None
  local_rope_theta: float | None = None  # RoPE base of sliding layers, unscaled (Gemma 3)
  qk_norm: bool = False  # RMSNorm over head_dim on q and k, before RoPE (Qwen3, Gemma 3)
  post_norms: bool = False  # RMSNorm on attention / MLP outputs before the residual add (Gemma 2/3)
  norm_offset: float = 0.0  # every RMSNorm multiplies by (norm_offset + weight), in f32 (Gemma: 1)
  query_pre_attn_scalar: float | None = None  # scores use q.k * scalar**-0.5 (None: head_dim)
  attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap), before the mask
  final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2 / 3)
  # Query block size for memory-lean attention (None = one [T, T] block); see
  # chunked_attention_core. Sequence lengths must be multiples of it.
  attention_chunk: int | None = None
  # Attention kernel of the non-cached forward: "xla" (attention_core; the reference),
  # "cudnn" (GPU), "splash" (TPU) or "auto" (by backend at trace time); ops/attention.py.
  # attention_chunk applies to "xla" only. The KV-cache path always uses xla.
  attention_impl: str = "xla"
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of matmuls; norms, softmax and RoPE run in f32
  remat: str = "none"  # one of _REMAT_POLICIES
  # Layers per iteration of the layer scan. 1 keeps compile time flat in depth; n_layers
  # unrolls the stack (no loop: XLA drops the stacked residual buffers of the scan, 3-4% of
  # a CPU training step for small_30m, docs/benchmarks.md) at a compile time linear in depth.
  scan_unroll: int = 1
  init_std: float = 0.02

  def __post_init__(self):
    # The order of the checks fixes which error a config with several faults reports.
    _check_sizes(self)
    _check_numerics(self)
    _coerce_rope_scaling(self)
    _check_scan_and_chunking(self)
    attention_ops.check_impl(self.attention_impl)
    _check_layer_kinds(self)
    _check_optional_positives(self)

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: True for a sliding (local) layer; see `layer_types`."""
    if self.layer_types is None:
      return (self.sliding_window is not None,) * self.n_layers
    return tuple(t == "sliding_attention" for t in self.layer_types)

  @property
  def attention_scale(self) -> float:
    """What q.k is multiplied by before the softmax: 1/sqrt(head_dim) or scalar**-0.5."""
    if self.query_pre_attn_scalar is None:
      return 1.0 / math.sqrt(self.head_dim)
    return self.query_pre_attn_scalar ** -0.5

  @property
  def jnp_dtype(self) -> Any:
    return _DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self) -> Any:
    return _DTYPES[self.param_dtype]

  def replace(self, **kwargs) -> "TransformerConfig":
    return dataclasses.replace(self, **kwargs)

  @classmethod
  def tiny(cls, **overrides) -> "TransformerConfig":
    """Test-sized: vocab 256, d 64, 2 layers, 4 heads, 2 kv heads."""
    base = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128)
    base.update(overrides)
    return cls(**base)

  @classmethod
  def small_30m(cls, **overrides) -> "TransformerConfig":
    """~35M params (19M in layers + tied 16M embedding).

    Llama shape: d 512, 6 layers, 8 heads / 4 kv heads, mlp 1536, vocab 32000.
    """
    base = dict(
        vocab_size=32000, d_model=512, n_layers=6, n_heads=8, n_kv_heads=4, mlp_dim=1536,
        norm_eps=1e-5, tie_embeddings=True,
    )
    base.update(overrides)
    return cls(**base)


# ----------------------------------------------------------------------------- numerics


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
  """RMSNorm over the last axis in f32, result cast back to x's dtype.

    y = (offset + scale) * x / sqrt(mean(x^2) + eps)

  offset 0 is HF Llama's `weight * normed`; Gemma stores `scale - 1` and uses offset 1,
  added in f32 so a bf16 weight near 0 keeps its precision (HF: `1.0 + weight.float()`).
  """
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  scale32 = scale.astype(jnp.float32)
  if offset:
    scale32 = offset + scale32
  return (scale32 * normed).astype(x.dtype)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(x / cap): smooth clipping into (-cap, cap) (Gemma 2); identity for None."""
  if cap is None:
    return x
  return cap * jnp.tanh(x / cap)


def final_logits(cfg: TransformerConfig, hidden_BxTxD: jax.Array,
                 unembed_DxV: jax.Array) -> jax.Array:
  """f32 logits soft_cap(hidden @ unembed, cfg.final_logit_softcap), any leading shape.

  Materialises [..., V]: for tests, tiny models and one-position sampling steps; training
  scores tokens with `ops.logprobs` (pass it `logit_softcap=cfg.final_logit_softcap`).
  """
  z = jnp.einsum("...d,dv->...v", hidden_BxTxD, unembed_DxV,
                 preferred_element_type=jnp.float32)
  return soft_cap(z, cfg.final_logit_softcap)


def rope_inv_freq(cfg: TransformerConfig, local: bool = False) -> jax.Array:
  """[head_dim // 2] inverse frequencies, with Llama-3 / linear scaling applied (f32).

  `local=True`: those of sliding layers, 1 / local_rope_theta^(2i/K) unscaled (Gemma 3's
  `rope_local_base_freq`), or the global ones when local_rope_theta is None.
  """
  k = cfg.head_dim
  if local and cfg.local_rope_theta is not None:
    return 1.0 / (cfg.local_rope_theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
  sc = cfg.rope_scaling
  if sc is None:
    return inv_freq
  if sc.rope_type == "linear":
    return inv_freq / sc.factor
  # Llama 3.1: keep high frequencies, divide low ones by factor, interpolate between.
  low_freq_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
  high_freq_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / sc.factor, inv_freq)
  smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
      sc.high_freq_factor - sc.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def rope_tables(positions_BxT: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each [B, T, 1, K] f32: the rotation of every position, for apply_rope_tables.

  Computed once per forward and passed to every layer, so no layer evaluates cos / sin
  again in its q and k fusions, forward or backward: the scan gets them as loop invariants,
  and `_materialized` keeps XLA from fusing them into every consumer when unrolled.
  """
  angles_BxTxH = positions_BxT.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
  angles_BxTxK = jnp.concatenate([angles_BxTxH, angles_BxTxH], axis=-1)
  cos = _materialized(jnp.cos(angles_BxTxK), lower_bound=-1.0)
  sin = _materialized(jnp.sin(angles_BxTxK), lower_bound=-1.0)
  return cos[:, :, None, :], sin[:, :, None, :]


def _materialized(x: jax.Array, lower_bound: float) -> jax.Array:
  """`x` (exactly), computed once instead of inside every fusion that reads it.

  XLA fuses an elementwise producer into each of its consumers, so with the layers
  unrolled the cos / sin tables were evaluated per element of q and k (broadcast over
  the heads) in four fusions per layer, forward and backward: 3-4% of the small_30m
  step on CPU (docs/benchmarks.md). A reduction is not duplicated into its consumers,
  and max(x, c) with c below x's range returns x bit for bit on every backend (an
  optimization barrier does not survive XLA:CPU's pipeline; a matmul by the identity
  would be inexact under TF32 / bf16 matmul precision).
  """
  floor = jnp.full_like(x, lower_bound - 1.0)
  # Stacked innermost: a reduction over a leading size-2 axis runs 2.6x slower on CPU.
  return jnp.max(jnp.stack([x, floor], axis=-1), axis=-1)


def apply_rope(x_BxTxNxK: jax.Array, positions_BxT: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding in HF's rotate_half layout: pairs are (i, i + K/2), not interleaved."""
  return apply_rope_tables(x_BxTxNxK, rope_tables(positions_BxT, inv_freq))


def apply_rope_tables(x_BxTxNxK: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
  """`apply_rope` with the (cos, sin) tables of `rope_tables`."""
  cos, sin = rope
  x32 = x_BxTxNxK.astype(jnp.float32)
  half = x32.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x_BxTxNxK.dtype)


def attention_core(
    q_BxTxHxK: jax.Array,
    k_BxSxGxK: jax.Array,
    v_BxSxGxK: jax.Array,
    mask_BxTxS: jax.Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
  """Scaled dot-product attention with grouped kv heads; softmax in f32.

    S = scale * Q K^T                  (scale None: 1 / sqrt(K))
    S = softcap * tanh(S / softcap)    (only when softcap is given: Gemma 2)
    P = softmax(where(mask, S, -inf)),   O = P V

  H query heads share G = H / (H // G) kv heads: the R = H / G query heads of a group are
  stacked into one [R * T, K] block per (batch, kv head). Rows whose mask is all False
  (padding) get a uniform, finite distribution instead of NaN, and no gradient. Reusable
  by a KV-cache decoder (S may differ from T).
  """
  b, t, h, kd = q_BxTxHxK.shape
  g = k_BxSxGxK.shape[2]
  q_BxGxRxTxK = q_BxTxHxK.reshape(b, t, g, h // g, kd).transpose(0, 2, 3, 1, 4)
  out = _grouped_attention(q_BxGxRxTxK, k_BxSxGxK.transpose(0, 2, 1, 3),
                           v_BxSxGxK.transpose(0, 2, 1, 3), mask_BxTxS,
                           _default_scale(q_BxTxHxK, scale), softcap)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, kd)


def _default_scale(q: jax.Array, scale: float | None) -> float:
  return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _raw_scores(q_BxGxRxTxK, k_BxGxSxK, scale):
  return jnp.einsum("bgrtk,bgsk->bgrts", q_BxGxRxTxK, k_BxGxSxK,
                    preferred_element_type=_softmax_dtype(q_BxGxRxTxK)) * scale


def _attention_probs(q_BxGxRxTxK, k_BxGxSxK, mask_BxTxS, scale, softcap):
  scores = soft_cap(_raw_scores(q_BxGxRxTxK, k_BxGxSxK, scale), softcap)
  scores = jnp.where(mask_BxTxS[:, None, None], scores, _MASK_VALUE)
  return jax.nn.softmax(scores, axis=-1)


def _softmax_dtype(x: jax.Array) -> Any:
  return jnp.promote_types(jnp.float32, x.dtype)  # f32 for bf16 / f32, f64 stays f64


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _grouped_attention(q_BxGxRxTxK, k_BxGxSxK, v_BxGxSxK, mask_BxTxS, scale, softcap):
  probs = _attention_probs(q_BxGxRxTxK, k_BxGxSxK, mask_BxTxS, scale, softcap)
  return jnp.einsum("bgrts,bgsk->bgrtk", probs.astype(v_BxGxSxK.dtype), v_BxGxSxK)


def _grouped_attention_fwd(q, k, v, mask_BxTxS, scale, softcap):
  probs = _attention_probs(q, k, mask_BxTxS, scale, softcap)
  out = jnp.einsum("bgrts,bgsk->bgrtk", probs.astype(v.dtype), v)
  return out, (q, k, v, out, probs, mask_BxTxS)


def _grouped_attention_bwd(scale, softcap, res, d_out):
  """FlashAttention's backward: dS = P * (dP - rowsum(dO * O)), no softmax Jacobian pass.

  Hand-written because XLA:CPU runs autodiff's version (the where's zero-filled select,
  a [T, S] reduction for the softmax VJP, and transposed copies of P and dS for the
  dk / dv matmuls) at ~1.2x the time (docs/benchmarks.md, model FLOP/s).

  With a soft cap, S = c * tanh(A / c) of the raw scores A = scale * Q K^T, so the chain
  rule adds dA = dS * (1 - tanh(A / c)^2). tanh is recomputed from Q K^T (one more
  [T, S, K] matmul, Gemma 2 only) rather than saved: saving it would double the [T, S]
  residuals the layer scan keeps for every layer.
  """
  q, k, v, out, probs, mask_BxTxS = res
  dt = q.dtype
  # dV and dK are computed as [K, S] (contracting P / dS over their leading row axis in
  # place) and transposed, which is a small [S, K] copy instead of a [T, S] one.
  dv = jnp.einsum("bgrtk,bgrts->bgks", d_out, probs.astype(dt)).swapaxes(-1, -2)
  sd = _softmax_dtype(q)
  dp = jnp.einsum("bgrtk,bgsk->bgrts", d_out, v, preferred_element_type=sd)
  row = jnp.sum(d_out.astype(sd) * out.astype(sd), axis=-1, keepdims=True)
  # A fully masked row has uniform P over constant scores: its true gradient is zero.
  live_Bx1x1xTx1 = jnp.any(mask_BxTxS, axis=-1)[:, None, None, :, None]
  if softcap is None:
    ds = probs * (dp - row) * scale
  else:
    tanh = jnp.tanh(_raw_scores(q, k, scale) / softcap)
    ds = probs * (dp - row) * (1 - tanh * tanh) * scale
  ds = jnp.where(live_Bx1x1xTx1, ds, 0.0).astype(dt)
  dq = jnp.einsum("bgrts,bgsk->bgrtk", ds, k)
  dk = jnp.einsum("bgrtk,bgrts->bgks", q, ds).swapaxes(-1, -2)
  return dq, dk, dv, None


_grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)


def chunked_attention_core(
    q_BxTxHxK: jax.Array,
    k_BxSxGxK: jax.Array,
    v_BxSxGxK: jax.Array,
    mask_BxTxS: jax.Array,
    chunk: int,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
  """`attention_core` over blocks of `chunk` queries, each block rematerialised.

  Equal to `attention_core` (up to float reassociation); the f32 score / probability
  arrays are [B, H, chunk, S] instead of [B, H, T, S], in the forward pass and in the
  backward pass (which recomputes each block's scores). T must be divisible by chunk.
  """
  b, t, h, kd = q_BxTxHxK.shape
  if t <= chunk:
    return attention_core(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, scale=scale,
                          softcap=softcap)
  if t % chunk:
    raise ValueError(
        f"sequence length {t} is not a multiple of TransformerConfig.attention_chunk={chunk}; "
        "bucket lengths to multiples of it or change attention_chunk."
    )
  n = t // chunk
  q_NxBxCxHxK = q_BxTxHxK.reshape(b, n, chunk, h, kd).swapaxes(0, 1)
  mask_NxBxCxS = mask_BxTxS.reshape(b, n, chunk, -1).swapaxes(0, 1)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def block(args):
    q, m = args
    return attention_core(q, k_BxSxGxK, v_BxSxGxK, m, scale=scale, softcap=softcap)

  out_NxBxCxHxK = jax.lax.map(block, (q_NxBxCxHxK, mask_NxBxCxS))
  return out_NxBxCxHxK.swapaxes(0, 1).reshape(b, t, h, kd)


def attend(cfg: "TransformerConfig", q, k, v, mask, *, chunked: bool = True):
  """Attention with the config's scale and soft cap; query-chunked when configured.

  chunked=False: one block whatever `attention_chunk` (KV-cache steps, whose lengths need
  not be multiples of the chunk).
  """
  kwargs = dict(scale=cfg.attention_scale, softcap=cfg.attn_logit_softcap)
  if isinstance(mask, attention_ops.MaskSpec):  # a fused kernel (TransformerConfig.attention_impl)
    return attention_ops.fused_attention(q, k, v, mask, **kwargs)
  if cfg.attention_chunk is None or not chunked:
    return attention_core(q, k, v, mask, **kwargs)
  return chunked_attention_core(q, k, v, mask, cfg.attention_chunk, **kwargs)


# ----------------------------------------------------------------------------- modules


def _param(init_fn, key, shape, dtype, axes: AxisNames) -> nnx.Param:
  # eager_sharding=False: axes are logical names, mapped to a mesh only by the caller's rules.
  return nnx.Param(init_fn(key, shape, dtype), out_sharding=axes, eager_sharding=False)


def _normal(std: float):
  return lambda key, shape, dtype: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def _zeros(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def _norm_init(cfg: TransformerConfig):
  """Norm weights that start as the identity: (norm_offset + w) = 1."""
  if not cfg.norm_offset:
    return _ones
  return lambda key, shape, dtype: jnp.full(shape, 1.0 - cfg.norm_offset, dtype)


# ----------------------------------------------------------------------------- per-layer kinds


class LayerInputs(NamedTuple):
  """What the layers of one forward read besides their params: the attention mask and the
  RoPE (cos, sin) tables of full-attention ("global") and sliding ("local") layers.

  An entry is None when no layer of that kind exists. `rope_local is rope_global` when
  both kinds rotate alike (no `local_rope_theta`).
  """

  mask_global: jax.Array | None
  mask_local: jax.Array | None
  rope_global: tuple[jax.Array, jax.Array] | None
  rope_local: tuple[jax.Array, jax.Array] | None

  def for_layer(self, is_local: jax.Array | None):
    """(mask, rope) of one layer. `is_local`: the scanned flag of `layer_flags` (a traced
    bool) in a mixed stack, None in a uniform one (then exactly one kind is present)."""
    if is_local is None:
      mask = self.mask_global if self.mask_local is None else self.mask_local
      rope = self.rope_global if self.rope_local is None else self.rope_local
      return mask, rope
    # A select per layer ([B, T, S] bools, [B, T, 1, K] tables) keeps the layers in one
    # scan; two scans (one per kind) would not keep Gemma's interleaved order.
    if isinstance(self.mask_global, attention_ops.MaskSpec):
      mask = self.mask_global.select(is_local, self.mask_local)
    else:
      mask = jnp.where(is_local, self.mask_local, self.mask_global)
    if self.rope_local is self.rope_global:
      return mask, self.rope_global
    rope = tuple(jnp.where(is_local, loc, glo)
                 for loc, glo in zip(self.rope_local, self.rope_global))
    return mask, rope


def layer_flags(cfg: TransformerConfig) -> jax.Array | None:
  """[L] bool (True = sliding layer), scanned beside the layer params; None when all
  layers are of one kind (the stack then has no per-layer branch at all)."""
  kinds = cfg.sliding_layers
  if len(set(kinds)) == 1:
    return None
  return jnp.asarray(kinds, bool)


def layer_inputs(cfg: TransformerConfig, mask_BxTxS: jax.Array, q_positions_BxT: jax.Array,
                 k_positions_BxS: jax.Array) -> LayerInputs:
  """`LayerInputs` from the mask without any window and the query / key position ids.

  Sliding layers add `q_pos - k_pos < sliding_window` to the mask: position ids, not
  slots, so packed and prefix-shared rows (whose positions restart / continue per
  sequence) see the window of each sequence run alone.
  """
  kinds = cfg.sliding_layers
  any_local, all_local = any(kinds), all(kinds)
  mask_local = None
  if any_local:
    mask_local = mask_BxTxS
    if isinstance(mask_BxTxS, attention_ops.MaskSpec):  # kernels take the window as a size
      mask_local = mask_BxTxS.with_window(cfg.sliding_window)
    elif cfg.sliding_window is not None:
      delta_BxTxS = q_positions_BxT[:, :, None] - k_positions_BxS[:, None, :]
      mask_local = mask_BxTxS & (delta_BxTxS < cfg.sliding_window)
  rope_global = None if all_local and cfg.local_rope_theta is not None else rope_tables(
      q_positions_BxT, rope_inv_freq(cfg))
  rope_local = None
  if any_local:
    rope_local = rope_global if cfg.local_rope_theta is None else rope_tables(
        q_positions_BxT, rope_inv_freq(cfg, local=True))
  return LayerInputs(None if all_local else mask_BxTxS, mask_local, rope_global, rope_local)


class StackedBlocks(nnx.Module):
  """All decoder layers, parameters stacked on a leading `layers` axis."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    l, d, h, g, k, f = (
        cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim,
    )
    pd = cfg.jnp_param_dtype
    std = cfg.init_std
    norm = _norm_init(cfg)
    # Output projections scaled down with depth (GPT-2 style) so the residual stays O(1).
    out_std = std / math.sqrt(2 * l)
    self.attn_norm = _param(norm, None, (l, d), pd, ("layers", "embed"))
    self.wq = _param(_normal(std), rngs.params(), (l, d, h, k), pd,
                     ("layers", "embed", "heads", "head_dim"))
    self.wk = _param(_normal(std), rngs.params(), (l, d, g, k), pd,
                     ("layers", "embed", "kv_heads", "head_dim"))
    self.wv = _param(_normal(std), rngs.params(), (l, d, g, k), pd,
                     ("layers", "embed", "kv_heads", "head_dim"))
    if cfg.qkv_bias:
      self.bq = _param(_zeros, None, (l, h, k), pd, ("layers", "heads", "head_dim"))
      self.bk = _param(_zeros, None, (l, g, k), pd, ("layers", "kv_heads", "head_dim"))
      self.bv = _param(_zeros, None, (l, g, k), pd, ("layers", "kv_heads", "head_dim"))
    if cfg.qk_norm:
      self.q_norm = _param(norm, None, (l, k), pd, ("layers", "head_dim"))
      self.k_norm = _param(norm, None, (l, k), pd, ("layers", "head_dim"))
    self.wo = _param(_normal(out_std), rngs.params(), (l, h, k, d), pd,
                     ("layers", "heads", "head_dim", "embed"))
    self.mlp_norm = _param(norm, None, (l, d), pd, ("layers", "embed"))
    self.w_gate = _param(_normal(std), rngs.params(), (l, d, f), pd, ("layers", "embed", "mlp"))
    self.w_up = _param(_normal(std), rngs.params(), (l, d, f), pd, ("layers", "embed", "mlp"))
    self.w_down = _param(_normal(out_std), rngs.params(), (l, f, d), pd, ("layers", "mlp", "embed"))
    if cfg.post_norms:
      self.post_attn_norm = _param(norm, None, (l, d), pd, ("layers", "embed"))
      self.post_mlp_norm = _param(norm, None, (l, d), pd, ("layers", "embed"))
    self.cfg = cfg

  def layer_params(self) -> dict[str, jax.Array]:
    names = ["attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down"]
    if self.cfg.qkv_bias:
      names += ["bq", "bk", "bv"]
    if self.cfg.qk_norm:
      names += ["q_norm", "k_norm"]
    if self.cfg.post_norms:
      names += ["post_attn_norm", "post_mlp_norm"]
    return {n: getattr(self, n)[...] for n in names}

  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxT, activation_sharding=None,
               lora: lora_lib.Adapters | None = None):
    """`mask_BxTxT` without any sliding window: sliding layers add theirs (`layer_inputs`).

    `lora`: adapters sliced per layer beside the weights and applied unmerged."""
    cfg = self.cfg
    shared = layer_inputs(cfg, mask_BxTxT, positions_BxT, positions_BxT)

    def body(x, xs):
      p, is_local, ad = xs
      mask, rope = shared.for_layer(is_local)
      # Pinning the carry on both sides of the layer makes the weights (fsdp-sharded
      # on "embed") the operand the partitioner gathers; the constraint's transpose
      # pins the cotangents in the backward pass too.
      x = _constrain(activation_sharding, x)
      y = decoder_layer(cfg, p, x, rope, mask, None if lora is None else lora.layer(ad))
      return _constrain(activation_sharding, y), None

    ad_xs = None if lora is None else lora.scan_inputs(cfg.n_layers)
    x_BxTxD, _ = jax.lax.scan(_maybe_remat(cfg, body, lora is not None), x_BxTxD,
                              (self.layer_params(), layer_flags(cfg), ad_xs),
                              unroll=cfg.scan_unroll)
    return x_BxTxD

  def call_cached(self, x_BxTxD, positions_BxT, mask_BxTxS, k_LxBxSxGxK, v_LxBxSxGxK,
                  index, key_positions_BxS, lora: lora_lib.Adapters | None = None):
    """Like __call__, attending over a KV cache into which this chunk's k/v are written
    at slots [index, index + T). `mask_BxTxS` has no window; `key_positions_BxS` are the
    position ids of the cache slots (for the sliding window). Returns (x, new k, new v)."""
    cfg = self.cfg
    shared = layer_inputs(cfg, mask_BxTxS, positions_BxT, key_positions_BxS)

    def body(x, layer):
      p, k_cache, v_cache, is_local, ad = layer
      mask, rope = shared.for_layer(is_local)
      pc = _cast(cfg, p)
      lo = None if lora is None else lora.layer(ad)
      q, k, v = attention_inputs(cfg, pc, x, rope, lo)
      k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, 1)
      v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, 1)
      attn = attend(cfg, q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask,
                    chunked=False)
      return attention_output_and_mlp(cfg, pc, x, attn, lo), (k_cache, v_cache)

    ad_xs = None if lora is None else lora.scan_inputs(cfg.n_layers)
    x_BxTxD, (k_new, v_new) = jax.lax.scan(
        body, x_BxTxD,
        (self.layer_params(), k_LxBxSxGxK, v_LxBxSxGxK, layer_flags(cfg), ad_xs))
    return x_BxTxD, k_new, v_new


def _maybe_remat(cfg: TransformerConfig, body, lora: bool = False):
  if cfg.remat == "none":
    return body
  policy = {
      "full": None,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  }[cfg.remat]
  if lora and policy is not None:
    policy = lora_lib.remat_policy(cfg.remat)
  return jax.checkpoint(body, policy=policy, prevent_cse=False)


def _cast(cfg: TransformerConfig, p: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {n: w.astype(cfg.jnp_dtype) for n, w in p.items()}


def _matmul_2d(x: jax.Array, w: jax.Array, n_contract: int) -> jax.Array:
  """x[..., c] @ w[c..., o...] as one 2-D matmul over flattened tokens.

  XLA:CPU runs the backward pass of the equivalent 3-D / 4-D einsums through explicit
  transposes at about half the speed of plain 2-D dots (docs/benchmarks.md, model FLOP/s).
  """
  in_shape, out_shape = w.shape[:n_contract], w.shape[n_contract:]
  lead = x.shape[: x.ndim - n_contract]
  k_in, k_out = math.prod(in_shape), math.prod(out_shape)
  y = x.reshape(-1, k_in) @ w.reshape(k_in, k_out)
  return y.reshape(*lead, *out_shape)


def _norm(cfg: TransformerConfig, x: jax.Array, scale: jax.Array) -> jax.Array:
  return rms_norm(x, scale, cfg.norm_eps, cfg.norm_offset)


def _project(p: dict[str, jax.Array], name: str, x: jax.Array, n_contract: int,
             lora: lora_lib.LayerAdapters | None) -> jax.Array:
  """x @ p[name], plus the weight's LoRA update (alpha / r) (x A) B when it has one."""
  y = _matmul_2d(x, p[name], n_contract)
  if lora is None:
    return y
  # Named for `lora.remat_policy`, which saves these sums rather than every dot.
  return checkpoint_name(lora.project(name, x, y, n_contract), lora_lib.PROJECTION_NAME)


def attention_inputs(cfg, p, x_BxTxD, rope, lora=None):
  """(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK) after the pre-norm, projections and RoPE.

  With `qk_norm`, q and k are RMS-normed over head_dim (weights shared by all heads)
  between the projection and RoPE (Qwen3, Gemma 3). `rope` is the (cos, sin) pair of
  `rope_tables` for these tokens' positions. `lora`: this layer's adapters or None.
  """
  h = _norm(cfg, x_BxTxD, p["attn_norm"])
  q = _project(p, "wq", h, 1, lora)
  k = _project(p, "wk", h, 1, lora)
  v = _project(p, "wv", h, 1, lora)
  if cfg.qkv_bias:
    q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
  if cfg.qk_norm:
    q, k = _norm(cfg, q, p["q_norm"]), _norm(cfg, k, p["k_norm"])
  return apply_rope_tables(q, rope), apply_rope_tables(k, rope), v


def attention_output_and_mlp(cfg, p, x_BxTxD, attn_BxTxHxK, lora=None):
  """Residual add of the attention output, then the pre-norm gated MLP block.

    x = x + post_attn_norm(attn @ wo)
    x = x + post_mlp_norm(w_down(act(norm(x) @ w_gate) * (norm(x) @ w_up)))

  where the post norms exist only with `post_norms` (Gemma 2 / 3; else the identity),
  and each projection adds its LoRA update when `lora` (this layer's adapters) has one.
  """
  a = _project(p, "wo", attn_BxTxHxK, 2, lora)
  if cfg.post_norms:
    a = _norm(cfg, a, p["post_attn_norm"])
  x_BxTxD = x_BxTxD + a
  h = _norm(cfg, x_BxTxD, p["mlp_norm"])
  gate = _project(p, "w_gate", h, 1, lora)
  up = _project(p, "w_up", h, 1, lora)
  act_fn = _ACTIVATIONS[cfg.mlp_activation]
  act = (act_fn(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(cfg.jnp_dtype)
  m = _project(p, "w_down", act, 1, lora)
  if cfg.post_norms:
    m = _norm(cfg, m, p["post_mlp_norm"])
  return x_BxTxD + m


def decoder_layer(
    cfg: TransformerConfig,
    p: dict[str, jax.Array],
    x_BxTxD: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    mask_BxTxT: jax.Array,
    lora: lora_lib.LayerAdapters | None = None,
) -> jax.Array:
  """One pre-norm Llama block on one layer's (unstacked) parameters.

  `rope`, `mask_BxTxT`: this layer's (`LayerInputs.for_layer`); the rope tables are
  computed once per forward and shared by all layers of a kind. `lora`: this layer's
  adapters (`lora.LayerAdapters`), or None.
  """
  p = _cast(cfg, p)
  q, k, v = attention_inputs(cfg, p, x_BxTxD, rope, lora)
  attn = attend(cfg, q, k, v, mask_BxTxT)
  return attention_output_and_mlp(cfg, p, x_BxTxD, attn, lora)


class Transformer(nnx.Module):
  """Llama-family decoder. `model(tokens, positions, ...) -> hidden_BxTxD` (final-normed)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.jnp_param_dtype
    self.embed = _param(_normal(cfg.init_std), rngs.params(), (cfg.vocab_size, cfg.d_model), pd,
                        ("vocab", "embed"))
    self.layers = StackedBlocks(cfg, rngs=rngs)
    self.final_norm = _param(_norm_init(cfg), None, (cfg.d_model,), pd, ("embed",))
    if not cfg.tie_embeddings:
      self.lm_head = _param(_normal(cfg.init_std), rngs.params(), (cfg.d_model, cfg.vocab_size),
                            pd, ("embed", "vocab"))

  def unembedding(self) -> jax.Array:
    """[D, V] output projection in the compute dtype (the embedding transposed when tied)."""
    w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    return w.astype(self.cfg.jnp_dtype)

  def __call__(
      self,
      tokens_BxT: jax.Array,
      positions_BxT: jax.Array,
      segment_ids_BxT: jax.Array | None = None,
      branch_ids_BxT: jax.Array | None = None,
      attention_mask_BxTxT: jax.Array | None = None,
      activation_sharding: ActivationSharding | None = None,
      lora: lora_lib.Adapters | None = None,
  ) -> jax.Array:
    cfg = self.cfg
    if tokens_BxT.ndim != 2 or positions_BxT.shape != tokens_BxT.shape:
      raise ValueError(
          f"tokens {tokens_BxT.shape} and positions {positions_BxT.shape} must both be [B, T]."
      )
    b, t = tokens_BxT.shape
    # No window here: the layer stack adds it to the sliding layers only.
    impl = attention_ops.resolve_impl(cfg.attention_impl, dtype=cfg.dtype)
    mesh = None if activation_sharding is None else activation_sharding.mesh
    if impl == "xla" and not attention_ops.context_parallel(mesh):
      mask_BxTxT = masks.make_attention_mask(
          b, t, segment_ids_BxT, branch_ids_BxT, attention_mask_BxTxT)
    else:  # fused kernels and context parallelism take the ids, not a dense mask
      mask_BxTxT = attention_ops.MaskSpec(impl, segment_ids_BxT, branch_ids_BxT,
                                          positions_BxT, attention_mask_BxTxT, mesh=mesh)
    x = _constrain(activation_sharding, self.embed_tokens(tokens_BxT))
    x = self.layers(x, positions_BxT, mask_BxTxT, activation_sharding, lora)
    return _constrain(activation_sharding, _norm(cfg, x, self.final_norm[...]))

  def embed_tokens(self, tokens_BxT: jax.Array) -> jax.Array:
    cfg = self.cfg
    x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(cfg.jnp_dtype)
    if cfg.embed_multiplier != 1.0:
      # In the compute dtype, as HF multiplies in the embedding's dtype (bf16 Gemma: the
      # scale sqrt(3072) = 55.43 becomes 55.5).
      x = x * jnp.asarray(cfg.embed_multiplier, cfg.jnp_dtype)
    return x

  def call_cached(self, tokens_BxT, positions_BxT, segment_ids_BxT, cache, index, lora=None):
    """Hidden states of T new tokens written into `cache` at slots [index, index + T)."""
    cfg = self.cfg
    t = tokens_BxT.shape[1]
    s = cache["segment_ids"].shape[1]
    positions_BxT = positions_BxT.astype(jnp.int32)
    seg_cache = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids_BxT,
                                                    index, 1)
    pos_cache = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions_BxT, index, 1)
    slot_q = index + jnp.arange(t)
    mask = (jnp.arange(s)[None, :] <= slot_q[:, None])[None]  # causal over slots
    mask = mask & (seg_cache[:, None, :] == segment_ids_BxT[:, :, None]) & (
        seg_cache[:, None, :] != 0)
    x, k_new, v_new = self.layers.call_cached(
        self.embed_tokens(tokens_BxT), positions_BxT, mask, cache["k"], cache["v"], index,
        pos_cache, lora)
    new_cache = {"k": k_new, "v": v_new, "segment_ids": seg_cache, "positions": pos_cache}
    return _norm(cfg, x, self.final_norm[...]), new_cache


# ----------------------------------------------------------------------------- functional API


def init(cfg: TransformerConfig, key: jax.Array) -> tuple[nnx.GraphDef, dict]:
  """Builds the model; returns (graphdef, params) with params a nested dict of arrays.

  Pure in `key`, so `jax.eval_shape(lambda k: init(cfg, k)[1], key)` gives the shapes
  without allocating, and `jax.jit(..., out_shardings=...)` places them directly.
  """
  graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=key)))
  return graphdef, state.to_pure_dict()


def forward(
    graphdef: nnx.GraphDef,
    params: dict,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None = None,
    branch_ids: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    activation_sharding: ActivationSharding | None = None,
    lora: lora_lib.Adapters | None = None,
) -> tuple[jax.Array, jax.Array]:
  """(hidden_BxTxD, unembed_DxV); pure function of params (and of the adapters).

  `activation_sharding` (None = unconstrained) pins the residual stream, including the
  returned hidden states, to batch sharding on its mesh; see `ActivationSharding`.
  `lora` (`lora.Adapters`, None = the base model): low-rank adapters applied unmerged,
  W x + (alpha / r) B A x on each targeted projection (`jaxalign.models.lora`).
  """
  model = nnx.merge(graphdef, params)
  hidden = model(tokens, positions, segment_ids, branch_ids, attention_mask,
                 activation_sharding, lora)
  return hidden, model.unembedding()


def init_cache(cfg: TransformerConfig, batch: int, max_len: int, dtype: Any = None) -> dict:
  """Empty KV cache for `forward_cached`: k/v [L, B, S, G, K], slot ids and positions [B, S].

  Slots with segment id 0 are empty (or padding) and are never attended to.
  """
  dtype = cfg.jnp_dtype if dtype is None else dtype
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  return {
      "k": jnp.zeros(shape, dtype),
      "v": jnp.zeros(shape, dtype),
      "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
      "positions": jnp.zeros((batch, max_len), jnp.int32),
  }


def forward_cached(
    graphdef: nnx.GraphDef,
    params: dict,
    tokens: jax.Array,
    positions: jax.Array,
    cache: dict,
    index: jax.Array | int,
    segment_ids: jax.Array | None = None,
    lora: lora_lib.Adapters | None = None,
) -> tuple[jax.Array, jax.Array, dict]:
  """Incremental forward for generation: (hidden_BxTxD, unembed_DxV, new_cache).

  The T new tokens occupy cache slots [index, index + T) (index may be traced; the
  caller keeps index + T <= max_len). Query slot i sees filled slots j <= i of its own
  segment; give prompt padding segment id 0 (left-padded prompts then match unpadded
  runs when their positions start at 0 after the padding). Prefill and one-token decode
  steps are the same call with different T. `lora`: adapters, as in `forward`.
  """
  model = nnx.merge(graphdef, params)
  if segment_ids is None:
    segment_ids = jnp.ones(tokens.shape, jnp.int32)
  hidden, new_cache = model.call_cached(tokens, positions, segment_ids.astype(jnp.int32), cache,
                                        index, lora)
  return hidden, model.unembedding(), new_cache


def config_of(graphdef: nnx.GraphDef, params: dict) -> TransformerConfig:
  """The TransformerConfig a (graphdef, params) pair was built with (free under jit)."""
  return nnx.merge(graphdef, params).cfg


def logits(graphdef, params, tokens, positions, segment_ids=None, branch_ids=None,
           attention_mask=None, lora=None) -> jax.Array:
  """[B, T, V] f32 logits, soft-capped when the config says so (`final_logits`).

  For tests and tiny models only (training uses chunked log-probs). `lora`: as in
  `forward`.
  """
  model = nnx.merge(graphdef, params)
  hidden = model(tokens, positions, segment_ids, branch_ids, attention_mask, lora=lora)
  return final_logits(model.cfg, hidden, model.unembedding())


def _abstract_state(cfg: TransformerConfig) -> nnx.State:
  abstract_model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0)))
  return nnx.split(abstract_model)[1]


def _state_to_dict(node: Any, leaf_fn) -> Any:
  if isinstance(node, nnx.Variable):
    return leaf_fn(node)
  return {k: _state_to_dict(v, leaf_fn) for k, v in node.items()}


def logical_axes(cfg: TransformerConfig) -> dict:
  """Pytree with the structure of `params`; each leaf a tuple of logical axis names.

  Tuples are pytrees themselves: map over it with `is_leaf=is_axes_leaf`.
  """
  return _state_to_dict(
      _abstract_state(cfg), lambda v: tuple(v.get_metadata()["out_sharding"])
  )


def is_axes_leaf(x: Any) -> bool:
  """Leaf predicate for `logical_axes` trees (tuples of axis names)."""
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def param_count(params: dict) -> int:
  return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(params))
