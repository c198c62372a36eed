"""Mesh construction, logical-axis rules and shardings (no compilation needed)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxalign.parallel import mesh as ml


def test_make_mesh_resolves_minus_one_and_orders_axes():
  mesh = ml.make_mesh(ml.MeshConfig(data=2, fsdp=-1, tensor=2))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  # tensor is the fastest-varying axis: a tensor group is two neighbouring devices.
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  np.testing.assert_array_equal(ids[0, 0], [0, 1])


@pytest.mark.parametrize("cfg,match", [
    (ml.MeshConfig(data=3, fsdp=1, tensor=1), r"data\*fsdp\*tensor .* = 3 devices"),
    (ml.MeshConfig(data=3, fsdp=-1, tensor=1), r"set mesh.fsdp explicitly"),
    (ml.MeshConfig(data=4, fsdp=4, tensor=1), r"16 devices, but 8 are available"),
])
def test_make_mesh_rejects_sizes_that_do_not_fit(cfg, match):
  with pytest.raises(ValueError, match=match):
    ml.make_mesh(cfg)


@pytest.mark.parametrize("kwargs,match", [
    (dict(data=0), r"mesh.data=0"),
    (dict(data=-1, fsdp=-1), r"at most one"),
    (dict(reference_placement="cpu"), r"mesh.reference_placement='cpu'"),
    (dict(rules=(("embed", "model"),)), r"unknown mesh axis 'model'"),
])
def test_mesh_config_validation_names_the_key(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ml.MeshConfig(**kwargs)


def test_logical_to_spec_rules_by_hand():
  rules = ml.DEFAULT_RULES
  assert ml.logical_to_spec(("layers", "embed", "heads", "head_dim"), rules) == P(
      None, "fsdp", "tensor")
  assert ml.logical_to_spec(("vocab", "embed"), rules) == P("tensor", "fsdp")
  assert ml.logical_to_spec(("batch",), rules) == P(("data", "fsdp"))
  # A mesh axis is used once per array: the second "tensor" dimension replicates.
  assert ml.logical_to_spec(("heads", "mlp"), rules) == P("tensor")
  assert ml.logical_to_spec((None, "unknown_name"), rules) == P()


def test_logical_to_spec_with_mesh_drops_trivial_and_uneven_axes():
  mesh = ml.make_mesh(ml.MeshConfig(data=1, fsdp=4, tensor=2))
  # embed=6 is not divisible by fsdp=4 -> replicated; vocab=10 divisible by 2.
  assert ml.logical_to_spec(("vocab", "embed"), ml.DEFAULT_RULES, (10, 6), mesh) == P(
      "tensor")
  mesh1 = ml.make_mesh(ml.MeshConfig(data=8, fsdp=1, tensor=1))
  assert ml.logical_to_spec(("vocab", "embed"), ml.DEFAULT_RULES, (8, 8), mesh1) == P()


def test_param_shardings_checks_rank():
  mesh = ml.make_mesh(ml.MeshConfig(fsdp=8))
  shapes = {"w": jax.ShapeDtypeStruct((8, 8), np.float32)}
  with pytest.raises(ValueError, match=r"2 names .* has shape \(8, 8\)|1 names"):
    ml.param_shardings({"w": ("embed",)}, mesh, ml.DEFAULT_RULES, shapes)


def test_reference_placements():
  mesh = ml.make_mesh(ml.MeshConfig(data=2, fsdp=2, tensor=2))
  axes = {"wq": ("layers", "embed", "heads", "head_dim")}
  shapes = {"wq": jax.ShapeDtypeStruct((1, 8, 4, 8), np.float32)}
  expected = {"policy": P(None, "fsdp", "tensor"), "replicated": P(),
              "tensor": P(None, None, "tensor")}
  for placement, spec in expected.items():
    cfg = ml.MeshConfig(data=2, fsdp=2, tensor=2, reference_placement=placement)
    sh = ml.reference_shardings(axes, mesh, cfg, shapes)
    assert sh["wq"].spec == spec, placement


def test_batch_shardings_rows_split_extras_replicated():
  mesh = ml.make_mesh(ml.MeshConfig(data=2, fsdp=2, tensor=2))
  batch = {"tokens": np.zeros((8, 16)), "seq_ids": np.zeros((8, 16)),
           "seq_last": np.zeros((8,)), "example_valid": np.zeros((4,))}
  sh = ml.batch_shardings(mesh, batch)
  assert sh["tokens"].spec == P(("data", "fsdp"))
  assert sh["seq_ids"].spec == P(("data", "fsdp"))
  assert sh["seq_last"].spec == P()
  assert sh["example_valid"].spec == P()
  micro = {k: v[None] for k, v in batch.items()}
  assert ml.batch_shardings(mesh, micro, microbatched=True)["tokens"].spec == P(
      None, ("data", "fsdp"))
  with pytest.raises(ValueError, match=r"6 rows, not divisible .* data\*fsdp=4"):
    ml.check_batch_divisible({"tokens": np.zeros((6, 16))}, mesh)
