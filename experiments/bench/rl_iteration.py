"""One RL iteration split into generate / score / update, on two code versions.

Issue 15's benchmark (docs/benchmarks.md, "RL iteration split before and after issue
15"). A run trains an RL config (`jaxalign.train.rl.run_rl`) for ``--iters`` iterations
and reads the ``time/generate``, ``time/score`` and ``time/update`` seconds that
`rl.iteration` records for each (each part ends in ``jax.block_until_ready``); iteration
1 compiles and is dropped, the figure of a run is the median of iterations 2..N.

Only `run_rl` and its history are used, which exist with the same meaning before and
after issue 15, so the same script measures both trees. The config file is loaded from
the tree whose ``jaxalign`` is imported, so each side runs its own defaults.

``--compare WORKTREE`` alternates fresh processes, before (WORKTREE's jaxalign, via the
/tmp/wtsite import hook that bypasses the editable install) and after (this checkout),
``--rounds`` times each, and prints per-part medians over runs and the median of the
after / before ratios of runs adjacent in time (before_i, after_i; the order within a
pair alternates, ABBA): on a shared, loaded machine adjacent runs see similar load, so
their ratio is steadier than the medians.

Usage:
  # one side, this checkout (JSON line per config, then a markdown row):
  .venv/bin/python experiments/bench/rl_iteration.py --configs grpo.py:tiny,ppo.py:tiny
  .venv/bin/python experiments/bench/rl_iteration.py --quick   # 3 iterations
  # before vs after issue 15 (its first commit b2baa4c; before = its parent):
  git worktree add /tmp/bench_before b2baa4c^ --detach
  nice -n 5 .venv/bin/python experiments/bench/rl_iteration.py \\
      --compare /tmp/bench_before --rounds 2 --iters 8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile

PARTS = ("generate", "score", "update")
WTSITE = "/tmp/wtsite"  # sitecustomize.py: JAXALIGN_WORKTREE's jaxalign wins the import


def _parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", default="grpo.py:tiny,ppo.py:tiny",
                 help="comma list of experiments/<file>:<arg>")
  p.add_argument("--iters", type=int, default=8, help="iterations per run (first dropped)")
  p.add_argument("--quick", action="store_true", help="3 iterations")
  p.add_argument("--compare", default="", help="worktree of the 'before' commit")
  p.add_argument("--rounds", type=int, default=2, help="--compare: runs per side")
  p.add_argument("--label", default="", help="tag for the JSON line")
  a = p.parse_args()
  if a.quick:
    a.iters = 3
  if a.iters < 2:
    p.error(f"--iters {a.iters}: needs >= 2 (iteration 1 compiles and is dropped)")
  return a


def _load_config(spec: str):
  """``grpo.py:tiny`` -> that tree's experiments/grpo.py get_config("tiny")."""
  import jaxalign  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(jaxalign.__file__)))
  fname, _, arg = spec.partition(":")
  path = os.path.join(root, "experiments", fname)
  if not os.path.exists(path):
    raise SystemExit(f"--configs {spec!r}: {path} does not exist in this tree")
  sys.path.insert(0, root)  # `from experiments import _common` of the same tree
  mod_spec = importlib.util.spec_from_file_location(f"cfg_{fname[:-3]}", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None), root


def measure(spec: str, iters: int) -> dict:
  """Trains ``spec`` for ``iters`` iterations; per-part median seconds of 2..iters."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxalign.train import rl  # pylint: disable=g-import-not-at-top
  c, root = _load_config(spec)
  c.num_steps = iters
  c.log.progress_bar = False
  c.log.tensorboard = False
  with tempfile.TemporaryDirectory() as d:
    res = rl.run_rl(c, d, log=lambda s: None)
  hist = res.history[1:]
  out = {k: statistics.median(h[f"time/{k}"] for h in hist) for k in PARTS}
  out["total"] = statistics.median(sum(h[f"time/{k}"] for k in PARTS) for h in hist)
  return dict(config=spec, tree=root, iters=iters, devices=jax.device_count(),
              platform=jax.devices()[0].platform,
              **{k: round(v, 5) for k, v in out.items()})


def _row(r: dict) -> str:
  t = r["total"]
  return (f"| {r['config']} | " + " | ".join(f"{r[k]:.4f} ({100 * r[k] / t:.0f}%)"
                                               for k in PARTS) + f" | {t:.4f} |")


def run_side(args) -> None:
  for spec in args.configs.split(","):
    r = measure(spec, args.iters)
    r["label"] = args.label
    print("RESULT " + json.dumps(r), flush=True)
    print(_row(r), flush=True)


def _spawn(args, spec: str, worktree: str | None) -> dict:
  env = dict(os.environ)
  if worktree:
    env["JAXALIGN_WORKTREE"] = worktree
    env["PYTHONPATH"] = os.pathsep.join([WTSITE, worktree])
  cmd = [sys.executable, os.path.abspath(__file__), "--configs", spec,
         "--iters", str(args.iters), "--label", "before" if worktree else "after"]
  # cwd=/ so that '' on sys.path cannot shadow the worktree's jaxalign.
  p = subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True, check=False)
  lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
  if p.returncode or not lines:
    raise SystemExit(f"{'before' if worktree else 'after'} run of {spec} failed "
                     f"(rc {p.returncode}):\n{p.stderr[-3000:]}")
  r = json.loads(lines[-1][len("RESULT "):])
  want = os.path.abspath(worktree) if worktree else os.path.dirname(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if os.path.realpath(r["tree"]) != os.path.realpath(want):
    raise SystemExit(f"{spec}: imported jaxalign from {r['tree']}, expected {want}")
  return r


def compare(args) -> None:
  """Alternates before / after runs per config; prints medians and adjacent ratios."""
  print(f"load before: {os.getloadavg()}", flush=True)
  for spec in args.configs.split(","):
    runs = {"before": [], "after": []}
    for i in range(args.rounds):
      # ABBA order: a load that drifts during the runs biases neither side.
      sides = (("before", args.compare), ("after", None))
      for side, wt in sides if i % 2 == 0 else sides[::-1]:
        r = _spawn(args, spec, wt)
        runs[side].append(r)
        print(f"{spec} round {i + 1} {side}: " + ", ".join(
            f"{k} {r[k]:.4f}" for k in (*PARTS, "total")) +
              f"  (load {os.getloadavg()[0]:.1f})", flush=True)
    print(f"\n{spec}, {args.rounds} runs per side, {args.iters} iterations each, "
          "median of iterations 2..N per run, median over runs:")
    print("| part | before s | after s | after / before (median of adjacent pairs) |")
    print("| --- | ---: | ---: | ---: |")
    for k in (*PARTS, "total"):
      b = statistics.median(r[k] for r in runs["before"])
      a = statistics.median(r[k] for r in runs["after"])
      ratios = [ra[k] / rb[k] for rb, ra in zip(runs["before"], runs["after"])]
      print(f"| {k} | {b:.4f} | {a:.4f} | {statistics.median(ratios):.2f} "
            f"({', '.join(f'{x:.2f}' for x in ratios)}) |")
    print("RAW " + json.dumps({"config": spec, **runs}), flush=True)
  print(f"load after: {os.getloadavg()}", flush=True)


def main() -> None:
  args = _parse_args()
  if args.compare:
    compare(args)
  else:
    run_side(args)


if __name__ == "__main__":
  main()
