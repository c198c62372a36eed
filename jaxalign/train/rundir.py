"""The run directory's guard rails: one writer, a record of what defines the run, and
a resume that refuses to change it.

`prepare(cfg, workdir)` runs before anything is built (`jaxalign.train.loop.run`
calls it first; `RunDir.release` at the end):

1. **Lock** (`RunLock`, ``workdir/run.lock``): one writer per run directory. A second
   launch stops at once (`RunDirError`, exit code 2) naming the holder: pid, host,
   start time and command, which the holder writes into the file. The lock is an
   ``fcntl.flock``, not a pid file, because the kernel drops it when its holder dies
   (SIGKILL and machine crashes included): a killed run leaves nothing stale to
   detect or clean up, and the next launch simply takes it. The descriptor is not
   inherited across ``exec``; a *forked* child that outlives its parent would keep
   the lock, and the refusal then says so (its holder pid is dead on this host). On a
   filesystem without ``flock`` (some network filesystems: ENOLCK / EOPNOTSUPP) the
   file's contents are the lock: refused while it names a live pid on this host or
   any pid on another host (delete the file once that run is gone).
   Multi-host: process 0 alone takes the lock and checks the record (the other
   processes are the same run); one broadcast tells every process the outcome, so
   they stop together and none waits in a collective for a process that left.

2. **Record** (``workdir/run.json``): the resolved, validated config as JSON, keyed as
   on the command line (``model.d_model``, ``loss_hparams.beta``), the tokenizer's
   fingerprint (`jaxalign.train.refcache.tokenizer_fingerprint`), the data's
   fingerprint (the bytes of ``data.path`` / ``data.eval_path``: all of them up to
   1 GiB, above that the size and 64 evenly spaced 1 MiB blocks; the synthetic task
   is defined by the config itself), and a history of starts, resumes and rollbacks.

3. **Resume check**, when a complete checkpoint exists: the new record is compared
   with the recorded one key by key, and a change that alters the run is refused with
   one message listing every differing key (``config.loss: 'dpo' -> 'ipo'``). What
   may change:

   - always (`ALLOWED`): ``num_steps`` (a decaying learning-rate schedule is
     re-shaped over the new length), ``max_nonfinite_in_a_row``, ``divergence.*``,
     ``checkpoint.every_steps / keep / async_save / restore_step``,
     ``eval.enabled / every_steps / batch_size``, ``log.*``, ``debug.*``,
     ``reference.cache_dir`` (the cache is keyed, never stale), the memory / speed
     knobs ``model.remat / attention_chunk / scan_unroll / logprob_chunk``, and
     ``data.path`` / ``data.eval_path`` (their *bytes* are compared instead, so a
     moved file is the same data);
   - with ``checkpoint.restore_step=N`` (`ON_ROLLBACK`, a deliberate restart from a
     chosen checkpoint): the optimizer's hyperparameters other than its name
     (``learning_rate``, ``schedule``, ``warmup_steps``, ``weight_decay``, ``b1``,
     ``b2``, ``eps``, ``grad_clip_norm``): the way out of a divergence is an older
     checkpoint and a lower learning rate.

   Everything else defines the run and is refused: ``seed``, the model (size,
   architecture, ``hf_path``, dtypes, ``lora``), ``loss`` and ``loss_hparams``,
   ``reference``, the data (contents, format, tokenizer, truncation, layout, buckets,
   batch size, micro-batches, shuffle seed, ``on_error``), ``optimizer.name``,
   ``mesh.*`` (as configured; the device count itself may change) and
   ``eval.num_examples`` (it decides the train / held-out split). A key the recorded
   config lacks (a run recorded by an older jaxalign) is accepted and noted.

4. **Rollback** (``checkpoint.restore_step=N``): the kept checkpoints after step N are
   moved to ``workdir/rolled_back/<UTC time>/`` (never deleted), so the run resumes
   from N; the record notes it, and rerunning the same command (after a preemption,
   say) resumes from the latest checkpoint instead of rolling back again.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

RECORD_FILE = "run.json"
LOCK_FILE = "run.lock"
ROLLED_BACK_DIR = "rolled_back"
_VERSION = 1

# Keys that may change on any resume; "x.*" covers a whole section.
ALLOWED = ("num_steps", "max_nonfinite_in_a_row", "divergence.*",
           "checkpoint.every_steps", "checkpoint.keep", "checkpoint.async_save",
           "checkpoint.restore_step", "eval.enabled", "eval.every_steps",
           "eval.batch_size", "log.*", "debug.*", "reference.cache_dir",
           "model.remat", "model.attention_chunk", "model.scan_unroll",
           "model.logprob_chunk", "data.path", "data.eval_path",
           "rl.logprob_chunk_size")
# Keys that may change with an explicit ``checkpoint.restore_step``.
ON_ROLLBACK = ("optimizer.learning_rate", "optimizer.schedule", "optimizer.warmup_steps",
               "optimizer.weight_decay", "optimizer.b1", "optimizer.b2", "optimizer.eps",
               "optimizer.grad_clip_norm")
_NO_LOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)
_MAX_LISTED = 12


class RunDirError(ValueError):
  """The run directory cannot be used as asked (locked, or the run would change)."""


# ----------------------------------------------------------------------------
# The lock.


def _now() -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class RunLock:
  """An exclusive ``flock`` on ``workdir/run.lock`` holding the holder's details."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> None:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise RunDirError(_held_message(os.path.dirname(self.path), holder)) from None
    except OSError as e:
      if e.errno not in _NO_LOCK:
        os.close(fd)
        raise
      _check_unlocked_holder(fd, os.path.dirname(self.path))  # no flock here
    self._fd = fd
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
            "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)  # no holder any more (matters without flock)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    except OSError:
      pass
    os.close(self._fd)
    self._fd = None


def _read_holder(fd: int) -> dict:
  for _ in range(3):  # the holder may be writing its details right now
    raw = os.pread(fd, 1 << 16, 0)
    try:
      return json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
      time.sleep(0.05)
  return {}


def _held_message(workdir: str, holder: dict) -> str:
  if not holder:
    who = "another process (its details are not written yet)"
  else:
    who = (f"pid {holder.get('pid')} on {holder.get('host')}, started "
           f"{holder.get('started')} ({holder.get('command', '?')})")
  stale = (holder.get("host") == socket.gethostname() and "pid" in holder
           and not _pid_alive(int(holder["pid"])))
  hint = (f" That pid is gone, but a process it forked still holds the lock: find it "
          f"with `fuser {os.path.join(workdir, LOCK_FILE)}`." if stale else
          " Wait for it to finish or stop it, or use another --workdir.")
  return f"{workdir} is in use by another run: {who}; one writer per run directory." + hint


def _check_unlocked_holder(fd: int, workdir: str) -> None:
  """Without flock: refuse while the file names a holder that may still run."""
  holder = _read_holder(fd)
  if not holder:
    return
  here = holder.get("host") == socket.gethostname()
  if here and not _pid_alive(int(holder.get("pid", -1))):
    return  # the holder died: a stale lock
  os.close(fd)
  raise RunDirError(_held_message(workdir, holder) + f" (This filesystem has no flock: "
                    f"delete {os.path.join(workdir, LOCK_FILE)} once that run is gone.)")


# ----------------------------------------------------------------------------
# The record.


def _plain(value: Any) -> Any:
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if value is None or isinstance(value, (str, int, float, bool)):
    return value
  return repr(value)


def config_record(cfg: Any) -> dict:
  """The validated config keyed as on the command line, JSON values only."""
  from jaxalign import config as config_lib  # pylint: disable=g-import-not-at-top
  out = {}
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if f.name == "model":
      out["model"] = {**_plain(value.arch),
                      **{g.name: _plain(getattr(value, g.name))
                         for g in dataclasses.fields(value) if g.name != "arch"}}
    elif f.name == "loss":
      out["loss"] = _plain(config_lib.loss_arg(value.terms))
      out["loss_hparams"] = _plain(value.hparams_dict())
    else:
      out[f.name] = _plain(value)
  return json.loads(json.dumps(out))  # tuples as lists, as read back from the file


def _file_digest(path: str) -> str:
  """sha256 of a file (large files: its size and 64 evenly spaced 1 MiB blocks)."""
  if not path:
    return ""
  if not os.path.isfile(path):
    return "missing"  # the data loader names the path properly
  size, block, h = os.path.getsize(path), 1 << 20, hashlib.sha256()
  with open(path, "rb") as f:
    if size <= 1 << 30:
      for chunk in iter(lambda: f.read(block), b""):
        h.update(chunk)
    else:
      h.update(str(size).encode())
      for i in range(64):
        f.seek((size - block) * i // 63)
        h.update(f.read(block))
  return h.hexdigest()


def fingerprints(cfg: Any) -> dict:
  """What the config's keys cannot say: the tokenizer and the data's bytes."""
  from jaxalign.train import refcache  # pylint: disable=g-import-not-at-top
  out = {"tokenizer": refcache.tokenizer_fingerprint(cfg)}
  if cfg.data.source == "file":
    out["data.path contents"] = _file_digest(cfg.data.path)
    out["data.eval_path contents"] = _file_digest(cfg.data.eval_path)
  return out


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):  # an empty section adds no key
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
  return any(key == p or (p.endswith(".*") and key.startswith(p[:-1]))
             for p in patterns)


@dataclasses.dataclass
class Diff:
  refused: list  # (key, old, new)
  allowed: list
  added: list  # keys the old record lacks


def compare(old: dict, new: dict, *, rollback: bool) -> Diff:
  """Key-by-key differences between two records (``config`` and fingerprints)."""
  a = {**{f"config.{k}": v for k, v in _flat(old.get("config", {})).items()},
       **old.get("fingerprints", {})}
  b = {**{f"config.{k}": v for k, v in _flat(new["config"]).items()},
       **new["fingerprints"]}
  may = ALLOWED + (ON_ROLLBACK if rollback else ())
  diff = Diff([], [], [])
  missing = object()
  for key in sorted(set(a) | set(b)):
    va, vb = a.get(key, missing), b.get(key, missing)
    if va == vb:
      continue
    if va is missing and not key.startswith("config.loss_hparams."):
      diff.added.append(key)  # a key this jaxalign added since the run was recorded
    elif _matches(key.removeprefix("config."), may):
      diff.allowed.append((key, va, vb))
    else:
      diff.refused.append((key, "(absent)" if va is missing else va,
                           "(absent)" if vb is missing else vb))
  return diff


def _short(v: Any) -> str:
  text = repr(v) if not (isinstance(v, str) and len(v) == 64) else v[:12] + "..."
  return text if len(text) <= 80 else text[:77] + "..."


def _refusal(workdir: str, steps: list[int], refused: list) -> str:
  lines = [f"{workdir} holds a run (checkpoints at steps {steps}) that a different "
           "config trained; resuming would mix both in one run. Differing keys (old "
           "-> new):"]
  lines += [f"  {k}: {_short(va)} -> {_short(vb)}" for k, va, vb in refused[:_MAX_LISTED]]
  if len(refused) > _MAX_LISTED:
    lines.append(f"  ... and {len(refused) - _MAX_LISTED} more")
  fix = "Use another --workdir for a new run, or revert these keys"
  if all(_matches(k.removeprefix("config."), ON_ROLLBACK) for k, _, _ in refused):
    fix += (f"; to restart from a kept checkpoint with new optimizer settings add "
            f"--config.checkpoint.restore_step=N (N in {steps})")
  return "\n".join(lines) + "\n" + fix + " (what may change: jaxalign/train/rundir.py)."


def _digest(record: dict) -> str:
  blob = json.dumps({"config": record["config"], "fp": record["fingerprints"]},
                    sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_record(workdir: str) -> dict | None:
  path = os.path.join(workdir, RECORD_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError:
      return None  # torn by a crash mid-write: rewritten below


def _write_record(workdir: str, record: dict) -> None:
  path = os.path.join(workdir, RECORD_FILE)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------
# Rollback and the whole preparation.


def _roll_back(workdir: str, ckpt_dir: str, to_step: int, steps: list[int]) -> list[int]:
  """Moves the checkpoints after ``to_step`` aside; returns their steps."""
  newer = [s for s in steps if s > to_step]
  if newer:
    dest = os.path.join(workdir, ROLLED_BACK_DIR,
                        time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    os.makedirs(dest, exist_ok=True)
    for s in newer:
      shutil.move(os.path.join(ckpt_dir, str(s)), os.path.join(dest, str(s)))
  return newer


def _rollback_applied(old: dict | None, to_step: int, digest: str) -> bool:
  """Whether this exact rollback (step and config) already happened: a rerun of the
  same command then resumes from the latest checkpoint."""
  events = [h for h in (old or {}).get("history", []) if h.get("event") == "rollback"]
  return bool(events) and events[-1].get("to_step") == to_step and (
      events[-1].get("digest") == digest)


def _check_and_record(cfg: Any, workdir: str, say: Callable[[str], None],
                      extra: dict | None = None) -> str:
  """Process 0's part of `prepare`: compare, roll back, write the record; returns the
  record's digest."""
  from jaxalign import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = ckpt_lib.complete_steps(ckpt_dir)
  config = {**config_record(cfg), **json.loads(json.dumps(_plain(extra or {})))}
  new = {"version": _VERSION, "config": config, "fingerprints": fingerprints(cfg)}
  digest, old = _digest(new), _read_record(workdir)
  to = cfg.checkpoint.restore_step
  rolling = to >= 0 and not _rollback_applied(old, to, digest)
  if rolling and to not in steps:
    raise RunDirError(f"config.checkpoint.restore_step={to}: no complete checkpoint at "
                      f"step {to} in {ckpt_dir}; kept steps: {steps or 'none'}. Pick one "
                      "of them, or -1 for the latest.")
  event = {"time": _now(), "step": max(steps, default=0), "digest": digest}
  if steps and old is not None:
    diff = compare(old, new, rollback=rolling)
    if diff.refused:
      raise RunDirError(_refusal(workdir, steps, diff.refused))
    event["changed"] = {k: [va, vb] for k, va, vb in diff.allowed}
    event["added"] = diff.added
    say(f"run dir {workdir}: resuming" + (
        "; changed: " + ", ".join(f"{k} {_short(va)} -> {_short(vb)}"
                                  for k, va, vb in diff.allowed) if diff.allowed else ""))
  elif steps:
    say(f"run dir {workdir}: no {RECORD_FILE} (an older run directory): resuming "
        "without the resume check; recorded now")
  if rolling:
    moved = _roll_back(workdir, ckpt_dir, to, steps)
    event.update(event="rollback", to_step=to, moved=moved)
    say(f"run dir {workdir}: rolling back to checkpoint step {to}" + (
        f"; moved steps {moved} to {os.path.join(workdir, ROLLED_BACK_DIR)}/"
        if moved else ""))
  else:
    event["event"] = "resume" if steps else "start"
    if not steps:
      say(f"run dir {workdir}: new run ({LOCK_FILE} held, {RECORD_FILE} recorded)")
  history = (old or {}).get("history", []) if steps else []
  _write_record(workdir, {**new, "history": history + [event]})
  return digest


@dataclasses.dataclass
class RunDir:
  """A prepared run directory: holds the lock until `release`. ``digest``: of the
  run's record (process 0; "" elsewhere), saved in each checkpoint's meta."""
  workdir: str
  lock: RunLock | None
  digest: str = ""

  def release(self) -> None:
    if self.lock is not None:
      self.lock.release()
      self.lock = None


def _agree(ok: bool) -> bool:
  """Process 0's outcome, on every process (one broadcast; nothing on one process)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return ok
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def prepare(cfg: Any, workdir: str, *, lead: bool = True,
            say: Callable[[str], None] = print, extra: dict | None = None) -> RunDir:
  """Locks ``workdir``, checks a resume against its record, applies a rollback, and
  records this start (see the module doc). Every process calls it; raises
  `RunDirError` on every process when process 0 refuses. ``extra``: more config
  sections to record and compare, e.g. ``{"rl": rl_config}`` (a dataclass or dict)."""
  os.makedirs(workdir, exist_ok=True)
  run_dir, error = RunDir(workdir, RunLock(workdir) if lead else None), None
  if lead:
    try:
      run_dir.lock.acquire()
      run_dir.digest = _check_and_record(cfg, workdir, say, extra)
    except Exception as e:  # pylint: disable=broad-except
      error = e
  if not _agree(error is None):
    run_dir.release()
    if error is not None:
      raise error
    raise RunDirError(f"process 0 refused the run directory {workdir} (its output "
                      "says why).")
  return run_dir
