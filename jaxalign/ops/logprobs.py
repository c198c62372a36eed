"""Memory-lean token log-probabilities (docs/architecture.md, section 3).

The language-model head turns hidden states ``h`` (``[B, N, D]``) and an
unembedding matrix ``W`` (``[D, V]``) into per-token log-probabilities of the
target tokens::

  z = h @ W                           # logits, [B, N, V]
  log p(t) = z_t - logsumexp(z)
  H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v

Materialising ``z`` costs ``B * N * V`` floats (2 GiB in f32 for batch 8,
sequence 2048, vocab 32k) and autodiff keeps it alive for the backward pass.
Here the sequence axis is split into chunks of ``chunk_size // B`` positions
(all rows together, so batch sharding survives) and a ``lax.scan`` visits one
chunk at a time. A ``jax.custom_vjp`` saves only the per-token logsumexp (and
entropy) and rematerialises each chunk's logits in the backward pass, where the
analytic gradient is applied directly:

  d log p(t) / dz = onehot(t) - p
  d H / dz_v      = -p_v (log p_v + H)

so peak memory is ``O(chunk_size * V)`` instead of ``O(B * N * V)``.

Gemma 2 / 3 soft-cap their final logits, and samplers divide them by a
temperature; both are elementwise maps of the raw logits ``a = h @ W``::

  z = f(a) = c * tanh(a / c) / T      (c = logit_softcap, T = temperature)
  f'(a)    = (1 - tanh(a / c)^2) / T

and the kernel applies them inside each chunk: log-probs and entropy are those
of ``z``, and the backward pass multiplies ``dz`` by ``f'(a)`` (recomputed from
the rematerialised ``a``). Without a cap and with T = 1 the kernel is the
plain one, op for op.

``vocab_parallel_token_logprobs`` runs the same chunk kernel under
``jax.shard_map`` when ``W`` is sharded over its vocab dimension: every device
reduces its local vocab slice and ``pmax`` / ``psum`` combine the slices into
the global logsumexp, target logit and entropy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

Array = jax.Array

DEFAULT_CHUNK_SIZE = 1024

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "gather_scored",
    "naive_token_logprobs",
    "sequence_logps",
    "token_logprobs",
    "vocab_parallel_token_logprobs",
]


# ---------------------------------------------------------------------------
# Validation helpers.


def _compute_dtype(*arrays: Any) -> jnp.dtype:
  """At least float32 (bf16/f16 inputs are accumulated in f32; f64 stays f64)."""
  return jnp.promote_types(jnp.float32, jnp.result_type(*arrays))


def _check_inputs(hidden: Any, unembed: Any, targets: Any,
                  fn_name: str) -> None:
  if hidden.ndim < 1 or unembed.ndim != 2:
    raise ValueError(
        f"{fn_name}: expected hidden [..., D] and unembed [D, V]; got hidden "
        f"shape {hidden.shape} and unembed shape {unembed.shape}. Pass the "
        "unembedding as [d_model, vocab] (transpose an embedding table).")
  if hidden.shape[-1] != unembed.shape[0]:
    raise ValueError(
        f"{fn_name}: hidden's last dim ({hidden.shape[-1]}) must equal "
        f"unembed's first dim ({unembed.shape[0]}); hidden {hidden.shape}, "
        f"unembed {unembed.shape}.")
  if tuple(targets.shape) != tuple(hidden.shape[:-1]):
    raise ValueError(
        f"{fn_name}: targets shape {targets.shape} must equal hidden's leading "
        f"shape {hidden.shape[:-1]} (one target id per hidden state).")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(
        f"{fn_name}: targets must be integer token ids, got dtype "
        f"{targets.dtype}.")


def _check_chunk_size(chunk_size: int, fn_name: str) -> None:
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(
        f"{fn_name}: chunk_size must be a positive int, got {chunk_size!r}.")


def _check_logit_transform(logit_softcap: Any, temperature: Any,
                           fn_name: str) -> None:
  if logit_softcap is not None and not float(logit_softcap) > 0:
    raise ValueError(
        f"{fn_name}: logit_softcap must be positive or None, got "
        f"{logit_softcap!r} (TransformerConfig.final_logit_softcap).")
  if not float(temperature) > 0:
    raise ValueError(
        f"{fn_name}: temperature must be > 0, got {temperature!r}.")


# ---------------------------------------------------------------------------
# The elementwise map of the raw logits (module docstring): soft cap, then
# temperature.


def _transform(a: Array, softcap: float | None, temperature: float) -> Array:
  """z = softcap * tanh(a / softcap) / temperature (each part only if set)."""
  if softcap is not None:
    a = softcap * jnp.tanh(a / softcap)
  if temperature != 1.0:
    a = a / temperature
  return a


def _transform_grad(a: Array, softcap: float | None,
                    temperature: float) -> Array | None:
  """dz / da of `_transform`, or None when it is the identity."""
  if softcap is None and temperature == 1.0:
    return None
  grad = jnp.ones_like(a)
  if softcap is not None:
    tanh = jnp.tanh(a / softcap)
    grad = 1 - tanh * tanh
  if temperature != 1.0:
    grad = grad / temperature
  return grad


# ---------------------------------------------------------------------------
# Reference implementation (materialises every logit).


def naive_token_logprobs(
    hidden_BxNxD: Array,
    unembed_DxV: Array,
    targets_BxN: Array,
    *,
    with_entropy: bool = False,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
) -> Array | tuple[Array, Array]:
  """Full-softmax reference: materialises the ``[B, N, V]`` logits.

  Same maths and signature as ``token_logprobs`` (without chunking); kept as
  the oracle for tests and for tiny vocabularies. Differentiated by autodiff.
  """
  _check_inputs(hidden_BxNxD, unembed_DxV, targets_BxN, "naive_token_logprobs")
  _check_logit_transform(logit_softcap, temperature, "naive_token_logprobs")
  dtype = _compute_dtype(hidden_BxNxD, unembed_DxV)
  logits_BxNxV = jnp.einsum(
      "...d,dv->...v", hidden_BxNxD, unembed_DxV,
      preferred_element_type=dtype).astype(dtype)
  logits_BxNxV = _transform(logits_BxNxV, logit_softcap, temperature)
  logp_BxNxV = jax.nn.log_softmax(logits_BxNxV, axis=-1)
  logp_BxN = jnp.take_along_axis(
      logp_BxNxV, targets_BxN[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if not with_entropy:
    return logp_BxN
  entropy_BxN = -jnp.sum(jnp.exp(logp_BxNxV) * logp_BxNxV, axis=-1)
  return logp_BxN, entropy_BxN


# ---------------------------------------------------------------------------
# The chunk kernel. `axis_name` is None on one device, or the mesh axis the
# vocab is split over (inside shard_map); reductions over the vocab then go
# through a collective.


def _vocab_offset(axis_name: str | None, local_vocab: int) -> Array:
  if axis_name is None:
    return jnp.int32(0)
  return jax.lax.axis_index(axis_name).astype(jnp.int32) * local_vocab


def _chunk_logits(h_CxD: Array, w_DxV: Array, dtype: jnp.dtype) -> Array:
  return jnp.dot(h_CxD, w_DxV, preferred_element_type=dtype).astype(dtype)


def _local_targets(t_C: Array, offset: Array,
                   local_vocab: int) -> tuple[Array, Array]:
  local_t_C = t_C.astype(jnp.int32) - offset
  owned_C = (local_t_C >= 0) & (local_t_C < local_vocab)
  return local_t_C, owned_C


def _chunk_forward(h_CxD, w_DxV, t_C, axis_name, with_entropy, dtype,
                   softcap=None, temperature=1.0):
  """Returns (logp_C, lse_C, entropy_C or None) for one chunk of tokens."""
  local_vocab = w_DxV.shape[1]
  z_CxV = _transform(_chunk_logits(h_CxD, w_DxV, dtype), softcap, temperature)
  # The max only stabilises exp(); it cancels exactly, so no gradient flows.
  m_C = jnp.max(z_CxV, axis=-1)
  if axis_name is not None:
    m_C = jax.lax.pmax(m_C, axis_name)
  m_C = jax.lax.stop_gradient(m_C)
  # The target logit is read from z, not from z - m, so z - m has one consumer
  # and XLA fuses it into the exp-sum instead of storing it (an extra [C, V]
  # write and read).
  zc_CxV = z_CxV - m_C[:, None]
  e_CxV = jnp.exp(zc_CxV)
  s_C = jnp.sum(e_CxV, axis=-1)
  local_t_C, owned_C = _local_targets(t_C, _vocab_offset(axis_name, local_vocab),
                                      local_vocab)
  zt_C = jnp.take_along_axis(
      z_CxV, jnp.clip(local_t_C, 0, local_vocab - 1)[:, None], axis=-1)[:, 0] - m_C
  # Only the shard that owns the target id contributes its logit.
  zt_C = jnp.where(owned_C, zt_C, jnp.zeros_like(zt_C))
  if with_entropy:
    ez_C = jnp.sum(e_CxV * zc_CxV, axis=-1)
  if axis_name is not None:
    s_C = jax.lax.psum(s_C, axis_name)
    zt_C = jax.lax.psum(zt_C, axis_name)
    if with_entropy:
      ez_C = jax.lax.psum(ez_C, axis_name)
  log_s_C = jnp.log(s_C)
  lse_C = m_C + log_s_C
  logp_C = zt_C - log_s_C
  # H = lse - E_p[z] = log s - E_p[z - m]; the shifted form avoids cancelling
  # two large numbers.
  entropy_C = (log_s_C - ez_C / s_C) if with_entropy else None
  return logp_C, lse_C, entropy_C


def _chunk_backward(h_CxD, w_DxV, t_C, lse_C, entropy_C, g_logp_C, g_ent_C,
                    axis_name, dtype, softcap=None, temperature=1.0):
  """Gradients of sum(g_logp * logp + g_ent * H) wrt this chunk's h and W.

  d logp / dz = onehot(t) - p is split in two: the dense -g * p part goes through
  the two [C, V] matmuls, and the one-hot part, which only touches the target
  column of each token, is added as a [C, D] gather (dh += g * W[:, t]) and a
  [C, D] scatter (dW[:, t] += g * h). A one-hot compare over all C x V logits
  costs XLA:CPU more than the scatter (1.07x the whole head).

  With a soft cap / temperature, z = f(a) of the raw logits a: the dense part is
  multiplied by f'(a) elementwise, the one-hot part by f'(a_t) of the target.
  """
  local_vocab = w_DxV.shape[1]
  a_CxV = _chunk_logits(h_CxD, w_DxV, dtype)
  z_CxV = _transform(a_CxV, softcap, temperature)
  logp_CxV = z_CxV - lse_C[:, None]
  p_CxV = jnp.exp(logp_CxV)
  local_t_C, owned_C = _local_targets(t_C, _vocab_offset(axis_name, local_vocab),
                                      local_vocab)
  dz_CxV = -g_logp_C[:, None] * p_CxV
  if g_ent_C is not None:
    dz_CxV = dz_CxV - g_ent_C[:, None] * p_CxV * (logp_CxV + entropy_C[:, None])
  # Tokens whose target lives on another vocab shard get no one-hot term here.
  g_hit_C = jnp.where(owned_C, g_logp_C, 0).astype(dtype)
  t_safe_C = jnp.clip(local_t_C, 0, local_vocab - 1)
  dz_da_CxV = _transform_grad(a_CxV, softcap, temperature)
  if dz_da_CxV is not None:
    dz_CxV = dz_CxV * dz_da_CxV
    a_t_C = jnp.take_along_axis(a_CxV, t_safe_C[:, None], axis=-1)[:, 0]
    g_hit_C = g_hit_C * _transform_grad(a_t_C, softcap, temperature)
  w_t_CxD = jnp.take(w_DxV, t_safe_C, axis=1).T.astype(dtype)
  dh_CxD = (jnp.dot(dz_CxV, w_DxV.T.astype(dtype), preferred_element_type=dtype)
            + g_hit_C[:, None] * w_t_CxD)
  if axis_name is not None:
    dh_CxD = jax.lax.psum(dh_CxD, axis_name)
  # Computed as [V, D] and transposed: with tied embeddings the caller's W is an
  # embedding table's transpose, the two transposes cancel, and XLA:CPU writes the
  # gradient straight into the table's layout instead of copying 4 * V * D bytes.
  dw_VxD = jnp.dot(dz_CxV.T, h_CxD.astype(dtype), preferred_element_type=dtype)
  dw_VxD = dw_VxD.at[t_safe_C].add(g_hit_C[:, None] * h_CxD.astype(dtype))
  return dh_CxD, dw_VxD.T


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _chunked(h_KxRxCxD, w_DxV, t_KxRxC, axis_name, batch_axes, with_entropy,
             softcap, temperature):
  out, _ = _chunked_fwd(h_KxRxCxD, w_DxV, t_KxRxC, axis_name, batch_axes,
                        with_entropy, softcap, temperature)
  return out


def _chunked_fwd(h_KxRxCxD, w_DxV, t_KxRxC, axis_name, batch_axes, with_entropy,
                 softcap, temperature):
  del batch_axes  # Only the backward pass reduces over the batch shards.
  dtype = _compute_dtype(h_KxRxCxD, w_DxV)

  def body(_, xs):
    h_RxCxD, t_RxC = xs
    logp_C, lse_C, ent_C = _chunk_forward(
        h_RxCxD.reshape(-1, h_RxCxD.shape[-1]), w_DxV, t_RxC.reshape(-1),
        axis_name, with_entropy, dtype, softcap, temperature)
    unflat = lambda x: None if x is None else x.reshape(t_RxC.shape)
    return None, (unflat(logp_C), unflat(lse_C), unflat(ent_C))

  _, (logp_KxRxC, lse_KxRxC, ent_KxRxC) = jax.lax.scan(
      body, None, (h_KxRxCxD, t_KxRxC))
  out = (logp_KxRxC, ent_KxRxC) if with_entropy else logp_KxRxC
  return out, (h_KxRxCxD, w_DxV, t_KxRxC, lse_KxRxC, ent_KxRxC)


def _chunked_bwd(axis_name, batch_axes, with_entropy, softcap, temperature,
                 residuals, g):
  h_KxRxCxD, w_DxV, t_KxRxC, lse_KxRxC, ent_KxRxC = residuals
  dtype = _compute_dtype(h_KxRxCxD, w_DxV)
  if with_entropy:
    g_logp_KxRxC, g_ent_KxRxC = g
  else:
    g_logp_KxRxC, g_ent_KxRxC = g, None

  def body(dw_DxV, xs):
    h_RxCxD, *rest = xs
    flat = lambda x: None if x is None else x.reshape(-1)
    t_C, lse_C, ent_C, g_logp_C, g_ent_C = map(flat, rest)
    dh_CxD, dw_chunk_DxV = _chunk_backward(
        h_RxCxD.reshape(-1, h_RxCxD.shape[-1]), w_DxV, t_C, lse_C, ent_C,
        g_logp_C.astype(dtype),
        None if g_ent_C is None else g_ent_C.astype(dtype), axis_name, dtype,
        softcap, temperature)
    return (dw_chunk_DxV if dw_DxV is None else dw_DxV + dw_chunk_DxV,
            dh_CxD.reshape(h_RxCxD.shape).astype(h_RxCxD.dtype))

  xs = (h_KxRxCxD, t_KxRxC, lse_KxRxC, ent_KxRxC, g_logp_KxRxC, g_ent_KxRxC)
  if h_KxRxCxD.shape[0] == 1:
    # One chunk: no accumulator (XLA keeps `w * 0 + dw`, an extra pass over W).
    dw_DxV, dh_RxCxD = body(None, jax.tree.map(lambda x: x[0], xs))
    dh_KxRxCxD = dh_RxCxD[None]
  else:
    # `w * 0` (not zeros) so the accumulator carries w's sharding type inside
    # shard_map; the scan carry must keep one type across iterations, and each
    # chunk's contribution also varies over the batch shards.
    dw0_DxV = (w_DxV * 0).astype(dtype)
    if batch_axes:
      dw0_DxV = jax.lax.pcast(dw0_DxV, batch_axes, to="varying")
    dw_DxV, dh_KxRxCxD = jax.lax.scan(body, dw0_DxV, xs)
  if batch_axes:
    # Every batch shard saw different tokens: the full gradient is their sum.
    dw_DxV = jax.lax.psum(dw_DxV, batch_axes)
  return dh_KxRxCxD, dw_DxV.astype(w_DxV.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _chunked_token_logprobs(hidden, unembed, targets, chunk_size, with_entropy,
                            axis_name, batch_axes=(), softcap=None,
                            temperature=1.0):
  """Chunks along the last (sequence) axis, pads it, runs the kernel, unpads.

  Every chunk holds the same positions of *all* rows ([rows, C] tokens with
  rows * C <= chunk_size when chunk_size >= rows), so a batch dimension sharded
  over devices stays sharded inside every chunk: no all-gather is needed, and
  the scan runs over the (unsharded) sequence axis.
  """
  lead_shape = targets.shape
  d = hidden.shape[-1]
  n = lead_shape[-1] if lead_shape else 1
  rows = int(np.prod(lead_shape[:-1], dtype=np.int64)) if lead_shape else 1
  chunk = max(1, min(chunk_size // max(rows, 1), n))
  num_chunks = -(-n // chunk)
  pad = num_chunks * chunk - n
  h_RxNxD = hidden.reshape(rows, n, d)
  t_RxN = targets.reshape(rows, n).astype(jnp.int32)
  if pad:
    # Padded positions score token 0 of a zero hidden state; they are sliced
    # off below, so their (zero) cotangents never reach the caller.
    h_RxNxD = jnp.pad(h_RxNxD, ((0, 0), (0, pad), (0, 0)))
    t_RxN = jnp.pad(t_RxN, ((0, 0), (0, pad)))
  h_KxRxCxD = h_RxNxD.reshape(rows, num_chunks, chunk, d).transpose(1, 0, 2, 3)
  t_KxRxC = t_RxN.reshape(rows, num_chunks, chunk).transpose(1, 0, 2)
  out = _chunked(h_KxRxCxD, unembed, t_KxRxC, axis_name, batch_axes,
                 with_entropy, softcap, temperature)

  def unchunk(x_KxRxC):
    x_RxN = x_KxRxC.transpose(1, 0, 2).reshape(rows, num_chunks * chunk)
    return x_RxN[:, :n].reshape(lead_shape)

  if with_entropy:
    return unchunk(out[0]), unchunk(out[1])
  return unchunk(out)


# ---------------------------------------------------------------------------
# Public API.


def token_logprobs(
    hidden_BxNxD: Array,
    unembed_DxV: Array,
    targets_BxN: Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
) -> Array | tuple[Array, Array]:
  """Per-token ``log p(target)`` without materialising ``[B, N, V]`` logits.

  The tokens are processed ``chunk_size`` at a time: a chunk holds
  ``C = max(1, chunk_size // B)`` consecutive positions of every row (the
  sequence axis is padded to a multiple of ``C``), so a sharded batch dim stays
  sharded. Each chunk's logits are recomputed in the backward pass, so peak
  memory is ``O(max(chunk_size, B) * V)``, never ``O(B * N * V)``.

  Args:
    hidden_BxNxD: hidden states ``[..., D]`` (any leading shape, any float
      dtype).
    unembed_DxV: unembedding ``[D, V]``.
    targets_BxN: int token ids with hidden's leading shape; must lie in
      ``[0, V)`` (an out-of-range id is not detected under jit and scores as if
      its logit were the row max).
    chunk_size: tokens per chunk (rounded down to a multiple of the number of
      rows, at least one position per row). Larger is faster, smaller is
      leaner; ``chunk_size * V`` logits (twice over in the backward pass) is
      the working set.
    with_entropy: also return the entropy of the full next-token distribution.
    logit_softcap: ``c``: score ``z = c * tanh(h @ W / c)`` (Gemma 2 / 3; pass
      ``TransformerConfig.final_logit_softcap``). None: no cap.
    temperature: ``T``: score ``z / T`` (after the cap, as a sampler divides
      the model's logits). With a cap, pass the temperature here instead of
      dividing ``hidden`` by it: ``c * tanh(h @ W / (T c))`` is another
      distribution.

  Returns:
    ``logp_BxN`` (and ``entropy_BxN`` when ``with_entropy``), float32 (float64
    for float64 inputs), whatever the input dtype.
  """
  _check_inputs(hidden_BxNxD, unembed_DxV, targets_BxN, "token_logprobs")
  _check_chunk_size(chunk_size, "token_logprobs")
  _check_logit_transform(logit_softcap, temperature, "token_logprobs")
  return _chunked_token_logprobs(
      hidden_BxNxD, unembed_DxV, targets_BxN, int(chunk_size),
      bool(with_entropy), None, softcap=_as_float(logit_softcap),
      temperature=float(temperature))


def _as_float(x: Any) -> float | None:
  # Hashable Python floats: the kernel takes them as static (nondiff) args.
  return None if x is None else float(x)


def _as_axes(axes: str | Sequence[str] | None) -> tuple[str, ...]:
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(axes)


def vocab_parallel_token_logprobs(
    hidden_BxNxD: Array,
    unembed_DxV: Array,
    targets_BxN: Array,
    *,
    mesh: Mesh,
    vocab_axis: str = "tensor",
    batch_axes: str | Sequence[str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
) -> Array | tuple[Array, Array]:
  """``token_logprobs`` with ``unembed`` split over its vocab dim on a mesh axis.

  Inside ``jax.shard_map`` every device holds ``V / n`` vocab columns (``n`` the
  size of ``vocab_axis``) and computes its chunk's local max, sum of
  exponentials and (if it owns the id) target logit; ``pmax`` / ``psum`` over
  ``vocab_axis`` give the global logsumexp. The backward pass ``psum``s the
  hidden-state gradient; each device keeps its slice of the unembedding
  gradient. The result equals ``token_logprobs`` on the unsharded arrays.

  Args:
    hidden_BxNxD: ``[B, N, D]`` hidden states; dim 0 is split over
      ``batch_axes`` (replicated over every other mesh axis).
    unembed_DxV: ``[D, V]``; dim 1 is split over ``vocab_axis``.
    targets_BxN: ``[B, N]`` int token ids, split like hidden's dim 0.
    mesh: the device mesh.
    vocab_axis: mesh axis the vocab is split over.
    batch_axes: mesh axis name(s) the batch dim is split over, or None.
    chunk_size: tokens per chunk, per device.
    with_entropy: also return the entropy.
    logit_softcap, temperature: as in ``token_logprobs``; both are elementwise
      in the logits, so every shard applies them to its own vocab slice before
      the collectives.

  Returns:
    ``logp_BxN`` (and ``entropy_BxN``), float32, sharded like ``targets``.
  """
  name = "vocab_parallel_token_logprobs"
  _check_inputs(hidden_BxNxD, unembed_DxV, targets_BxN, name)
  _check_chunk_size(chunk_size, name)
  _check_logit_transform(logit_softcap, temperature, name)
  softcap, temperature = _as_float(logit_softcap), float(temperature)
  if hidden_BxNxD.ndim != 3:
    raise ValueError(f"{name}: hidden must be [B, N, D], got shape "
                     f"{hidden_BxNxD.shape}.")
  batch = _as_axes(batch_axes)
  for axis in (vocab_axis, *batch):
    if axis not in mesh.axis_names:
      raise ValueError(
          f"{name}: mesh axis {axis!r} not in the mesh's axes "
          f"{tuple(mesh.axis_names)}; set vocab_axis / batch_axes to mesh "
          "axis names.")
  if vocab_axis in batch:
    raise ValueError(f"{name}: vocab_axis {vocab_axis!r} cannot also be a "
                     f"batch axis ({batch}).")
  n_vocab_shards = mesh.shape[vocab_axis]
  if unembed_DxV.shape[1] % n_vocab_shards:
    raise ValueError(
        f"{name}: vocab size {unembed_DxV.shape[1]} is not divisible by the "
        f"size {n_vocab_shards} of mesh axis {vocab_axis!r}; pad the vocab to "
        "a multiple of the tensor-parallel size.")
  n_batch_shards = int(np.prod([mesh.shape[a] for a in batch], dtype=np.int64))
  if hidden_BxNxD.shape[0] % n_batch_shards:
    raise ValueError(
        f"{name}: batch size {hidden_BxNxD.shape[0]} is not divisible by "
        f"{n_batch_shards}, the size of batch_axes {batch}.")

  batch_spec = (batch if len(batch) > 1 else batch[0]) if batch else None
  h_spec = P(batch_spec, None, None)
  t_spec = P(batch_spec, None)
  w_spec = P(None, vocab_axis)
  out_specs = (t_spec, t_spec) if with_entropy else t_spec

  def local(h, w, t):
    return _chunked_token_logprobs(h, w, t, int(chunk_size), bool(with_entropy),
                                   vocab_axis, batch, softcap, temperature)

  args = (hidden_BxNxD, unembed_DxV, targets_BxN)
  in_specs = (h_spec, w_spec, t_spec)
  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    # With explicit mesh axes (jax.make_mesh's default) shard_map requires the
    # inputs' sharding types to equal in_specs; resharding is the layout
    # change the caller asked for by choosing vocab_axis / batch_axes.
    args = tuple(
        jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec))
        for x, spec in zip(args, in_specs))
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                       out_specs=out_specs)(*args)


def gather_scored(hidden_BxTxD: Array, logit_pos_BxK: Array) -> Array:
  """Hidden state that predicts each scored slot: ``hidden[b, logit_pos[b, k]]``.

  ``K`` is ``T`` for slot-per-position score arrays, fewer for compacted ones
  (`jaxalign.data.batching.compact_scores`). Positions are clipped into ``[0, T)``;
  unscored slots (``seq_ids == -1``) may carry any position, their values are masked
  out downstream.
  """
  if (hidden_BxTxD.ndim != 3 or logit_pos_BxK.ndim != 2
      or logit_pos_BxK.shape[0] != hidden_BxTxD.shape[0]):
    raise ValueError(
        f"gather_scored: expected hidden [B, T, D] and logit_pos [B, K]; got "
        f"hidden {hidden_BxTxD.shape} and logit_pos {logit_pos_BxK.shape}.")
  logit_pos_BxT = logit_pos_BxK
  pos_BxT = jnp.clip(logit_pos_BxT.astype(jnp.int32), 0,
                     hidden_BxTxD.shape[1] - 1)
  return jnp.take_along_axis(hidden_BxTxD, pos_BxT[..., None], axis=1)


_BATCH_KEYS = ("logit_pos", "targets", "seq_ids")


def sequence_logps(
    hidden_BxTxD: Array,
    unembed_DxV: Array,
    batch: Mapping[str, Any],
    num_sequences: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    logprob_fn: Callable[..., Array] | None = None,
    logit_softcap: float | None = None,
) -> tuple[Array, Array]:
  """Per-sequence sums of scored-token log-probs, and the scored-token counts.

  For every slot ``(b, t)`` with ``seq_ids[b, t] = s >= 0``:
  ``sums[s] += log p(targets[b, t] | hidden[b, logit_pos[b, t]])`` and
  ``counts[s] += 1``. Slots with ``seq_ids == -1`` contribute nothing.

  Args:
    hidden_BxTxD: model output ``[R, L, D]`` for the batch rows.
    unembed_DxV: unembedding ``[D, V]``.
    batch: the batch dict (docs/architecture.md section 2); uses ``logit_pos``,
      ``targets`` and ``seq_ids``, each ``[R, L]``, or each ``[R, K]`` when the
      layout compacted them to the scored slots (`batching.compact_scores`).
    num_sequences: ``S``, static.
    chunk_size: tokens per chunk for ``token_logprobs``.
    logprob_fn: replaces ``token_logprobs`` (called as
      ``fn(hidden, unembed, targets, chunk_size=...)``, plus
      ``logit_softcap=...`` when that is set), e.g. a
      ``functools.partial(vocab_parallel_token_logprobs, mesh=mesh)``.
    logit_softcap: the model's final-logit soft cap
      (``TransformerConfig.final_logit_softcap``; Gemma 2 / 3), None for none.

  Returns:
    ``(sums [S] float32, counts [S] int32)``.
  """
  for key in _BATCH_KEYS:
    if key not in batch:
      raise ValueError(
          f"sequence_logps: batch is missing key {key!r} (has "
          f"{sorted(batch)}); build batches with jaxalign.data.batching.")
  # [R, L], or [R, K] once compacted (batching.compact_scores): the head then runs on
  # the K scored slots of each row only.
  want = tuple(batch["seq_ids"].shape)
  for key in _BATCH_KEYS:
    if (len(batch[key].shape) != 2 or batch[key].shape[0] != hidden_BxTxD.shape[0]
        or tuple(batch[key].shape) != want):
      raise ValueError(
          f"sequence_logps: batch[{key!r}] has shape {batch[key].shape}, expected "
          f"[R, L] = {hidden_BxTxD.shape[:2]} (or [R, K] compacted, as every score "
          "array) to match hidden.")
  if not isinstance(num_sequences, (int, np.integer)) or num_sequences < 1:
    raise ValueError(f"sequence_logps: num_sequences must be a positive int, "
                     f"got {num_sequences!r}.")
  fn = token_logprobs if logprob_fn is None else logprob_fn
  scored_BxTxD = gather_scored(hidden_BxTxD, jnp.asarray(batch["logit_pos"]))
  targets_BxT = jnp.asarray(batch["targets"]).astype(jnp.int32)
  # Passed only when set, so a custom logprob_fn without the argument still works
  # for uncapped models.
  cap_kwargs = {} if logit_softcap is None else {"logit_softcap": logit_softcap}
  logp_BxT = fn(scored_BxTxD, unembed_DxV, targets_BxT, chunk_size=chunk_size,
                **cap_kwargs)
  seq_ids_BxT = jnp.asarray(batch["seq_ids"]).astype(jnp.int32)
  scored_BxT = seq_ids_BxT >= 0
  # Unscored slots go to an extra segment that is dropped; `where` (not a
  # multiply) keeps a non-finite value in an unscored slot out of the sums.
  segment_BxT = jnp.where(scored_BxT, seq_ids_BxT, num_sequences)
  sums_S = jax.ops.segment_sum(
      jnp.where(scored_BxT, logp_BxT, 0.0).reshape(-1),
      segment_BxT.reshape(-1), num_segments=num_sequences + 1)[:num_sequences]
  counts_S = jax.ops.segment_sum(
      scored_BxT.astype(jnp.int32).reshape(-1), segment_BxT.reshape(-1),
      num_segments=num_sequences + 1)[:num_sequences]
  return sums_S, counts_S
