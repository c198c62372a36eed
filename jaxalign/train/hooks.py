"""What a training driver does around its steps: preemption, the divergence guard,
fault injection, quiet logging on non-lead processes. Shared by the offline loop and
online RL."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

# The batch key of the fault-injection gate (`FaultInjection`).
DEBUG_NAN_KEY = "debug_nan_gate"


class GuardError(RuntimeError):
  """A guard stopped the run (non-finite or divergent steps); ``jaxalign.main``
  exits with code 3. The message names the checkpoint a rerun resumes from."""


class DivergenceError(GuardError):
  """Too many divergent steps in a row (`DivergenceGuard`); none of them was saved."""


class NonFiniteError(GuardError):
  """Too many consecutive non-finite steps; the last good checkpoint is intact."""


_WATCHED = (signal.SIGTERM, signal.SIGINT)


class Preemption:
  """Turns SIGTERM / SIGINT into a flag the driver polls between steps.

  The signal is acknowledged at once by ``announce`` (default: stderr), even while
  the main thread is inside a long XLA compile: the C-level handler writes the
  signal number to a wakeup socket (``signal.set_wakeup_fd``) that a daemon thread
  reads, so the message does not wait for the step to finish.
  """

  def __init__(self, announce: Callable[[str], None] | None = None):
    self.signal: int | None = None
    self._previous = {}
    self._announce = announce or (lambda m: print(m, file=sys.stderr, flush=True))
    self._wakeup = None  # (read socket, write socket, previous wakeup fd)

  def __enter__(self) -> "Preemption":
    for sig in _WATCHED:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    if self._previous:
      self._start_watcher()
    return self

  def _start_watcher(self) -> None:
    r, w = socket.socketpair()
    w.setblocking(False)
    try:
      previous = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
    except ValueError:
      r.close()
      w.close()
      return
    self._wakeup = (r, w, previous)
    threading.Thread(target=self._watch, args=(r,), daemon=True,
                     name="preemption-ack").start()

  def _watch(self, r: socket.socket) -> None:
    acknowledged = False
    while True:
      try:
        data = r.recv(64)
      except OSError:
        return
      if not data:
        return
      got = [b for b in data if b in _WATCHED]
      if got and not acknowledged:
        acknowledged = True
        self._announce(f"received {signal.Signals(got[0]).name}: stopping after the "
                       "current step (the first one includes compiling) and saving a "
                       "checkpoint.")

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal = signum

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    if self._wakeup is not None:
      r, w, previous = self._wakeup
      signal.set_wakeup_fd(previous)
      w.close()  # the watcher's recv returns b"" and it ends
      r.close()
      self._wakeup = None

  @property
  def requested(self) -> bool:
    return self.signal is not None


# A signal-carrying Adam update is ||lr m / (sqrt(v) + eps)|| ~ lr sqrt(n) (every
# coordinate moves by up to ~lr), far below (lr / eps) ||g|| unless the gradient's
# coordinates are near eps; 1/100 of that bound separates the two by orders of
# magnitude (a zero-advantage GRPO iteration: 0.9 of it; real iterations 1e-5..4e-4).
_NO_SIGNAL_SHARE = 1e-2


def _median(values) -> float | None:
  return float(np.median(np.asarray(values))) if values else None


class DivergenceGuard:
  """Judges each applied step against running references (``config.divergence``;
  the rules are in `jaxalign.config.DivergenceConfig`).

  ``check(metrics)`` takes a step's host metrics (``loss``, ``grad_norm``,
  ``update_norm``, ``param_norm``, ``skipped``) and returns why the step is
  divergent, or None; only healthy steps enter the windows. ``state()`` is the
  windows as JSON (saved in each checkpoint's meta) and ``DivergenceGuard(cfg,
  state)`` resumes them. A step function without ``update_norm`` / ``param_norm``
  is judged on the loss and gradient tests alone. Online RL judges an iteration by
  its largest minibatch update (`check_iteration`).
  """

  KEYS = ("update_ratio", "loss", "grad_norm")

  def __init__(self, cfg: Any, state: dict | None = None):
    self.cfg = cfg
    state = state or {}
    self.windows = {k: collections.deque((float(v) for v in state.get(k, [])),
                                         maxlen=cfg.window) for k in self.KEYS}

  def state(self) -> dict:
    return {k: list(v) for k, v in self.windows.items()}

  def check(self, metrics: dict) -> str | None:
    if bool(metrics.get("skipped", False)):
      return None  # unchanged state: the non-finite guard counts it
    m = {k: float(np.asarray(v)) for k, v in metrics.items()
         if k in ("loss", "grad_norm", "update_norm", "param_norm")}
    values = {"loss": m.get("loss"), "grad_norm": m.get("grad_norm")}
    if "update_norm" in m and m.get("param_norm", 0.0) > 0:
      values["update_ratio"] = m["update_norm"] / m["param_norm"]
    reasons = self._reasons(values)
    if not reasons:
      quiet = self._no_signal(m)
      for k, v in values.items():
        # Zero updates (a warmup's first step at learning rate 0) and updates that
        # carry no signal set no scale for updates and gradients.
        if k == "update_ratio" and (v <= 0 or quiet) or k == "grad_norm" and quiet:
          continue
        if v is not None and math.isfinite(v):
          self.windows[k].append(abs(v) if k == "loss" else v)
    return "; ".join(reasons) or None

  def _no_signal(self, m: dict) -> bool:
    """Whether an Adam(W) update came from a gradient below the optimizer's
    resolution (`jaxalign.config.DivergenceConfig`): Adam scales a gradient by at
    most ``lr / eps`` (``lr g / (|g| + eps)`` at its first step, ``|g| << eps``), and
    an update within ``_NO_SIGNAL_SHARE`` of that bound is eps's doing (or momentum's
    and weight decay's alone), not the gradient's."""
    gain, g, u = self.cfg.adam_gain, m.get("grad_norm"), m.get("update_norm")
    return bool(gain) and g is not None and u is not None and (
        u >= _NO_SIGNAL_SHARE * gain * g)

  def _reasons(self, values: dict) -> list[str]:
    c, out = self.cfg, []
    r = values.get("update_ratio")
    if r is not None and c.max_update_ratio and r > c.max_update_ratio:
      out.append(f"its update was {r:.3g} x the norm of the weights "
                 f"(config.divergence.max_update_ratio={c.max_update_ratio:g})")
    for key, factor, name in (("update_ratio", c.factor, "divergence.factor"),
                              ("loss", c.loss_factor, "divergence.loss_factor"),
                              ("grad_norm", c.grad_factor, "divergence.grad_factor")):
      v, ref = values.get(key), _median(self.windows[key])
      if factor and v is not None and ref and v > factor * ref:
        out.append(f"its {'relative update' if key == 'update_ratio' else key} {v:.3g} "
                   f"is {v / ref:.3g} x the median {ref:.3g} of the last "
                   f"{len(self.windows[key])} steps (config.{name}={factor:g})")
    return out


class FaultInjection:
  """The ``debug.*`` keys (tests rehearse failures with them): poisoned steps, a
  SIGTERM after a step, a SIGKILL while a checkpoint is being written.

  Exists only when one of those keys is set (`from_config`), so a normal run
  compiles no gate and checks nothing.
  """

  def __init__(self, debug: Any):
    self._debug = debug
    self.poisons = bool(debug.nonfinite_steps)

  @classmethod
  def from_config(cls, debug: Any) -> "FaultInjection | None":
    active = (debug.nonfinite_steps or debug.sigterm_at_step >= 0
              or debug.sigkill_in_save_at_step >= 0)
    return cls(debug) if active else None

  def wrap_forward(self, forward: Callable) -> Callable:
    """The forward with its hidden states multiplied by the batch's gate: 1.0
    normally, NaN on the steps listed in ``debug.nonfinite_steps``."""
    if not self.poisons:
      return forward

    def gated(params, batch):
      hidden, unembed = forward(params, batch)
      if DEBUG_NAN_KEY in batch:
        hidden = hidden * batch[DEBUG_NAN_KEY][0].astype(hidden.dtype)
      return hidden, unembed
    return gated

  def gate(self, batch: dict, step: int) -> dict:
    """``batch`` for loop step ``step`` (1-based: the step it produces)."""
    if not self.poisons:
      return batch
    value = np.nan if step in self._debug.nonfinite_steps else 1.0
    return dict(batch, **{DEBUG_NAN_KEY: np.full((1,), value, np.float32)})

  def after_save(self, step: int, started: bool) -> None:
    if started and step == self._debug.sigkill_in_save_at_step:
      # Die while the asynchronous save is still being written.
      os.kill(os.getpid(), signal.SIGKILL)

  def after_step(self, step: int) -> None:
    if step == self._debug.sigterm_at_step:
      os.kill(os.getpid(), signal.SIGTERM)


class NullLogger:
  """The metrics logger of processes other than 0: writes nothing."""

  def write(self, *args, **kwargs) -> None:
    del args, kwargs

  def advance(self, n: int = 1) -> None:
    del n

  def info(self, message: str) -> None:
    del message

  def close(self) -> None:
    pass



# ----------------------------------------------------------------------------
# The drivers' per-step hooks: ``run`` is the offline `loop.Run` or online RL's
# `rl.RLRun` (each has ``cfg``, ``ckpt`` and ``say``).


@dataclasses.dataclass
class Counters:
  """The driver's host-side bookkeeping between steps and log lines."""
  guard: DivergenceGuard | None = None
  in_a_row: int = 0  # non-finite steps in a row
  skipped_total: int = 0
  # A divergent step and the divergent or skipped steps after it: while > 0 the
  # state descends from a divergent update and is not saved.
  divergent_in_a_row: int = 0
  first_divergent: tuple[int, str] | None = None  # (step, why) of this streak
  examples: int = 0  # valid examples trained on since the last log line
  t_last: float = dataclasses.field(default_factory=time.perf_counter)
  run_digest: str = ""

  def meta(self) -> dict:
    """What a checkpoint's meta carries for the next process."""
    guard = {} if self.guard is None else {"guard": self.guard.state()}
    return {"run_digest": self.run_digest, **guard}


def resume_hint(ckpt: Any, bad_step: int) -> str:
  """Which checkpoint a rerun resumes from, and how to pick another."""
  ckpt.wait()
  steps = ckpt.all_steps()
  if not steps:
    return (f"No checkpoint was saved before step {bad_step}: a rerun starts from "
            "step 0; change what diverged first (e.g. a lower "
            "--config.optimizer.learning_rate).")
  return (f"The last good checkpoint is step {steps[-1]} in {ckpt.directory} (kept: "
          f"{steps}); a rerun resumes from it. To rerun with other optimizer settings "
          "(e.g. a lower --config.optimizer.learning_rate) add "
          f"--config.checkpoint.restore_step={steps[-1]}, or another kept step to go "
          "further back.")


def check_step(run: Any, c: Counters, metrics: dict, step: int) -> bool:
  """Counts non-finite and divergent steps (raising `NonFiniteError` /
  `DivergenceError` after too many in a row); returns whether this step's state
  must not be saved."""
  skipped = bool(metrics["skipped"])
  _count_nonfinite(run, c, skipped, step)
  why = c.guard.check(metrics) if c.guard is not None else None
  return _count_divergent(run, c, why, skipped, step)


def _count_nonfinite(run: Any, c: Counters, skipped: bool, step: int) -> None:
  c.in_a_row = c.in_a_row + 1 if skipped else 0
  c.skipped_total += int(skipped)
  limit = run.cfg.max_nonfinite_in_a_row
  if c.in_a_row >= limit:
    raise NonFiniteError(
        f"{c.in_a_row} consecutive steps (up to step {step}) had a non-finite loss or "
        f"gradient (config.max_nonfinite_in_a_row={limit}); stopped without saving. "
        + resume_hint(run.ckpt, step - c.in_a_row + 1))


def _count_divergent(run: Any, c: Counters, why: str | None, skipped: bool,
                     step: int) -> bool:
  if why or (skipped and c.divergent_in_a_row):
    c.divergent_in_a_row += 1
    c.first_divergent = c.first_divergent or (step, why)
  else:
    c.divergent_in_a_row, c.first_divergent = 0, None
  limit = run.cfg.divergence.max_in_a_row
  if c.divergent_in_a_row >= limit:
    first, reason = c.first_divergent
    streak = (f"; {c.divergent_in_a_row} steps in a row up to step {step} were "
              f"divergent or non-finite" if c.divergent_in_a_row > 1 else "")
    raise DivergenceError(
        f"step {first} diverged: {reason}{streak} (config.divergence.max_in_a_row="
        f"{limit}); stopped without saving it. " + resume_hint(run.ckpt, first))
  if why:
    run.say(f"WARNING: step {step} diverged ({why}); not saved until a healthy step.")
  return skipped or c.divergent_in_a_row > 0


def largest_update(mb_metrics: list[dict]) -> dict[str, float]:
  """``update_norm`` and ``param_norm`` of the applied minibatch update (of an RL
  iteration's several) with the largest ratio of the two: the one the guard judges.
  Empty when every update was skipped."""
  best, ratio = {}, -1.0
  for m in mb_metrics:
    if float(np.asarray(m["skipped"])):
      continue
    u, p = float(np.asarray(m["update_norm"])), float(np.asarray(m["param_norm"]))
    r = u / p if p > 0 else (math.inf if u > 0 else 0.0)
    if not r <= ratio:  # NaN and inf updates win
      best, ratio = {"update_norm": u, "param_norm": p}, r
  return best


def check_iteration(run: Any, c: Counters, metrics: dict, iteration: int) -> bool:
  """`check_step` for an online-RL iteration (host metrics of `rl.iteration`, its
  minibatch updates averaged, ``update_norm`` / ``param_norm`` of `largest_update`).

  Non-finite: any minibatch update skipped (non-finite loss or gradients) or a
  non-finite reward; such iterations count towards ``max_nonfinite_in_a_row`` and
  are not saved. Divergent: the guard's verdict on the largest applied update (and,
  opt-in, the mean loss / gradient norm), judged even when other minibatches of the
  iteration were skipped. Returns whether this iteration's state must not be saved.
  """
  skipped_share = float(metrics["skipped"])
  nonfinite = skipped_share > 0 or not math.isfinite(float(metrics["objective/scores"]))
  _count_nonfinite(run, c, nonfinite, iteration)
  why = None
  if c.guard is not None and skipped_share < 1 and "update_norm" in metrics:
    judged = {k: metrics[k] for k in ("loss", "grad_norm", "update_norm", "param_norm")
              if k in metrics}
    why = c.guard.check(judged)
  return _count_divergent(run, c, why, nonfinite, iteration)


def run_iterations(run: Any, stop_at: int, step: Callable, log: Callable,
                   save: Callable, run_digest: str = "") -> tuple[Any, int, list, str]:
  """Online RL's loop (`rl.run_rl`) from ``run.start`` to ``stop_at``, with the
  offline loop's hooks: the guard (`check_iteration`; a held iteration is not
  saved), logging, saving every ``checkpoint.every_steps`` (forced at ``stop_at``),
  ``debug.*`` fault injection, and SIGTERM / SIGINT (save unless held, then stop).

  ``step(state, it) -> (state, host metrics)``, ``log(it, metrics)``, ``save(it,
  state, force=, meta=) -> started``. Returns (state, iteration, history, status).
  """
  cfg, it, history = run.cfg, run.start, []
  guard = DivergenceGuard(cfg.divergence,
                          run.ckpt.read_meta(it).get("guard") if it else None)
  c = Counters(guard=guard, run_digest=run_digest)
  faults = FaultInjection.from_config(cfg.debug)
  if faults is not None and faults.poisons:
    raise ValueError("config.debug.nonfinite_steps: the offline loop's poisoned "
                     "batches have no online-RL form; leave it empty for RL configs.")
  state = run.state
  try:
    with Preemption(run.say) as preempt:
      while it < stop_at:
        state, metrics = step(state, it)
        it += 1
        history.append(metrics)
        hold = check_iteration(run, c, metrics, it)
        log(it, metrics)
        if not hold:
          started = save(it, state, force=it == stop_at, meta=c.meta())
          if faults is not None:
            faults.after_save(it, started)
        if faults is not None:
          faults.after_step(it)
        if preempt.requested:
          saved = not hold and (save(it, state, force=True, meta=c.meta()) or True)
          run.ckpt.wait()
          run.say(f"preempted by signal {preempt.signal} at iteration {it}; " + (
              "checkpoint saved" if saved else
              f"not saved (a suspect state); {resume_hint(run.ckpt, it)}"))
          break
    run.ckpt.wait()
  finally:
    run.ckpt.close()
    run.logger.close()
  return state, it, history, "preempted" if preempt.requested else "done"


def valid_examples(batch: dict, default: int) -> int:
  # A packed batch may hold fewer examples than asked (the rest were carried).
  valid = batch.get("example_valid")
  return default if valid is None else int(np.sum(valid))


def log_step(run: Any, c: Counters, step: int, metrics: dict) -> None:
  cfg = run.cfg
  if step % cfg.log.every_steps and step != cfg.num_steps:
    return
  now = time.perf_counter()
  host = {k: float(np.asarray(v)) for k, v in metrics.items()}
  host["pairs_per_s"] = c.examples / max(now - c.t_last, 1e-9)
  host["skipped_total"] = float(c.skipped_total)
  if run.ref_source is not None:
    host["ref_cache_misses"] = float(run.ref_source.misses)
  run.logger.write(step, host)
  c.t_last, c.examples = now, 0


def announce_setup(cfg: Any, say: Callable[[str], None]) -> None:
  """The first line of a run: what setup is about to do (it can take a while)."""
  d = cfg.data
  if d.source == "file":
    from jaxalign.train import build  # pylint: disable=g-import-not-at-top
    tok = build.tokenizer_spec(d.tokenizer, cfg.model.hf_path)
    say(f"setup: reading {d.path} (format {d.format}) and tokenising it with "
        f"tokenizer {tok!r}, building the model ...")
  else:
    say(f"setup: generating the synthetic task ({d.task.num_train} examples), "
        "building the model ...")


def announce_compile(run: Any) -> None:
  shape = tuple(np.shape(run.data.train.peek()["tokens"]))
  micro = " (micro-batches, rows, length)" if len(shape) == 3 else " (rows, length)"
  run.say(f"compiling the train step for token batches of shape {shape}{micro}; "
          f"one program per row-length bucket {tuple(run.data.layout.buckets)} ...")


def startup_messages(run: Any) -> None:
  """After setup: the layout, a resume, the data report and its truncation warning."""
  from jaxalign.train import logging as log_lib  # pylint: disable=g-import-not-at-top
  layout = run.data.layout
  run.say(f"data: layout={layout.kind}, buckets={tuple(layout.buckets)}, "
          f"{layout.examples_per_batch} examples per "
          f"{'micro-batch' if run.cfg.data.micro_batches > 1 else 'batch'}")
  if run.start:
    run.say(f"resumed from checkpoint step {run.start} in {run.ckpt.directory}")
  report = run.data.report
  if report is None:
    return
  run.say(f"data: {report.summary()}")
  warning = log_lib.truncation_warning(report, run.cfg.data.max_length,
                                       run.cfg.data.max_prompt_length)
  if warning:
    run.say(f"WARNING: {warning}")
  if run.lead:
    with open(os.path.join(run.workdir, "data_report.json"), "w", encoding="utf-8") as f:
      json.dump(report.to_dict(), f, indent=1)


def finish(run: Any, status: str, step: int, last_eval: dict, skipped: int,
           plot_keys: Any) -> None:
  """A finished run's plots and ``final_eval.json`` (process 0)."""
  if status != "done" or not run.lead:
    return
  if run.cfg.log.plots:
    from jaxalign.train import logging as log_lib  # pylint: disable=g-import-not-at-top
    log_lib.plot_metrics(run.workdir, plot_keys)
  with open(os.path.join(run.workdir, "final_eval.json"), "w", encoding="utf-8") as f:
    json.dump({"step": step, **last_eval, "skipped_total": skipped}, f, indent=1)


# Online RL's curves: what the rollouts say about the policy. Rollout statistics are
# drawn at the iteration of the policy that sampled them (offset -1: the first point
# is the initial policy's, step 0; `logging.plot_data`).
RL_PLOT_KEYS = (("train", "objective/scores", -1), ("train", "objective/kl", -1),
                ("train", "objective/rlhf_reward", -1), ("train", "loss"),
                ("train", "response_length", -1))
# Averaged over the last iterations into ``final_eval.json`` (one iteration's
# rollouts are a small, noisy sample).
RL_FINAL_KEYS = ("objective/scores", "objective/kl", "objective/rlhf_reward",
                 "objective/oracle", "response_length", "eos_rate")


def finish_rl(workdir: str, cfg: Any, status: str, iteration: int,
              history: list[dict], say: Callable[[str], None], last: int = 5,
              extra: dict | None = None) -> dict:
  """A finished RL run's plots and ``final_eval.json`` (the offline run's artefacts):
  the mean of `RL_FINAL_KEYS` over its last ``last`` iterations in this call, plus
  ``extra`` (e.g. the held-out ``accuracy_before`` / ``accuracy_after``). Under
  jax.distributed only process 0 writes (every process has the same history)."""
  import jax  # pylint: disable=g-import-not-at-top
  if status != "done" or not history or jax.process_index() != 0:
    return {}
  tail = history[-last:]
  final = {k: float(np.mean([h[k] for h in tail])) for k in RL_FINAL_KEYS
           if k in tail[0]}
  final.update(extra or {})
  with open(os.path.join(workdir, "final_eval.json"), "w", encoding="utf-8") as f:
    json.dump({"step": iteration, "iterations_averaged": len(tail), **final}, f,
              indent=1)
  if cfg.log.plots:
    from jaxalign.train import logging as log_lib  # pylint: disable=g-import-not-at-top
    log_lib.plot_metrics(workdir, RL_PLOT_KEYS)
  say(f"done at iteration {iteration}: " + ", ".join(
      f"{k}={v:.4g}" for k, v in final.items()))
  return final
