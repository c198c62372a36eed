"""Objectives and jitted train steps: sharded == unsharded, accumulation, skips."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxalign.data import batching
from jaxalign.data.examples import PairExample
from jaxalign.losses import dpo
from jaxalign.models import transformer as tr
from jaxalign.parallel import mesh as ml
from jaxalign.train import objectives as ob
from jaxalign.train import state as st
from jaxalign.train import steps

CFG = tr.TransformerConfig.tiny(vocab_size=128, d_model=32, n_layers=1, n_heads=4,
                                n_kv_heads=2, mlp_dim=64)
BETA = 0.1
LR = 1e-2
CHUNK = 16


def _pairs(n, seed=0):
  rng = np.random.default_rng(seed)
  tok = lambda k: rng.integers(1, CFG.vocab_size, k).astype(np.int32)
  return [PairExample(tok(rng.integers(2, 6)), tok(rng.integers(2, 7)),
                      tok(rng.integers(2, 7))) for _ in range(n)]


def _layout(kind="padded", n=4, buckets=(16,), rows=None):
  return batching.LayoutConfig(kind=kind, buckets=buckets, examples_per_batch=n,
                               rows_per_batch=rows)


@functools.lru_cache(maxsize=None)
def _model():
  graphdefs = []  # captured from an abstract trace: no eager init
  jax.eval_shape(lambda k: graphdefs.append(tr.init(CFG, k)[0]), jax.random.key(0))
  return graphdefs[0]


def _init_fn(key):
  return tr.init(CFG, key)[1]


def _objective(**kwargs):
  loss_fn = functools.partial(dpo, beta=BETA)
  return ob.make_objective("pairwise", loss_fn=loss_fn,
                           forward_fn=ob.model_forward_fn(_model()),
                           needs_reference=True, chunk_size=CHUNK, **kwargs)


@functools.lru_cache(maxsize=None)
def _host_params(seed):
  return jax.device_get(jax.jit(_init_fn)(jax.random.key(seed)))


def _ref_params():
  # A reference different from the policy, so the DPO margin is not zero.
  return _host_params(7)


@jax.jit
def _plain_logits(params, tokens_BxT):
  # Plain causal forward: no segment / branch ids, no batch layout, full logits.
  positions = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
  return tr.logits(_model(), params, tokens_BxT, positions)


def _seq_logp_oracle(params, prompt, completion):
  """Sum of completion log-probs from a plain causal forward (float64 numpy).

  The sequence is right-padded to 16 so one program serves every sequence; causal
  attention keeps the pads from touching earlier positions."""
  seq = np.concatenate([prompt, completion])
  padded = np.zeros((1, 16), np.int32)
  padded[0, :len(seq)] = seq
  logits = np.asarray(_plain_logits(params, padded), np.float64)[0]
  m = logits.max(-1, keepdims=True)
  logp = logits - (np.log(np.exp(logits - m).sum(-1, keepdims=True)) + m)
  return sum(logp[t - 1, seq[t]] for t in range(len(prompt), len(seq)))


@pytest.mark.parametrize("kind,rows", [("padded", None), ("packed", 3),
                                       ("prefix_shared", None)])
def test_pairwise_objective_matches_numpy_dpo(kind, rows):
  """Objective on every layout == DPO (Rafailov et al. eq. 7) in numpy on sums from
  independent per-sequence forwards; one empty slot is masked out of the mean."""
  examples = _pairs(3, seed=1)
  policy = _host_params(1)
  ref = _ref_params()
  batch = batching.make_batch(examples, _layout(kind, n=4, buckets=(16, 32), rows=rows))
  loss, metrics = jax.jit(_objective())(policy, ref, batch)
  per = []
  for e in examples:
    h = ((_seq_logp_oracle(policy, e.prompt, e.chosen)
          - _seq_logp_oracle(ref, e.prompt, e.chosen))
         - (_seq_logp_oracle(policy, e.prompt, e.rejected)
            - _seq_logp_oracle(ref, e.prompt, e.rejected)))
    per.append(np.log1p(np.exp(-BETA * h)))
  # f32 forward vs float64 oracle: rtol 1e-5.
  np.testing.assert_allclose(float(loss), np.mean(per), rtol=1e-5)
  assert all(np.ndim(v) == 0 for v in metrics.values())


# Golden partition specs, derived by hand from DEFAULT_RULES for CFG (vocab 128,
# embed 32, 4 heads, 2 kv heads, head_dim 8, mlp 64, 1 layer). Size-1 mesh axes are
# dropped, so the data=8 mesh replicates every parameter.
_FSDP8 = {
    "embed": P(None, "fsdp"), "final_norm": P("fsdp"), "lm_head": P("fsdp"),
    "layers": {"attn_norm": P(None, "fsdp"), "mlp_norm": P(None, "fsdp"),
               "w_down": P(None, None, "fsdp"), "w_gate": P(None, "fsdp"),
               "w_up": P(None, "fsdp"), "wk": P(None, "fsdp"),
               "wo": P(None, None, None, "fsdp"), "wq": P(None, "fsdp"),
               "wv": P(None, "fsdp")}}
_D2F2T2 = {
    "embed": P("tensor", "fsdp"), "final_norm": P("fsdp"),
    "lm_head": P("fsdp", "tensor"),
    "layers": {"attn_norm": P(None, "fsdp"), "mlp_norm": P(None, "fsdp"),
               "w_down": P(None, "tensor", "fsdp"), "w_gate": P(None, "fsdp", "tensor"),
               "w_up": P(None, "fsdp", "tensor"), "wk": P(None, "fsdp", "tensor"),
               "wo": P(None, "tensor", None, "fsdp"), "wq": P(None, "fsdp", "tensor"),
               "wv": P(None, "fsdp", "tensor")}}
_DATA8 = jax.tree.map(lambda _: P(), _FSDP8, is_leaf=lambda x: isinstance(x, P))


def _run_dpo_steps(mesh, batch, num_steps=2, mesh_cfg=None):
  # SGD with momentum: its update is linear in the gradient, so the comparison
  # measures the step, not Adam's amplification of ~0 gradients (g / sqrt(v)).
  opt = optax.sgd(LR, momentum=0.9)
  state, shs = st.init_train_state(_init_fn, opt, tr.logical_axes(CFG), mesh,
                                   jax.random.key(1))
  ref_shs = shs.params
  if mesh_cfg is not None:  # the reference placed per mesh_cfg.reference_placement
    ref_shs = ml.reference_shardings(tr.logical_axes(CFG), mesh, mesh_cfg,
                                     jax.eval_shape(_init_fn, jax.random.key(0)))
  ref = jax.device_put(_ref_params(), ref_shs)
  step = steps.make_train_step(objective=_objective(), optimizer=opt, mesh=mesh,
                               state_shardings=shs, ref_shardings=ref_shs,
                               batch_ndims=steps.batch_signature(batch))
  losses = []
  for _ in range(num_steps):
    state, metrics = step(state, ref, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


@pytest.fixture(scope="module")
def dpo_batch():
  return batching.make_batch(_pairs(4), _layout("padded", n=4))  # R = S = 8 rows


@pytest.fixture(scope="module")
def single_device_run(dpo_batch):
  mesh = ml.make_mesh(ml.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  state, losses = _run_dpo_steps(mesh, dpo_batch)
  return jax.device_get(state.params), losses


@pytest.mark.parametrize("mesh_cfg,golden", [
    (ml.MeshConfig(data=8, fsdp=1, tensor=1), _DATA8),
    (ml.MeshConfig(data=1, fsdp=8, tensor=1, reference_placement="replicated"),
     _FSDP8),
    (ml.MeshConfig(data=2, fsdp=2, tensor=2, reference_placement="tensor"), _D2F2T2),
], ids=["data8", "fsdp8-ref-replicated", "d2f2t2-ref-tensor"])
def test_sharded_dpo_steps_equal_single_device(mesh_cfg, golden, dpo_batch,
                                               single_device_run):
  mesh = ml.make_mesh(mesh_cfg)
  state, losses = _run_dpo_steps(mesh, dpo_batch, mesh_cfg=mesh_cfg)
  specs = jax.tree.map(lambda x: x.sharding.spec, state.params)
  assert specs == golden
  # The momentum buffer is placed like its parameters.
  trace_specs = jax.tree.map(lambda x: x.sharding.spec, state.opt_state[0].trace)
  assert trace_specs == golden
  want_params, want_losses = single_device_run
  # f32 throughout; only the reduction order differs: rtol 1e-5.
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(state.params), want_params)


@pytest.fixture(scope="module")
def accumulation_case():
  """7 pairs as one batch on a (2, 2, 2) mesh: (batch, params, ref, grad_step out)."""
  examples = _pairs(7, seed=3)  # 7 pairs: the last micro-batch has an empty slot
  full = batching.make_batch(examples, _layout("padded", n=8))
  mesh = ml.make_mesh(ml.MeshConfig(data=2, fsdp=2, tensor=2))
  shs = ml.param_shardings(tr.logical_axes(CFG), mesh, ml.DEFAULT_RULES,
                           jax.eval_shape(_init_fn, jax.random.key(0)))
  params = jax.device_put(_host_params(1), shs)
  ref = jax.device_put(_ref_params(), shs)
  out = steps.make_grad_step(objective=_objective(), mesh=mesh, param_shardings=shs,
                             ref_shardings=shs,
                             batch_ndims=steps.batch_signature(full))(params, ref, full)
  return full, params, ref, out


def test_grad_accumulation_over_4_microbatches_equals_full_batch(accumulation_case):
  full, params, ref, (loss_f, metrics_f, grads_f) = accumulation_case
  examples = _pairs(7, seed=3)
  micro = steps.stack_microbatches(
      [batching.make_batch(examples[i:i + 2], _layout("padded", n=2))
       for i in range(0, 8, 2)])
  assert micro["tokens"].shape == (4, 4, 16)
  mesh = params["embed"].sharding.mesh
  shs = jax.tree.map(lambda x: x.sharding, params)
  loss_m, metrics_m, grads_m = steps.make_grad_step(
      objective=_objective(), mesh=mesh, param_shardings=shs, ref_shardings=shs,
      batch_ndims=steps.batch_signature(micro), microbatched=True)(params, ref, micro)
  # Same f32 sums in a different order: rtol 1e-5.
  np.testing.assert_allclose(float(loss_m), float(loss_f), rtol=1e-5)
  for k in metrics_f:
    np.testing.assert_allclose(float(metrics_m[k]), float(metrics_f[k]), rtol=1e-5,
                               atol=1e-7, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
               jax.device_get(grads_m), jax.device_get(grads_f))
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads_m))


def test_stack_microbatches_rejects_mismatched_shapes():
  a = batching.make_batch(_pairs(2), _layout("padded", n=2, buckets=(16,)))
  b = batching.make_batch(_pairs(2), _layout("padded", n=2, buckets=(32,)))
  with pytest.raises(ValueError, match=r"micro-batch 1 field '\w+' has shape \(4, 32\)"):
    steps.stack_microbatches([a, b])


def _single_mesh():
  return ml.make_mesh(ml.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def test_cached_reference_without_params_raises_clear_error():
  batch = batching.make_batch(_pairs(2), _layout("padded", n=2))
  abstract = jax.eval_shape(_init_fn, jax.random.key(1))
  with pytest.raises(ValueError, match="ref_logps"):
    jax.eval_shape(_objective(), abstract, None, batch)


def test_compiled_programs_one_per_bucket_and_non_finite_skips():
  """A cached reference (ref_params=None) on two buckets: two programs for four
  batches; a poisoned (NaN) cache skips the step and leaves the state unchanged."""
  traces = []

  def counting(params, ref, batch, normalizer=None):
    traces.append(batch["tokens"].shape)
    return _objective()(params, ref, batch, normalizer=normalizer)

  mesh = _single_mesh()
  opt = optax.adam(LR)
  state, shs = st.init_train_state(_init_fn, opt, tr.logical_axes(CFG), mesh,
                                   jax.random.key(1))
  # Score arrays at full width: one program per row length (compacted ones add
  # at most len(batching.score_widths(L)) per row length).
  layout = batching.LayoutConfig("padded", (8, 16), 2, compact_scores=False)
  short = [PairExample(np.array([1, 2], np.int32), np.array([3], np.int32),
                       np.array([4, 5], np.int32))] * 2
  rng = np.random.default_rng(0)
  cached = lambda b: dict(b, **{ob.REF_LOGPS_KEY: rng.normal(-8, 1, 4).astype(
      np.float32)})
  batches = [cached(batching.make_batch(short, layout)),
             cached(batching.make_batch(_pairs(2), layout)),
             cached(batching.make_batch(short, layout)),
             cached(batching.make_batch(_pairs(2, 5), layout))]
  step = steps.make_train_step(objective=counting, optimizer=opt, mesh=mesh,
                               state_shardings=shs, ref_shardings=None,
                               batch_ndims=steps.batch_signature(batches[0]))
  for b in batches:
    state, metrics = step(state, None, b)
    assert not bool(metrics["skipped"])
  assert sorted(traces) == [(4, 8), (4, 16)]  # 2 buckets -> 2 programs, not 4
  assert int(state.step) == 4

  before = jax.device_get(state)
  poisoned = dict(batches[1], **{ob.REF_LOGPS_KEY: np.full((4,), np.nan, np.float32)})
  state, metrics = step(state, None, poisoned)
  assert bool(metrics["skipped"])
  assert not np.isfinite(float(metrics["loss"]))
  after = jax.device_get(state)
  assert int(after.step) == 4
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)
  assert len(traces) == 2  # the skip path is the same program


def test_bf16_compute_keeps_f32_master_and_tracks_f32_loss(accumulation_case):
  full, params, ref, (loss32, _, grads32) = accumulation_case
  loss16, _, grads16 = jax.jit(functools.partial(
      steps.grad_step, objective=_objective(compute_dtype=jnp.bfloat16)))(
          jax.device_get(params), jax.device_get(ref), full)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
  # bf16 has an 8-bit mantissa (rel. eps 2^-8 ~ 4e-3); sums of ~10 log-probs, so a
  # 2e-2 relative bound on the loss and 5e-2 on the gradient norm is the scale.
  np.testing.assert_allclose(float(loss16), float(loss32), rtol=2e-2)
  np.testing.assert_allclose(float(optax.global_norm(grads16)),
                             float(optax.global_norm(grads32)), rtol=5e-2)


def test_state_shardings_place_adam_moments_like_params_without_allocating():
  mesh = ml.make_mesh(ml.MeshConfig(data=2, fsdp=2, tensor=2))
  abstract, shs = st.state_shardings(_init_fn, optax.adam(LR), tr.logical_axes(CFG),
                                     mesh)
  assert isinstance(abstract.params["embed"], jax.ShapeDtypeStruct)
  assert abstract.params["embed"].dtype == jnp.float32
  specs = lambda t: jax.tree.map(lambda x: x.spec, t)
  assert specs(shs.params) == _D2F2T2
  assert specs(shs.opt_state[0].mu) == _D2F2T2
  assert specs(shs.opt_state[0].nu) == _D2F2T2
  assert shs.opt_state[0].count.spec == P() and shs.step.spec == P()


def test_objective_applies_the_models_final_logit_softcap():
  """Gemma 2's soft-cap reaches the log-prob head through make_objective: the policy
  sums equal a NumPy f64 transcription of log_softmax(c * tanh(z / c))."""
  cap = 0.05  # small enough to bite on this tiny model's logits
  batch = batching.make_batch(_pairs(4), _layout())
  params = _host_params(0)
  fwd = ob.model_forward_fn(_model())
  got, _ = ob.sequence_stats(fwd, params, batch, chunk_size=CHUNK, logit_softcap=cap)
  plain, _ = ob.sequence_stats(fwd, params, batch, chunk_size=CHUNK)
  hidden, unembed = fwd(params, batch)
  z = np.einsum("btd,dv->btv", np.asarray(hidden, np.float64),
                np.asarray(unembed, np.float64))
  z = cap * np.tanh(z / cap)
  logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - z.max(-1, keepdims=True)
  want = np.zeros(int(batch["seq_last"].shape[0]))
  rows, slots = np.nonzero(batch["seq_ids"] >= 0)
  for r, t in zip(rows, slots):
    want[batch["seq_ids"][r, t]] += logp[r, batch["logit_pos"][r, t], batch["targets"][r, t]]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(plain) - want).max() > 1e-2  # the cap changed the sums
  # ... and the objective built with the cap uses it for policy and reference.
  _, m = _objective(logit_softcap=cap)(params, params, batch)
  np.testing.assert_allclose(float(m["logps/chosen"]),
                             want[0::2][np.asarray(batch["example_valid"], bool)].mean(),
                             rtol=1e-5)
