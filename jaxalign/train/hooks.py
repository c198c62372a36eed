"""What a training driver does around its steps: preemption, fault injection, quiet
logging on non-lead processes. Shared by the offline loop and online RL."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import numpy as np

# The batch key of the fault-injection gate (`FaultInjection`).
DEBUG_NAN_KEY = "debug_nan_gate"


class Preemption:
  """Turns SIGTERM / SIGINT into a flag the driver polls between steps."""

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}

  def __enter__(self) -> "Preemption":
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal = signum

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  @property
  def requested(self) -> bool:
    return self.signal is not None


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
