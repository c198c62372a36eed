"""DPO from an SFT start at two learning rates: implicit reward vs the policy's own
responses (issue 18; docs/results.md, "DPO from an SFT start").

On the built-in ground-truth task (`jaxalign.data.synthetic`):

1. SFT from random init (``experiments/sft.py:tiny``: the oracle-best of 4 behaviour
   responses per prompt);
2. DPO from that SFT checkpoint (``model.init_from``; the reference is the SFT
   policy) at each learning rate of ``--lrs`` (default 1e-3, the rate that suits random
   init, and 1e-5, a trained-start rate), everything else as ``experiments/dpo.py:tiny``.

Each run's eval (every ``--eval_every`` steps, 128 held-out examples) reports both the
held-out implicit-reward accuracy ``pair_accuracy`` (what DPO optimises: ``beta *
(log pi - log pi_ref)`` ranks the preferred response of held-out pairs higher) and
the evaluation by generation (`jaxalign.train.gen_eval`): the oracle reward of the
policy's greedy responses to the held-out prompts (``gen_oracle_reward``), their win
rate against the SFT policy's greedy responses (``gen_win_rate``, ties half) and
their length. The table goes to stdout and ``--out/table.md``; every eval record to
``--out/evals.json``.

  python experiments/sft_dpo_lr.py --out /tmp/sft_dpo_lr            # ~ a few CPU minutes
  python experiments/sft_dpo_lr.py --out /tmp/sft_dpo_lr_q --quick  # smoke: 6 + 4 steps
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as a script, sys.path[0] is experiments/
  sys.path.insert(0, _ROOT)
from experiments import dpo as dpo_exp  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import sft as sft_exp  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxalign import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxalign.train import logging as log_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxalign.train import loop  # pylint: disable=g-import-not-at-top,wrong-import-position

COLUMNS = ("pair_accuracy", "gen_oracle_reward", "gen_win_rate", "gen_length",
           "oracle_expected")


def _config(base, steps: int, eval_every: int, quiet: bool, **keys):
  c = base.get_config(f"tiny,steps={steps}")
  c.eval.every_steps = eval_every
  c.checkpoint.every_steps = steps
  c.log.progress_bar = not quiet
  c.log.plots = not quiet
  for dotted, value in keys.items():
    node = c
    *parents, name = dotted.split("__")
    for p in parents:
      node = node[p]
    node[name] = value
  return config_lib.validate(c, jax.device_count())


def _evals(workdir: str) -> list[dict]:
  return [r for r in log_lib.read_metrics(os.path.join(workdir, log_lib.METRICS_FILE))
          if r.get("split") == "eval"]


def run_study(out: str, *, sft_steps: int, dpo_steps: int, eval_every: int,
              lrs: list[float], quiet: bool = False) -> dict[str, list[dict]]:
  """Runs SFT then one DPO run per learning rate in ``out``; returns the eval records
  by run name ("sft", "dpo_lr=...")."""
  log = (lambda m: None) if quiet else print
  sft_dir = os.path.join(out, "sft")
  loop.run(_config(sft_exp, sft_steps, eval_every, quiet), sft_dir, log=log)
  results = {"sft": _evals(sft_dir)}
  for lr in lrs:
    name = f"dpo_lr={lr:g}"
    cfg = _config(dpo_exp, dpo_steps, eval_every, quiet, model__init_from=sft_dir,
                  optimizer__learning_rate=lr)
    loop.run(cfg, os.path.join(out, name), log=log)
    results[name] = _evals(os.path.join(out, name))
  return results


def table(results: dict[str, list[dict]]) -> str:
  """A markdown table: one row per (run, eval step)."""
  lines = ["| run | step | " + " | ".join(COLUMNS) + " |",
           "|---|---:|" + "---:|" * len(COLUMNS)]
  for name, recs in results.items():
    for r in recs:
      cells = [f"{r[k]:.3f}" if r.get(k) is not None else "-" for k in COLUMNS]
      lines.append(f"| {name} | {r['step']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--quick", action="store_true", help="smoke run: 6 SFT + 4 DPO steps")
  p.add_argument("--sft_steps", type=int, default=300)
  p.add_argument("--dpo_steps", type=int, default=200)
  p.add_argument("--eval_every", type=int, default=50)
  p.add_argument("--lrs", default="1e-3,1e-5")
  a = p.parse_args(argv)
  if a.quick:
    a.sft_steps, a.dpo_steps, a.eval_every = 6, 4, 2
  results = run_study(a.out, sft_steps=a.sft_steps, dpo_steps=a.dpo_steps,
                      eval_every=a.eval_every,
                      lrs=[float(x) for x in a.lrs.split(",")], quiet=a.quick)
  md = table(results)
  print(md)
  with open(os.path.join(a.out, "table.md"), "w", encoding="utf-8") as f:
    f.write(md + "\n")
  with open(os.path.join(a.out, "evals.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
