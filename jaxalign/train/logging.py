"""Training logs: a metrics JSONL file, TensorBoard events, a tqdm bar, PNG plots.

One `MetricsLogger` writes every sink; the loop calls ``write(step, metrics)`` with
host floats. ``metrics.jsonl`` is the source of truth (one JSON object per line,
``{"step": s, "split": "train"|"eval", ...}``); the plots are drawn from it at the
end, so a resumed run plots its whole history. On resume, lines with a step beyond the
restored checkpoint are dropped (they came from work the restart repeats). The
progress bar appears after the first step, so its rate and ETA never count the
first step's compilation. `truncation_warning` is the line training and the data
CLI print when truncation cuts many completions.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Mapping

import numpy as np

METRICS_FILE = "metrics.jsonl"
# Share of examples losing completion tokens to truncation above which it is a WARNING.
TRUNCATION_WARNING_SHARE = 0.25


def _finite_or_none(v: float) -> float | None:
  return v if math.isfinite(v) else None


class MetricsLogger:
  """Writes scalar metrics to JSONL, TensorBoard and (optionally) a tqdm bar.

  Args:
    workdir: run directory; ``metrics.jsonl`` and ``tensorboard/`` go here.
    total_steps: length of the progress bar.
    start_step: the step training resumes from (0 for a fresh run).
    tensorboard: write TensorBoard event files (tensorboardX, no TensorFlow).
    progress_bar: show a tqdm bar with step, loss and pairs/s, from the first
      `advance` on (its ETA then leaves out the first step's compilation).
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
    self._bar_args = (total_steps, start_step) if progress_bar else None
    self._postfix = {}

  def write(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
    clean = {k: float(v) for k, v in metrics.items()}
    record = {"step": int(step), "split": split}
    record.update({k: _finite_or_none(v) for k, v in clean.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(f"{split}/{k}", v, step)
    if split == "train":
      self._postfix = {k: f"{clean[k]:.4g}" for k in ("loss", "pairs_per_s")
                       if k in clean}
      if self._bar is not None:
        self._bar.set_postfix(self._postfix, refresh=False)

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)
    elif self._bar_args is not None:  # the first step is done: start the bar now
      import tqdm  # pylint: disable=g-import-not-at-top
      total, start = self._bar_args
      self._bar_args = None
      self._bar = tqdm.tqdm(total=total, initial=start + n, unit="step",
                            dynamic_ncols=True, postfix=self._postfix or None)

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


def truncation_warning(report, max_length: int | None, max_prompt_length: int | None
                       ) -> str | None:
  """A warning when more than `TRUNCATION_WARNING_SHARE` of the examples lose
  completion tokens to truncation (kept shortened, or dropped with none left), from a
  `jaxalign.data.formats.DataReport`; None otherwise."""
  from jaxalign.data import formats  # pylint: disable=g-import-not-at-top
  t = report.truncation
  lost = (t.get(formats.COMPLETION_TRUNCATED, 0) + t.get(formats.COMPLETION_TRUNCATED_AWAY, 0)
          + t.get(formats.IDENTICAL_AFTER_TRUNCATION, 0))
  total = report.examples + report.num_dropped
  if not total or lost / total <= TRUNCATION_WARNING_SHARE:
    return None
  return (f"{lost} of {total} examples ({lost / total:.0%}) lose completion tokens to "
          f"truncation (max_length={max_length or 'none'}, max_prompt_length="
          f"{max_prompt_length or 'none'}; {report.num_dropped} dropped with none left): "
          "the loss sees cut responses. Raise config.data.max_length, or check the "
          "lengths with `python -m jaxalign.data FILE --config EXPERIMENT`.")


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


# Horizontal lines drawn on a metric's plot: (label, a constant or the metric of the
# same record holding it). The eval reports the reference policy's expected oracle
# reward and the best candidate's (`jaxalign.eval.candidate_metrics`); a KL to the
# reference is 0 at the reference; a pair accuracy of 0.5 is chance.
REFERENCE_LINES = {
    ("eval", "oracle_expected"): (("reference policy", "oracle_reference"),
                                  ("best candidate", "oracle_best")),
    ("eval", "kl_to_reference"): (("reference", 0.0),),
    ("eval", "pair_accuracy"): (("chance", 0.5),),
    # Evaluation by generation (`jaxalign.train.gen_eval`): the frozen reference's
    # responses, scored once; a win rate of 0.5 ties with them.
    ("eval", "gen_oracle_reward"): (("reference policy", "gen_reference_oracle_reward"),),
    ("eval", "gen_reward_model"): (("reference policy", "gen_reference_reward_model"),),
    ("eval", "gen_win_rate"): (("reference (tie)", 0.5),),
    ("train", "objective/kl"): (("reference", 0.0),),
}


def plot_data(records: list[dict], split: str, key: str, offset: int = 0
              ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, float]]]:
  """What the plot of one metric shows: (steps + ``offset``, values, reference lines
  of `REFERENCE_LINES`, a record-held value taken from the latest record with it).

  ``offset``: where a record's step differs from the step it describes, e.g. -1 for
  online RL's rollout statistics: the rollouts logged at iteration i were sampled by
  the policy of iteration i - 1, so the first one is the initial policy's (step 0).
  """
  steps, vals = series(records, key, split)
  lines = []
  for label, ref in REFERENCE_LINES.get((split, key), ()):
    if isinstance(ref, str):
      _, held = series(records, ref, split)
      if not held.size:
        continue
      ref = float(held[-1])
    lines.append((label, float(ref)))
  return steps + offset, vals, lines


def plot_metrics(workdir: str, keys: Iterable[tuple]) -> list[str]:
  """Writes one PNG per (split, metric[, step offset]) found in ``metrics.jsonl``
  (`plot_data`: the points and the reference lines); returns the paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = read_metrics(os.path.join(workdir, METRICS_FILE))
  paths = []
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  for split, key, *offset in keys:
    steps, vals, lines = plot_data(records, split, key, *offset)
    if steps.size == 0:
      continue
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, vals, marker="." if steps.size < 50 else None)
    for i, (label, value) in enumerate(lines):
      ax.axhline(value, color=f"C{i + 1}", linestyle="--", linewidth=1, label=label)
    if lines:
      ax.legend(fontsize="small")
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
