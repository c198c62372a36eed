"""Two real processes x 4 CPU devices == one process x 8 devices, for DPO steps."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

import _multihost_worker as worker
import _procs

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Two cold JAX processes compile on 2 shared cores; generous so load cannot flake it.
TIMEOUT_S = 240


@pytest.mark.slow
def test_two_processes_match_single_process_8_devices(tmp_path):
  port = portpicker.pick_unused_port()
  out = tmp_path / "multihost.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
      [sys.executable, str(pathlib.Path(worker.__file__)), str(port), str(pid), "2",
       str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for pid in range(2)]
  with _procs.reaped(procs):
    # The single-process 8-device oracle runs while the workers start up.
    assert jax.device_count() == 8
    want_losses, want_params = worker.run_dpo()
    logs = _procs.outputs(procs, TIMEOUT_S)
  for pid, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {pid} failed:\n{log[-3000:]}"

  got = np.load(out)
  # Same f32 program, partitioned across processes (gloo all-reduces): rtol 1e-5.
  np.testing.assert_allclose(got["losses"], want_losses, rtol=1e-5)
  assert abs(want_losses[-1] - want_losses[0]) > 1e-4  # the steps did train
  flat, _ = jax.tree_util.tree_flatten_with_path(want_params)
  assert len(got.files) == len(flat) + 1
  for path, want in flat:
    np.testing.assert_allclose(got[jax.tree_util.keystr(path)], want, rtol=1e-5,
                               atol=1e-7, err_msg=jax.tree_util.keystr(path))
