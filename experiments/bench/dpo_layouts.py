"""DPO train-step throughput per batch layout, on real HH-RLHF pairs.

One run, one model, one machine; four configurations of the same jitted
``steps.train_step`` (DPO, beta 0.1, SGD):

  1. padded + live reference      (baseline: one row per sequence, reference forward
                                   inside the step)
  2. packed + live reference      (sequences packed first-fit-decreasing into rows)
  3. prefix-shared + live ref.    (prompt once, chosen / rejected as branches,
                                   units packed into rows)
  4. prefix-shared + cached ref.  (reference sums precomputed once by
                                   ``refcache.build_or_load``; the step runs no
                                   reference forward; the one-off precompute is
                                   timed and reported separately)

Reported per configuration: DPO pairs/s over the same sampled pairs (every distinct
batch shape is compiled and warmed up before timing), the speed-up over the padded
baseline, computed row slots per pair, and achieved model FLOP/s as a fraction of a
matmul peak measured in the same run (best of several f32 ``jnp.dot`` 1024^3). Model
FLOPs count useful work only (real tokens, not padding): policy forward + backward
``6 * P_nonembed * real_tokens + 6 * d * V * scored_tokens``, plus the live reference
forward ``2 * P_nonembed * real_tokens + 2 * d * V * scored_tokens``; attention's
T^2 terms are not counted. The CPU may be shared with other jobs: compare ratios
within one run, not absolute numbers across runs.

Usage:
  .venv/bin/python experiments/bench/dpo_layouts.py
  .venv/bin/python experiments/bench/dpo_layouts.py --pairs 32 --model tiny
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time

import numpy as np

_DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                             "data", "hh-rlhf-harmless-base-test.jsonl.gz")


def _parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default=_DEFAULT_DATA)
  p.add_argument("--pairs", type=int, default=64,
                 help="pairs sampled (fixed seed) from the file and timed per layout")
  p.add_argument("--examples-per-batch", type=int, default=8)
  p.add_argument("--buckets", default="128,256,512")
  p.add_argument("--max-prompt-length", type=int, default=384)
  p.add_argument("--packed-rows", type=int, default=6)
  p.add_argument("--prefix-rows", type=int, default=4)
  p.add_argument("--vocab-size", type=int, default=8000)
  p.add_argument("--model", default="small", choices=["tiny", "small"])
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args()


def _load(args):
  from jaxalign.data import formats
  from jaxalign.data import tokenizer as tok
  buckets = tuple(int(b) for b in args.buckets.split(","))
  records = list(formats.iter_text_records(args.data, "hh", on_error="skip"))
  texts = [r.prompt for r in records] + [c for r in records for c in r.completions]
  tokenizer = tok.SentencePieceTokenizer.train(texts, vocab_size=args.vocab_size)
  truncation = formats.Truncation(max_length=buckets[-1],
                                  max_prompt_length=args.max_prompt_length)
  examples = formats.load_examples(args.data, "hh", tokenizer, truncation=truncation,
                                   on_error="skip")
  rng = np.random.default_rng(args.seed)
  picked = [examples[i] for i in rng.permutation(len(examples))[:args.pairs]]
  return picked, buckets, tokenizer


def _matmul_peak(n: int = 1024, reps: int = 10) -> float:
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, a))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, a))
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def main() -> None:
  args = _parse_args()
  import jax
  import optax
  from jaxalign.data import batching
  from jaxalign.losses import dpo
  from jaxalign.models import transformer as tr
  from jaxalign.parallel import mesh as ml
  from jaxalign.train import objectives as ob
  from jaxalign.train import refcache
  from jaxalign.train import state as st
  from jaxalign.train import steps

  t0 = time.perf_counter()
  examples, buckets, tokenizer = _load(args)
  print(f"data: {len(examples)} HH pairs sampled (seed {args.seed}), SentencePiece "
        f"vocab {tokenizer.vocab_size}, loaded in {time.perf_counter() - t0:.1f}s")
  if args.model == "tiny":
    cfg = tr.TransformerConfig.tiny(vocab_size=tokenizer.vocab_size)
  else:
    cfg = tr.TransformerConfig(vocab_size=tokenizer.vocab_size, d_model=256,
                               n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=768,
                               tie_embeddings=True)
  n = args.examples_per_batch
  prefix_buckets = buckets + (2 * buckets[-1],)
  layouts = {
      "padded": batching.LayoutConfig("padded", buckets, n),
      "packed": batching.LayoutConfig("packed", buckets, n,
                                      rows_per_batch=args.packed_rows),
      "prefix_shared": batching.LayoutConfig("prefix_shared", prefix_buckets, n,
                                             rows_per_batch=args.prefix_rows),
  }
  batches = {name: list(batching.iter_batches(examples, lay))
             for name, lay in layouts.items()}

  graphdefs = []
  jax.eval_shape(lambda k: graphdefs.append(tr.init(cfg, k)[0]), jax.random.key(0))
  init_fn = lambda k: tr.init(cfg, k)[1]
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  p_all = tr.param_count(abstract)
  p_embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  p_nonembed = p_all - p_embed
  print(f"model: d {cfg.d_model}, {cfg.n_layers} layers, vocab {cfg.vocab_size}: "
        f"{p_all / 1e6:.2f}M params ({p_nonembed / 1e6:.2f}M non-embedding)")

  mesh = ml.make_mesh(ml.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  opt = optax.sgd(1e-3)
  forward_fn = ob.model_forward_fn(graphdefs[0])
  chunk = 1024
  loss_fn = functools.partial(dpo, beta=0.1)
  ref_params = jax.jit(init_fn)(jax.random.key(7))

  peak = _matmul_peak()
  print(f"matmul peak (f32 1024^3, best of 10): {peak / 1e9:.1f} GFLOP/s")

  def flops(batch, live_ref):
    real = int(np.count_nonzero(batch["segment_ids"]))
    scored = int(np.count_nonzero(batch["seq_ids"] >= 0))
    mult = 8 if live_ref else 6
    return mult * (p_nonembed * real + cfg.d_model * cfg.vocab_size * scored)

  def run(name, layout_batches, live_ref):
    objective = ob.make_objective("pairwise", loss_fn=loss_fn, forward_fn=forward_fn,
                                  needs_reference=True, chunk_size=chunk)
    state, shs = st.init_train_state(init_fn, opt, tr.logical_axes(cfg), mesh,
                                     jax.random.key(1))
    step = steps.make_train_step(
        objective=objective, optimizer=opt, mesh=mesh, state_shardings=shs,
        ref_shardings=shs.params if live_ref else None,
        batch_ndims=steps.batch_signature(layout_batches[0]))
    ref = ref_params if live_ref else None
    t0 = time.perf_counter()
    seen = set()
    for b in layout_batches:  # compile + warm every distinct shape, untimed
      shape = batching.batch_shape(b)
      if shape not in seen:
        seen.add(shape)
        state, m = step(state, ref, b)
        jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in layout_batches:
      state, m = step(state, ref, b)
    jax.block_until_ready(state.params)
    dt = time.perf_counter() - t0
    pairs = sum(int(b["example_valid"].sum()) for b in layout_batches)
    slots = sum(b["tokens"].size for b in layout_batches)
    fl = sum(flops(b, live_ref) for b in layout_batches)
    return {"name": name, "pairs_s": pairs / dt, "seconds": dt,
            "slots_per_pair": slots / pairs, "flops_s": fl / dt,
            "shapes": len(seen), "compile_s": compile_s}

  results = [
      run("padded + live reference", batches["padded"], True),
      run("packed + live reference", batches["packed"], True),
      run("prefix-shared + live reference", batches["prefix_shared"], True),
  ]
  logprob = jax.jit(functools.partial(steps.logprob_step, forward_fn=forward_fn,
                                      chunk_size=chunk))
  with tempfile.TemporaryDirectory() as tmp:
    key = refcache.cache_key(reference="bench-seed-7",
                             tokenizer=refcache.fingerprint_tokenizer(tokenizer),
                             data=refcache.fingerprint_files([args.data]),
                             layout=layouts["prefix_shared"], pairs=args.pairs,
                             seed=args.seed)
    t0 = time.perf_counter()
    cache, _ = refcache.build_or_load(tmp, key, lambda: batches["prefix_shared"],
                                      lambda: ref_params, logprob)
    precompute_s = time.perf_counter() - t0
  cached = [cache.attach(b) for b in batches["prefix_shared"]]
  results.append(run("prefix-shared + cached reference", cached, False))

  base = results[0]["pairs_s"]
  print(f"\n{'configuration':34s} {'pairs/s':>8s} {'x padded':>8s} "
        f"{'slots/pair':>10s} {'GFLOP/s':>8s} {'/ peak':>7s} {'shapes':>6s}")
  for r in results:
    print(f"{r['name']:34s} {r['pairs_s']:8.2f} {r['pairs_s'] / base:8.2f} "
          f"{r['slots_per_pair']:10.0f} {r['flops_s'] / 1e9:8.1f} "
          f"{r['flops_s'] / peak:7.2f} {r['shapes']:6d}")
  print(f"\nreference precompute (one-off, {len(batches['prefix_shared'])} batches, "
        f"incl. compile): {precompute_s:.1f}s; compile+warm-up per configuration: "
        + ", ".join(f"{r['compile_s']:.0f}s" for r in results))


if __name__ == "__main__":
  main()
