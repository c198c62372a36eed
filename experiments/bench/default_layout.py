"""DPO pairs/s on HH-RLHF: the default layout of today vs the old default, through the
real training setup (`jaxalign.train.loop.setup`, what ``python -m jaxalign.main``
builds), in one interleaved run.

Both configurations are ``experiments/dpo.py:hh`` (the HH preset model, max_length
256, max_prompt_length 192, batch 8, live reference, AdamW) and differ only in the
data keys the old default set:

  old: data.layout="padded", data.buckets=(128, 256)   (the preset before issue 17)
  new: the defaults: data.layout="auto" -> prefix_shared, data.buckets=() -> derived
       from max_length and the layout (128, 256, 384, 512)

Each configuration first runs its first ``--steps`` batches once (every batch shape
is compiled there), then the data stream is rewound and the same batches are timed;
rounds alternate old / new and the best pass of each is kept. The CPU may be shared:
compare the ratio within one run.

Usage:
  .venv/bin/python experiments/bench/default_layout.py --steps 12 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# The experiment configs import experiments._common; this script's folder is
# sys.path[0], so put the repository root first.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

_DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                             "data", "hh-rlhf-harmless-base-test.jsonl.gz")


def _config(path: str, steps: int, old: bool):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "dpo_config", os.path.join(os.path.dirname(__file__), "..", "dpo.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(f"hh,path={path},steps={steps}")
  c.eval.enabled = False
  c.log.progress_bar = c.log.tensorboard = c.log.plots = False
  if old:
    c.data.layout, c.data.buckets = "padded", (128, 256)
  return c


def _pass(run, state, steps: int):
  import jax  # pylint: disable=g-import-not-at-top
  from jaxalign.train import loop  # pylint: disable=g-import-not-at-top
  run.data.train.set_state(run.initial_data_state)
  examples, t0 = 0, time.perf_counter()
  for i in range(steps):
    state, metrics, batch = loop.train_step(run, state, i)
    examples += int(batch["example_valid"].sum())
  jax.block_until_ready(state.params)
  return state, time.perf_counter() - t0, examples, float(metrics["loss"])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default=_DEFAULT_DATA)
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--rounds", type=int, default=2)
  args = p.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  from jaxalign import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxalign.train import loop  # pylint: disable=g-import-not-at-top
  runs, states, best = {}, {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in ("old", "new"):
      cfg = config_lib.validate(_config(args.data, args.steps, name == "old"),
                                jax.device_count())
      run = loop.setup(cfg, os.path.join(tmp, name), log=lambda s: None)
      run.initial_data_state = run.data.train.get_state()
      runs[name] = run
      t0 = time.perf_counter()
      states[name], _, _, _ = _pass(run, run.state, args.steps)  # compiles
      print(f"{name}: layout={run.data.layout.kind} buckets={run.data.layout.buckets} "
            f"warm-up pass (with compiles) {time.perf_counter() - t0:.1f} s", flush=True)
    for r in range(args.rounds):
      for name, run in runs.items():
        states[name], secs, n, loss = _pass(run, states[name], args.steps)
        best[name] = min(best.get(name, (1e9,)), (secs, n))
        print(f"round {r + 1} {name}: {n} pairs in {secs:.2f} s = {n / secs:.2f} "
              f"pairs/s (loss {loss:.4f})", flush=True)
  rate = {k: n / s for k, (s, n) in best.items()}
  print(f"\nbest: old {rate['old']:.2f} pairs/s, new {rate['new']:.2f} pairs/s, "
        f"new / old = {rate['new'] / rate['old']:.2f}x on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s)")


if __name__ == "__main__":
  main()
