"""Rollout throughput of the KV-cache sampler and a PPO iteration's time split.

Part 1: tokens/s of `jaxalign.models.sampling.Sampler` (jitted prefill + while_loop
decode over a donated KV cache) against `generate_uncached` (the same sampling rule,
re-running the full transformer forward over the [B, P + N] buffer at every step),
same model, same params, same prompts, for several batch sizes. EOS is disabled so every
row generates exactly N tokens in both. Each figure is the best of ``--repeats`` timed
calls after one warm-up (compile) call; ratios are within one run.

Part 2: a PPO iteration on the tiny ground-truth config (`experiments/ppo.py:tiny`)
split into generation (sampler), scoring (policy / reference / value forwards + the
oracle + GAE) and update (epochs x minibatches of the jitted PPO step), averaged over
iterations after the first (which compiles).

Usage:
  .venv/bin/python experiments/bench/sampling.py
  .venv/bin/python experiments/bench/sampling.py --batches 1,8,32 --new 64 --ppo-iters 6
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import config as config_lib
from jaxalign.models import sampling
from jaxalign.models import transformer as tfm


def _parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--prompt", type=int, default=64, help="prompt bucket P")
  p.add_argument("--new", type=int, default=64, help="new tokens N")
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--vocab", type=int, default=512)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--ppo-iters", type=int, default=6)
  return p.parse_args()


def _best(fn, repeats):
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def bench_sampler(args) -> None:
  cfg = tfm.TransformerConfig(vocab_size=args.vocab, d_model=args.d_model,
                              n_layers=args.layers, n_heads=8, n_kv_heads=4,
                              mlp_dim=3 * args.d_model, tie_embeddings=True)
  graphdef, params = tfm.init(cfg, jax.random.key(0))
  print(f"model: d {cfg.d_model}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, "
        f"{tfm.param_count(params) / 1e6:.2f}M params; P={args.prompt}, N={args.new}, "
        f"devices={jax.device_count()} ({jax.devices()[0].platform})")
  scfg = sampling.SamplingConfig(max_new_tokens=args.new, temperature=1.0, eos_id=-1)
  print("| batch | cached tok/s | re-forward tok/s | cached / re-forward | cached tok/s "
        "vs batch 1 |")
  print("| ---: | ---: | ---: | ---: | ---: |")
  base = None
  for b in [int(x) for x in args.batches.split(",")]:
    rng = np.random.default_rng(b)
    lens = rng.integers(args.prompt // 2, args.prompt + 1, size=b).astype(np.int32)
    prompts = np.zeros((b, args.prompt), np.int32)
    for i, l in enumerate(lens):
      prompts[i, args.prompt - l:] = rng.integers(4, args.vocab, l)
    sampler = sampling.Sampler(cfg, scfg, batch=b, prompt_len=args.prompt)
    key = jax.random.key(1)
    t_cached = _best(lambda: sampler(params, prompts, lens, key).tokens, args.repeats)
    uncached = jax.jit(lambda p, x, l, k: sampling.generate_uncached(graphdef, p, scfg, x,
                                                                     l, k))
    px, pl = jnp.asarray(prompts), jnp.asarray(lens)
    t_full = _best(lambda: uncached(params, px, pl, key)[0], args.repeats)
    tokens = b * args.new
    base = base or tokens / t_cached
    print(f"| {b} | {tokens / t_cached:,.0f} | {tokens / t_full:,.0f} | "
          f"{t_full / t_cached:.1f}x | {tokens / t_cached / base:.1f}x |", flush=True)


def bench_ppo(args) -> None:
  from jaxalign.train import rl  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), "..", "ppo.py")
  # The config imports experiments._common; this script's own folder is sys.path[0].
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
  spec = importlib.util.spec_from_file_location("ppo_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("tiny")
  c.num_steps = args.ppo_iters
  c.log.progress_bar = False
  c.log.tensorboard = False
  with tempfile.TemporaryDirectory() as d:
    res = rl.run_rl(c, d, log=lambda s: None)
  hist = res.history[1:]
  parts = {k: float(np.mean([h[f"time/{k}"] for h in hist]))
           for k in ("generate", "score", "update")}
  total = sum(parts.values())
  cfgv = config_lib.validate_rl(c, jax.device_count())[1]
  rows = c.data.batch_size * cfgv.group_size
  print(f"\nPPO iteration (experiments/ppo.py:tiny, {rows} rollouts x {cfgv.max_new_tokens} "
        f"new tokens, {cfgv.ppo_epochs} epochs x {cfgv.num_minibatches} minibatches), "
        f"mean of iterations 2..{args.ppo_iters}:")
  print("| part | seconds | share |")
  print("| --- | ---: | ---: |")
  for k, v in parts.items():
    print(f"| {k} | {v:.4f} | {100 * v / total:.0f}% |")
  print(f"| total | {total:.4f} | 100% |")


def main() -> None:
  args = _parse_args()
  bench_sampler(args)
  if args.ppo_iters > 1:
    bench_ppo(args)


if __name__ == "__main__":
  main()
