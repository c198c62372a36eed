"""End to end through ``python -m jaxalign.main`` in real subprocesses (with timeouts).

* Exact resume: a run that receives SIGTERM at step 3 saves and exits cleanly; its
  restart ends with params, optimizer state, step and PRNG key BITWISE identical to an
  uninterrupted run.
* A run SIGKILLed while its asynchronous save of step 4 is being written restarts
  from the previous complete checkpoint (step 2) and also ends bitwise identical.
* N non-finite steps in a row stop the run with a clear error; the last good
  checkpoint is intact (bitwise equal to the uninterrupted run's at that step).
* Issue 21: exit codes (done 0, preempted 75, guard 3, user error 2); a second writer
  and a resume that changes the run are refused; a learning rate of 1e30 stops at
  the divergent step and a rerun with a sane one rolls back and finishes; config
  mistakes are one short message; loss hyperparameters settable for any loss; the
  data CLI reads a config as training does.

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
from jaxalign import main as main_lib

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
  first = _main(workdir, cache_dir, "--config.debug.sigterm_at_step=3")
  # Preempted is not finished: its own exit code (a scheduler reruns it).
  assert first.returncode == main_lib.EXIT_PREEMPTED == 75, first.stderr[-3000:]
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


# --- issue 21 -------------------------------------------------------------------------


def _lines(proc):
  return (proc.stdout + proc.stderr).strip().splitlines()


def test_preempted_done_guard_and_user_error_codes_are_distinct():
  codes = (main_lib.EXIT_DONE, main_lib.EXIT_USER_ERROR, main_lib.EXIT_GUARD,
           main_lib.EXIT_PREEMPTED)
  assert codes == (0, 2, 3, 75)
  readme = open(os.path.join(ROOT, "README.md")).read()
  for code in codes[1:]:
    assert f"| {code} |" in readme  # documented


def test_misspelled_key_is_one_short_message(tmp_path, cache_dir):
  proc = _main(str(tmp_path / "run"), cache_dir, "--config.data.bach_size=8")
  assert proc.returncode == main_lib.EXIT_USER_ERROR
  lines = _lines(proc)
  assert len(lines) <= 5, lines
  assert "config.data.bach_size" in lines[0]
  assert "did you mean config.data.batch_size?" in lines[0]
  assert "Traceback" not in proc.stderr


def _parsed_config(*overrides):
  """The config as ``jaxalign.main`` parses it: locked, overrides applied."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["main", "--config", "experiments/dpo.py:tiny", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_any_loss_hyperparameter_is_settable_and_checked(tmp_path, cache_dir):
  from jaxalign import config as config_lib
  cfg = config_lib.validate(_parsed_config("--config.loss_hparams.label_smoothing=0.1"), 8)
  assert cfg.loss.hparams_dict() == {"beta": 0.1, "label_smoothing": 0.1}  # cDPO
  cfg = config_lib.validate(_parsed_config("--config.loss=discopop",
                                           "--config.loss_hparams.tau=0.5"), 8)
  assert cfg.loss.hparams_dict() == {"beta": 0.1, "tau": 0.5}  # another loss's own
  for bad in ("--config.loss_hparams.tau=0.5", "--config.loss_hparams.bogus=1"):
    proc = _main(str(tmp_path / "run"), cache_dir, bad)
    assert proc.returncode == main_lib.EXIT_USER_ERROR
    lines = _lines(proc)
    assert len(lines) <= 2 and "Traceback" not in proc.stderr, lines
    name = bad.split("=")[0].removeprefix("--")
    assert lines[0].startswith(f"error: {name}: not a hyperparameter of the loss 'dpo'")
    assert "beta, label_smoothing, reference_free" in lines[0]


def test_second_writer_is_refused_naming_the_holder(tmp_path, cache_dir):
  import socket
  from jaxalign.train import rundir
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  lock = rundir.RunLock(workdir)
  lock.acquire()  # this test process is the running writer
  try:
    proc = _main(workdir, cache_dir)
  finally:
    lock.release()
  assert proc.returncode == main_lib.EXIT_USER_ERROR, proc.stdout + proc.stderr
  assert f"pid {os.getpid()} on {socket.gethostname()}" in proc.stderr
  assert "in use by another run" in proc.stderr and len(_lines(proc)) <= 3
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


@pytest.mark.parametrize("override,shown", [
    ("--config.loss=ipo", "config.loss: 'dpo' -> 'ipo'"),
    ("--config.model.d_model=32", "config.model.d_model: 64 -> 32"),
])
def test_resume_that_changes_the_run_is_refused(uninterrupted, cache_dir, override,
                                                 shown):
  before = open(os.path.join(uninterrupted, "metrics.jsonl")).read()
  proc = _main(uninterrupted, cache_dir, f"--config.num_steps={STEPS + 2}", override)
  assert proc.returncode == main_lib.EXIT_USER_ERROR, proc.stdout[-2000:]
  assert shown in proc.stderr and "Traceback" not in proc.stderr
  assert len(_lines(proc)) <= 5, _lines(proc)
  # Nothing was trained or logged.
  assert open(os.path.join(uninterrupted, "metrics.jsonl")).read() == before
  assert _final(uninterrupted).step == STEPS


def test_huge_learning_rate_stops_and_a_sane_rerun_rolls_back(tmp_path, cache_dir):
  """The issue's lr-1e30 scenario. The preset warms up over 1 step, so step 1 is an
  update at learning rate 0 (saved: checkpoint.every_steps=1) and step 2's update is
  ~1e30 x the weights: it is finite, so only the divergence guard catches it."""
  workdir = str(tmp_path / "run")
  every = "--config.checkpoint.every_steps=1"
  proc = _main(workdir, cache_dir, every, "--config.optimizer.learning_rate=1e30")
  assert proc.returncode == main_lib.EXIT_GUARD, proc.stdout[-2000:] + proc.stderr[-2000:]
  err = proc.stderr
  assert "DivergenceError: step 2 diverged: its update was" in err
  assert "The last good checkpoint is step 1" in err
  assert "--config.checkpoint.restore_step=1" in err and "Traceback" not in err
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                             keep=5) as ck:
    assert ck.all_steps() == [1]  # the divergent step was not saved
  # A sane learning rate alone is refused (it changes the run) ...
  sane = "--config.optimizer.learning_rate=1e-3"
  proc = _main(workdir, cache_dir, every, sane)
  assert proc.returncode == main_lib.EXIT_USER_ERROR
  assert "config.optimizer.learning_rate: 1e+30 -> 0.001" in proc.stderr
  # ... and accepted with the restore option: it resumes from step 1 and finishes.
  proc = _ok(_main(workdir, cache_dir, every, sane, "--config.checkpoint.restore_step=1"))
  out = proc.stdout + proc.stderr
  assert "rolling back to checkpoint step 1" in out
  assert "resumed from checkpoint step 1" in out
  assert f"status=done step={STEPS} skipped=0" in proc.stdout
  r = _final(workdir)
  assert r.step == STEPS and r.meta["optimizer_step"] == STEPS
  params = [np.asarray(x) for x in jax.tree.leaves(r.state["params"])]
  assert all(np.all(np.isfinite(p)) and np.max(np.abs(p)) < 100 for p in params)


def test_data_cli_reads_the_config_as_training_does(tmp_path, capsys):
  """--config: training's tokenizer (bytes), truncation (the hh preset's 256 / 192)
  and layout; the WARNING line when most completions are cut."""
  from jaxalign.data import __main__ as data_cli
  path = tmp_path / "hh.jsonl"
  with open(path, "w") as f:
    for i in range(100):
      long = "word " * (80 if i % 2 else 10)
      f.write(json.dumps({"chosen": f"\n\nHuman: q{i}?\n\nAssistant: yes {long}",
                          "rejected": f"\n\nHuman: q{i}?\n\nAssistant: no {long}"}) + "\n")
  assert data_cli.main(["--config", f"experiments/dpo.py:hh,path={path}", "--json"]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["tokenizer"].startswith("byte")
  assert summary["truncation"] == {"max_length": 256, "max_prompt_length": 192}
  assert summary["report"]["truncation"]["completion_truncated"] == 50
  assert summary["truncation_warning"].startswith("50 of 100 examples (50%)")
  t = summary["training_layout"]
  assert t["layout"] == "prefix_shared" and t["examples_per_batch"] == 8
  # Without --config: training's default tokenizer too ('byte', spelled as configs do).
  assert data_cli.main([str(path), "--format", "hh", "--tokenizer", "byte",
                        "--max_length", "256"]) == 0
  text = capsys.readouterr().out
  assert "tokenizer: byte" in text and "WARNING: 50 of 100" in text
  assert data_cli.main([str(path), "--format", "hh", "--max-length", "100000"]) == 0
  text = capsys.readouterr().out
  assert "tokenizer: byte" in text and "WARNING" not in text
  assert data_cli.main([str(path), "--config", "experiments/dpo.py:tiny"]) == 2
