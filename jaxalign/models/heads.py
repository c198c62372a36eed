"""Scalar heads on top of the transformer's hidden states (reward and value models).

A head is a Linear D -> 1: `score = hidden . w + b`, computed in f32. Its params are a
plain dict `{"w": [D], "b": []}` with logical axes `{"w": ("embed",), "b": ()}`, so it
sits beside the transformer params in one pytree (e.g. `{"model": ..., "head": ...}`).

The reward of a sequence is the head at the sequence's last token, addressed by the
batch contract's `seq_last` (flat index `row * T + pos`, -1 for an absent sequence).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def init_head(d_model: int, key: jax.Array, *, std: float | None = None,
              param_dtype=jnp.float32) -> dict[str, jax.Array]:
  """Head params: w ~ N(0, std^2) with std = 1/sqrt(D+1) by default (HF reward heads), b = 0."""
  std = 1.0 / math.sqrt(d_model + 1) if std is None else std
  w = std * jax.random.normal(key, (d_model,), jnp.float32)
  return {"w": w.astype(param_dtype), "b": jnp.zeros((), param_dtype)}


def head_logical_axes() -> dict[str, tuple]:
  return {"w": ("embed",), "b": ()}


def token_scores(hidden_BxTxD: jax.Array, head_params: dict[str, jax.Array]) -> jax.Array:
  """[B, T] f32 head output at every position (per-token values for PPO)."""
  w = head_params["w"].astype(jnp.float32)
  return jnp.einsum("btd,d->bt", hidden_BxTxD.astype(jnp.float32), w) + head_params["b"].astype(
      jnp.float32
  )


def sequence_scores(hidden_BxTxD: jax.Array, head_params: dict[str, jax.Array],
                    seq_last_S: jax.Array) -> jax.Array:
  """[S] f32 head output at each sequence's last token; 0 where `seq_last_S == -1`.

  Gathers only the S hidden rows it needs, so no [B, T] score array is formed.
  """
  b, t, d = hidden_BxTxD.shape
  flat_NxD = hidden_BxTxD.reshape(b * t, d)
  present_S = seq_last_S >= 0
  rows_SxD = jnp.take(flat_NxD, jnp.where(present_S, seq_last_S, 0), axis=0)
  w = head_params["w"].astype(jnp.float32)
  scores_S = rows_SxD.astype(jnp.float32) @ w + head_params["b"].astype(jnp.float32)
  return jnp.where(present_S, scores_S, 0.0)


class ScalarHead(nnx.Module):
  """NNX wrapper over the same params, for module-style use: `head(hidden) -> [B, T]`."""

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    p = init_head(d_model, rngs.params(), param_dtype=param_dtype)
    self.w = nnx.Param(p["w"], out_sharding=("embed",), eager_sharding=False)
    self.b = nnx.Param(p["b"], out_sharding=(), eager_sharding=False)

  def __call__(self, hidden_BxTxD: jax.Array) -> jax.Array:
    return token_scores(hidden_BxTxD, {"w": self.w[...], "b": self.b[...]})
