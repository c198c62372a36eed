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
   on the command line (``model.d_model``, ``loss_hparams.beta``; an "auto"
   ``optimizer.learning_rate`` as the rate it resolved to), the tokenizer's
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
     ``eval.enabled / every_steps / batch_size``, evaluation by generation
     (``eval.generate_prompts / max_new_tokens / temperature / reward_model / judge``:
     what is measured, not what is trained), ``log.*``, ``debug.*``,
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

5. **What later runs read back** (section "Chaining runs" below): ``run.json``'s
   ``resolved`` section (the architecture the run built, its HF model type and
   tokenizer), ``config.py`` (the resolved config: ``--config W/config.py`` reruns
   it), ``tokenizer/`` (the tokenizer itself), and ``model.init_from`` (a run that
   starts from this one's checkpoint).
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
           "eval.batch_size", "eval.generate_prompts", "eval.max_new_tokens",
           "eval.temperature", "eval.reward_model", "eval.judge", "log.*", "debug.*",
           "reference.cache_dir",
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
    # Derived fields (set by validation, e.g. the learning rate's startup note) are
    # no config keys: the record holds what they were derived into.
    return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
            if not f.metadata.get("derived")}
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


def _auto_lr_hint(cfg: Any, refused: list) -> str:
  """A resume refused because "auto" now resolves to another rate than the run
  trained at (a preset that moved from an explicit rate to auto): how to go on."""
  old = [va for k, va, _ in refused if k == "config.optimizer.learning_rate"]
  if not old or not cfg.optimizer.learning_rate_auto:
    return ""
  return (f"\noptimizer.learning_rate is auto here (-> {cfg.optimizer.learning_rate:g}, "
          f"jaxalign.config.OptimizerConfig); the recorded run trained at {old[0]!r}: "
          f"to resume it as it was, add --config.optimizer.learning_rate={old[0]!r}.")


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
  check_init_source(cfg, new["fingerprints"]["tokenizer"])
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
      raise RunDirError(_refusal(workdir, steps, diff.refused) + _auto_lr_hint(
          cfg, diff.refused))
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
  _write_record(workdir, {**new, "resolved": keep_for_later(cfg, workdir),
                          "history": history + [event]})
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
    if cfg.optimizer.learning_rate_note:  # what "auto" chose for a trained start,
      # or a warning about an explicit rate
      say(cfg.optimizer.learning_rate_note)
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


# ----------------------------------------------------------------------------
# Chaining runs: what a later run, an export or a generation reads back.
#
# Besides ``run.json`` (whose ``resolved`` section holds the architecture the run
# really built -- ``model.hf_path``'s, not the configured one -- and the HF
# model_type it came from), the run directory keeps:
#
# - ``config.py``: ``--config`` accepts it; it rebuilds the ConfigDict from
#   ``run.json`` (`load_config`), so ``python -m jaxalign.main --config W/config.py
#   --workdir NEW`` reruns the run, overrides included;
# - ``tokenizer/``: the tokenizer it used: an HF checkpoint's tokenizer files (with
#   the chat template and generation_config.json), or a ``jaxalign_tokenizer.json``
#   note for the byte tokenizer, jaxalign's SentencePiece model (copied beside it) and
#   the synthetic task's ids (`load_tokenizer_dir` reads both kinds).
#
# ``model.init_from=WORKDIR[:STEP]`` starts a run from another run's checkpoint
# (`resolve_init_from` in config validation, `check_init_source` here before
# anything is built, `source_params` in `build.build_model`): the source's
# architecture (`ARCH_FREE` fields aside) and tokenizer must be this run's. A LoRA
# source is merged into its base (W + alpha/r A B); a reward model's trunk starts a
# policy (its head is dropped), a policy starts a reward model with a fresh head.

TOKENIZER_DIR = "tokenizer"
TOKENIZER_NOTE = "jaxalign_tokenizer.json"
RERUN_CONFIG = "config.py"
INIT_KEY = "model.init_from"
# TransformerConfig fields that decide memory, speed or the random init, not what the
# weights mean: a chained run may change them.
ARCH_FREE = ("attention_chunk", "remat", "scan_unroll", "dtype", "param_dtype",
             "init_std")

_RERUN_SOURCE = '''"""The resolved config of the jaxalign run in this directory (written by jaxalign).

Rerun it (any --config.KEY=VALUE override works):
  python -m jaxalign.main --config {path} --workdir NEW_WORKDIR
"""
import os

from jaxalign.train import rundir


def get_config():
  return rundir.load_config(os.path.dirname(os.path.abspath(__file__)))
'''


class SyntheticTokens:
  """The synthetic task's ids as a tokenizer for generation: no text, ids in and out."""

  def __init__(self, vocab_size: int, eos_id: int, pad_id: int):
    self.vocab_size, self.eos_id, self.pad_id = vocab_size, eos_id, pad_id
    self.bos_id, self.chat_template = None, None

  def encode(self, text: str):
    raise ValueError("the run trained on the synthetic task, whose prompts are token "
                     "ids, not text: give each prompt as \"prompt_ids\": [ids].")

  def decode(self, ids) -> str:
    return " ".join(str(int(i)) for i in ids)


def run_tokenizer(cfg: Any) -> tuple[Any, str]:
  """(the run's tokenizer, its spec); None and "synthetic" for the synthetic task."""
  if cfg.data.source == "synthetic":
    return None, "synthetic"
  from jaxalign.train import build  # pylint: disable=g-import-not-at-top
  return (build.build_tokenizer(cfg),
          build.tokenizer_spec(cfg.data.tokenizer, cfg.model.hf_path))


def save_tokenizer(tok: Any, dest: str, vocab_size: int = 0) -> None:
  """Writes ``tok`` into the directory ``dest`` (see the section comment)."""
  tmp = dest.rstrip(os.sep) + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  note: dict[str, Any] | None = None
  if tok is None:
    from jaxalign.data import synthetic  # pylint: disable=g-import-not-at-top
    note = {"kind": "synthetic", "vocab_size": vocab_size,
            "eos_id": synthetic.SAMPLING_STOPS["eos_id"],
            "pad_id": synthetic.SAMPLING_STOPS["pad_id"]}
  elif getattr(tok, "files", None):  # a checkpoint's tokenizer: its own files
    for path in tok.files:
      shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))
  elif isinstance(getattr(tok, "model_proto", None), bytes):  # a property
    with open(os.path.join(tmp, "spm.model"), "wb") as f:
      f.write(tok.model_proto)
    note = {"kind": "sentencepiece", "file": "spm.model"}
  elif type(tok).__name__ == "ByteTokenizer":
    note = {"kind": "byte"}
  else:
    raise ValueError(f"cannot save a tokenizer of type {type(tok).__name__}.")
  if note is not None:
    with open(os.path.join(tmp, TOKENIZER_NOTE), "w", encoding="utf-8") as f:
      json.dump(note, f, indent=1)
  shutil.rmtree(dest, ignore_errors=True)
  os.replace(tmp, dest)


def load_tokenizer_dir(path: str) -> Any:
  """The tokenizer `save_tokenizer` wrote, or an HF checkpoint directory's own."""
  from jaxalign.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  note_path = os.path.join(path, TOKENIZER_NOTE)
  if os.path.exists(note_path):
    with open(note_path, encoding="utf-8") as f:
      note = json.load(f)
    kind = note.get("kind")
    if kind == "byte":
      return tok_lib.ByteTokenizer()
    if kind == "sentencepiece":
      return tok_lib.SentencePieceTokenizer.from_file(os.path.join(path, note["file"]))
    if kind == "synthetic":
      return SyntheticTokens(int(note["vocab_size"]), int(note["eos_id"]),
                             int(note["pad_id"]))
    raise ValueError(f"{note_path}: unknown tokenizer kind {kind!r}.")
  if any(os.path.exists(os.path.join(path, n)) for n in ("tokenizer.json",
                                                         "tokenizer.model")):
    return tok_lib.from_pretrained(path)
  raise ValueError(f"{path}: no tokenizer (tokenizer.json, tokenizer.model or "
                   f"{TOKENIZER_NOTE}); a jaxalign export or an HF checkpoint directory "
                   "ships one.")


def _hf_model_type(hf_path: str) -> str:
  path = os.path.join(hf_path, "config.json")
  if not os.path.exists(path):
    return ""
  with open(path, encoding="utf-8") as f:
    return str(json.load(f).get("model_type", ""))


def keep_for_later(cfg: Any, workdir: str) -> dict:
  """Writes ``tokenizer/`` and ``config.py``; returns run.json's ``resolved``
  section (architecture, HF model type, tokenizer spec)."""
  from jaxalign.train import build  # pylint: disable=g-import-not-at-top
  tok, spec = run_tokenizer(cfg)
  save_tokenizer(tok, os.path.join(workdir, TOKENIZER_DIR), cfg.data.task.vocab_size)
  path = os.path.join(os.path.abspath(workdir), RERUN_CONFIG)
  with open(path, "w", encoding="utf-8") as f:
    f.write(_RERUN_SOURCE.format(path=path))
  model_type = _hf_model_type(cfg.model.hf_path) if cfg.model.hf_path else ""
  if cfg.model.init_from and not model_type:
    source = read_run_record(split_init_from(cfg.model.init_from)[0], INIT_KEY)
    model_type = source.get("resolved", {}).get("hf_model_type", "")
  arch = _plain(build.resolved_arch(cfg.model))
  return json.loads(json.dumps({"arch": arch, "hf_model_type": model_type,
                                "tokenizer": spec}))


def read_run_record(workdir: str, key: str) -> dict:
  """``workdir``'s run.json; ``key`` names the flag or config key that gave it."""
  record = _read_record(workdir)
  if record is None or "config" not in record:
    raise ValueError(f"{key}={workdir!r}: no readable {RECORD_FILE}; give the workdir of "
                     "a jaxalign run (one recorded by this version keeps its config, "
                     "architecture and tokenizer).")
  if "resolved" not in record:
    raise ValueError(f"{key}={workdir!r}: its {RECORD_FILE} has no 'resolved' section (a "
                     "run recorded by an older jaxalign): resume it once with this "
                     "version to record it, then retry.")
  return record


# ----------------------------------------------------------------------------
# Loading a recorded config back.


def _overlay(node: Any, values: dict) -> None:
  import ml_collections  # pylint: disable=g-import-not-at-top
  for k, v in values.items():
    current = node.get(k) if k in node else None
    if isinstance(v, dict) and isinstance(current, ml_collections.ConfigDict):
      _overlay(current, v)
      continue
    if isinstance(v, dict):
      v = ml_collections.ConfigDict(v)
    elif isinstance(v, list) and isinstance(current, tuple):
      v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    node[k] = v


def load_config(path: str) -> Any:
  """The ConfigDict of the run recorded in ``path`` (a workdir or its run.json):
  `config.base_config` with every recorded key set, so `config.validate` gives the
  run's config back and ``--config.KEY=VALUE`` overrides apply."""
  from jaxalign import config as config_lib  # pylint: disable=g-import-not-at-top
  workdir = os.path.dirname(path) if path.endswith(".json") else path
  record = _read_record(workdir)
  if record is None or "config" not in record:
    raise ValueError(f"{path}: no readable {RECORD_FILE} with a config to load.")
  recorded = dict(record["config"])
  c = config_lib.base_config()
  if "rl" in recorded:
    import ml_collections  # pylint: disable=g-import-not-at-top
    c.rl = ml_collections.ConfigDict()
  _overlay(c, recorded)
  return c


# ----------------------------------------------------------------------------
# model.init_from.


def split_init_from(spec: str) -> tuple[str, int | None]:
  """``WORKDIR[:STEP]`` -> (workdir, step or None)."""
  head, sep, tail = spec.rpartition(":")
  if sep and tail.isdigit():
    return head, int(tail)
  return spec, None


def resolve_step(workdir: str, step: int | None, key: str) -> int:
  """``step``, or the latest complete checkpoint of ``workdir``; errors name ``key``."""
  from jaxalign import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise ValueError(f"{key}={workdir!r}: not a directory; give the workdir of a "
                     "jaxalign run (WORKDIR, or WORKDIR:STEP for a kept checkpoint).")
  steps = ckpt_lib.complete_steps(os.path.join(workdir, "checkpoints"))
  if not steps:
    raise ValueError(f"{key}={workdir!r}: no complete checkpoint in its checkpoints/; "
                     "give the workdir of a run that saved one.")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise ValueError(f"{key}: {workdir!r} has no checkpoint at step {step}; kept "
                     f"steps: {steps}. Pick one, or give the workdir alone (latest).")
  return step


def resolve_init_from(spec: str) -> str:
  """``model.init_from`` as ``/abs/workdir:step`` (the latest step when none is
  given), so the run's record names the exact checkpoint it started from: a resume
  after the source saved a newer one is refused, not silently re-based."""
  workdir, step = split_init_from(spec)
  workdir = os.path.abspath(workdir)
  step = resolve_step(workdir, step, f"config.{INIT_KEY}")
  read_run_record(workdir, f"config.{INIT_KEY}")
  return f"{workdir}:{step}"


def arch_from_record(arch: dict) -> Any:
  """The `TransformerConfig` of a run.json ``resolved.arch``."""
  from jaxalign.models import transformer  # pylint: disable=g-import-not-at-top
  kwargs = dict(arch)
  if kwargs.get("rope_scaling") is not None:
    kwargs["rope_scaling"] = transformer.RopeScaling(**kwargs["rope_scaling"])
  if kwargs.get("layer_types") is not None:
    kwargs["layer_types"] = tuple(kwargs["layer_types"])
  return transformer.TransformerConfig(**kwargs)


def check_init_source(cfg: Any, tokenizer_fp: str) -> None:
  """ValueError, before anything is built, unless ``model.init_from``'s run has this
  run's architecture (`ARCH_FREE` aside) and tokenizer (fingerprint)."""
  if not cfg.model.init_from:
    return
  from jaxalign.train import build  # pylint: disable=g-import-not-at-top
  source, _ = split_init_from(cfg.model.init_from)
  record = read_run_record(source, f"config.{INIT_KEY}")
  ours = json.loads(json.dumps(_plain(build.resolved_arch(cfg.model))))
  theirs = record["resolved"]["arch"]
  lines = [f"  model.{k}: {theirs.get(k)!r} in the source run, {ours[k]!r} here"
           for k in sorted(ours) if k not in ARCH_FREE and theirs.get(k) != ours[k]]
  if record.get("fingerprints", {}).get("tokenizer") != tokenizer_fp:
    lines.append(f"  tokenizer: the source run's is {record['resolved']['tokenizer']!r}, "
                 f"this run's {run_tokenizer(cfg)[1]!r} (or the same name with other "
                 "files)")
  if not lines:
    return
  src_hf = record["config"].get("model", {}).get("hf_path", "")
  hint = (f" (it started from model.hf_path={src_hf!r}: set that here too)" if src_hf
          else "")
  raise ValueError(
      f"config.{INIT_KEY}={cfg.model.init_from!r}: this run cannot start from that "
      "run's weights; they differ in:\n" + "\n".join(lines[:_MAX_LISTED]) + "\nSet "
      f"these as the source run has them{hint}; its resolved config is "
      f"{os.path.join(source, RERUN_CONFIG)} and its tokenizer "
      f"{os.path.join(source, TOKENIZER_DIR)} (data.tokenizer accepts an HF one).")


# ----------------------------------------------------------------------------
# A run's weights, on the host.


def lora_config(model_record: dict) -> Any:
  """The `LoraConfig` of a recorded ``config.model``."""
  from jaxalign.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  raw = model_record.get("lora") or {}
  return lora_lib.LoraConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in raw.items()})


def checkpoint_params(workdir: str, step: int) -> Any:
  """The params saved at ``step`` in ``workdir``'s checkpoints (an offline state's
  ``params`` or an RL state's ``policy.params``), as NumPy arrays. Read without a
  target: the optimizer need not be this run's."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxalign import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                             keep=1 << 20) as ck:
    state = ck.restore_arrays(step).state
  params = state["policy"]["params"] if "policy" in state else state["params"]
  return jax.tree.map(np.asarray, jax.device_get(params))


_JITTED: dict[str, Any] = {}


def _jitted(name: str, fn: Callable, static: int) -> Callable:
  """One jitted function per name for the process (an export then a chained run
  compile the random init once)."""
  if name not in _JITTED:
    import jax  # pylint: disable=g-import-not-at-top
    _JITTED[name] = jax.jit(fn, static_argnums=static)
  return _JITTED[name]


def initial_lm_params(record: dict, dtype: Any = None) -> Any:
  """The transformer params a recorded run started from: its ``init_from`` run's,
  ``model.hf_path``'s, or the seed's init (the key split of `build.initial_state` and
  `build.base_params`); cast to ``dtype`` when given (a LoRA base's)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  model = record["config"]["model"]
  if model.get("init_from"):
    src, step = split_init_from(model["init_from"])
    lm = run_lm_params(src, step, f"(source of) config.{INIT_KEY}")[0]
  elif model.get("hf_path"):
    from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
    lm = hf.load(model["hf_path"])[1]
  else:
    from jaxalign.models import transformer  # pylint: disable=g-import-not-at-top
    arch = arch_from_record(record["resolved"]["arch"])
    key = jax.random.split(jax.random.key(int(record["config"]["seed"])))[0]
    if model.get("head") == "scalar":
      key = jax.random.split(key)[0]  # build.build_model's scalar init_params
    lm = _jitted("init", lambda a, k: transformer.init(a, k)[1], 0)(arch, key)
  dtype = None if dtype is None else jax.numpy.dtype(dtype)
  return jax.tree.map(lambda p: np.asarray(p) if dtype is None
                      else np.asarray(p).astype(dtype), lm)


def run_lm_params(workdir: str, step: int, key: str) -> tuple[Any, Any, dict]:
  """``(transformer params, scalar head or None, run.json)`` of the checkpoint at
  ``step`` of the run in ``workdir``; a LoRA run's adapters are merged into its base
  (W + alpha / r A B, in the base's dtype)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxalign.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  record = read_run_record(workdir, key)
  model = record["config"]["model"]
  params = checkpoint_params(workdir, step)
  scalar = model.get("head") == "scalar"
  head = params.get("head") if scalar else None
  lcfg = lora_config(model)
  if lcfg.enabled:
    base = initial_lm_params(record, lcfg.base_dtype)
    from jaxalign.train import objectives  # pylint: disable=g-import-not-at-top
    merge = _jitted("merge", lora_lib.merge, 2)  # one program, not op by op
    lm = jax.tree.map(np.asarray, merge(base, params[objectives.LORA_KEY], lcfg))
  else:
    lm = params["model"] if scalar else params
  return lm, head, record


def source_params(spec: str) -> tuple[Any, Any, str]:
  """``(transformer params, scalar head or None, a note)`` of ``model.init_from``."""
  workdir, step = split_init_from(spec)
  lm, head, record = run_lm_params(workdir, step, f"config.{INIT_KEY}")
  model = record["config"]["model"]
  what = ("a reward model (scalar head)" if head is not None else "a policy") + (
      f" with LoRA rank {model['lora']['rank']}, merged into its base"
      if lora_config(model).enabled else "")
  return lm, head, f"{INIT_KEY}: step {step} of {workdir}, {what}"
