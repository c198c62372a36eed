"""Attention masks built from segment / branch ids (docs/architecture.md, section 1).

Token i attends to token j iff
  segment_ids[i] == segment_ids[j] != 0,  j <= i,  and
  branch_ids[j] == 0 or branch_ids[j] == branch_ids[i],
optionally ANDed with a sliding window and a caller-given boolean mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_mask(q_len: int, kv_len: int | None = None) -> jax.Array:
  """[Tq, Tk] lower-triangular mask; query i sees keys j <= i (aligned at the start)."""
  kv_len = q_len if kv_len is None else kv_len
  return jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None]


def segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """[B, T, T]: same non-zero segment (packing; segment 0 is padding)."""
  seg_q = segment_ids_BxT[:, :, None]
  seg_k = segment_ids_BxT[:, None, :]
  return (seg_q == seg_k) & (seg_k != 0)


def branch_mask(branch_ids_BxT: jax.Array) -> jax.Array:
  """[B, T, T]: key j is shared (branch 0) or on the query's own branch."""
  br_q = branch_ids_BxT[:, :, None]
  br_k = branch_ids_BxT[:, None, :]
  return (br_k == 0) | (br_k == br_q)


def sliding_window_mask(positions_BxT: jax.Array, window: int) -> jax.Array:
  """[B, T, T]: key within `window` positions of the query (q_pos - k_pos < window).

  Uses position ids rather than row indices, so packed / prefix-shared rows see the
  same window as each sequence run alone.
  """
  delta = positions_BxT[:, :, None] - positions_BxT[:, None, :]
  return delta < window


def make_attention_mask(
    batch: int,
    length: int,
    segment_ids_BxT: jax.Array | None = None,
    branch_ids_BxT: jax.Array | None = None,
    attention_mask_BxTxT: jax.Array | None = None,
    positions_BxT: jax.Array | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
  """The full boolean [B, T, T] mask (True = may attend) from the batch contract ids."""
  mask = jnp.broadcast_to(causal_mask(length)[None], (batch, length, length))
  if segment_ids_BxT is not None:
    mask = mask & segment_mask(segment_ids_BxT)
  if branch_ids_BxT is not None:
    mask = mask & branch_mask(branch_ids_BxT)
  if sliding_window is not None:
    if positions_BxT is None:
      raise ValueError("sliding_window needs positions_BxT to measure distances.")
    mask = mask & sliding_window_mask(positions_BxT, sliding_window)
  if attention_mask_BxTxT is not None:
    if attention_mask_BxTxT.shape != (batch, length, length):
      raise ValueError(
          f"attention_mask has shape {attention_mask_BxTxT.shape}; expected "
          f"{(batch, length, length)} (bool, True = may attend)."
      )
    mask = mask & attention_mask_BxTxT.astype(bool)
  return mask
