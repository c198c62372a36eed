"""Activations pinned to batch sharding on an fsdp mesh (transformer.ActivationSharding).

Without a constraint, XLA's sharding propagation on an fsdp mesh (weights sharded on
"embed" over fsdp, batch rows over (data, fsdp)) may move the *activations* (all-gather
the whole batch's hidden states) instead of the weights: the Llama-3 8B DPO step showed
51.9 GB of temporaries per device (docs/scale_out.md, section 8). These tests compile a
tiny model's DPO grad step on fsdp=8 (the 8 fake CPU devices) with and without the
constraint and read XLA's compiled memory analysis and HLO; the pinned step's loss and
gradients must equal the unconstrained one's (the constraint only moves data).
"""

import functools
import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign.data import batching
from jaxalign.data.examples import PairExample
from jaxalign.losses import dpo
from jaxalign.models import transformer as tr
from jaxalign.parallel import mesh as ml
from jaxalign.train import objectives as ob
from jaxalign.train import steps

CFG = tr.TransformerConfig.tiny(vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                                n_kv_heads=2, mlp_dim=128)
PAIRS = 16  # 32 padded rows: 4 per device on fsdp=8
LENGTH = 64
CHUNK = 64


@functools.lru_cache(maxsize=None)
def _graphdef():
  box = []
  jax.eval_shape(lambda k: box.append(tr.init(CFG, k)[0]), jax.random.key(0))
  return box[0]


def _init(key):
  return tr.init(CFG, key)[1]


def _batch():
  rng = np.random.default_rng(0)
  tok = lambda k: rng.integers(4, CFG.vocab_size, k).astype(np.int32)  # noqa: E731
  pairs = [PairExample(tok(LENGTH // 2), tok(LENGTH // 2 - 1), tok(LENGTH // 2 - 3))
           for _ in range(PAIRS)]
  layout = batching.LayoutConfig(kind="padded", buckets=(LENGTH,),
                                 examples_per_batch=PAIRS)
  return batching.make_batch(pairs, layout)


def _mesh():
  return ml.make_mesh(ml.MeshConfig(data=1, fsdp=8, tensor=1))


def _grad_step(mesh, batch, pinned: bool):
  act = tr.ActivationSharding(mesh) if pinned else None
  objective = ob.make_objective(
      "pairwise", loss_fn=functools.partial(dpo, beta=0.1),
      forward_fn=ob.model_forward_fn(_graphdef(), act), needs_reference=True,
      chunk_size=CHUNK, activation_sharding=act)
  shapes = jax.eval_shape(_init, jax.random.key(0))
  param_sh = ml.param_shardings(tr.logical_axes(CFG), mesh, shapes_tree=shapes)
  step = steps.make_grad_step(objective=objective, mesh=mesh, param_shardings=param_sh,
                              ref_shardings=param_sh,
                              batch_ndims=steps.batch_signature(batch))
  return step, param_sh


@functools.lru_cache(maxsize=None)
def _compiled():
  """(compiled unpinned, compiled pinned, param shardings, batch): two compilations."""
  mesh, batch = _mesh(), _batch()
  out = []
  for pinned in (False, True):
    step, param_sh = _grad_step(mesh, batch, pinned)
    out.append(step.lower(jax.eval_shape(_init, jax.random.key(0)),
                          jax.eval_shape(_init, jax.random.key(0)), batch).compile())
  return out[0], out[1], param_sh, batch


_COLLECTIVE = re.compile(r"= (\w+)\[([\d,]*)\]\S* (all-gather|all-reduce|all-to-all)"
                         r"(?:-start)?\(")


def _batch_sized_collectives(hlo_text: str, rows: int, tokens: int) -> list[str]:
  """Floating-point collectives whose result's leading dim is the global batch (rows
  or rows*tokens). Integer ones are left out: the embedding lookup all-gathers the
  token ids (4 B per token, far cheaper than gathering the [V, D] table)."""
  hits = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if m and m.group(2) and m.group(1).startswith(("f", "bf")):
      lead = int(m.group(2).split(",")[0])
      if lead in (rows, rows * tokens):
        hits.append(f"{m.group(3)} {m.group(1)}[{m.group(2)}]")
  return hits


def test_pinned_step_gathers_weights_not_activations():
  """HLO of the fsdp=8 grad step: the unconstrained one all-gathers batch-sized
  activations (so this check can fail); the pinned one has no float collective whose
  result has the global batch's leading dim ([32 rows, ...] or [2048 tokens, ...])."""
  plain, pinned, _, batch = _compiled()
  rows, tokens = batch["tokens"].shape
  before = _batch_sized_collectives(plain.as_text(), rows, tokens)
  after = _batch_sized_collectives(pinned.as_text(), rows, tokens)
  assert before, "expected the unconstrained step to gather activations"
  assert after == [], after


def test_pinned_step_uses_less_temp_memory():
  """XLA's compiled memory analysis: temporaries per device with the constraint are
  well below (< 0.6x) the unconstrained step's, whose buffers hold the whole batch's
  hidden states on every device."""
  plain, pinned, _, _ = _compiled()
  t_plain = plain.memory_analysis().temp_size_in_bytes
  t_pinned = pinned.memory_analysis().temp_size_in_bytes
  assert t_pinned < 0.6 * t_plain, (t_pinned, t_plain)


def test_pinned_step_equals_unconstrained():
  """Loss and every gradient leaf with the constraint == without it, rtol 1e-5: the
  constraint changes placement only; the oracle is the unconstrained program.

  The batch reductions run in a different order (local partial sums + all-reduce vs
  sums over gathered rows), so gradient entries that nearly cancel differ by f32
  rounding (~1e-6 of the leaf's largest entry, measured); the tolerance is therefore
  rtol 1e-5 per element plus 1e-5 of the leaf's largest magnitude, and 1e-5 on the
  leaf's relative L2 error."""
  plain, pinned, param_sh, batch = _compiled()
  policy = jax.device_put(jax.jit(_init)(jax.random.key(1)), param_sh)
  ref = jax.device_put(jax.jit(_init)(jax.random.key(2)), param_sh)
  mesh = _mesh()
  placed = jax.device_put(batch, ml.batch_shardings(mesh, batch))
  loss_a, _, grads_a = plain(policy, ref, placed)
  loss_b, _, grads_b = pinned(policy, ref, placed)
  np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.abs(a).max()
    assert scale > 0
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * scale)
    assert np.linalg.norm(b - a) <= 1e-5 * np.linalg.norm(a)


def test_forward_unchanged_and_output_batch_sharded():
  """forward(..., activation_sharding) == forward(...) (rtol 1e-6, same f32 ops), and
  its hidden states come out split by rows over fsdp."""
  mesh = _mesh()
  batch = _batch()
  params = jax.jit(_init)(jax.random.key(3))
  act = tr.ActivationSharding(mesh)

  @functools.partial(jax.jit, static_argnums=2)
  def fwd(p, b, pinned):
    return tr.forward(_graphdef(), p, b["tokens"], b["positions"], b["segment_ids"],
                      activation_sharding=act if pinned else None)[0]

  h_plain = fwd(params, batch, False)
  h_pinned = fwd(params, batch, True)
  np.testing.assert_allclose(np.asarray(h_pinned), np.asarray(h_plain), rtol=1e-6,
                             atol=1e-6)
  assert h_pinned.sharding.is_equivalent_to(
      NamedSharding(mesh, P(("data", "fsdp"))), h_pinned.ndim)


def test_activation_spec_follows_rules():
  """Residual stream [B, T, D] -> rows over (data, fsdp); "embed" finds fsdp taken and
  stays replicated; a batch the mesh does not divide is not split; custom rules
  are honoured; a wrong number of axis names is a ValueError naming them."""
  mesh = ml.make_mesh(ml.MeshConfig(data=2, fsdp=2, tensor=2))
  act = tr.ActivationSharding(mesh)
  assert act.spec((8, 16, 64), tr.RESIDUAL_AXES) == P(("data", "fsdp"))
  # 6 rows: the 4-way row split fails, so (as for params) fsdp is free for "embed".
  assert act.spec((6, 16, 64), tr.RESIDUAL_AXES) == P(None, None, "fsdp")
  assert act.spec((8, 16, 4, 8), ("batch", "length", "heads", "head_dim")) == P(
      ("data", "fsdp"), None, "tensor")
  seq = tr.ActivationSharding(mesh, ml.DEFAULT_RULES + (("length", "tensor"),))
  assert seq.spec((8, 16, 64), tr.RESIDUAL_AXES) == P(("data", "fsdp"), "tensor")
  with pytest.raises(ValueError, match="logical axes"):
    act.spec((8, 16), tr.RESIDUAL_AXES)
