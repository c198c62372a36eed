"""The HH-RLHF recipe: SFT -> reward model -> DPO -> PPO on a local HH file.

Preparation makes the run honest about held-out data: the pairs are split 80/20 by a
seeded hash of each record (``split_pairs``), and a SentencePiece tokenizer is
trained on the TRAIN split only (``train_tokenizer``). Every stage trains on the
train split and evaluates on all of the held-out split:

  sft     next-token loss on the chosen responses (no reference);
  reward  Bradley-Terry reward model initialised from the SFT model; figure: held-out
          pair accuracy of its scalar reward;
  dpo     DPO from the SFT model (also the frozen reference); figure: held-out
          implicit-reward accuracy, beta * (log pi - log pi_ref), chosen vs rejected;
  ppo     PPO from the SFT model against the reward model, value model initialised
          from the reward model.

The SFT model reaches the later stages as an HF checkpoint directory (``export``:
the latest Orbax checkpoint of the SFT run -> ``root/sft_hf``), the same way a
downloaded base model would. Sizes: ``small`` (the CPU figures in docs/hh_recipe.md)
and ``tiny`` (a smoke run of a few steps).

All at once (prepare, the four stages, a summary in root/figures.json):

  python -m experiments.hh.recipe --hh=/data/hh-rlhf-harmless-base-test.jsonl.gz \
      --root=/tmp/hh-recipe --size=small

Stage by stage, with the same files (what the all-at-once runner does):

  python -m experiments.hh.recipe --hh=/data/hh.jsonl.gz --root=/tmp/hh --stages=prepare
  python -m jaxalign.main --config experiments/hh/recipe.py:stage=sft,root=/tmp/hh \
      --workdir /tmp/hh/sft
  python -m experiments.hh.recipe --root=/tmp/hh --stages=export
  python -m jaxalign.main --config experiments/hh/recipe.py:stage=reward,root=/tmp/hh \
      --workdir /tmp/hh/reward
  python -m jaxalign.main --config experiments/hh/recipe.py:stage=dpo,root=/tmp/hh \
      --workdir /tmp/hh/dpo
  python -m jaxalign.main --config experiments/hh/recipe.py:stage=ppo,root=/tmp/hh \
      --workdir /tmp/hh/ppo

(``size=tiny`` and ``steps=N`` go in the config argument too.)
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import sys
import time

import ml_collections

from experiments import _common
from jaxalign import config as config_lib

STAGES = ("sft", "reward", "dpo", "ppo")

# SentencePiece vocabulary (upper bound: a small text gives a smaller model) and the
# model shapes. vocab_size of the model must cover the tokenizer's.
SIZES = {
    "small": dict(
        spm_vocab=2048,
        arch=dict(vocab_size=2048, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                  mlp_dim=384, tie_embeddings=True),
        max_length=256, max_prompt_length=192, batch_size=16,
        steps=dict(sft=200, reward=200, dpo=200, ppo=8),
        lr=dict(sft=1e-3, reward=3e-4, dpo=3e-4, ppo=1e-5),
        ppo=dict(batch_size=8, prompt_len=128, max_new_tokens=32)),
    "tiny": dict(
        spm_vocab=400,
        arch=dict(vocab_size=512, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                  mlp_dim=64, tie_embeddings=True),
        max_length=64, max_prompt_length=48, batch_size=8,
        steps=dict(sft=3, reward=3, dpo=3, ppo=2),
        lr=dict(sft=1e-3, reward=1e-3, dpo=1e-3, ppo=1e-4),
        ppo=dict(batch_size=8, prompt_len=32, max_new_tokens=8)),
}


@dataclasses.dataclass(frozen=True)
class Paths:
  """Where the recipe keeps its files under ``root`` (outside the project)."""
  root: str

  @property
  def train(self) -> str:
    return os.path.join(self.root, "data", "train.jsonl.gz")

  @property
  def eval(self) -> str:
    return os.path.join(self.root, "data", "eval.jsonl.gz")

  @property
  def tokenizer(self) -> str:
    return os.path.join(self.root, "data", "spm.model")

  @property
  def sft_hf(self) -> str:
    return os.path.join(self.root, "sft_hf")

  def workdir(self, stage: str) -> str:
    return os.path.join(self.root, stage)


# ----------------------------------------------------------------------------
# Preparation.


def is_eval_record(line: bytes, *, seed: int, eval_fraction: float) -> bool:
  """A record goes to the eval split iff its seeded SHA-256 falls below the fraction.

  Depends only on the record's bytes and the seed: the split is the same whatever
  the file's order, and a duplicated record never lands on both sides.
  """
  digest = hashlib.sha256(f"{seed}:".encode() + line.strip()).digest()
  return int.from_bytes(digest[:8], "big") < eval_fraction * 2.0**64


def split_pairs(src: str, train_path: str, eval_path: str, *, seed: int = 0,
                eval_fraction: float = 0.2) -> tuple[int, int]:
  """Writes the train / eval JSONL.gz splits of ``src``; returns their sizes."""
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction={eval_fraction}: must be in (0, 1).")
  os.makedirs(os.path.dirname(train_path), exist_ok=True)
  opener = gzip.open if src.endswith(".gz") else open
  n_train = n_eval = 0
  with opener(src, "rb") as f, gzip.open(train_path, "wb") as tr, \
      gzip.open(eval_path, "wb") as ev:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{src}:{lineno}: not a JSON record ({e}).") from None
      if is_eval_record(line, seed=seed, eval_fraction=eval_fraction):
        ev.write(line.rstrip(b"\n") + b"\n")
        n_eval += 1
      else:
        tr.write(line.rstrip(b"\n") + b"\n")
        n_train += 1
  if not n_train or not n_eval:
    raise ValueError(f"{src}: split gave {n_train} train / {n_eval} eval records; "
                     "the file needs more records.")
  return n_train, n_eval


def train_tokenizer(train_path: str, out_path: str, vocab_size: int):
  """SentencePiece (BPE, byte fallback, exact round trip) on the train split only."""
  from jaxalign.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top

  def texts():
    with gzip.open(train_path, "rt", encoding="utf-8") as f:
      for line in f:
        record = json.loads(line)
        yield record["chosen"]
        yield record["rejected"]

  tok = tok_lib.SentencePieceTokenizer.train(texts(), vocab_size=vocab_size)
  tok.save(out_path)
  return tok


def prepare(hh_path: str, paths: Paths, size: str, *, seed: int = 0) -> dict:
  """Split, tokenizer, and what the stages will see of each split (the records
  skipped by reason, the pairs truncated to the size's lengths)."""
  from jaxalign.data import formats  # pylint: disable=g-import-not-at-top

  n_train, n_eval = split_pairs(hh_path, paths.train, paths.eval, seed=seed)
  tok = train_tokenizer(paths.train, paths.tokenizer, SIZES[size]["spm_vocab"])
  out = {"train_records": n_train, "eval_records": n_eval,
         "tokenizer_vocab": tok.vocab_size}
  trunc = formats.Truncation(max_length=SIZES[size]["max_length"],
                             max_prompt_length=SIZES[size]["max_prompt_length"])
  for name, path in (("train", paths.train), ("eval", paths.eval)):
    report = formats.DataReport()
    examples = formats.load_examples(path, "hh", tok, on_error="skip",
                                     truncation=trunc, report=report)
    out[f"{name}_pairs"] = len(examples)
    out[f"{name}_report"] = report.to_dict()
  return out


# ----------------------------------------------------------------------------
# Stage configs.


def stage_config(stage: str, paths: Paths, size: str = "small",
                 steps: int = 0) -> ml_collections.ConfigDict:
  """The ConfigDict of one stage (validated by jaxalign.config / config.validate_rl)."""
  if stage not in STAGES:
    raise ValueError(f"stage={stage!r}: expected one of {STAGES}.")
  if size not in SIZES:
    raise ValueError(f"size={size!r}: expected one of {sorted(SIZES)}.")
  s = SIZES[size]
  num_steps = steps or s["steps"][stage]
  if stage == "ppo":
    return _ppo_config(paths, s, num_steps)
  c = config_lib.base_config()
  c.seed = 0
  c.num_steps = num_steps
  c.model.update(s["arch"])
  c.data.source = "file"
  c.data.format = "hh"
  c.data.path = paths.train
  c.data.eval_path = paths.eval  # every held-out pair is evaluated
  c.data.tokenizer = paths.tokenizer
  # The real file has a few unusable records (e.g. an empty final response); skip
  # them (prepare() counts them by reason in figures.json).
  c.data.on_error = "skip"
  c.data.max_length = s["max_length"]
  c.data.max_prompt_length = s["max_prompt_length"]
  c.data.buckets = ()  # derived from max_length and the stage's layout
  c.data.batch_size = s["batch_size"]
  c.optimizer.learning_rate = s["lr"][stage]
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = max(num_steps // 10, 0)
  c.eval.batch_size = s["batch_size"]
  c.eval.num_examples = s["batch_size"]  # unused with eval_path
  c.eval.every_steps = max(num_steps // 2, 1)  # every held-out pair: not cheap
  c.checkpoint.every_steps = num_steps  # the final one (and on preemption)
  c.checkpoint.keep = 1
  c.log.every_steps = max(min(10, num_steps // 10), 1)
  c.log.progress_bar = False
  if stage == "sft":
    c.loss = "sft"
    c.reference.kind = "none"
  elif stage == "reward":
    c.loss = "bradley_terry"
    c.reference.kind = "none"
    c.model.head = "scalar"
    c.model.hf_path = paths.sft_hf
  else:
    c.loss = "dpo"
    c.loss_hparams.beta = 0.1
    c.reference.kind = "initial"  # = the SFT model the policy starts from
    c.model.hf_path = paths.sft_hf
  return c


def _ppo_config(paths: Paths, s: dict, num_steps: int) -> ml_collections.ConfigDict:
  from experiments import _common  # pylint: disable=g-import-not-at-top

  c = _common.rl_config("ppo", f"hh,path={paths.train},hf_path={paths.sft_hf},"
                      f"reward_path={paths.workdir('reward')},steps={num_steps}")
  # The reward model is rebuilt from model.*: the same shape as the SFT export.
  c.model.update(s["arch"])
  c.data.tokenizer = paths.tokenizer
  c.data.on_error = "skip"
  c.data.max_length = s["max_length"]
  c.data.max_prompt_length = s["max_prompt_length"]
  c.data.batch_size = s["ppo"]["batch_size"]
  c.optimizer.learning_rate = s["lr"]["ppo"]
  c.checkpoint.every_steps = num_steps
  c.checkpoint.keep = 1
  c.log.every_steps = 1
  c.log.progress_bar = False
  c.rl.prompt_len = s["ppo"]["prompt_len"]
  c.rl.max_new_tokens = s["ppo"]["max_new_tokens"]
  c.rl.num_minibatches = 1
  return c


def get_config(arg=None):
  """``stage=sft|reward|dpo|ppo,root=DIR[,size=small|tiny][,steps=N]``."""
  a = _common.parse_arg(arg, stage="sft", root="", size="small", steps=0)
  if not a.root:
    raise ValueError("experiments/hh/recipe.py needs root=<dir of the prepared data>, "
                     "e.g. --config experiments/hh/recipe.py:stage=sft,root=/tmp/hh "
                     "(prepare it with python -m experiments.hh.recipe --stages=prepare)")
  return stage_config(a.stage, Paths(a.root), a.size, a.steps)


# ----------------------------------------------------------------------------
# Export and the all-at-once runner.


def export_hf(stage_cfg: ml_collections.ConfigDict, workdir: str, out_dir: str) -> int:
  """Writes the latest checkpoint of an LM run in ``workdir`` as an HF directory."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxalign import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from jaxalign.models import hf  # pylint: disable=g-import-not-at-top

  cfg = config_lib.validate(stage_cfg, jax.device_count())
  if cfg.model.head != "lm" or cfg.model.hf_path:
    raise ValueError("export_hf: expects a randomly initialised LM stage (sft).")
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                             keep=1000) as ck:
    restored = ck.restore_arrays()
  params = jax.tree.map(np.asarray, restored.state["params"])
  hf.save_hf(out_dir, cfg.model.arch, params, "llama")
  return restored.step


def _final_eval(workdir: str) -> dict:
  with open(os.path.join(workdir, "final_eval.json"), encoding="utf-8") as f:
    return json.load(f)


def run_all(hh_path: str, root: str, size: str, stages: tuple[str, ...],
            log=print) -> dict:
  """Runs the requested stages in order; returns (and writes) the figures."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxalign.train import loop  # pylint: disable=g-import-not-at-top

  paths = Paths(root)
  out_path = os.path.join(root, "figures.json")
  figures = {}
  if os.path.exists(out_path):
    with open(out_path, encoding="utf-8") as f:
      figures = json.load(f)
  figures.update(size=size, devices=jax.device_count(), backend=jax.default_backend())

  def record(name, value):
    figures[name] = value
    with open(out_path, "w", encoding="utf-8") as f:
      json.dump(figures, f, indent=1)
    log(f"{name}: {json.dumps(value)}")

  for stage in stages:
    t0 = time.perf_counter()
    if stage == "prepare":
      if not hh_path:
        raise ValueError("--stages=prepare needs --hh=<HH-RLHF .jsonl(.gz)>.")
      record("prepare", dict(prepare(hh_path, paths, size), source=hh_path,
                             seconds=round(time.perf_counter() - t0, 1)))
    elif stage == "export":
      step = export_hf(stage_config("sft", paths, size), paths.workdir("sft"),
                       paths.sft_hf)
      record("export", {"sft_step": step, "dir": paths.sft_hf})
    elif stage == "ppo":
      from jaxalign.train import rl  # pylint: disable=g-import-not-at-top
      result = rl.run_rl(stage_config("ppo", paths, size), paths.workdir("ppo"))
      h = result.history
      keys = ("objective/scores", "objective/kl", "response_length")
      record("ppo", {"iterations": result.iteration,
                     "first": {k: h[0][k] for k in keys} if h else {},
                     "last": {k: h[-1][k] for k in keys} if h else {},
                     "seconds": round(time.perf_counter() - t0, 1)})
    else:
      c = stage_config(stage, paths, size)
      cfg = config_lib.validate(c, jax.device_count())
      result = loop.run(cfg, paths.workdir(stage), log=log)
      arch = cfg.model.arch
      record(stage, {"status": result.status, "steps": result.step,
                     "final_eval": _final_eval(paths.workdir(stage)),
                     "batch_pairs": cfg.data.batch_size,
                     "lr": cfg.optimizer.learning_rate,
                     "arch": {k: getattr(arch, k) for k in SIZES[size]["arch"]},
                     "seconds": round(time.perf_counter() - t0, 1)})
  return figures


def main(argv: list[str]) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--hh", default="", help="HH-RLHF .jsonl(.gz) (for prepare)")
  p.add_argument("--root", required=True, help="directory for every output")
  p.add_argument("--size", default="small", choices=sorted(SIZES))
  p.add_argument("--stages", default="prepare,sft,export,reward,dpo,ppo",
                 help="comma-separated subset of prepare,sft,export,reward,dpo,ppo")
  args = p.parse_args(argv)
  stages = tuple(x.strip() for x in args.stages.split(",") if x.strip())
  known = ("prepare", "sft", "export", "reward", "dpo", "ppo")
  for stage in stages:
    if stage not in known:
      raise SystemExit(f"--stages: unknown stage {stage!r}; expected {known}.")
  run_all(args.hh, args.root, args.size, stages)


if __name__ == "__main__":
  main(sys.argv[1:])
