"""Full-vocabulary divergences between two models' next-token distributions, chunk by
chunk over the sequence (GKD, `jaxalign.losses.generalized_jsd`).

Both models' logits ``z = h @ W`` would be ``[B, N, V]`` each, and autodiff would keep
them for the backward pass. As in `jaxalign.ops.logprobs`, the sequence axis is cut
in chunks of ``chunk_size // B`` positions of all rows (batch sharding survives) and
a ``lax.scan`` visits one chunk at a time; its body is rematerialised
(``jax.checkpoint``), so the backward pass recomputes each chunk's logits instead of
storing them: peak memory ``O(chunk_size * V)`` per model. Each chunk holds the whole
vocabulary, so the divergence is exact, not a top-k estimate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxalign.losses import _online

Array = jax.Array


def _logits(h: Array, w: Array, softcap: float | None, temperature: float) -> Array:
  """``c * tanh(h @ W / c) / T`` in f32 (the sampler's transform of the logits)."""
  a = jnp.einsum("...d,dv->...v", h.astype(jnp.float32), w.astype(jnp.float32))
  if softcap is not None:
    a = softcap * jnp.tanh(a / softcap)
  return a / temperature


def token_generalized_jsd(student_h_BxNxD: Array, student_w_DxV: Array,
                          teacher_h_BxNxE: Array, teacher_w_ExV: Array, *, beta: float,
                          chunk_size: int = 1024, temperature: float = 1.0,
                          student_softcap: float | None = None,
                          teacher_softcap: float | None = None) -> Array:
  """[B, N] generalised JSD(beta) (`jaxalign.losses.generalized_jsd`) between the
  teacher's and the student's distributions at each position, from hidden states and
  unembeddings (the models may differ in width; they must share the vocabulary V).
  Gradients reach the student's inputs only: the teacher's are stopped."""
  b, n, _ = student_h_BxNxD.shape
  if (teacher_h_BxNxE.shape[:2] != (b, n)
      or student_w_DxV.shape[1] != teacher_w_ExV.shape[1]):
    raise ValueError(f"token_generalized_jsd: student hidden {student_h_BxNxD.shape} / "
                     f"unembed {student_w_DxV.shape} and teacher hidden "
                     f"{teacher_h_BxNxE.shape} / unembed {teacher_w_ExV.shape} must share "
                     "[B, N] and the vocabulary V.")
  teacher_h_BxNxE = jax.lax.stop_gradient(teacher_h_BxNxE)
  teacher_w_ExV = jax.lax.stop_gradient(teacher_w_ExV)
  chunk = max(1, min(chunk_size // max(b, 1), n))
  k = -(-n // chunk)
  pad = ((0, 0), (0, k * chunk - n), (0, 0))

  def split(h):  # [B, N, D] -> [K, B, C, D]
    return jnp.pad(h, pad).reshape(b, k, chunk, h.shape[-1]).transpose(1, 0, 2, 3)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def body(carry, hs):
    z_s = _logits(hs[0], student_w_DxV, student_softcap, temperature)
    z_t = _logits(hs[1], teacher_w_ExV, teacher_softcap, temperature)
    return carry, _online.generalized_jsd(z_s, z_t, beta=beta)

  _, d_KxBxC = jax.lax.scan(body, None, (split(student_h_BxNxD), split(teacher_h_BxNxE)))
  return d_KxBxC.transpose(1, 0, 2).reshape(b, k * chunk)[:, :n]
