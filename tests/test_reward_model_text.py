"""A reward model scoring text with its own tokenizer (`jaxalign.rewards.model`).

Oracles: transformers' ``LlamaForSequenceClassification`` on the same texts, tokenised
independently by transformers' own tokenizer (its logits are the scores); a reward
model run scored from its run directory against its ``jaxalign.export`` (and
transformers on that export); the RL text scorer against the model called directly.
The checkpoints are made here: a tiny byte-level BPE (`tokenizers`) and random weights.
"""

import functools
import json
import os
import types

import jax
import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign import rewards
from jaxalign.data.tokenizer import ByteTokenizer
from jaxalign.rewards import model as rm_lib
from jaxalign.train import rl_rewards

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TOL = 1e-4  # f32 scores of a 2-layer d=64 model, two implementations
CORPUS = ["What is 3+4? It is 7.", "How do I make tea? Boil water, add the bag.",
          "The quick brown fox jumps over the lazy dog.", "12+7=19 and 9-3=6"] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PROMPTS = ["What is 3+4?", "How do I make tea?", "12+7=", "Say something.", "9-3="]
COMPLETIONS = ["It is 7.", "Boil water, add the bag.", "19", "", "6 and more words here"]


def _hf_rm(path, template, pad_is_eos=True, seed=0, arch="Llama"):
  """A random ``{arch}ForSequenceClassification`` + a BPE tokenizer (a chat template
  or none) saved in ``path``; returns the transformers model."""
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=300, special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(path)
  tok.save(str(path / "tokenizer.json"))
  cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
  if template:
    cfg.update(chat_template=template, eos_token="<|im_end|>")
  (path / "tokenizer_config.json").write_text(json.dumps(cfg))
  eos = tok.token_to_id(cfg["eos_token"])
  torch.manual_seed(seed)
  config = getattr(transformers, f"{arch}Config")(
      vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_labels=1,
      pad_token_id=eos if pad_is_eos else 0, rms_norm_eps=1e-5)
  model = getattr(transformers, f"{arch}ForSequenceClassification")(config)
  model = model.float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path, safe_serialization=True)
  return model


def _hf_scores(model, seqs):
  with torch.no_grad():
    return np.array([model(torch.tensor([list(s)])).logits[0, 0].item() for s in seqs])


def _hf_ids(path, template, prompt, completion):
  """transformers' own tokenisation: the chat template, or prompt + completion + EOS."""
  # The checkpoint's tokenizer.json as such: AutoTokenizer would pick transformers'
  # class for config.json's model_type (Qwen2Tokenizer re-splits digits).
  cfg = json.loads((path / "tokenizer_config.json").read_text())
  tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"),
                                             eos_token=cfg["eos_token"])
  tok.chat_template = cfg.get("chat_template")
  if template:
    return tok.apply_chat_template([{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": completion}],
                                   tokenize=True, return_dict=False)
  return (tok(prompt, add_special_tokens=False)["input_ids"]
          + tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])


@pytest.mark.parametrize("template,arch", [("", "Llama"), (CHATML, "Qwen2")],
                         ids=["llama_plain", "qwen2_chatml"])
def test_hf_reward_model_scores_equal_transformers(tmp_path, template, arch):
  path = tmp_path / "rm"
  model = _hf_rm(path, template, arch=arch)  # Qwen2: q/k/v biases (randomised)
  rm = rm_lib.load(str(path), rows=4, max_len=64)  # 5 texts: two chunks of 4 rows
  got = rm(PROMPTS, COMPLETIONS)
  seqs = [_hf_ids(path, template, p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
  for s, p, c in zip(seqs, PROMPTS, COMPLETIONS):
    np.testing.assert_array_equal(rm_lib.encode(rm.source.tokenizer, p, c), s)
  np.testing.assert_allclose(got, _hf_scores(model, seqs), atol=TOL, rtol=0)
  # pad = eos: without a template the text ends in EOS, and transformers (so jaxalign)
  # reads the token before it.
  assert rm.source.pad_id == rm.source.tokenizer.eos_id
  if not template:
    assert all(rm_lib.score_index(s, rm.source.pad_id) == len(s) - 2 for s in seqs)
  # Static shapes: one program per length bucket (32, 64), whatever the batch.
  for i in range(len(PROMPTS)):
    np.testing.assert_allclose(rm(PROMPTS[i:i + 1], COMPLETIONS[i:i + 1]), got[i:i + 1],
                               atol=1e-5, rtol=0)
  traces = rm.traces
  rm(PROMPTS[::-1], COMPLETIONS[::-1])
  rm(PROMPTS[:2], COMPLETIONS[:2])
  assert rm.traces == traces <= len(rm.buckets) == 2


def test_not_a_reward_model_names_the_key(tmp_path):
  path = tmp_path / "rm"
  _hf_rm(path, "")
  lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2))
  lm.save_pretrained(tmp_path / "lm", safe_serialization=True)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (tmp_path / "lm" / name).write_bytes((path / name).read_bytes())
  with pytest.raises(ValueError, match=r"config.rl.reward_model=.*no 'score.weight'"):
    rm_lib.resolve(str(tmp_path / "lm"))
  with pytest.raises(ValueError, match=r"config.rl.reward_model=.*not a directory"):
    rm_lib.resolve(str(tmp_path / "nothing"))
  # The HF causal-LM reader refuses the reward model (no LM head) by name.
  from jaxalign.models import hf
  with pytest.raises(ValueError, match="load_hf_reward"):
    hf.load_hf(str(path))


# ----------------------------------------------------------------------------- RL


def _policy_config(rm_path, **rl):
  from experiments import grpo_verifiable
  c = grpo_verifiable.get_config("tiny")  # byte tokenizer, arithmetic prompts
  c.rl.update(reward_functions="reward_model:1.0,format:0.5", reward_model=rm_path,
              sft_warmup_steps=0, **rl)
  c.num_steps = 1
  return c


@pytest.mark.parametrize("rl,key", [
    (dict(reward_functions="format:1"), "rl.reward_model"),
    (dict(reward_model=""), "rl.reward_model"),
    (dict(reward_model="/nope"), "rl.reward_model")])
def test_config_errors_name_the_key(tmp_path, rl, key):
  path = tmp_path / "rm"
  _hf_rm(path, "")
  c = _policy_config(str(path))
  c.rl.update(rl)
  with pytest.raises(ValueError, match=f"config.{key}"):
    config_lib.validate_rl(c, jax.device_count())


def test_text_reward_with_another_tokenizer_equals_the_model_on_the_text(tmp_path):
  path = tmp_path / "rm"
  _hf_rm(path, CHATML)
  _, rlc = config_lib.validate_rl(_policy_config(str(path)), jax.device_count())
  assert rlc.reward_model == str(path)
  tok = ByteTokenizer()  # the policy's: not the reward model's BPE
  source = types.SimpleNamespace(tokenizer=tok, fields=lambda it: [{}, {}],
                                 stops={"eos_id": tok.eos_id, "extra_eos_ids": ()})
  tr = rl_rewards.make_text_reward(rlc, source, rows=4)
  prompts = [tok.encode("3+4=")] * 2 + [tok.encode("9-3=")] * 2
  texts = ["7", "seven", "6", "66"]
  tokens = np.zeros((4, 6), np.int32)
  for i, t in enumerate(texts):
    ids = list(tok.encode(t)) + [tok.eos_id]
    tokens[i, :len(ids)] = ids
  scores, metrics = tr(0, prompts, type("Out", (), {"tokens": tokens})())
  direct = rm_lib.load(str(path), rows=4, max_len=64)(
      ["3+4="] * 2 + ["9-3="] * 2, texts)
  fmt = rewards.format_match([""] * 4, texts, pattern=rlc.format_pattern)
  np.testing.assert_allclose(scores, direct + 0.5 * np.asarray(fmt), atol=1e-5)
  assert metrics["reward/reward_model"] == pytest.approx(direct.mean(), abs=1e-5)
  # A text over the model's length cap is a failure named like any function's:
  # the function and the completion (rl.reward_errors='zero' would score it 0).
  short = rm_lib.load(str(path), rows=4, max_len=32)
  fn = functools.partial(rewards.get_reward("reward_model"), model=short)
  with pytest.raises(rewards.RewardError,
                     match="'reward_model' failed on completion 2: .*over its limit 32"):
    rewards.call_reward("reward_model", fn, ["3+4="] * 3, ["7", "8", "9" * 80], {})
  got, failed = rewards.call_reward("reward_model", fn, ["3+4="] * 3, ["7", "8", "9" * 80],
                                    {}, on_error="zero")
  assert failed == 1 and got[2] == 0.0
  np.testing.assert_allclose(got[:2], short(["3+4="] * 2, ["7", "8"]), atol=1e-6)


@pytest.mark.slow  # one GRPO iteration end to end: 14 s with a warm compile cache, 57 s cold
def test_grpo_iteration_with_a_text_reward_model(tmp_path):
  from jaxalign.train import logging as log_lib
  from jaxalign.train import rl
  path = tmp_path / "rm"
  _hf_rm(path, CHATML)
  res = rl.run_rl(_policy_config(str(path)), str(tmp_path / "run"), log=lambda m: None)
  assert res.status == "done" and res.iteration == 1
  recs = [r for r in log_lib.read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
          if "reward/reward_model" in r]
  assert recs and np.isfinite(recs[-1]["reward/reward_model"])


# ----------------------------------------------------------------------------- export


def _rm_run(tmp_path, bias):
  """A recorded reward-model run (byte tokenizer, file data) with a hand-made
  checkpoint: random trunk, a random head with bias ``bias`` (no training)."""
  from experiments import _common
  from jaxalign import checkpoint as ckpt_lib
  from jaxalign.models import heads
  from jaxalign.models import transformer
  from jaxalign.train import rundir
  data = tmp_path / "pairs.jsonl"
  data.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
  c = _common.apply_variant(config_lib.base_config(), _common.experiment_arg("tiny"),
                            num_steps=1)
  c.loss, c.model.head = "bradley_terry", "scalar"
  c.model.update(vocab_size=260, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                 mlp_dim=64, tie_embeddings=False)
  c.data.update(source="file", path=str(data), format="pairwise", tokenizer="byte")
  cfg = config_lib.validate(c, jax.device_count())
  workdir = str(tmp_path / "rm_run")
  rundir.prepare(cfg, workdir, say=lambda m: None).release()
  trunk = jax.device_get(transformer.init(cfg.model.arch, jax.random.key(3))[1])
  head = jax.device_get(heads.init_head(32, jax.random.key(4)))
  head["b"] = np.float32(bias)
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                             keep=2) as ck:
    ck.save(5, {"params": {"model": trunk, "head": head}}, {})
  return workdir


def test_exported_reward_run_scores_as_its_run_dir_and_in_transformers(tmp_path):
  from jaxalign import export
  workdir = _rm_run(tmp_path, bias=0.25)
  assert rm_lib.resolve(workdir) == f"{os.path.abspath(workdir)}:5"
  by_run = rm_lib.load(workdir, rows=4, max_len=64)
  assert by_run.source.pad_id is None and by_run.source.arch.vocab_size == 260
  out = str(tmp_path / "hf")
  note = export.export(workdir, out)
  assert note["reward_model"] and note["score_bias"] == 0.25 and "warning" not in note
  by_hf = rm_lib.load(out, rows=4, max_len=64)
  assert by_hf.source.pad_id == 0  # the byte tokenizer's pad, not its EOS (3)
  want = by_run(PROMPTS, COMPLETIONS)
  np.testing.assert_allclose(by_hf(PROMPTS, COMPLETIONS), want, atol=1e-5, rtol=0)
  # transformers on the export (the same ids: jaxalign's byte tokenizer); its score
  # layer has no bias, so its scores are jaxalign's minus the head's bias.
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, dtype=torch.float32).eval()
  assert type(model).__name__ == "LlamaForSequenceClassification"
  seqs = by_run.encode_all(PROMPTS, COMPLETIONS)
  np.testing.assert_allclose(_hf_scores(model, seqs), want - 0.25, atol=TOL, rtol=0)
  # A policy run is not a reward model.
  c = _policy_config(_policy_run(tmp_path))
  with pytest.raises(ValueError, match=r"config.rl.reward_model=.*not a reward model"):
    config_lib.validate_rl(c, jax.device_count())


def _policy_run(tmp_path):
  from experiments import _common
  from jaxalign.train import rundir
  c = _common.apply_variant(config_lib.base_config(), _common.experiment_arg("tiny"),
                            num_steps=1)
  cfg = config_lib.validate(c, jax.device_count())
  workdir = str(tmp_path / "policy_run")
  rundir.prepare(cfg, workdir, say=lambda m: None).release()
  from jaxalign import checkpoint as ckpt_lib
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                             keep=2) as ck:
    ck.save(1, {"params": {"w": np.zeros(2, np.float32)}}, {})
  return workdir


def test_eval_reward_model_with_another_tokenizer_scores_the_text(tmp_path):
  """``eval.reward_model`` (offline training's generation eval) with an HF reward
  model: the byte-tokenizer policy's responses, decoded up to EOS, scored as text."""
  from experiments import _common
  from jaxalign.train import gen_eval
  from jaxalign.train import rl_steps
  path = tmp_path / "rm"
  _hf_rm(path, CHATML)
  data = tmp_path / "pairs.jsonl"
  data.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
  c = _common.apply_variant(config_lib.base_config(), _common.experiment_arg("tiny"),
                            num_steps=1)
  c.data.update(source="file", path=str(data), format="pairwise", tokenizer="byte")
  c.model.vocab_size = 260
  c.eval.reward_model = str(path)
  cfg = config_lib.validate(c, jax.device_count())
  assert cfg.eval.reward_model == str(path)
  scorer = gen_eval.reward_model_scorer(cfg.eval.reward_model, cfg, None)
  tok = ByteTokenizer()
  p_BxP, len_B = rl_steps.left_pad([tok.encode("3+4="), tok.encode("12+7=")], 8)
  tokens = np.zeros((2, 5), np.int32)
  for i, t in enumerate(["7", "19"]):
    ids = list(tok.encode(t)) + [tok.eos_id, 70]  # what follows EOS is not read
    tokens[i, :len(ids)] = ids
  got = scorer(p_BxP, len_B, types.SimpleNamespace(tokens=tokens))
  want = rm_lib.load(str(path), rows=4, max_len=64)(["3+4=", "12+7="], ["7", "19"])
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
