"""Checkpointer: exact round trip into target shardings, keep-N, incomplete saves."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxalign import checkpoint as ckpt_lib


def _state(mesh, seed=0):
  k = jax.random.key(seed)
  w = jax.random.normal(k, (16, 8), jnp.float32)
  return {
      "params": {"w": jax.device_put(w, NamedSharding(mesh, P("x"))),
                 "b": jax.device_put(jnp.arange(8, dtype=jnp.bfloat16),
                                     NamedSharding(mesh, P()))},
      "step": jnp.int32(seed),
      "rng": ckpt_lib.key_to_data(jax.random.key(seed + 100)),
  }


@pytest.fixture
def mesh():
  return jax.make_mesh((8,), ("x",))


def test_roundtrip_exact_into_target_shardings(tmp_path, mesh):
  state = _state(mesh, 3)
  data_state = {"next_index": 17, "blob": b"\x00\x01binary", "nested": [1, {"a": 2}]}
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=2) as ck:
    assert ck.save(3, state, data_state, {"note": "x"})
    ck.wait()
    # Restore into a *different* sharding: w replicated instead of split over x.
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())),
        state)
    r = ck.restore(target)
  assert r.step == 3
  assert r.data_state == data_state
  assert r.meta == {"note": "x", "step": 3}
  for got, want in zip(jax.tree.leaves(r.state), jax.tree.leaves(state)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # bitwise
    assert got.sharding.spec == P()
  key = ckpt_lib.data_to_key(r.state["rng"])
  np.testing.assert_array_equal(jax.random.normal(key, (4,)),
                                jax.random.normal(jax.random.key(103), (4,)))


def test_periodic_keep_n_and_latest(tmp_path, mesh):
  with ckpt_lib.Checkpointer(tmp_path, save_every=2, keep=2) as ck:
    saved = [s for s in range(1, 8) if ck.save(s, _state(mesh, s), {"i": s})]
    assert saved == [2, 4, 6]
    assert ck.save(7, _state(mesh, 7), {"i": 7}, force=True)
    assert not ck.save(7, _state(mesh, 7), force=True)  # already there
    ck.wait()
    assert ck.all_steps() == [6, 7]
    assert ck.latest_step() == 7
    r = ck.restore(_state(mesh, 0), step=6)
  assert r.data_state == {"i": 6}
  np.testing.assert_array_equal(r.state["params"]["w"], _state(mesh, 6)["params"]["w"])


def test_incomplete_checkpoint_is_ignored(tmp_path, mesh):
  """A save interrupted before Orbax's final rename leaves a tmp dir: never restored."""
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5) as ck:
    ck.save(1, _state(mesh, 1), {"i": 1})
    ck.wait()
  # What a kill mid-save leaves behind: the step's files under a temporary name.
  shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp")
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5) as ck:
    assert ck.latest_step() == 1
    r = ck.restore(_state(mesh, 0))
  assert r.step == 1 and r.data_state == {"i": 1}
  assert not os.path.exists(tmp_path / "2.orbax-checkpoint-tmp")  # cleaned up


def test_restore_without_checkpoint_is_a_clear_error(tmp_path, mesh):
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=1) as ck:
    with pytest.raises(ValueError, match="No complete checkpoint"):
      ck.restore(_state(mesh))


@pytest.mark.parametrize("kwargs,key", [({"save_every": 0, "keep": 1}, "every_steps"),
                                        ({"save_every": 1, "keep": 0}, "keep")])
def test_bad_options(tmp_path, kwargs, key):
  with pytest.raises(ValueError, match=key):
    ckpt_lib.Checkpointer(tmp_path, **kwargs)


def test_other_model_size_is_a_short_error_naming_the_leaves(tmp_path, mesh):
  """A checkpoint of other shapes (another model size) is one message, not Orbax's."""
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=1) as ck:
    ck.save(1, _state(mesh), {"i": 1})
    ck.wait()
    bigger = dict(_state(mesh), params={"w": jnp.zeros((32, 8)), "b": jnp.zeros((8,),
                                                                         jnp.bfloat16)})
    with pytest.raises(ValueError) as info:
      ck.restore(bigger)
  msg = str(info.value)
  assert "params.w: saved (16, 8), expected (32, 8)" in msg and "1 differ" in msg
  assert "params.b" not in msg and len(msg) < 400 and "\n" not in msg


def test_meta_alone_and_complete_steps(tmp_path, mesh):
  assert ckpt_lib.complete_steps(tmp_path / "nothing") == []
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5) as ck:
    for s in (2, 4):
      ck.save(s, _state(mesh, s), {"i": s}, {"guard": {"loss": [0.5, float(s)]}})
    ck.wait()
    assert ck.read_meta(4) == {"guard": {"loss": [0.5, 4.0]}, "step": 4}
  shutil.copytree(tmp_path / "4", tmp_path / "6.orbax-checkpoint-tmp")  # incomplete
  assert ckpt_lib.complete_steps(tmp_path) == [2, 4]
