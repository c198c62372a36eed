"""Validate a record file and print its statistics: what training would see.

    python -m jaxalign.data [FILE ...] --config experiments/NAME.py[:arg] [--json]
    python -m jaxalign.data FILE [FILE ...] --format {sft,pairwise,hh,unpaired,ranked,prompt}
        [--tokenizer byte | auto | CHECKPOINT_DIR | MODEL | train] [--hf-path DIR]
        [--vocab-size N] [--max-length N] [--max-prompt-length N] [--on-error raise|skip]
        [--examples-per-batch N] [--json]

With ``--config`` (the argument ``jaxalign.main`` takes, e.g.
``experiments/dpo.py:hh,path=/data/hh.jsonl.gz``) everything comes from the validated
config, exactly as training reads it: the files (``data.path``, unless FILEs are
given), format, tokenizer (``data.tokenizer``, ``auto`` = ``model.hf_path``'s),
truncation, ``on_error``, and the training batch layout (the loss's examples, the
layout, buckets and examples per batch); the other options then are not allowed.
Without it, options are spelled as the config spells them (``--tokenizer byte``;
``--max_length`` works as well as ``--max-length``) and default to training's
defaults: the tokenizer is ``auto`` (``--hf-path``'s own, else ``byte``); ``--tokenizer
train`` (or a ``--vocab-size``) trains a SentencePiece on the file instead.
A WARNING line says when more than a quarter of the examples lose completion tokens
to truncation (as training's log does).

FILE is ``.jsonl``, ``.jsonl.gz`` or ``.parquet`` (formats: ``jaxalign.data.formats``).
Prints record / example counts, errors by reason (with the first few locations),
truncation counts, token-length statistics (prompt / completion / total per sequence:
mean, p50, p95, max) before and after truncation, the conversational share of the
records and the scored share of SFT completion tokens (a multi-turn conversation
scores only its assistant turns), and, for each batch layout of
``jaxalign.data.batching``, tokens per example and the pad fraction (not for
``prompt`` records, which online RL completes by sampling). Exit status: 0 ok, 1 when
``--on-error raise`` met a bad record, 2 for bad arguments, configs or unreadable
files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxalign.data import formats
from jaxalign.data.examples import PairExample, PromptExample, RankedExample, SFTExample
from jaxalign.data import tokenizer as tokenizer_lib
from jaxalign.data.tokenizer import ByteTokenizer, ChatTemplate, SentencePieceTokenizer


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
  """mean, p50, p95 (linear interpolation, numpy's default), max; zeros when empty."""
  if not len(lengths):
    return {"count": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
  arr = np.asarray(lengths, dtype=np.float64)
  return {"count": int(arr.size), "mean": float(arr.mean()),
          "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
          "max": int(arr.max())}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m jaxalign.data", description=__doc__.split("\n")[0])
  p.add_argument("files", nargs="*", metavar="FILE",
                 help=".jsonl, .jsonl.gz or .parquet record files (default with --config: "
                      "its data.path)")
  p.add_argument("--config", default=None,
                 help="an experiment config as jaxalign.main takes it "
                      "(experiments/dpo.py:hh,path=...): its data settings, exactly")
  p.add_argument("--format", default=None, choices=formats.FORMATS)
  p.add_argument("--tokenizer", default=None,
                 help="as config.data.tokenizer: 'auto' (default: --hf-path's tokenizer, "
                      "else 'byte'), 'byte', a checkpoint directory (tokenizer.json + chat "
                      "template) or a SentencePiece .model file; or 'train' to train a "
                      "SentencePiece on the file(s)")
  p.add_argument("--hf-path", "--hf_path", dest="hf_path", default="",
                 help="as config.model.hf_path: whose tokenizer 'auto' means")
  p.add_argument("--vocab-size", "--vocab_size", dest="vocab_size", type=int, default=None,
                 help="vocabulary of a trained tokenizer (implies --tokenizer train when "
                      "--tokenizer is absent; default 8000)")
  p.add_argument("--max-length", "--max_length", dest="max_length", type=int, default=None)
  p.add_argument("--max-prompt-length", "--max_prompt_length", dest="max_prompt_length",
                 type=int, default=None)
  p.add_argument("--on-error", "--on_error", dest="on_error", choices=("raise", "skip"),
                 default=None, help="default: raise")
  p.add_argument("--examples-per-batch", "--examples_per_batch", dest="examples_per_batch",
                 type=int, default=None, help="N for the batch layout statistics (default 8)")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  return p


_CONFIG_OWNS = ("format", "tokenizer", "vocab_size", "max_length", "max_prompt_length",
                "on_error", "examples_per_batch")


def _load_config(spec: str):
  """The validated `Config` of an experiment spec (as ``jaxalign.main --config``), on
  as many devices as its mesh asks for (no device is touched)."""
  import sys as sys_lib  # pylint: disable=g-import-not-at-top,reimported
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if root not in sys_lib.path:
    sys_lib.path.insert(0, root)  # experiment files import `experiments._common`
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
  from jaxalign import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    raw = config_flags.ConfigFileFlagParser("config", lock_config=False).parse(spec)
  except Exception as e:  # pylint: disable=broad-except
    while (e.__cause__ or e.__context__) is not None:
      e = e.__cause__ or e.__context__
    raise ValueError(f"--config {spec}: {str(e).strip().splitlines()[-1]}") from None
  if not hasattr(raw, "keys"):
    raise ValueError(f"--config {spec}: cannot load it ({raw}).")
  mesh = raw.get("mesh", {})
  devices = 1
  for axis in ("data", "fsdp", "tensor"):
    devices *= max(int(mesh.get(axis, 1)), 1)
  return config_lib.validate(raw, devices)


def resolve_args(args: argparse.Namespace) -> tuple[argparse.Namespace, Any]:
  """Fills the options from ``--config`` (or training's defaults); returns (args, cfg)."""
  cfg = None
  if args.config:
    given = [f"--{k.replace('_', '-')}" for k in _CONFIG_OWNS if getattr(args, k) is not None]
    if given or args.hf_path:
      raise ValueError(f"{', '.join(given + (['--hf-path'] if args.hf_path else []))}: set "
                       "by --config; drop them (or change the config).")
    cfg = _load_config(args.config)
    d = cfg.data
    if d.source != "file":
      raise ValueError(f"--config {args.config}: data.source={d.source!r}; only file "
                       "data can be described.")
    from jaxalign.train import build  # pylint: disable=g-import-not-at-top
    args.files = args.files or [d.path] + ([d.eval_path] if d.eval_path else [])
    args.format, args.on_error = d.format, d.on_error
    args.tokenizer = build.tokenizer_spec(d.tokenizer, cfg.model.hf_path)
    args.max_length, args.max_prompt_length = d.max_length or None, d.max_prompt_length or None
    args.examples_per_batch = d.batch_size // d.micro_batches
  if not args.files or not args.format:
    raise ValueError("give FILE(s) and --format, or --config EXPERIMENT.")
  if args.tokenizer is None:
    args.tokenizer = "train" if args.vocab_size else (args.hf_path or "byte")
  if args.tokenizer == "auto":
    args.tokenizer = args.hf_path or "byte"
  args.vocab_size = args.vocab_size or 8000
  args.on_error = args.on_error or "raise"
  args.examples_per_batch = args.examples_per_batch or 8
  args.resolved = True
  return args, cfg


def _layout_stats(examples: list, max_unit: int,
                  examples_per_batch: int) -> dict[str, Any]:
  try:
    from jaxalign.data import batching  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {"unavailable": "jaxalign.data.batching is not importable"}
  top = 64
  while top < max_unit:
    top *= 2
  buckets = tuple(2 ** k for k in range(6, top.bit_length()))
  configs = {
      "padded": batching.LayoutConfig("padded", buckets, examples_per_batch),
      "packed": batching.LayoutConfig("packed", buckets, examples_per_batch,
                                      rows_per_batch=examples_per_batch),
      "prefix_shared": batching.LayoutConfig("prefix_shared", buckets, examples_per_batch),
  }
  out: dict[str, Any] = {}
  for name, cfg in configs.items():
    try:
      stats = batching.epoch_stats(examples, cfg)
    except ValueError as e:
      out[name] = {"error": str(e)}
      continue
    out[name] = {k: stats[k] for k in ("batches", "distinct_shapes", "tokens_per_example",
                                       "real_tokens_per_example", "pad_fraction")}
    out[name]["rows_per_batch"] = cfg.rows_per_batch
    out[name]["buckets"] = list(buckets)
  return out


def _tokenizer_for(args: argparse.Namespace,
                   records: Sequence[formats.TextRecord]) -> tuple[Any, str]:
  """The tokenizer --tokenizer names (or one trained on the records) and a line saying which."""
  if args.tokenizer == "train" and not records:
    return ByteTokenizer(), "none trained: no valid records (byte tokenizer used)"
  if args.tokenizer == "train":
    texts = (t for r in records for t in (r.prompt, *r.completions))
    tok = SentencePieceTokenizer.train(texts, vocab_size=args.vocab_size)
    return tok, (f"trained on the input: SentencePiece BPE, vocab {tok.vocab_size} "
                 f"(asked {args.vocab_size})")
  if args.tokenizer in ("bytes", "byte"):  # 'byte', as configs spell it ('bytes' too)
    return ByteTokenizer(), "byte (UTF-8 bytes + 4), as training uses by default"
  if os.path.isdir(args.tokenizer):
    tok = tokenizer_lib.from_pretrained(args.tokenizer)
    return tok, (f"{args.tokenizer}: the checkpoint's {type(tok).__name__} (vocab "
                 f"{tok.vocab_size}) and chat template")
  tok = SentencePieceTokenizer.from_file(args.tokenizer)
  return tok, f"{args.tokenizer} (vocab {tok.vocab_size})"


class _Tokenized(NamedTuple):
  examples: list[Any]
  raw: dict[str, list[int]]  # lengths before truncation
  final: dict[str, list[int]]  # lengths of the kept, truncated examples
  scored: int  # SFT completion tokens the loss mask scores
  completion_tokens: int  # all SFT completion tokens


def _tokenize_all(records: Sequence[formats.TextRecord], tok: Any, template: ChatTemplate,
                  truncation: formats.Truncation, report: formats.DataReport) -> _Tokenized:
  raw = {"prompt": [], "completion": [], "total": []}
  final = {"prompt": [], "completion": [], "total": []}
  examples = []
  scored = completion_tokens = 0
  for record in records:
    enc = formats.encode_record(record, tok, template)
    _add_lengths(raw, enc.prompt, enc.completions)
    ex = formats.truncate_encoded(record, enc.prompt, enc.completions, truncation,
                                  bos_id=tok.bos_id, report=report,
                                  loss_masks=enc.loss_masks)
    if ex is None:
      continue
    examples.append(ex)
    _add_lengths(final, ex.prompt, _completions(ex))
    if isinstance(ex, SFTExample):
      completion_tokens += len(ex.completion)
      scored += len(ex.completion) if ex.loss_mask is None else int(ex.loss_mask.sum())
  return _Tokenized(examples, raw, final, scored, completion_tokens)


def _layouts_for(examples: Sequence[Any], examples_per_batch: int) -> dict[str, Any]:
  if examples and isinstance(examples[0], PromptExample):
    return {"note": "prompt records are not laid out: online RL samples their "
                    "completions"}
  if examples:
    max_unit = max(len(e.prompt) + sum(len(c) for c in _completions(e)) for e in examples)
    return _layout_stats(examples, max_unit, examples_per_batch)
  return {}


def _training_layout(cfg: Any, examples: Sequence[Any]) -> dict[str, Any]:
  """Statistics of the batches training would lay out (``--config``): the loss's
  examples in the config's layout, buckets and examples per batch."""
  from jaxalign import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxalign.data import batching  # pylint: disable=g-import-not-at-top
  from jaxalign.train import stream  # pylint: disable=g-import-not-at-top
  kind = "reward" if cfg.model.head == "scalar" else cfg.loss.input_kind
  train = stream.convert_examples(examples, kind)
  buckets = tuple(cfg.data.buckets) or config_lib.derive_buckets(
      stream.longest_need(train, cfg.data.layout))
  layout = stream.layout_config(cfg, cfg.data.batch_size // cfg.data.micro_batches,
                                buckets=buckets)
  stats = batching.epoch_stats(train, layout)
  return {"layout": layout.kind, "buckets": list(buckets), "input_kind": kind,
          "examples_per_batch": layout.examples_per_batch,
          **{k: stats[k] for k in ("batches", "distinct_shapes", "tokens_per_example",
                                   "real_tokens_per_example", "pad_fraction")}}


def run(args: argparse.Namespace, cfg: Any = None) -> dict[str, Any]:
  """Does the work of the CLI; returns the summary dict (raises ValueError on bad data).
  ``cfg``: the validated config of ``--config`` (`resolve_args`), if any."""
  if not getattr(args, "resolved", False):
    args, cfg = resolve_args(args)
  truncation = formats.Truncation(args.max_length, args.max_prompt_length)
  template = ChatTemplate()
  report = formats.DataReport()
  t0 = time.perf_counter()
  records = [r for path in args.files for r in formats.iter_text_records(
      path, args.format, on_error=args.on_error, report=report, template=template)]
  t_parse = time.perf_counter() - t0
  tok, tok_note = _tokenizer_for(args, records)
  t1 = time.perf_counter()
  tokenized = _tokenize_all(records, tok, template, truncation, report)
  t_tok = time.perf_counter() - t1
  scored, completion_tokens = tokenized.scored, tokenized.completion_tokens
  from jaxalign.train import logging as log_lib  # pylint: disable=g-import-not-at-top
  summary = {
      "files": list(args.files),
      "format": args.format,
      "tokenizer": tok_note,
      "truncation": {"max_length": args.max_length,
                     "max_prompt_length": args.max_prompt_length},
      "report": report.to_dict(),
      "lengths_before_truncation": {k: length_stats(v) for k, v in tokenized.raw.items()},
      "lengths": {k: length_stats(v) for k, v in tokenized.final.items()},
      "conversational_records": sum(r.conversational for r in records),
      "sft_scored_fraction": scored / completion_tokens if completion_tokens else None,
      "examples_per_batch": args.examples_per_batch,
      "layouts": _layouts_for(tokenized.examples, args.examples_per_batch),
      "seconds": {"parse": t_parse, "tokenize_and_truncate": t_tok},
      "config": args.config,
      "truncation_warning": log_lib.truncation_warning(report, args.max_length,
                                                       args.max_prompt_length),
  }
  if cfg is not None and tokenized.examples and not isinstance(tokenized.examples[0],
                                                                PromptExample):
    summary["training_layout"] = _training_layout(cfg, tokenized.examples)
  return summary


def _completions(ex) -> tuple[np.ndarray, ...]:
  if isinstance(ex, PairExample):
    return (ex.chosen, ex.rejected)
  if isinstance(ex, RankedExample):
    return tuple(ex.responses)
  if isinstance(ex, PromptExample):
    return ()
  return (ex.completion,)


def _add_lengths(lengths: dict[str, list[int]], prompt: np.ndarray,
                 completions: Sequence[np.ndarray]) -> None:
  lengths["prompt"].append(len(prompt))
  lengths["completion"].extend(len(c) for c in completions)
  lengths["total"].extend(len(prompt) + len(c) for c in completions)


def _fmt_stats(s: dict[str, float]) -> str:
  return (f"n={s['count']} mean={s['mean']:.1f} p50={s['p50']:.0f} p95={s['p95']:.0f} "
          f"max={s['max']}")


def format_text(summary: dict[str, Any]) -> str:
  rep = summary["report"]
  lines = [f"files: {', '.join(summary['files'])} (format {summary['format']}"
           + (f", from --config {summary['config']})" if summary.get("config") else ")"),
           f"tokenizer: {summary['tokenizer']}",
           f"lines: {rep['lines']} (blank {rep['blank_lines']})  valid records: "
           f"{rep['records']} ({summary['conversational_records']} conversational)  "
           f"examples after truncation: {rep['examples']}",
           f"errors: {sum(rep['errors'].values())}"]
  for reason, n in sorted(rep["errors"].items()):
    lines.append(f"  {reason}: {n}")
    lines.extend(f"    e.g. {m}" for m in rep["error_samples"][reason])
  t = summary["truncation"]
  lines.append(f"truncation (max_length={t['max_length']}, "
               f"max_prompt_length={t['max_prompt_length']}): "
               + (", ".join(f"{k}={v}" for k, v in sorted(rep["truncation"].items()))
                  or "nothing truncated"))
  if summary.get("truncation_warning"):
    lines.append(f"WARNING: {summary['truncation_warning']}")
  for title, key in (("token lengths before truncation", "lengths_before_truncation"),
                     ("token lengths after truncation", "lengths")):
    lines.append(f"{title}:")
    for part in ("prompt", "completion", "total"):
      lines.append(f"  {part:<10} {_fmt_stats(summary[key][part])}")
  if summary["sft_scored_fraction"] is not None:
    lines.append(f"scored share of SFT completion tokens: "
                 f"{summary['sft_scored_fraction']:.3f}")
  if "note" in summary["layouts"]:
    lines.append(f"batch layouts: {summary['layouts']['note']}")
  elif summary["layouts"]:
    lines.append(f"batch layouts (examples_per_batch={summary['examples_per_batch']}, "
                 "power-of-two buckets from 64):")
    for name, s in summary["layouts"].items():
      if "error" in s or "unavailable" in s:
        lines.append(f"  {name}: {s.get('error', s.get('unavailable'))}")
        continue
      lines.append(f"  {name:<14} tokens/example={s['tokens_per_example']:.1f} "
                   f"real/example={s['real_tokens_per_example']:.1f} "
                   f"pad_fraction={s['pad_fraction']:.3f} batches={s['batches']} "
                   f"shapes={s['distinct_shapes']} rows={s['rows_per_batch'] or 'auto'}")
  t = summary.get("training_layout")
  if t:
    lines.append(f"training batches (the config's {t['input_kind']} examples, layout "
                 f"{t['layout']}, buckets {tuple(t['buckets'])}, {t['examples_per_batch']} "
                 f"per batch): tokens/example={t['tokens_per_example']:.1f} "
                 f"real/example={t['real_tokens_per_example']:.1f} pad_fraction="
                 f"{t['pad_fraction']:.3f} batches={t['batches']} "
                 f"shapes={t['distinct_shapes']}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    args, cfg = resolve_args(args)
    summary = run(args, cfg)
  except formats.RecordError as e:
    print(f"error: {e}", file=sys.stderr)
    print("(use --on-error skip to count bad records by reason instead)", file=sys.stderr)
    return 1
  except ValueError as e:  # Bad arguments or files: a message, not a traceback.
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(summary, indent=1))
  else:
    print(format_text(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
