"""Tests for jaxalign.ops.logprobs.

Oracles: a float64 NumPy transcription of log-softmax / entropy and of their
analytic gradients, the full-softmax `naive_token_logprobs` (another
implementation), `jax.test_util.check_grads` (finite differences), and XLA's
compiled memory analysis for the memory claim.

Tolerances: float32 comparisons use rtol=1e-5 with atol=1e-5 scaled by the
reference's largest magnitude (chunked and full matmuls sum in different
orders); float64 comparisons use 1e-10.
"""

import functools

import jax
import jax.test_util  # noqa: F401  (check_grads; a submodule, not imported by jax)
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from jaxalign.ops import gather_scored
from jaxalign.ops import naive_token_logprobs
from jaxalign.ops import sequence_logps
from jaxalign.ops import token_logprobs
from jaxalign.ops import vocab_parallel_token_logprobs

F32_RTOL = 1e-5
F32_ATOL = 1e-5
F64_TOL = 1e-10


def assert_close_f32(actual, expected):
  expected = np.asarray(expected, np.float64)
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=F32_RTOL, atol=F32_ATOL * scale)


def make_inputs(seed, b, n, d, v, dtype=np.float32):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(b, n, d)).astype(dtype)
  unembed = (rng.normal(size=(d, v)) / np.sqrt(d) * 3).astype(dtype)
  targets = rng.integers(0, v, size=(b, n)).astype(np.int32)
  return hidden, unembed, targets


# NumPy float64 transcription of the definitions.
def np_log_softmax(z):
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_logprobs_entropy(hidden, unembed, targets):
  logp = np_log_softmax(hidden.astype(np.float64) @ unembed.astype(np.float64))
  tok = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  ent = -(np.exp(logp) * logp).sum(-1)
  return tok, ent


def np_analytic_grads(hidden, unembed, targets, w_logp, w_ent):
  """Grad of sum(w_logp * log p(t) + w_ent * H) via dz = w(onehot - p) - ..."""
  h = hidden.astype(np.float64)
  u = unembed.astype(np.float64)
  logp = np_log_softmax(h @ u)
  p = np.exp(logp)
  ent = -(p * logp).sum(-1)
  onehot = np.eye(u.shape[1])[targets]
  dz = (w_logp[..., None] * (onehot - p)
        - w_ent[..., None] * p * (logp + ent[..., None]))
  return dz @ u.T, np.einsum("bnd,bnv->dv", h, dz)


def weighted_loss(fn, w_logp, w_ent):
  def loss(hidden, unembed, targets):
    logp, ent = fn(hidden, unembed, targets, with_entropy=True)
    return jnp.sum(w_logp * logp) + jnp.sum(w_ent * ent)
  return loss


B, N, D, V = 3, 10, 16, 96  # 30 tokens.


# Chunks hold chunk_size // B positions of every row: 2 -> 1 position (fewer
# tokens than rows), 7 -> 2 (divides N=10), 12 -> 4 (does not: padded), 64 -> 10.
@pytest.mark.parametrize("chunk_size", [2, 7, 12, 64])
def test_values_match_numpy_and_naive(chunk_size):
  hidden, unembed, targets = make_inputs(0, B, N, D, V)
  fn = jax.jit(functools.partial(token_logprobs, chunk_size=chunk_size,
                                 with_entropy=True))
  logp, ent = fn(hidden, unembed, targets)
  assert logp.shape == (B, N) and ent.shape == (B, N)
  assert logp.dtype == jnp.float32 and ent.dtype == jnp.float32
  np_logp, np_ent = np_logprobs_entropy(hidden, unembed, targets)
  assert_close_f32(logp, np_logp)
  assert_close_f32(ent, np_ent)
  naive_logp, naive_ent = naive_token_logprobs(hidden, unembed, targets,
                                               with_entropy=True)
  assert_close_f32(logp, naive_logp)
  assert_close_f32(ent, naive_ent)
  # Without entropy: a single array, the same values.
  logp_only = token_logprobs(hidden, unembed, targets, chunk_size=chunk_size)
  assert_close_f32(logp_only, np_logp)


@pytest.mark.parametrize("chunk_size", [12, 30])
def test_grads_match_naive_and_analytic(chunk_size):
  hidden, unembed, targets = make_inputs(1, B, N, D, V)
  rng = np.random.default_rng(2)
  w_logp = rng.normal(size=(B, N)).astype(np.float32)
  w_ent = rng.normal(size=(B, N)).astype(np.float32)
  chunked = functools.partial(token_logprobs, chunk_size=chunk_size)
  grad = lambda f: jax.jit(jax.grad(weighted_loss(f, w_logp, w_ent),
                                    argnums=(0, 1)))
  dh, du = grad(chunked)(hidden, unembed, targets)
  naive_dh, naive_du = grad(naive_token_logprobs)(hidden, unembed, targets)
  assert dh.dtype == jnp.float32 and du.dtype == jnp.float32
  assert_close_f32(dh, naive_dh)
  assert_close_f32(du, naive_du)
  np_dh, np_du = np_analytic_grads(hidden, unembed, targets,
                                   w_logp.astype(np.float64),
                                   w_ent.astype(np.float64))
  assert_close_f32(dh, np_dh)
  assert_close_f32(du, np_du)


def test_check_grads_float64():
  with jax.enable_x64(True):
    hidden, unembed, targets = make_inputs(3, 2, 3, 4, 8, dtype=np.float64)
    rng = np.random.default_rng(4)
    w_logp, w_ent = rng.normal(size=(2, 2, 3))
    loss = weighted_loss(functools.partial(token_logprobs, chunk_size=4),
                         w_logp, w_ent)
    value = loss(hidden, unembed, targets)
    assert value.dtype == jnp.float64
    np_logp, np_ent = np_logprobs_entropy(hidden, unembed, targets)
    np.testing.assert_allclose(
        value, np.sum(w_logp * np_logp) + np.sum(w_ent * np_ent),
        rtol=F64_TOL)
    jax.test_util.check_grads(lambda h, u: loss(h, u, targets),
                              (hidden, unembed), order=1, modes=("rev",),
                              eps=1e-6, atol=1e-7, rtol=1e-7)
    dh, du = jax.grad(loss, argnums=(0, 1))(hidden, unembed, targets)
    np_dh, np_du = np_analytic_grads(hidden, unembed, targets, w_logp, w_ent)
    np.testing.assert_allclose(dh, np_dh, rtol=F64_TOL, atol=F64_TOL)
    np.testing.assert_allclose(du, np_du, rtol=F64_TOL, atol=F64_TOL)


def test_bfloat16_inputs_give_float32_outputs():
  hidden, unembed, targets = make_inputs(5, B, N, D, V)
  h16, u16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(unembed,
                                                             jnp.bfloat16)
  logp = token_logprobs(h16, u16, targets, chunk_size=7)
  assert logp.dtype == jnp.float32
  # bf16 products are exact in f32, so the oracle is the f32 computation on
  # the same (upcast) values.
  np_logp, _ = np_logprobs_entropy(np.asarray(h16, np.float32),
                                   np.asarray(u16, np.float32), targets)
  assert_close_f32(logp, np_logp)
  dh, du = jax.grad(lambda h, u: jnp.sum(token_logprobs(h, u, targets,
                                                        chunk_size=7)),
                    argnums=(0, 1))(h16, u16)
  assert dh.dtype == jnp.bfloat16 and du.dtype == jnp.bfloat16


@pytest.mark.parametrize("data,tensor,axis_type", [
    (4, 2, AxisType.Explicit),
    (2, 4, AxisType.Explicit),
    (1, 8, AxisType.Auto),
])
def test_vocab_parallel_matches_naive(data, tensor, axis_type):
  b, n, d, v = 4, 5, 16, 128
  hidden, unembed, targets = make_inputs(6, b, n, d, v)
  rng = np.random.default_rng(7)
  w_logp = rng.normal(size=(b, n)).astype(np.float32)
  w_ent = rng.normal(size=(b, n)).astype(np.float32)
  mesh = jax.make_mesh((data, tensor), ("data", "tensor"),
                       axis_types=(axis_type, axis_type))
  batch_axes = "data" if data > 1 else None
  parallel = functools.partial(vocab_parallel_token_logprobs, mesh=mesh,
                               vocab_axis="tensor", batch_axes=batch_axes,
                               chunk_size=3)  # 3 does not divide 5 tokens/dev.

  def loss_and_outputs(fn):
    def f(h, u, t):
      logp, ent = fn(h, u, t, with_entropy=True)
      return jnp.sum(w_logp * logp) + jnp.sum(w_ent * ent), (logp, ent)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

  (_, (logp, ent)), (dh, du) = loss_and_outputs(parallel)(hidden, unembed,
                                                          targets)
  (_, (n_logp, n_ent)), (n_dh, n_du) = loss_and_outputs(naive_token_logprobs)(
      hidden, unembed, targets)
  for actual, expected in [(logp, n_logp), (ent, n_ent), (dh, n_dh),
                           (du, n_du)]:
    assert actual.shape == expected.shape
    assert_close_f32(actual, expected)
  np_logp, _ = np_logprobs_entropy(hidden, unembed, targets)
  assert_close_f32(logp, np_logp)


def test_batch_sharding_survives_chunking():
  # Chunks run along the sequence axis with every row in each chunk, so a
  # data-parallel step needs no all-gather of the hidden states (only the
  # unembedding gradient's all-reduce).
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  hidden, unembed, targets = make_inputs(11, 8, 16, 16, 64)
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  hidden, targets = jax.device_put(hidden, data), jax.device_put(targets, data)
  step = jax.jit(jax.value_and_grad(
      lambda h, u: jnp.sum(token_logprobs(h, u, targets, chunk_size=32)),
      argnums=(0, 1)))
  hlo = step.lower(hidden, unembed).compile().as_text()
  assert "all-gather" not in hlo
  _, (dh, du) = step(hidden, unembed)
  n_dh, n_du = jax.grad(
      lambda h, u: jnp.sum(naive_token_logprobs(h, u, targets)),
      argnums=(0, 1))(hidden, unembed)
  assert_close_f32(dh, n_dh)
  assert_close_f32(du, n_du)


def test_vocab_parallel_rejects_bad_layout():
  hidden, unembed, targets = make_inputs(8, 4, 2, 8, 30)
  mesh = jax.make_mesh((2, 4), ("data", "tensor"))
  with pytest.raises(ValueError, match="not divisible by the size 4"):
    vocab_parallel_token_logprobs(hidden, unembed, targets, mesh=mesh)
  with pytest.raises(ValueError, match="'model' not in the mesh"):
    vocab_parallel_token_logprobs(hidden, unembed[:, :28], targets, mesh=mesh,
                                  vocab_axis="model")


def test_input_validation_messages():
  hidden, unembed, targets = make_inputs(9, 2, 3, 8, 16)
  with pytest.raises(ValueError, match="hidden's last dim"):
    token_logprobs(hidden, unembed.T, targets)
  with pytest.raises(ValueError, match="targets shape"):
    token_logprobs(hidden, unembed, targets[:, :2])
  with pytest.raises(ValueError, match="chunk_size"):
    token_logprobs(hidden, unembed, targets, chunk_size=0)
  with pytest.raises(ValueError, match="integer token ids"):
    token_logprobs(hidden, unembed, targets.astype(np.float32))


def _hand_batch():
  # Two rows of length 6; S = 4 sequences, sequence 3 absent (no tokens).
  # Row 0: a packed pair (seq 0 then seq 1) with a padding hole; row 1: one
  # prefix-shared-like row where scored slots read from earlier positions
  # (logit_pos != t - 1) and an unscored slot points anywhere.
  return {
      "logit_pos": np.array([[0, 0, 1, 0, 3, 4],
                             [5, 0, 1, 1, 3, 1]], np.int32),
      "targets": np.array([[0, 7, 9, 0, 2, 11],
                           [3, 0, 5, 6, 8, 4]], np.int32),
      "seq_ids": np.array([[-1, 0, 0, -1, 1, 1],
                           [-1, -1, 2, 2, 2, 1]], np.int32),
  }


def test_sequence_logps_matches_numpy_loop():
  r, l, d, v, s = 2, 6, 8, 16, 4
  rng = np.random.default_rng(10)
  hidden = rng.normal(size=(r, l, d)).astype(np.float32)
  unembed = rng.normal(size=(d, v)).astype(np.float32)
  # A non-finite hidden state read only by an unscored slot (row 1, slot 0)
  # must not leak into the sums.
  hidden[1, 5] = np.nan
  batch = _hand_batch()
  sums, counts = jax.jit(functools.partial(sequence_logps, num_sequences=s,
                                           chunk_size=5))(hidden, unembed,
                                                          batch)
  assert sums.shape == (s,) and sums.dtype == jnp.float32
  assert counts.shape == (s,) and counts.dtype == jnp.int32

  exp_sums = np.zeros(s)
  exp_counts = np.zeros(s, np.int64)
  for row in range(r):
    for t in range(l):
      seq = batch["seq_ids"][row, t]
      if seq < 0:
        continue
      h = hidden[row, batch["logit_pos"][row, t]].astype(np.float64)
      logp = np_log_softmax(h @ unembed.astype(np.float64))
      exp_sums[seq] += logp[batch["targets"][row, t]]
      exp_counts[seq] += 1
  np.testing.assert_array_equal(counts, exp_counts)
  assert exp_counts[3] == 0 and float(sums[3]) == 0.0
  assert_close_f32(sums, exp_sums)

  gathered = gather_scored(jnp.asarray(hidden), jnp.asarray(batch["logit_pos"]))
  np.testing.assert_array_equal(
      gathered, hidden[np.arange(r)[:, None], batch["logit_pos"]])


def test_sequence_logps_missing_key():
  hidden = np.zeros((2, 6, 8), np.float32)
  batch = _hand_batch()
  del batch["seq_ids"]
  with pytest.raises(ValueError, match="missing key 'seq_ids'"):
    sequence_logps(hidden, np.zeros((8, 16), np.float32), batch, 4)


def test_memory_chunked_is_under_10_percent_of_naive():
  b, n, d, v = 8, 2048, 512, 32000
  specs = (jax.ShapeDtypeStruct((b, n, d), jnp.float32),
           jax.ShapeDtypeStruct((d, v), jnp.float32),
           jax.ShapeDtypeStruct((b, n), jnp.int32))

  def temp_bytes(fn):
    step = jax.value_and_grad(lambda h, u, t: jnp.sum(fn(h, u, t)),
                              argnums=(0, 1))
    return jax.jit(step).lower(*specs).compile().memory_analysis(
    ).temp_size_in_bytes

  naive = temp_bytes(naive_token_logprobs)
  chunked = temp_bytes(functools.partial(token_logprobs, chunk_size=1024))
  # The naive version holds at least the [B, N, V] f32 logits.
  assert naive >= b * n * v * 4
  assert chunked <= 0.10 * naive, (chunked, naive)


# ---------------------------------------------------------------------------
# Final-logit soft cap (Gemma 2 / 3) and temperature: z = c * tanh(a / c) / T of
# the raw logits a = h @ W. Oracles: a float64 NumPy transcription of that
# formula, jax autodiff of a plain jnp transcription (for the hand-written
# backward), finite differences in float64.

CAP = 2.5  # make_inputs' logits reach |a| ~ 10: the cap changes every row


def np_capped_logprobs_entropy(hidden, unembed, targets, cap, temperature):
  a = hidden.astype(np.float64) @ unembed.astype(np.float64)
  logp = np_log_softmax(cap * np.tanh(a / cap) / temperature)
  tok = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return tok, -(np.exp(logp) * logp).sum(-1)


def plain_capped(hidden, unembed, targets, *, with_entropy=True,
                 logit_softcap=CAP, temperature=1.0):
  """The formula in jnp, differentiated by autodiff (no custom VJP anywhere)."""
  a = jnp.einsum("...d,dv->...v", hidden, unembed)
  logp = jax.nn.log_softmax(
      logit_softcap * jnp.tanh(a / logit_softcap) / temperature, axis=-1)
  tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return tok, -jnp.sum(jnp.exp(logp) * logp, axis=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [7, 12, 64])
def test_softcap_values_match_numpy(chunk_size, temperature):
  hidden, unembed, targets = make_inputs(20, B, N, D, V)
  assert np.abs(hidden @ unembed).max() > 3 * CAP  # the cap bites
  logp, ent = jax.jit(functools.partial(
      token_logprobs, chunk_size=chunk_size, with_entropy=True,
      logit_softcap=CAP, temperature=temperature))(hidden, unembed, targets)
  np_logp, np_ent = np_capped_logprobs_entropy(hidden, unembed, targets, CAP,
                                               temperature)
  assert_close_f32(logp, np_logp)
  assert_close_f32(ent, np_ent)
  naive_logp, naive_ent = naive_token_logprobs(
      hidden, unembed, targets, with_entropy=True, logit_softcap=CAP,
      temperature=temperature)
  assert_close_f32(naive_logp, np_logp)
  assert_close_f32(naive_ent, np_ent)
  # The cap is not a no-op here: uncapped log-probs are far away.
  assert np.abs(np_logprobs_entropy(hidden, unembed, targets)[0]
                - np_logp).max() > 0.5


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_softcap_grads_match_autodiff_of_plain_formula(temperature):
  hidden, unembed, targets = make_inputs(21, B, N, D, V)
  rng = np.random.default_rng(22)
  w_logp = rng.normal(size=(B, N)).astype(np.float32)
  w_ent = rng.normal(size=(B, N)).astype(np.float32)
  kw = dict(logit_softcap=CAP, temperature=temperature)
  chunked = functools.partial(token_logprobs, chunk_size=12, **kw)
  grad = lambda f: jax.jit(jax.grad(weighted_loss(f, w_logp, w_ent),  # noqa: E731
                                    argnums=(0, 1)))
  dh, du = grad(chunked)(hidden, unembed, targets)
  p_dh, p_du = grad(functools.partial(plain_capped, **kw))(hidden, unembed,
                                                          targets)
  assert_close_f32(dh, p_dh)
  assert_close_f32(du, p_du)
  with jax.enable_x64(True):
    h64, u64, t64 = make_inputs(23, 2, 3, 4, 8, dtype=np.float64)
    u64 = u64 * 4  # |a| past the cap
    wl, we = np.random.default_rng(24).normal(size=(2, 2, 3))
    loss = weighted_loss(functools.partial(token_logprobs, chunk_size=4, **kw),
                         wl, we)
    jax.test_util.check_grads(lambda h, u: loss(h, u, t64), (h64, u64),
                              order=1, modes=("rev",), eps=1e-6, atol=1e-7,
                              rtol=1e-7)
    plain = weighted_loss(functools.partial(plain_capped, **kw), wl, we)
    got = jax.grad(loss, argnums=(0, 1))(h64, u64, t64)
    want = jax.grad(plain, argnums=(0, 1))(h64, u64, t64)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=F64_TOL, atol=F64_TOL)


def test_vocab_parallel_softcap_matches_plain():
  b, n, d, v = 4, 5, 16, 128
  hidden, unembed, targets = make_inputs(25, b, n, d, v)
  w_logp = np.random.default_rng(26).normal(size=(b, n)).astype(np.float32)
  mesh = jax.make_mesh((2, 4), ("data", "tensor"),
                       axis_types=(AxisType.Explicit, AxisType.Explicit))
  kw = dict(logit_softcap=CAP, temperature=0.7)
  parallel = functools.partial(vocab_parallel_token_logprobs, mesh=mesh,
                               batch_axes="data", chunk_size=3, **kw)

  def value_and_grads(fn):
    def f(h, u, t):
      logp, ent = fn(h, u, t, with_entropy=True)
      return jnp.sum(w_logp * logp) + jnp.sum(ent), (logp, ent)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        hidden, unembed, targets)

  (_, got), got_g = value_and_grads(parallel)
  (_, want), want_g = value_and_grads(functools.partial(plain_capped, **kw))
  for a, w in zip((*got, *got_g), (*want, *want_g)):
    assert_close_f32(a, w)


def test_sequence_logps_passes_the_softcap():
  r, l, d, v, s = 2, 6, 8, 16, 4
  rng = np.random.default_rng(27)
  hidden = (3 * rng.normal(size=(r, l, d))).astype(np.float32)
  unembed = rng.normal(size=(d, v)).astype(np.float32)
  batch = _hand_batch()
  sums, _ = sequence_logps(hidden, unembed, batch, s, chunk_size=5,
                           logit_softcap=CAP)
  logp, _ = np_capped_logprobs_entropy(
      hidden[np.arange(r)[:, None], batch["logit_pos"]], unembed,
      batch["targets"], CAP, 1.0)
  want = [logp[batch["seq_ids"] == i].sum() for i in range(s)]
  assert_close_f32(sums, want)
  with pytest.raises(ValueError, match=r"logit_softcap must be positive.*"
                     r"final_logit_softcap"):
    token_logprobs(hidden, unembed, batch["targets"], logit_softcap=0.0)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    token_logprobs(hidden, unembed, batch["targets"], temperature=0.0)
