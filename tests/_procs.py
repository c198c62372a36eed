"""Child processes of the multi-process tests: launch 2 processes x 4 CPU devices beside
1 process x 8, collect their output, never leak them, read back their checkpoints."""

import contextlib
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker

from jaxalign import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def reaped(procs):
  """Kills (and waits for) any of ``procs`` still running when the block exits, so a
  failing or timed-out test leaves no JAX process holding a coordinator port."""
  try:
    yield
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def outputs(procs, timeout: float) -> list[str]:
  """Each process's combined stdout / stderr, after it exits (killed on timeout)."""
  with reaped(procs):
    return [p.communicate(timeout=timeout)[0].decode(errors="replace") for p in procs]


def spawn(argv, devices: int, **env_extra) -> subprocess.Popen:
  """``python *argv`` at the repository root on ``devices`` CPU devices (JAX's own
  environment variables reach the child; the parent's fake-device XLA_FLAGS do not)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
             PYTHONPATH=ROOT, **env_extra)
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def two_and_one(tmp_path, launch, timeout: float, done: str):
  """Runs ``launch(workdir, devices, *extra)`` as the two halves of a distributed run
  (2 x 4 devices, ``tmp_path/multi``) beside the 1 x 8 oracle (``tmp_path/single``);
  asserts each exited 0 and logged ``done``; returns (multi, single)."""
  port = portpicker.pick_unused_port()
  multi, single = tmp_path / "multi", tmp_path / "single"
  procs = [launch(multi, 4, f"--coordinator_address=localhost:{port}",
                  "--num_processes=2", f"--process_id={pid}") for pid in range(2)]
  procs.append(launch(single, 8))
  logs = outputs(procs, timeout)
  for name, p, log in zip(("process 0", "process 1", "single"), procs, logs):
    assert p.returncode == 0, f"{name} failed:\n{log[-3000:]}"
    assert done in log, log[-2000:]
  return multi, single


def final_state(workdir, step: int, like=None):
  """The last checkpoint's state tree (asserted to be at ``step``); ``like``: a tree
  giving shapes and dtypes, to restore a checkpoint saved on another topology (the
  2-process devices) onto one local device."""
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                             keep=5) as ck:
    if like is None:
      restored = ck.restore_arrays()
    else:
      one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      restored = ck.restore(jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), like))
  assert restored.step == step
  return restored.state


def assert_same_params(got, want, what="", rtol=0.0, atol=1e-6):
  """Same tree structure (more than 5 leaves) and every leaf within the tolerance."""
  flat_w, tree_w = jax.tree_util.tree_flatten_with_path(want)
  flat_g, tree_g = jax.tree_util.tree_flatten(got)
  assert tree_w == tree_g and len(flat_w) > 5
  for (path, w), g in zip(flat_w, flat_g):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol,
                               err_msg=what + jax.tree_util.keystr(path))
