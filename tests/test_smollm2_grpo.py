"""GRPO of SmolLM2-135M-Instruct on the arithmetic task (experiments/smollm2/grpo.py).

The questions of `jaxalign.data.verifiable` reach a tokenizer with a chat template as
a user turn rendered by that template: the oracle is transformers'
``apply_chat_template`` on the same message with the same converted directory (token
ids equal); a tokenizer without a template keeps the plain ``"a+b="`` text. The heavy
test runs the recipe's ``runlocal`` variant end to end.
"""

import json
import math
import os
import re

import pytest

import jax

from jaxalign import config as config_lib
from jaxalign.data import tokenizer as tok_lib
from jaxalign.data import verifiable
from jaxalign.train import build

transformers = pytest.importorskip("transformers")

from experiments.smollm2 import grpo  # noqa: E402


def _task():
  return verifiable.ArithmeticTask(max_operand=20, num_heldout=16, num_train=64, seed=0)


def test_questions_render_through_the_checkpoints_chat_template(smollm2_dir):
  cfg, _ = config_lib.validate_rl(grpo.get_config(f"hf_path={smollm2_dir}"),
                                  jax.device_count())
  tok = build.build_tokenizer(cfg)
  hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  _, held = verifiable.records(_task())
  for rec, ex in zip(held, verifiable.prompt_examples(held, tok)):
    question = f"What is {rec['prompt'][:-1]}? Answer with the number only."
    want = hf_tok.apply_chat_template([{"role": "user", "content": question}],
                                      add_generation_prompt=True, tokenize=True)
    want = want if isinstance(want, list) else want["input_ids"]  # BatchEncoding
    assert list(ex.prompt) == list(want), rec
    assert ex.fields["answer"] == rec["answer"]
  # The SFT form (rl.sft_warmup_steps): the answer is the assistant turn.
  sft = verifiable.sft_examples(held[:1], tok)[0]
  assert tok.decode(sft.completion) == held[0]["answer"] + "<|im_end|>\n"


def test_a_tokenizer_without_a_template_keeps_the_plain_text():
  tok = tok_lib.ByteTokenizer()
  _, held = verifiable.records(_task())
  for rec, ex in zip(held, verifiable.prompt_examples(held, tok)):
    assert tok.decode(ex.prompt) == rec["prompt"]  # "a+b=" (BOS is not text)


def test_the_recipe_validates_and_its_prompts_fit(smollm2_dir):
  """prompt_len holds the longest rendered question of the full run's task (else the
  run stops before compiling, naming rl.prompt_len)."""
  for arg in (f"hf_path={smollm2_dir}", f"hf_path={smollm2_dir},runlocal"):
    cfg, rl = config_lib.validate_rl(grpo.get_config(arg), jax.device_count())
    assert rl.algorithm == "grpo" and rl.kl_coef == 0 and rl.sft_warmup_steps == 0
    assert cfg.data.tokenizer == "auto" and cfg.optimizer.learning_rate == 1e-5
  tok = build.build_tokenizer(cfg)
  train, held = verifiable.records(verifiable.task_from_config(cfg))
  longest = max(len(e.prompt) for e in verifiable.prompt_examples(train + held, tok))
  assert longest <= grpo.PROMPT_LEN


def test_final_number_scores_the_last_number_not_a_restated_question():
  """Hand-checked cases: an echo of the question is wrong under ``final_number``, and
  (since the fix) under the built-in ``accuracy`` too."""
  from jaxalign import rewards
  cases = [("16 + 13 = ", "29", 0.0), ("16 + 13 = 29", "29", 1.0), ("29", "29", 1.0),
           ("The answer is 29.", "29", 1.0), ("12-6 is a mathematical expression", "6", 0.0),
           ("12 - 6 = 6", "6", 1.0), ("17-2 is 17", "15", 0.0), ("", "3", 0.0),
           ("4 + 16 = 1", "20", 0.0)]
  got = grpo.final_number([""] * len(cases), [c for c, _, _ in cases],
                          answer=[a for _, a, _ in cases])
  assert got == [w for _, _, w in cases]
  echoes = ["16 + 13 = ", "12-6 is a mathematical expression"]
  assert rewards.get_reward("accuracy")([""] * 2, echoes, answer=["29", "6"]) == [0.0, 0.0]


@pytest.mark.heavy
def test_runlocal_trains_and_writes_responses(smollm2_dir, tmp_path):
  """Two iterations end to end: finite metrics, held-out accuracies, ChatML prompts in
  the before/after samples, responses.json and the reward plots."""
  work = str(tmp_path / "run")
  assert grpo.main(["--workdir", work, "--arg", f"runlocal,hf_path={smollm2_dir}"]) == 0
  with open(os.path.join(work, "metrics.jsonl"), encoding="utf-8") as f:
    train = [json.loads(line) for line in f if '"train"' in line]
  assert [r["step"] for r in train] == [1, 2]
  for r in train:
    for k in ("loss", "objective/scores", "reward/final_number", "reward/format"):
      assert math.isfinite(r[k]), (k, r)
    assert 0.0 <= r["reward/final_number"] <= 1.0 and 0.0 <= r["reward/format"] <= 1.0
  with open(os.path.join(work, "final_eval.json"), encoding="utf-8") as f:
    final = json.load(f)
  assert 0.0 <= final["accuracy_before"] <= 1.0 and 0.0 <= final["accuracy_after"] <= 1.0
  with open(os.path.join(work, "responses.json"), encoding="utf-8") as f:
    responses = json.load(f)
  assert len(responses) == grpo.NUM_SAMPLES
  for r in responses:
    # The answer, from the decoded question, independently of the task code.
    a, op, b = re.search(r"What is (\d+)([+-])(\d+)\?", r["prompt"]).groups()
    assert r["answer"] == str(int(a) + int(b) if op == "+" else int(a) - int(b)), r
    for when in ("before", "after"):
      if re.fullmatch(r"\s*-?\d+\s*", r[when]):  # a bare number: correct iff equal
        assert r[f"correct_{when}"] == (int(r[when]) == int(r["answer"])), r
    assert r["prompt"].startswith("<|im_start|>system\n"), r
    assert "<|im_start|>user\nWhat is " in r["prompt"], r
    assert r["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n"), r
    assert isinstance(r["before"], str) and isinstance(r["after"], str)
  assert os.path.exists(os.path.join(work, "plots", "train_reward_final_number.png"))
  with open(os.path.join(work, "recipe.json"), encoding="utf-8") as f:
    recipe = json.load(f)
  assert len(recipe["reward_curve"]) == 2
  for when in ("before", "after"):  # final_number, recomputed with a regex of its own
    with open(os.path.join(work, f"heldout_{when}.json"), encoding="utf-8") as f:
      samples = json.load(f)["samples"]
    want = [bool(n) and float(n[-1]) == float(s["answer"])
            for s in samples for n in [re.findall(r"-?\d+(?:\.\d+)?", s["completion"])]]
    assert recipe["heldout"][f"final_number_{when}"] == sum(want) / len(want)
