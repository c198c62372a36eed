"""End to end through ``python -m jaxalign.main`` in real subprocesses (with timeouts).

* Exact resume: a run that receives SIGTERM at step 3 saves and exits cleanly; its
  restart ends with params, optimizer state, step and PRNG key BITWISE identical to an
  uninterrupted run.
* A run SIGKILLed while its asynchronous save of step 4 is being written restarts
  from the previous complete checkpoint (step 2) and also ends bitwise identical.
* N non-finite steps in a row stop the run with a clear error; the last good
  checkpoint is intact (bitwise equal to the uninterrupted run's at that step).

The subprocesses share a JAX persistent compilation cache (set through JAX's own
environment variables, for the child processes only), so only the first one compiles.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxalign import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240
STEPS = 6
BASE_FLAGS = [
    "--config", "experiments/dpo.py:tiny,runlocal",
    f"--config.num_steps={STEPS}", "--config.checkpoint.every_steps=2",
    "--config.checkpoint.keep=5", "--config.eval.enabled=False",
    "--config.log.tensorboard=False", "--config.log.plots=False",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def _main(workdir, cache_dir, *extra):
  env = dict(os.environ)
  env.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  cmd = [sys.executable, "-m", "jaxalign.main", *BASE_FLAGS,
         f"--workdir={workdir}", *extra]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=TIMEOUT_S, check=False)


def _ok(proc):
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def _final(workdir, step=None):
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                             keep=5) as ck:
    return ck.restore_arrays(step)


def _assert_bitwise_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  assert len(la) > 10
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  proc = _ok(_main(workdir, cache_dir))
  assert f"status=done step={STEPS}" in proc.stdout
  return workdir


def test_uninterrupted_run_trains_and_logs(uninterrupted):
  r = _final(uninterrupted)
  assert r.step == STEPS and r.meta["optimizer_step"] == STEPS
  assert int(np.asarray(r.state["step"])) == STEPS
  # Params moved away from the initial ones (checkpoint 2 vs 6 differ).
  early = _final(uninterrupted, 2)
  assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(
      jax.tree.leaves(r.state["params"]), jax.tree.leaves(early.state["params"])))
  lines = open(os.path.join(uninterrupted, "metrics.jsonl")).read().splitlines()
  assert len(lines) == STEPS  # one train record per step (log.every_steps=1)


def test_sigterm_then_restart_is_bitwise_identical(uninterrupted, tmp_path, cache_dir):
  workdir = str(tmp_path / "run")
  first = _ok(_main(workdir, cache_dir, "--config.debug.sigterm_at_step=3"))
  assert "status=preempted step=3" in first.stdout
  assert _final(workdir).step == 3  # the preemption checkpoint (not a periodic one)
  second = _ok(_main(workdir, cache_dir, "--config.debug.sigterm_at_step=3"))
  assert "resumed from checkpoint step 3" in second.stdout + second.stderr
  assert f"status=done step={STEPS}" in second.stdout
  a, b = _final(uninterrupted), _final(workdir)
  _assert_bitwise_equal(a.state, b.state)
  assert a.data_state == b.data_state
  # The metrics file holds each step once, across the two processes.
  steps = [l for l in open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()]
  assert len(steps) == STEPS


def test_sigkill_during_save_restarts_from_previous_complete(uninterrupted, tmp_path,
                                                            cache_dir):
  workdir = str(tmp_path / "run")
  first = _main(workdir, cache_dir, "--config.debug.sigkill_in_save_at_step=4")
  assert first.returncode == -9, first.stderr[-2000:]
  entries = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  # Step 4's save was cut short: only its temporary directory exists.
  assert "2" in entries and "4" not in entries
  assert any(e.startswith("4.") for e in entries), entries
  second = _ok(_main(workdir, cache_dir))
  assert "resumed from checkpoint step 2" in second.stdout + second.stderr
  _assert_bitwise_equal(_final(uninterrupted).state, _final(workdir).state)


def test_nonfinite_in_a_row_stops_with_clear_error(uninterrupted, tmp_path, cache_dir):
  workdir = str(tmp_path / "run")
  proc = _main(workdir, cache_dir, "--config.debug.nonfinite_steps=(3,4,5)",
               "--config.max_nonfinite_in_a_row=3")
  assert proc.returncode != 0
  assert "NonFiniteError" in proc.stderr
  assert "3 consecutive steps (up to step 5)" in proc.stderr
  assert "last good checkpoint is step 2" in proc.stderr
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                             keep=5) as ck:
    assert ck.all_steps() == [2]
  # Intact: identical to the uninterrupted run's step-2 checkpoint.
  _assert_bitwise_equal(_final(uninterrupted, 2).state, _final(workdir, 2).state)


def test_poisoned_batch_is_skipped_and_counted(uninterrupted, tmp_path, cache_dir):
  workdir = str(tmp_path / "run")
  proc = _ok(_main(workdir, cache_dir, "--config.debug.nonfinite_steps=(3,)"))
  assert f"status=done step={STEPS} skipped=1" in proc.stdout
  r = _final(workdir)
  # The optimizer step counts applied updates only: one of STEPS was skipped.
  assert r.meta["optimizer_step"] == STEPS - 1
  assert int(np.asarray(r.state["step"])) == STEPS - 1
  recs = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  by_step = {x["step"]: x for x in recs if x["split"] == "train"}
  assert by_step[3]["skipped"] == 1.0 and by_step[3]["loss"] is None
  assert by_step[6]["skipped_total"] == 1.0
  assert all(by_step[s]["skipped"] == 0.0 for s in (1, 2, 4, 5, 6))
  # Before the poisoned batch the run is the uninterrupted one, bit for bit.
  _assert_bitwise_equal(_final(uninterrupted, 2).state, _final(workdir, 2).state)


def test_bad_override_fails_before_compiling(tmp_path, cache_dir):
  proc = _main(str(tmp_path / "run"), cache_dir, "--config.data.bach_size=6")
  assert proc.returncode != 0 and "bach_size" in proc.stderr  # locked config
  proc = _main(str(tmp_path / "run2"), cache_dir, "--config.mesh.data=2",
               "--config.mesh.fsdp=1")
  assert proc.returncode != 0
  assert "mesh" in proc.stderr and "1 are available" in proc.stderr
  assert not os.path.exists(tmp_path / "run2" / "checkpoints")


def test_distributed_flags_are_checked_before_anything_runs(tmp_path, cache_dir):
  proc = _main(str(tmp_path / "run"), cache_dir, "--num_processes=2",
               "--process_id=0")
  assert proc.returncode != 0 and "--coordinator_address" in proc.stderr
  proc = _main(str(tmp_path / "run2"), cache_dir, "--coordinator_address=localhost:1",
               "--num_processes=2", "--process_id=2")
  assert proc.returncode != 0 and "0 <= --process_id < --num_processes" in proc.stderr
  assert not os.path.exists(tmp_path / "run2" / "checkpoints")
