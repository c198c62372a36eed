"""Reward functions (`jaxalign.rewards`): every built-in against hand cases, the
registry and its ``name:weight`` parser, failures named (function and completion /
prompt index) or zeroed and counted, the RL text scorer, and the config checks."""

import math

import jax
import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign import rewards
from jaxalign.data.tokenizer import ByteTokenizer
from jaxalign.rewards import _builtin
from jaxalign.train import rl_rewards

B = lambda n: [""] * n  # prompts the functions do not read


# ----------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize("text,gold,want", [
    ("19", "19", 1.0), ("The answer is 19.", 19, 1.0), (r"\boxed{19}", "19", 1.0),
    ("18", "19", 0.0), ("", "19", 0.0), ("no idea", "19", 0.0), ("-3", "-3", 1.0),
    ("3.0", "3", 1.0), ("1/2", "0.5", 1.0), ("x = 7", "7", 1.0), ("1,000", "1000", 1.0),
    ("12+7=19", "19", 1.0), ("19", "-19", 0.0), ("16 + 13 = 29", "29", 1.0),
    (r"$\frac{1}{2}$", "0.5", 1.0), ("The answer is $-19$", "-19", 1.0),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", 1.0)])
def test_accuracy_hand_cases(text, gold, want):
  assert rewards.accuracy(B(1), [text], answer=[gold]) == [want]


@pytest.mark.parametrize("text,gold", [
    ("16 + 13 = ", "29"), ("12-6 is a mathematical expression", "6"),
    (r"\boxed{16+13}", "29"), ("29 = 16 + 13", "29"), ("$2^{3}$", "8"), ("4*5", "20")])
def test_accuracy_refuses_an_unevaluated_expression(text, gold):
  """A reply that restates the question is not an answer: math-verify alone evaluates
  the extracted expression and credits it (checked here, so the case stays real)."""
  math_verify = pytest.importorskip("math_verify")
  assert math_verify.verify(math_verify.parse(gold), math_verify.parse(text))
  assert rewards.accuracy(B(1), [text], answer=[gold]) == [0.0]
  assert _builtin._numeric_equal(gold, text) is False  # the fallback agrees


def test_accuracy_needs_the_answer_field():
  with pytest.raises(KeyError, match="'answer'"):
    rewards.accuracy(B(1), ["1"], question=["q"])


@pytest.mark.parametrize("text,want", [
    ("42", 42.0), ("a 1,000 b 2.5", 2.5), ("x=-7", -7.0), ("3/4", 0.75), ("abc", None),
    ("so .5", 0.5)])
def test_last_number(text, want):
  assert rewards.last_number(text) == want


@pytest.mark.parametrize("gold,text,want", [
    ("19", "it is 19", True), ("19", "19.0", True), ("19", "91", False),
    ("0.5", "1/2", True), ("yes", " yes ", True), ("yes", "no", False),
    ("19", "", False)])
def test_numeric_fallback_without_math_verify(gold, text, want):
  # The comparator used where math-verify is not installed.
  assert _builtin._numeric_equal(gold, text) is want


def test_exact_match():
  got = rewards.exact_match(B(4), [" 42 ", "42.", "4 2", "42"], answer=["42", "42", "42", 42])
  assert got == [1.0, 0.0, 0.0, 1.0]


def test_format():
  got = rewards.format_match(B(5), ["42", " -3\n", "4 2", "abc", "42abc"],
                             pattern="-?[0-9]+")
  assert got == [1.0, 1.0, 0.0, 0.0, 0.0]
  with pytest.raises(ValueError, match="rl.format_pattern"):
    rewards.format_match(B(1), ["1"])


def _dapo_overlong(n, l_max, l_cache):
  """Yu et al. 2025 (DAPO), eq. 13, transcribed."""
  if n <= l_max - l_cache:
    return 0.0
  if n <= l_max:
    return ((l_max - l_cache) - n) / l_cache
  return -1.0


def test_overlong_is_dapos_soft_punishment():
  lengths = [0, 5, 6, 7, 8, 9, 10, 11, 40]
  got = rewards.overlong(B(9), B(9), max_len=10, cache=4, completion_length=lengths)
  want = [_dapo_overlong(n, 10, 4) for n in lengths]
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
  np.testing.assert_allclose(got[:8], [0, 0, 0, -0.25, -0.5, -0.75, -1, -1])
  with pytest.raises(ValueError, match="overlong_cache"):
    rewards.overlong(B(1), B(1), max_len=10, cache=0, completion_length=[3])


def test_length():
  got = rewards.length(B(3), B(3), max_len=8, completion_length=[2, 8, 0])
  np.testing.assert_allclose(got, [0.25, 1.0, 0.0])


# ----------------------------------------------------------------------------- registry


def test_registry_and_weights():
  assert {"accuracy", "exact_match", "format", "overlong", "length"} <= set(
      rewards.list_rewards())
  assert rewards.parse_weights("accuracy:1.0, format:0.2,length") == (
      ("accuracy", 1.0), ("format", 0.2), ("length", 1.0))
  with pytest.raises(ValueError, match="unknown reward function 'acc'.*accuracy"):
    rewards.get_reward("acc")
  for spec, match in [("accuracy:x", "not a number"), ("nope:1", "unknown reward"),
                      ("accuracy:1,accuracy:2", "twice"), ("", "empty"),
                      ("accuracy:nan", "finite")]:
    with pytest.raises(ValueError, match=match):
      rewards.parse_weights(spec)
  fn = lambda p, c, **f: [0.0] * len(c)
  rewards.register_reward("test_zero", fn)
  try:
    assert rewards.get_reward("test_zero") is fn
    with pytest.raises(ValueError, match="already exists"):
      rewards.register_reward("test_zero", fn)
  finally:
    rewards.unregister_reward("test_zero")
  with pytest.raises(ValueError, match="must be non-empty"):
    rewards.register_reward("a:b", fn)


# ----------------------------------------------------------------------------- failures


def _raises_on_bad(p, c, **f):
  return [float(len(x)) if x != "bad" else 1 / 0 for x in c]


def _nan_on_bad(p, c, **f):
  return np.array([math.nan if x == "bad" else 1.0 for x in c])


def _short_by_one(p, c, **f):
  return [1.0] * (len(c) - 1)


TEXTS = ["ok", "fine", "bad", "good", "bad"]


@pytest.mark.parametrize("fn,index,match", [
    (_raises_on_bad, 2, "ZeroDivisionError"), (_nan_on_bad, 2, "not finite"),
    (_short_by_one, 0, "0 score")])
def test_failures_name_the_function_and_completion(fn, index, match):
  with pytest.raises(rewards.RewardError, match=match) as e:
    rewards.call_reward("myfn", fn, B(5), TEXTS, {})
  assert e.value.name == "myfn" and e.value.index == index
  assert f"reward function 'myfn' failed on completion {index}" in str(e.value)


@pytest.mark.parametrize("fn,ok_score", [(_raises_on_bad, None), (_nan_on_bad, 1.0)])
def test_zero_mode_scores_failures_0_and_counts_them(fn, ok_score):
  scores, failed = rewards.call_reward("myfn", fn, B(5), TEXTS, {}, on_error="zero")
  assert failed == 2
  want = [ok_score or float(len(t)) for t in TEXTS]
  want[2] = want[4] = 0.0
  np.testing.assert_array_equal(scores, want)
  scores, failed = rewards.call_reward("myfn", _short_by_one, B(5), TEXTS, {},
                                       on_error="zero")
  assert failed == 5 and not scores.any()


def test_a_batch_only_failure_is_named_without_an_index():
  fn = lambda p, c, **f: [1.0] if len(c) == 1 else 1 / 0  # fails only on the batch
  with pytest.raises(rewards.RewardError, match="'myfn' failed: ZeroDivisionError"):
    rewards.call_reward("myfn", fn, B(3), ["a", "b", "c"], {})


# ----------------------------------------------------------------------------- RL scorer


def _text_reward(parts, on_error="raise", group_size=2):
  tok = ByteTokenizer()
  fields = lambda it: [{"answer": "7"}, {"answer": "12"}]
  return tok, rl_rewards.TextReward(tokenizer=tok, stop_ids=(tok.eos_id,),
                                    parts=tuple(parts), fields=fields,
                                    group_size=group_size, on_error=on_error)


def _completions(tok, texts, n=6):
  out = np.zeros((len(texts), n), np.int32)
  for i, t in enumerate(texts):
    ids = list(tok.encode(t)) + [tok.eos_id, 70, 71]  # what follows EOS is not read
    ids = ids[:n]
    out[i, :len(ids)] = ids
  return out


def test_text_reward_decodes_weights_and_logs_each_function():
  import functools
  parts = [("accuracy", 1.0, rewards.accuracy),
           ("format", 0.5, functools.partial(rewards.format_match, pattern="[0-9]+")),
           ("length", -1.0, functools.partial(rewards.length, max_len=6))]
  tok, tr = _text_reward(parts)
  prompts = [tok.encode("3+4=")] * 2 + [tok.encode("9+3=")] * 2
  toks = _completions(tok, ["7", "= 7", "12", "123456"])
  scores, metrics = tr(0, prompts, type("Out", (), {"tokens": toks})())
  acc = np.array([1, 1, 1, 0.0])  # "= 7" has the right final number
  fmt = np.array([1, 0, 1, 1.0])
  lengths = np.array([2, 4, 3, 6.0])  # tokens generated, EOS included ("123456" has none)
  np.testing.assert_allclose(scores, acc + 0.5 * fmt - lengths / 6, rtol=1e-6)
  assert metrics == pytest.approx({"reward/accuracy": 0.75, "reward/format": 0.75,
                                   "reward/length": lengths.mean() / 6})


def test_text_reward_error_names_function_and_prompt_index():
  parts = [("accuracy", 1.0, rewards.accuracy), ("picky", 1.0, _raises_on_bad)]
  tok, tr = _text_reward(parts)
  prompts = [tok.encode("3+4=")] * 2 + [tok.encode("9+3=")] * 2
  out = type("Out", (), {"tokens": _completions(tok, ["7", "7", "bad", "12"])})()
  with pytest.raises(ValueError, match=r"iteration 5: reward function 'picky' failed on "
                     r"completion 2.*prompt index 1 of the iteration: '9\+3='"):
    tr(5, prompts, out)
  _, tr0 = _text_reward(parts, on_error="zero")
  scores, metrics = tr0(5, prompts, out)
  assert metrics["reward/picky/failures"] == 1.0
  np.testing.assert_allclose(scores, [2.0, 2.0, 0.0, 3.0])


# ----------------------------------------------------------------------------- config


def _rl_config(**rl):
  from experiments import grpo_verifiable
  c = grpo_verifiable.get_config("tiny")
  for k, v in rl.items():
    if k.startswith("data_"):
      c.data[k[5:]] = v
    else:
      c.rl[k] = v
  return c


@pytest.mark.parametrize("overrides,key", [
    (dict(reward_functions="accuracy:1,nope:1"), "rl.reward_functions"),
    (dict(reward_functions=""), "rl.reward_functions"),
    (dict(reward_functions="format:1", format_pattern=""), "rl.format_pattern"),
    (dict(reward_functions="format:1", format_pattern="(["), "rl.format_pattern"),
    (dict(reward_functions="overlong:1", overlong_cache=0), "rl.overlong_cache"),
    (dict(reward_functions="overlong:1", overlong_cache=99), "rl.overlong_cache"),
    (dict(reward_errors="skip"), "rl.reward_errors"),
    (dict(reward="checkpoint", reward_path="/x"), "rl.reward_functions"),
    (dict(sft_warmup_steps=-1), "rl.sft_warmup_steps"),
    (dict(data_source="synthetic", sft_warmup_steps=0), "rl.reward"),
    (dict(data_source="file", data_path="/x.jsonl", data_format="prompt"),
     "rl.sft_warmup_steps")])
def test_config_errors_name_the_key(overrides, key):
  with pytest.raises(ValueError, match=f"config.{key}"):
    config_lib.validate_rl(_rl_config(**overrides), jax.device_count())


def test_config_accepts_the_experiment():
  _, rl = config_lib.validate_rl(_rl_config(), jax.device_count())
  assert rl.reward == "functions" and rl.reward_errors == "raise"


@pytest.mark.parametrize("gold,text", [
    ("19", "19"), ("19", "019"), ("19", "19.0"), ("19", "-19"), ("0", "-0"),
    ("2.50", "2.5"), ("3", "4"), ("-7", "+7"), ("12", " 12 "),
    ("1", "1\x1f"), ("1", "\x1c1\n")])  # control characters str.strip() removes
def test_plain_number_shortcut_agrees_with_math_verify(gold, text):
  math_verify = pytest.importorskip("math_verify")
  want = math_verify.verify(math_verify.parse(gold), math_verify.parse(text))
  assert rewards.answers_equal(gold, text) is bool(want)
