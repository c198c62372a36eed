"""Data-pipeline throughput on real HH-RLHF pairs: parse, tokenize, truncate, lay out.

Reads the HH-RLHF harmless-base test pairs (``../shared/data``, never copied into the
project) and times, on this machine, each stage over the whole file (best of
``--repeats`` runs, so a neighbour's burst of CPU use does not count):

  parse        gzip + UTF-8 + JSON + validation + HH implicit-prompt split
  tokenize     SentencePiece encode of prompt and both completions + truncation
  layout       batching.iter_batches (padded and prefix_shared), when available
  end_to_end   parse + tokenize + padded layout, in one pass
  grain        the TFDS array_record source -> grain iterator (shuffle, tokenize) ->
               padded layout (the training path; the one-time TFDS build is timed apart)

and prints HH pairs per minute for each, with the ratio to the 20,000 pairs/min
target. All figures come from one run. Tokenizer training (once per dataset) is
timed separately and not part of the per-pair throughput.

Usage:
  .venv/bin/python experiments/bench/data_pipeline.py
  .venv/bin/python experiments/bench/data_pipeline.py --repeats 5 --vocab-size 8000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from jaxalign.data import formats, pipeline, tfds_builder
from jaxalign.data.tokenizer import ChatTemplate, SentencePieceTokenizer

_DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                             "data", "hh-rlhf-harmless-base-test.jsonl.gz")
TARGET_PAIRS_PER_MIN = 20_000


def _parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default=_DEFAULT_DATA)
  p.add_argument("--vocab-size", type=int, default=8000)
  p.add_argument("--max-length", type=int, default=1024)
  p.add_argument("--max-prompt-length", type=int, default=768)
  p.add_argument("--examples-per-batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3)
  return p.parse_args()


def _best(fn, repeats: int):
  best, out = float("inf"), None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t0)
  return best, out


def main() -> None:
  args = _parse_args()
  truncation = formats.Truncation(args.max_length, args.max_prompt_length)
  template = ChatTemplate()
  try:
    from jaxalign.data import batching  # pylint: disable=g-import-not-at-top
  except ImportError:
    batching = None

  def parse():
    return list(formats.iter_text_records(args.data, "hh", on_error="skip"))

  t_parse, records = _best(parse, args.repeats)
  n = len(records)

  t0 = time.perf_counter()
  tok = SentencePieceTokenizer.train((t for r in records for t in (r.prompt, *r.completions)),
                                     vocab_size=args.vocab_size)
  t_train = time.perf_counter() - t0

  def tokenize():
    report = formats.DataReport()
    exs = [formats.tokenize_record(r, tok, truncation=truncation, template=template,
                                   report=report) for r in records]
    return [e for e in exs if e is not None]

  t_tok, examples = _best(tokenize, args.repeats)

  rows = [("parse", t_parse, n), ("tokenize+truncate", t_tok, n)]
  layouts = {}
  if batching is not None:
    buckets = (128, 256, 512, 1024, 2048, 4096)
    layouts = {
        "padded": batching.LayoutConfig("padded", buckets, args.examples_per_batch),
        "prefix_shared": batching.LayoutConfig("prefix_shared", buckets,
                                               args.examples_per_batch),
    }
    for name, cfg in layouts.items():
      t, _ = _best(lambda cfg=cfg: sum(1 for _ in batching.iter_batches(examples, cfg)),
                   args.repeats)
      rows.append((f"layout ({name})", t, len(examples)))

  def end_to_end():
    report = formats.DataReport()
    exs = formats.load_examples(args.data, "hh", tok, on_error="skip", truncation=truncation,
                                report=report, template=template)
    if batching is not None:
      for _ in batching.iter_batches(exs, layouts["padded"]):
        pass
    return report.examples

  t_e2e, n_e2e = _best(end_to_end, args.repeats)
  rows.append(("end_to_end (parse+tok+padded)" if batching else "end_to_end (parse+tok)",
               t_e2e, n_e2e))

  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    sources, _ = tfds_builder.build_data_sources({"train": [args.data]}, "hh", tmp,
                                                 on_error="skip")
    t_build = time.perf_counter() - t0
    tokenize_fn = pipeline.make_tokenize_fn(tok, truncation=truncation, template=template)

    def grain_path():
      it = pipeline.make_example_iterator(sources["train"], tokenize_fn, seed=0,
                                          num_epochs=1)
      if batching is not None:
        return sum(int(b["example_valid"].sum())
                   for b in batching.iter_batches(it, layouts["padded"]))
      return sum(1 for _ in it)

    t_grain, n_grain = _best(grain_path, args.repeats)
  rows.append(("grain (tfds->shuffle->tok" + ("->padded)" if batching else ")"), t_grain,
               n_grain))

  print(f"data: {args.data}")
  print(f"pairs: {n} valid of the file; tokenizer: SentencePiece BPE vocab {tok.vocab_size} "
        f"trained in {t_train:.2f}s (once per dataset, not in the rates below)")
  print(f"truncation: max_length={args.max_length} max_prompt_length={args.max_prompt_length}; "
        f"one-time TFDS array_record build: {t_build:.2f}s; best of {args.repeats} runs")
  if batching is None:
    print("layout step: jaxalign.data.batching not importable, skipped")
  print(f"{'stage':<36}{'seconds':>9}{'pairs':>7}{'pairs/min':>12}{'x target':>10}")
  for name, t, count in rows:
    rate = count / t * 60
    print(f"{name:<36}{t:>9.3f}{count:>7}{rate:>12,.0f}{rate / TARGET_PAIRS_PER_MIN:>10.1f}")


if __name__ == "__main__":
  main()
