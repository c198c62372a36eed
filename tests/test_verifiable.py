"""The built-in verifiable task (`jaxalign.data.verifiable`): disjoint, seed-fixed
splits of correct questions through the project's tokenizer path; the prompt stream's
fields; the SFT warm-up batch; and a tiny GRPO run with ``rl.reward="functions"``
(``experiments/grpo_verifiable.py:tiny``) that logs ``reward/<name>``, counts a
flaky function's failures in zero mode, and writes the held-out accuracies."""

import json
import os

import jax
import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign import rewards
from jaxalign.data import verifiable
from jaxalign.data.tokenizer import ByteTokenizer
from jaxalign.train import rl_rewards
from jaxalign.train import stream


def _oracle(prompt: str) -> str:
  """The answer, computed independently of the task code."""
  a, op, b = prompt.rstrip("=").partition("+") if "+" in prompt else \
      prompt.rstrip("=").partition("-")
  return str(int(a) + int(b) if op == "+" else int(a) - int(b))


def test_splits_are_disjoint_correct_and_fixed_by_the_seed():
  task = verifiable.ArithmeticTask(max_operand=9, num_heldout=20, num_train=1000, seed=3)
  train, held = verifiable.records(task)
  n = 10
  assert verifiable.num_questions(task) == n * n + n * (n + 1) // 2  # a+b, a-b (a>=b)
  assert len(held) == 20 and len(train) == verifiable.num_questions(task) - 20
  prompts = [r["prompt"] for r in train + held]
  assert len(set(prompts)) == len(prompts)  # disjoint, no repeats
  assert all(r["answer"] == _oracle(r["prompt"]) for r in train + held)
  assert all(int(r["answer"]) >= 0 for r in train + held)
  assert verifiable.records(task) == (train, held)
  other = verifiable.records(verifiable.ArithmeticTask(num_heldout=20, seed=4))[1]
  assert other != held
  small = verifiable.records(verifiable.ArithmeticTask(num_heldout=20, num_train=5))[0]
  assert len(small) == 5


def test_task_errors_name_the_keys():
  with pytest.raises(ValueError, match="eval.num_examples=200 .* 155 distinct"):
    verifiable.ArithmeticTask(num_heldout=200)
  with pytest.raises(ValueError, match="data.task.operations"):
    verifiable.ArithmeticTask(operations="*")
  with pytest.raises(ValueError, match="data.task.max_operand"):
    verifiable.ArithmeticTask(max_operand=0)


def test_records_go_through_the_tokenizer_path():
  tok = ByteTokenizer()
  recs = [{"prompt": "23+19=", "answer": "42"}]
  (p,) = verifiable.prompt_examples(recs, tok)
  np.testing.assert_array_equal(p.prompt, [tok.bos_id, *tok.encode("23+19=")])
  assert dict(p.fields) == {"answer": "42"}
  (s,) = verifiable.sft_examples(recs, tok)
  np.testing.assert_array_equal(s.completion, [*tok.encode("42"), tok.eos_id])


def _config(**over):
  from experiments import grpo_verifiable
  c = grpo_verifiable.get_config("tiny")
  c.log.progress_bar = False
  c.log.tensorboard = False
  c.log.plots = False
  c.checkpoint.async_save = False
  for k, v in over.items():
    c.rl[k] = v
  return c


def test_prompt_stream_fields_follow_the_prompts():
  cfg, _ = config_lib.validate_rl(_config(), jax.device_count())
  src = stream.PromptSource(cfg)
  held = {src.tokenizer.decode(e.prompt) for e in src.heldout}
  assert len(held) == cfg.eval.num_examples
  for it in (0, 7):
    prompts, fields = src(it), src.fields(it)
    assert len(prompts) == len(fields) == cfg.data.batch_size
    for p, f in zip(prompts, fields):
      text = src.tokenizer.decode(p)
      assert f["answer"] == _oracle(text) and text not in held
  np.testing.assert_array_equal(np.concatenate(src(3)), np.concatenate(src(3)))
  with pytest.raises(ValueError, match="data.source='arithmetic' is a prompt stream"):
    stream.build_data(cfg, "sft")


def test_teacher_batch_lays_out_the_answers_after_the_prompts():
  tok = ByteTokenizer()
  ex = verifiable.sft_examples([{"prompt": "3+4=", "answer": "7"},
                                {"prompt": "10-2=", "answer": "8"}], tok)
  b = rl_rewards.teacher_batch(ex, prompt_len=8, max_new_tokens=3)
  np.testing.assert_array_equal(b["mask"], [[1, 1, 0], [1, 1, 0]])
  np.testing.assert_array_equal(b["tokens"][0, 8:10], [*tok.encode("7"), tok.eos_id])
  p = [tok.bos_id, *tok.encode("3+4=")]
  np.testing.assert_array_equal(b["tokens"][0, 8 - len(p):8], p)
  # Positions count from the first real token and run on into the completion.
  np.testing.assert_array_equal(b["positions"][0, 8 - len(p):10], np.arange(len(p) + 2))
  np.testing.assert_array_equal(b["segment_ids"][0], [0] * (8 - len(p)) + [1] * (len(p) + 2) + [0])


def _flaky(prompts, completions, **fields):
  """Raises on every completion that does not start with a digit."""
  return [float(int(c[0]) >= 0) for c in completions]


@pytest.mark.slow  # ~80 s of CPU: compiles the warm-up, both samplers and the update
def test_tiny_grpo_with_reward_functions(tmp_path):
  from jaxalign.train import rl
  rewards.register_reward("test_flaky", _flaky, overwrite=True)
  try:
    c = _config(reward_functions="accuracy:1.0,format:0.2,test_flaky:0.0",
                reward_errors="zero")
    c.num_steps = 2
    res = rl.run_rl(c, str(tmp_path), log=lambda s: None)
  finally:
    rewards.unregister_reward("test_flaky")
  assert res.status == "done" and res.iteration == 2
  for h in res.history:
    for name in ("accuracy", "format", "test_flaky"):
      assert 0.0 <= h[f"reward/{name}"] <= 1.0
    assert 0 <= h["reward/test_flaky/failures"] <= 16
  # The untrained policy writes non-digits: the flaky function failed and was counted.
  assert sum(h["reward/test_flaky/failures"] for h in res.history) > 0
  logged = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert "reward/accuracy" in logged[-1]
  final = json.load(open(tmp_path / "final_eval.json"))
  after = json.load(open(tmp_path / "heldout_after.json"))
  before = json.load(open(tmp_path / "heldout_before.json"))
  assert final["accuracy_before"] == before["accuracy_before"]
  assert final["accuracy_after"] == after["accuracy_after"]
  # The held-out accuracy is the accuracy reward of the samples it reports.
  s = after["samples"]
  assert len(s) == c.eval.num_examples
  assert after["accuracy_after"] == pytest.approx(np.mean(rewards.accuracy(
      [x["prompt"] for x in s], [x["completion"] for x in s],
      answer=[x["answer"] for x in s])))
  assert all(x["answer"] == _oracle(x["prompt"]) for x in s)
