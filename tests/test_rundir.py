"""The run directory's guard rails (`jaxalign.train.rundir`): one writer, the run
record, the resume check and rollbacks. No training here: a checkpoint of a few
small arrays stands for a run's progress (the whole runs are in test_main)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from experiments import _common
from jaxalign import checkpoint as ckpt_lib
from jaxalign import config as config_lib
from jaxalign.train import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**overrides):
  c = _common.apply_variant(config_lib.base_config(), _common.experiment_arg("tiny"),
                            num_steps=20)
  c.loss_hparams.beta = 0.1  # as experiments/dpo.py
  for key, value in overrides.items():
    node = c
    *parents, name = key.split(".")
    for p in parents:
      node = node[p]
    node[name] = value
  return config_lib.validate(c, 8)


def _progress(workdir, *steps):
  """Complete checkpoints at ``steps``, as a run that trained that far leaves them."""
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                             keep=10) as ck:
    for s in steps:
      ck.save(s, {"w": jnp.full((2,), float(s))}, {"i": s})


def _prepare(cfg, workdir, said=None):
  rd = rundir.prepare(cfg, str(workdir), say=(said.append if said is not None else
                                              lambda m: None))
  rd.release()
  return rd


# --- the lock ---------------------------------------------------------------------


def test_second_writer_is_refused_naming_the_holder(tmp_path):
  first = rundir.prepare(_cfg(), str(tmp_path), say=lambda m: None)
  try:
    with pytest.raises(rundir.RunDirError) as info:
      rundir.prepare(_cfg(), str(tmp_path), say=lambda m: None)
    msg = str(info.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in msg
    assert "in use by another run" in msg and "--workdir" in msg
  finally:
    first.release()
  _prepare(_cfg(), tmp_path)  # released: the next launch takes it


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
  """flock dies with its holder: a SIGKILLed run leaves no stale lock."""
  code = ("import sys, time; from jaxalign.train import rundir; "
          f"rundir.RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
          "time.sleep(60)")
  holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=ROOT))
  try:
    assert holder.stdout.readline().strip() == "held"
    lock = rundir.RunLock(str(tmp_path))
    with pytest.raises(rundir.RunDirError, match=f"pid {holder.pid} "):
      lock.acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    lock.acquire()  # the dead holder's details are still in the file: not a problem
    info = json.loads(open(os.path.join(tmp_path, rundir.LOCK_FILE)).read())
    assert info["pid"] == os.getpid()
    lock.release()
  finally:
    holder.kill()
    holder.wait(timeout=30)


# --- the record and the resume check ----------------------------------------------


def test_record_holds_the_resolved_config_and_fingerprints(tmp_path):
  _prepare(_cfg(), tmp_path)
  rec = json.load(open(os.path.join(tmp_path, rundir.RECORD_FILE)))
  assert rec["config"]["loss"] == "dpo" and rec["config"]["loss_hparams"] == {"beta": 0.1}
  assert rec["config"]["model"]["d_model"] == 64  # keyed as on the command line
  assert rec["config"]["data"]["layout"] == "prefix_shared"  # resolved from "auto"
  assert rec["fingerprints"]["tokenizer"] == "synthetic-vocab-32"
  assert [h["event"] for h in rec["history"]] == ["start"]


def test_resume_with_a_changed_loss_is_refused_naming_the_key(tmp_path):
  _prepare(_cfg(), tmp_path)
  _progress(tmp_path, 5)
  with pytest.raises(rundir.RunDirError) as info:
    _prepare(_cfg(loss="ipo"), tmp_path)
  msg = str(info.value)
  assert "config.loss: 'dpo' -> 'ipo'" in msg
  assert "checkpoints at steps [5]" in msg and len(msg.splitlines()) <= 4
  # Nothing was recorded for the refused launch.
  rec = json.load(open(os.path.join(tmp_path, rundir.RECORD_FILE)))
  assert rec["config"]["loss"] == "dpo" and len(rec["history"]) == 1


@pytest.mark.parametrize("key,value,shown", [
    ("model.d_model", 32, "config.model.d_model: 64 -> 32"),
    ("loss_hparams.label_smoothing", 0.1, "config.loss_hparams.label_smoothing: "
     "'(absent)' -> 0.1"),
    ("seed", 1, "config.seed: 0 -> 1"),
    ("data.batch_size", 32, "config.data.batch_size: 16 -> 32"),
    ("mesh.tensor", 2, "config.mesh.tensor: 1 -> 2"),
    ("optimizer.name", "sgd", "config.optimizer.name: 'adamw' -> 'sgd'"),
])
def test_run_defining_changes_are_refused(tmp_path, key, value, shown):
  _prepare(_cfg(), tmp_path)
  _progress(tmp_path, 5)
  with pytest.raises(rundir.RunDirError) as info:
    _prepare(_cfg(**{key: value}), tmp_path)
  assert shown in str(info.value)


def test_allowed_changes_resume_and_are_recorded(tmp_path):
  _prepare(_cfg(), tmp_path)
  _progress(tmp_path, 5)
  said = []
  _prepare(_cfg(num_steps=40, **{"log.every_steps": 3, "eval.every_steps": 7,
                                 "checkpoint.keep": 9, "divergence.factor": 10.0,
                                 "model.remat": "full"}), tmp_path, said)
  rec = json.load(open(os.path.join(tmp_path, rundir.RECORD_FILE)))
  assert rec["history"][-1]["event"] == "resume"
  assert rec["history"][-1]["changed"]["config.num_steps"] == [20, 40]
  assert rec["config"]["num_steps"] == 40
  assert "config.num_steps 20 -> 40" in said[0]


def test_no_check_without_a_checkpoint(tmp_path):
  """A run that never saved has no history to protect: a new config just starts."""
  _prepare(_cfg(), tmp_path)
  _prepare(_cfg(loss="ipo"), tmp_path)
  assert json.load(open(os.path.join(tmp_path, rundir.RECORD_FILE)))["config"]["loss"] == "ipo"


def test_data_is_compared_by_its_bytes(tmp_path):
  data = tmp_path / "hh.jsonl"
  row = {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
  data.write_text(json.dumps(row) + "\n")
  run = tmp_path / "run"
  file_cfg = lambda path: _cfg(**{"data.source": "file", "data.path": str(path),
                                  "data.format": "hh", "eval.num_examples": 8,
                                  "eval.batch_size": 8})
  _prepare(file_cfg(data), run)
  _progress(run, 2)
  moved = tmp_path / "moved.jsonl"
  moved.write_bytes(data.read_bytes())
  _prepare(file_cfg(moved), run)  # same bytes, new path: the same data
  moved.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
  with pytest.raises(rundir.RunDirError, match="data.path contents"):
    _prepare(file_cfg(moved), run)


# --- rollbacks ----------------------------------------------------------------------


def test_learning_rate_change_needs_restore_step(tmp_path):
  _prepare(_cfg(), tmp_path)
  _progress(tmp_path, 2, 4)
  with pytest.raises(rundir.RunDirError) as info:
    _prepare(_cfg(**{"optimizer.learning_rate": 1e-4}), tmp_path)
  assert "config.optimizer.learning_rate: 0.001 -> 0.0001" in str(info.value)
  assert "--config.checkpoint.restore_step=N (N in [2, 4])" in str(info.value)
  _prepare(_cfg(**{"optimizer.learning_rate": 1e-4, "checkpoint.restore_step": 4}),
           tmp_path)
  assert ckpt_lib.complete_steps(os.path.join(tmp_path, "checkpoints")) == [2, 4]


def test_rollback_moves_newer_checkpoints_aside_once(tmp_path):
  _prepare(_cfg(), tmp_path)
  _progress(tmp_path, 2, 4, 6)
  rolled = _cfg(**{"checkpoint.restore_step": 2})
  _prepare(rolled, tmp_path)
  ckpt_dir = os.path.join(tmp_path, "checkpoints")
  assert ckpt_lib.complete_steps(ckpt_dir) == [2]
  aside = os.path.join(tmp_path, rundir.ROLLED_BACK_DIR)
  (stamp,) = os.listdir(aside)
  assert sorted(os.listdir(os.path.join(aside, stamp))) == ["4", "6"]  # kept, not deleted
  # The rolled-back run makes progress; the same command again (say after a
  # preemption) resumes from the latest checkpoint instead of rolling back again.
  _progress(tmp_path, 4)
  _prepare(rolled, tmp_path)
  assert ckpt_lib.complete_steps(ckpt_dir) == [2, 4]
  events = [h["event"] for h in json.load(open(os.path.join(tmp_path, "run.json")))["history"]]
  assert events == ["start", "rollback", "resume"]


def test_restore_step_must_be_a_kept_checkpoint(tmp_path):
  _prepare(_cfg(), tmp_path)
  _progress(tmp_path, 2, 4)
  with pytest.raises(rundir.RunDirError, match=r"restore_step=3: no complete checkpoint "
                     r"at step 3 .*kept steps: \[2, 4\]"):
    _prepare(_cfg(**{"checkpoint.restore_step": 3}), tmp_path)


def test_compare_lists_every_refused_key():
  old = {"config": {"a": 1, "optimizer": {"learning_rate": 1.0}, "log": {"every_steps": 1}},
         "fingerprints": {"tokenizer": "x"}}
  new = {"config": {"a": 2, "optimizer": {"learning_rate": 0.5}, "log": {"every_steps": 5},
                    "model": {"lora": {"rank": 0}}},
         "fingerprints": {"tokenizer": "y"}}
  d = rundir.compare(old, new, rollback=False)
  assert [k for k, _, _ in d.refused] == ["config.a", "config.optimizer.learning_rate",
                                          "tokenizer"]
  assert [k for k, _, _ in d.allowed] == ["config.log.every_steps"]
  assert d.added == ["config.model.lora.rank"]  # a key newer than the record
  d = rundir.compare(old, new, rollback=True)
  assert [k for k, _, _ in d.refused] == ["config.a", "tokenizer"]


def test_lock_file_names_holder_while_held(tmp_path):
  rd = rundir.prepare(_cfg(), str(tmp_path), say=lambda m: None)
  try:
    info = json.load(open(os.path.join(tmp_path, rundir.LOCK_FILE)))
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert time.strptime(info["started"], "%Y-%m-%d %H:%M:%S UTC")
  finally:
    rd.release()
  assert open(os.path.join(tmp_path, rundir.LOCK_FILE)).read() == ""


def test_extra_sections_are_recorded_and_compared(tmp_path):
  """What online RL passes: its ``rl`` section, compared like the rest."""
  rl = config_lib.RLConfig()
  _prepare_rl = lambda r: rundir.prepare(_cfg(), str(tmp_path), say=lambda m: None,
                                         extra={"rl": r}).release()
  _prepare_rl(rl)
  _progress(tmp_path, 3)
  _prepare_rl(rl)
  import dataclasses
  with pytest.raises(rundir.RunDirError, match="config.rl.algorithm: 'ppo' -> 'grpo'"):
    _prepare_rl(dataclasses.replace(rl, algorithm="grpo", group_size=4))
