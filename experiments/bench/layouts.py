"""Tokens per pair and pad waste of the batch layouts on real HH-RLHF pairs.

Tokenizes the HH-RLHF harmless-base test pairs (``../shared/data``, never copied into
the project) with the project's parser and a tokenizer (a SentencePiece model trained
here on the same file, or UTF-8 bytes), then lays the whole epoch out with each layout
and reports, per pair: row slots (R * L, what the model computes over), real tokens,
pad fraction, distinct batch shapes, and the host time to build the batches. All
figures in one table come from one run, so their ratios are meaningful.

With ``--forward N`` it also times a jitted ``forward + sequence_logps`` of a
Llama-shaped model over the first N batches of each layout (after one warm-up per
shape) and reports the time per pair relative to the padded layout.

Usage:
  .venv/bin/python experiments/bench/layouts.py
  .venv/bin/python experiments/bench/layouts.py --tokenizer byte --buckets 256,512,1024,2048
  .venv/bin/python experiments/bench/layouts.py --forward 4
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from jaxalign.data import batching
from jaxalign.data.batching import LayoutConfig

_DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                             "data", "hh-rlhf-harmless-base-test.jsonl.gz")


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default=_DEFAULT_DATA)
  parser.add_argument("--tokenizer", default="spm", choices=["spm", "byte"])
  parser.add_argument("--vocab-size", type=int, default=8000, help="for --tokenizer spm")
  parser.add_argument("--buckets", default="128,256,512,1024")
  parser.add_argument("--max-prompt-length", type=int, default=768)
  parser.add_argument("--examples-per-batch", type=int, default=8)
  parser.add_argument("--packed-rows", type=int, default=6,
                      help="rows_per_batch of the packed layout (16 sequences per batch)")
  parser.add_argument("--prefix-rows", type=int, default=4,
                      help="rows_per_batch of the packed prefix-shared layout")
  parser.add_argument("--forward", type=int, default=0,
                      help="time model forward + sequence_logps over this many batches")
  parser.add_argument("--model", default="small_30m", choices=["tiny", "small_30m"])
  return parser.parse_args()


def _load(args):
  from jaxalign.data import formats, tokenizer as tok
  buckets = tuple(int(b) for b in args.buckets.split(","))
  t0 = time.perf_counter()
  if args.tokenizer == "byte":
    tokenizer = tok.ByteTokenizer()
  else:
    records = list(formats.iter_text_records(args.data, "hh", on_error="skip"))
    texts = [r.prompt for r in records] + [c for r in records for c in r.completions]
    tokenizer = tok.SentencePieceTokenizer.train(texts, vocab_size=args.vocab_size)
  truncation = formats.Truncation(max_length=buckets[-1],
                                  max_prompt_length=args.max_prompt_length)
  report = formats.DataReport()
  examples = formats.load_examples(args.data, "hh", tokenizer, truncation=truncation,
                                   on_error="skip", report=report)
  print(f"loaded {len(examples)} pairs in {time.perf_counter() - t0:.1f}s "
        f"(tokenizer {args.tokenizer}, vocab {tokenizer.vocab_size}); {report.summary()}")
  return examples, buckets, tokenizer.vocab_size


def _layouts(args, buckets):
  n = args.examples_per_batch
  # Truncation bounds each sequence by the largest bucket; a prefix-shared unit holds
  # the prompt and both completions, so it needs one more, doubled bucket.
  prefix_buckets = buckets + (2 * buckets[-1],)
  return {
      "padded": LayoutConfig("padded", buckets, n),
      "packed": LayoutConfig("packed", buckets, n, rows_per_batch=args.packed_rows),
      "prefix_shared": LayoutConfig("prefix_shared", prefix_buckets, n),
      "prefix_packed": LayoutConfig("prefix_shared", prefix_buckets, n,
                                    rows_per_batch=args.prefix_rows),
  }


def _time_forward(batches, model_cfg, num_seqs):
  import jax
  import jax.numpy as jnp
  from jaxalign.models import transformer
  from jaxalign.ops.logprobs import sequence_logps

  graphdef, params = transformer.init(model_cfg, jax.random.key(0))

  @jax.jit
  def step(params, batch):
    hidden, unembed = transformer.forward(
        graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"],
        batch["branch_ids"])
    return sequence_logps(hidden, unembed, batch, num_seqs, chunk_size=2048)

  keys = ("tokens", "positions", "segment_ids", "branch_ids", "logit_pos", "targets",
          "seq_ids")
  warmed = set()
  total = 0.0
  pairs = 0
  for b in batches:
    arrays = {k: jnp.asarray(b[k]) for k in keys}
    shape = b["tokens"].shape
    if shape not in warmed:
      jax.block_until_ready(step(params, arrays))
      warmed.add(shape)
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, arrays))
    total += time.perf_counter() - t0
    pairs += int(b["example_valid"].sum())
  return total / max(pairs, 1)


def main() -> None:
  args = _parse_args()
  examples, buckets, vocab = _load(args)
  lengths = np.array([[e.prompt.size, e.chosen.size, e.rejected.size] for e in examples])
  print(f"tokens per pair: prompt mean {lengths[:, 0].mean():.0f}, chosen "
        f"{lengths[:, 1].mean():.0f}, rejected {lengths[:, 2].mean():.0f}")
  layouts = _layouts(args, buckets)
  print(f"{'layout':<15}{'R':>4}{'slots/pair':>12}{'real/pair':>11}{'pad %':>8}"
        f"{'shapes':>8}{'batches':>9}{'build s':>9}")
  all_batches = {}
  rows = {}
  for name, cfg in layouts.items():
    t0 = time.perf_counter()
    batches = list(batching.iter_batches(examples, cfg))
    build = time.perf_counter() - t0
    shapes = {batching.batch_shape(b) for b in batches}
    total = sum(b["tokens"].size for b in batches)
    real = sum(int(np.count_nonzero(b["segment_ids"])) for b in batches)
    n = sum(int(b["example_valid"].sum()) for b in batches)
    assert n == len(examples)
    rows[name] = total / n
    r = batches[0]["tokens"].shape[0]
    print(f"{name:<15}{r:>4}{total / n:>12.1f}{real / n:>11.1f}"
          f"{100 * (total - real) / total:>8.1f}{len(shapes):>8}{len(batches):>9}"
          f"{build:>9.2f}")
    all_batches[name] = batches
  print("slots per pair relative to padded: " + ", ".join(
      f"{k} {v / rows['padded']:.3f}" for k, v in rows.items()))

  if args.forward:
    from jaxalign.models import transformer
    import jax
    make = getattr(transformer.TransformerConfig, args.model)
    model_cfg = make(vocab_size=vocab)
    print(f"forward + sequence_logps ({args.model}, vocab {vocab}, "
          f"{jax.devices()[0].platform}), first {args.forward} batches per layout:")
    per_pair = {}
    for name, batches in all_batches.items():
      per_pair[name] = _time_forward(batches[:args.forward], model_cfg,
                                     batches[0]["seq_last"].shape[0])
    for name, t in per_pair.items():
      print(f"  {name:<15} {1e3 * t:8.2f} ms/pair   x{t / per_pair['padded']:.3f} of padded")


if __name__ == "__main__":
  main()
