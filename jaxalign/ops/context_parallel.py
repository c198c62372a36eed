"""Context parallelism: one sequence's attention spread over the `context` mesh axis.

All-gather context parallelism (the scheme of Llama 3's long-context training, Dubey et
al. 2024, section 3.3.2): every device holds T / C consecutive tokens of each row (q, k,
v and the row ids); inside `shard_map` it all-gathers k, v and the key-side ids over the
`context` axis and attends its own queries to all T keys with `attention_core`. The
backward pass is autodiff's transpose of the gather, a reduce-scatter of dk and dv, so
each device ends with the gradients of its own tokens.

Per device: scores / probabilities [B, H, T / C, T] (1 / C of single-device attention),
k and v whole ([B, T, G, K]: small under grouped-query attention), one all-gather of k, v
forward and one reduce-scatter of dk, dv backward per layer. Not done here: the
load-balancing reorder of causal rows (shard c then holds chunks c and 2C - 1 - c, so
every device has equal work; now the last shard does the most) and a ring schedule that
overlaps the k / v transfer with compute; the local attention is the xla core.

Masks: as `ops.masks` (causal by slot, same non-zero segment, shared-or-same branch,
position-id sliding window), built per shard from global slot indices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxalign.parallel import mesh as mesh_lib


def _cross_mask(q_ids, k_ids, q_slot_T, k_slot_S, window):
  """[B, Tq, S] bool from query-side and key-side (segment, branch, position) ids."""
  seg_q, bra_q, pos_q = q_ids
  seg_k, bra_k, pos_k = k_ids
  mask = (k_slot_S[None, :] <= q_slot_T[:, None])[None]
  mask = mask & (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_k[:, None, :] != 0)
  mask = mask & ((bra_k[:, None, :] == 0) | (bra_k[:, None, :] == bra_q[:, :, None]))
  if window is not None:
    mask = mask & (pos_q[:, :, None] - pos_k[:, None, :] < window)
  return mask


def context_parallel_attention(
    q_BxTxHxK: jax.Array, k_BxTxGxK: jax.Array, v_BxTxGxK: jax.Array, mesh: Mesh, *,
    segment_ids: jax.Array | None = None, branch_ids: jax.Array | None = None,
    positions: jax.Array | None = None, window: int | None = None, scale: float,
    softcap: float | None = None, axis: str = mesh_lib.CONTEXT_AXIS,
    batch_axes: tuple[str, ...] = mesh_lib.BATCH_AXES) -> jax.Array:
  """Self-attention [B, T, H, K] with T split over `mesh`'s `axis` (see module doc).

  Rows are split over those of `batch_axes` the mesh has (size > 1). T must be a
  multiple of the context axis size; ids default to one segment, no branches and
  positions 0..T-1.
  """
  from jaxalign.models import transformer  # pylint: disable=g-import-not-at-top
  if axis not in mesh.shape:
    raise ValueError(f"context_parallel_attention: the mesh {dict(mesh.shape)} has no "
                     f"{axis!r} axis; build it with mesh.make_context_mesh.")
  b, t = q_BxTxHxK.shape[:2]
  c = mesh.shape[axis]
  if t % c:
    raise ValueError(f"context parallelism: sequence length {t} is not a multiple of the "
                     f"{axis!r} axis size {c}; bucket lengths to multiples of it.")
  ones = jnp.ones((b, t), jnp.int32)
  seg = ones if segment_ids is None else segment_ids.astype(jnp.int32)
  bra = 0 * ones if branch_ids is None else branch_ids.astype(jnp.int32)
  pos = jnp.cumsum(ones, axis=1) - 1 if positions is None else positions.astype(jnp.int32)
  rows = tuple(a for a in batch_axes if a in mesh.shape and mesh.shape[a] > 1) or None
  spec = P(rows, axis)

  def local(q, k, v, seg, bra, pos):
    tl = q.shape[1]
    gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)
    q_slot = jax.lax.axis_index(axis) * tl + jnp.arange(tl)
    mask = _cross_mask((seg, bra, pos), (gather(seg), gather(bra), gather(pos)), q_slot,
                       jnp.arange(tl * c), window)
    return transformer.attention_core(q, gather(k), gather(v), mask, scale=scale,
                                      softcap=softcap)

  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec)(
      q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, seg, bra, pos)
