"""Training logs: a metrics JSONL file, TensorBoard events, a tqdm bar, PNG plots.

One `MetricsLogger` writes every sink; the loop calls ``write(step, metrics)`` with
host floats. ``metrics.jsonl`` is the source of truth (one JSON object per line,
``{"step": s, "split": "train"|"eval", ...}``); the plots are drawn from it at the
end, so a resumed run plots its whole history. On resume, lines with a step beyond the
restored checkpoint are dropped (they came from work the restart repeats).
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Mapping

import numpy as np

METRICS_FILE = "metrics.jsonl"


def _finite_or_none(v: float) -> float | None:
  return v if math.isfinite(v) else None


class MetricsLogger:
  """Writes scalar metrics to JSONL, TensorBoard and (optionally) a tqdm bar.

  Args:
    workdir: run directory; ``metrics.jsonl`` and ``tensorboard/`` go here.
    total_steps: length of the progress bar.
    start_step: the step training resumes from (0 for a fresh run).
    tensorboard: write TensorBoard event files (tensorboardX, no TensorFlow).
    progress_bar: show a tqdm bar with step, loss and pairs/s.
  """

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
               tensorboard: bool = True, progress_bar: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.workdir = workdir
    self.path = os.path.join(workdir, METRICS_FILE)
    _truncate_after(self.path, start_step)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(
          logdir=os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
    self._bar = None
    if progress_bar:
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True)

  def write(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
    clean = {k: float(v) for k, v in metrics.items()}
    record = {"step": int(step), "split": split}
    record.update({k: _finite_or_none(v) for k, v in clean.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(f"{split}/{k}", v, step)
    if self._bar is not None and split == "train":
      shown = {k: f"{clean[k]:.4g}" for k in ("loss", "pairs_per_s") if k in clean}
      self._bar.set_postfix(shown, refresh=False)

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def info(self, message: str) -> None:
    """A line of text that does not break the progress bar."""
    if self._bar is not None:
      self._bar.write(message)
    else:
      print(message, flush=True)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._bar is not None:
      self._bar.close()


def _truncate_after(path: str, step: int) -> None:
  """Drops records with ``step > step`` (work a resumed run will redo)."""
  if not os.path.exists(path):
    return
  kept = [line for line in read_metrics(path) if line["step"] <= step]
  with open(path, "w", encoding="utf-8") as f:
    for rec in kept:
      f.write(json.dumps(rec) + "\n")


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics JSONL file (a torn last line is ignored)."""
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def series(records: Iterable[dict], key: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one metric, skipping records without a finite value."""
  pts = [(r["step"], r[key]) for r in records
         if r.get("split") == split and r.get(key) is not None]
  if not pts:
    return np.zeros((0,)), np.zeros((0,))
  steps, vals = zip(*pts)
  return np.asarray(steps), np.asarray(vals, dtype=np.float64)


def plot_metrics(workdir: str, keys: Iterable[tuple[str, str]]) -> list[str]:
  """Writes one PNG per (split, metric) found in ``metrics.jsonl``; returns the paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = read_metrics(os.path.join(workdir, METRICS_FILE))
  paths = []
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  for split, key in keys:
    steps, vals = series(records, key, split)
    if steps.size == 0:
      continue
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, vals, marker="." if steps.size < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(f"{split}/{key}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(workdir, "plots", f"{split}_{key.replace('/', '_')}.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    paths.append(path)
  return paths
