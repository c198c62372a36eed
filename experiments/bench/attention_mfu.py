"""Tokens/s and MFU of a DPO step per attention implementation (issue 20).

The step: policy forward + backward on the chosen and rejected rows (one batch of 2P
rows of T tokens, padded layout, plain causal), a reference forward (no gradient), the
DPO loss -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) over summed token
log-probs (`ops.token_logprobs`). Each implementation in --impls is jitted once, and the
timed steps alternate between them round by round (ABAB...), so a drift in the machine's
speed reaches every implementation alike; each figure is the best round's.

Model FLOPs per step (as docs/benchmarks.md's "Model FLOP/s"; no remat counted):
  policy fwd + bwd:  6 * P_nonembed * tokens + 12 * L * B * T^2 * H * K / 2 (causal half)
                     + 6 * tokens * D * V
  reference fwd:     2 * P_nonembed * tokens +  4 * L * B * T^2 * H * K / 2 + 2 * tokens * D * V
MFU = model FLOPs / step time / --peak-tflops (the accelerator's dense peak in the
step's dtype: H100 SXM bf16 989 TFLOP/s, A100 312, v5p 459).

  # a 1B-class Llama (d 2048, 16 layers, 32 / 8 heads, mlp 8192, vocab 128256), bf16:
  python experiments/bench/attention_mfu.py --impls xla,cudnn --peak-tflops 989
  # CPU smoke run of the same code (the cudnn wrapper through jax.nn's xla):
  python experiments/bench/attention_mfu.py --tiny --impls xla,cudnn:xla --dtype float32
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--impls", default="xla,cudnn")
  p.add_argument("--pairs", type=int, default=8, help="pairs per step (2x rows)")
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--remat", default="full")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--peak-tflops", type=float, default=0.0)
  p.add_argument("--tiny", action="store_true", help="a test-sized model (CPU smoke run)")
  return p.parse_args()


def _config(args, impl):
  from jaxalign.models import transformer as tfm  # pylint: disable=g-import-not-at-top
  if args.tiny:
    return tfm.TransformerConfig.tiny(dtype=args.dtype, remat=args.remat,
                                      attention_impl=impl)
  return tfm.TransformerConfig(
      vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
      head_dim=64, mlp_dim=8192, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True,
      dtype=args.dtype, remat=args.remat, attention_impl=impl)


def _model_flops(cfg, rows, t) -> float:
  p = cfg.n_layers * (cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
                      + 3 * cfg.d_model * cfg.mlp_dim)
  tokens = rows * t
  attn = cfg.n_layers * rows * t * t * cfg.n_heads * cfg.head_dim / 2
  head = tokens * cfg.d_model * cfg.vocab_size
  return (6 * p * tokens + 12 * attn + 6 * head) + (2 * p * tokens + 4 * attn + 2 * head)


def _step(cfg, beta=0.1):
  """loss(params, ref_params, tokens, positions, graphdef): DPO on rows [chosen; rejected]."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxalign.models import transformer as tfm  # pylint: disable=g-import-not-at-top
  from jaxalign.ops import logprobs  # pylint: disable=g-import-not-at-top

  def seq_logps(graphdef, params, tokens, positions):
    hidden, unembed = tfm.forward(graphdef, params, tokens, positions)
    lp = logprobs.token_logprobs(hidden[:, :-1], unembed, tokens[:, 1:])
    return jnp.sum(lp, axis=-1)

  def loss(params, ref_params, tokens, positions, graphdef):
    pi = seq_logps(graphdef, params, tokens, positions)
    ref = jax.lax.stop_gradient(seq_logps(graphdef, ref_params, tokens, positions))
    margin = (pi - ref).reshape(2, -1)
    return -jnp.mean(jax.nn.log_sigmoid(beta * (margin[0] - margin[1])))

  return loss


def main():
  args = _args()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxalign.models import transformer as tfm  # pylint: disable=g-import-not-at-top
  impls = args.impls.split(",")
  t = 128 if args.tiny else args.seq
  rows = 2 * args.pairs
  cfgs = {impl: _config(args, impl) for impl in impls}
  graphdef, params = tfm.init(cfgs[impls[0]], jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (rows, t), 0, cfgs[impls[0]].vocab_size)
  positions = jnp.broadcast_to(jnp.arange(t), (rows, t))
  steps = {}
  for impl, cfg in cfgs.items():
    gd = tfm.init(cfg, jax.random.key(0))[0] if impl != impls[0] else graphdef
    loss = _step(cfg)
    fn = jax.jit(jax.value_and_grad(lambda p, r, tk, ps, gd=gd, loss=loss: loss(p, r, tk, ps,
                                                                                gd)))
    jax.block_until_ready(fn(params, params, tokens, positions))  # compile + warm up
    steps[impl] = fn
  best = {impl: float("inf") for impl in impls}
  for _ in range(args.rounds):
    for impl in impls:
      t0 = time.perf_counter()
      jax.block_until_ready(steps[impl](params, params, tokens, positions))
      best[impl] = min(best[impl], time.perf_counter() - t0)
  flops = _model_flops(cfgs[impls[0]], rows, t)
  print(f"backend {jax.default_backend()}, {rows} rows x {t} tokens, dtype {args.dtype}, "
        f"remat {args.remat}, model {flops / 1e12:.2f} TFLOP/step")
  for impl in impls:
    tflops = flops / best[impl] / 1e12
    mfu = f", MFU {100 * tflops / args.peak_tflops:.1f}%" if args.peak_tflops else ""
    print(f"  {impl:18s} {best[impl] * 1e3:9.1f} ms/step  {rows * t / best[impl]:10.0f} "
          f"tokens/s  {tflops:8.2f} TFLOP/s{mfu}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__)))))
  main()
