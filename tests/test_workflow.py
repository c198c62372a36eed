"""Chaining runs (``model.init_from``) and the run directory's config and tokenizer
(issue 18): tiny synthetic runs of a few steps."""

import json
import math
import os

import jax
import numpy as np
import pytest

from experiments import _common
from jaxalign import config as config_lib
from jaxalign.train import build
from jaxalign.train import logging as log_lib
from jaxalign.train import loop
from jaxalign.train import rundir


def tiny(loss="sft", steps=3, **overrides):
  """A ConfigDict: the synthetic task, a 1-layer d_model 32 model, nothing extra."""
  c = config_lib.base_config()
  c = _common.apply_variant(c, _common.experiment_arg("tiny"), num_steps=steps)
  c.loss = loss
  if loss == "dpo":
    c.loss_hparams.beta = 0.1
  if loss == "bradley_terry":
    c.model.head = "scalar"
  c.model.update(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, mlp_dim=64)
  c.model.logprob_chunk = 16
  c.data.batch_size = 16
  c.data.task.num_train = 64
  c.eval.enabled = False
  c.log.update(every_steps=1, tensorboard=False, progress_bar=False, plots=False)
  c.checkpoint.update(async_save=False, every_steps=1000)  # the final save only
  for key, value in overrides.items():
    node = c
    *parents, name = key.split(".")
    for p in parents:
      node = node[p]
    node[name] = value
  return c


def _validate(c):
  return config_lib.validate(c, 8)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sft"))
  result = loop.run(_validate(tiny("sft")), workdir, log=lambda m: None)
  return workdir, result


@pytest.mark.slow  # trains a tiny model (the module's SFT / LoRA run)
def test_run_dir_keeps_a_rerunnable_config_and_the_tokenizer(sft_run, tmp_path):
  workdir, _ = sft_run
  cfg = _validate(tiny("sft"))
  with open(os.path.join(workdir, "run.json")) as f:
    record = json.load(f)
  assert record["resolved"]["arch"]["d_model"] == 32
  assert record["resolved"]["tokenizer"] == "synthetic"
  tok = rundir.load_tokenizer_dir(os.path.join(workdir, rundir.TOKENIZER_DIR))
  assert (tok.vocab_size, tok.eos_id) == (32, 3)
  # The saved config.py, loaded as --config loads it, validates to the same Config.
  from ml_collections import config_flags
  parser = config_flags.config_flags.ConfigFileFlagParser("config", lock_config=True)
  loaded = parser.parse(os.path.join(workdir, rundir.RERUN_CONFIG))
  assert _validate(loaded) == cfg
  loaded.num_steps = 7  # overrides still apply on the locked config
  assert _validate(loaded).num_steps == 7


@pytest.mark.slow  # trains a tiny model (the module's SFT / LoRA run)
def test_sft_to_dpo_starts_from_the_sft_weights_and_reference(sft_run, tmp_path):
  sft_dir, sft = sft_run
  c = tiny("dpo", steps=1, **{"model.init_from": sft_dir})
  cfg = _validate(c)
  assert cfg.model.init_from == f"{os.path.abspath(sft_dir)}:3"  # resolved: latest
  result = loop.run(cfg, str(tmp_path / "dpo"), log=lambda m: None)
  first = [r for r in log_lib.read_metrics(str(tmp_path / "dpo" / "metrics.jsonl"))
           if "loss" in r][0]
  # Analytic identity: DPO's loss is -log sigmoid(beta * (margin_policy -
  # margin_reference)); at the first step it is log 2 exactly when the reference's
  # log-probs are the policy's.
  assert abs(first["loss"] - math.log(2.0)) < 1e-6, first
  assert result.step == 1
  # A restarted run recomputes its reference (`build.reference_params`): from the
  # SFT checkpoint again, so it is the SFT run's final policy, not a re-init.
  model = build.build_model(cfg.model, 32)
  ref = build.reference_params(cfg.reference, model, jax.random.key(cfg.seed), None)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(sft.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_reward_model_run_starts_a_policy_with_its_trunk(tmp_path, capsys):
  """No training: a recorded reward-model run with a hand-made checkpoint."""
  from jaxalign import checkpoint as ckpt_lib
  from jaxalign.models import heads
  from jaxalign.models import transformer
  rm_cfg = _validate(tiny("bradley_terry"))
  rundir.prepare(rm_cfg, str(tmp_path / "rm"), say=lambda m: None).release()
  trunk = jax.device_get(transformer.init(rm_cfg.model.arch, jax.random.key(5))[1])
  head = jax.device_get(heads.init_head(32, jax.random.key(6)))
  with ckpt_lib.Checkpointer(str(tmp_path / "rm" / "checkpoints"), save_every=1,
                             keep=2) as ck:
    ck.save(4, {"params": {"model": trunk, "head": head}}, {})
  policy = build.build_model(_validate(
      tiny("dpo", **{"model.init_from": str(tmp_path / "rm")})).model, 32)
  assert "reward model (scalar head)" in capsys.readouterr().out
  for a, b in zip(jax.tree.leaves(policy.loaded_params), jax.tree.leaves(trunk)):
    np.testing.assert_array_equal(a, b)
  # A reward model started from it keeps its head too (RM -> RM).
  rm = build.build_model(_validate(
      tiny("bradley_terry", **{"model.init_from": str(tmp_path / "rm")})).model, 32)
  np.testing.assert_array_equal(jax.tree.leaves(rm.loaded_params["head"])[0],
                                jax.tree.leaves(head)[0])
  # A policy run starts a reward model: its weights, a fresh head (SFT -> RM).
  rundir.prepare(_validate(tiny("sft")), str(tmp_path / "sft"),
                 say=lambda m: None).release()
  with ckpt_lib.Checkpointer(str(tmp_path / "sft" / "checkpoints"), save_every=1,
                             keep=2) as ck:
    ck.save(2, {"params": trunk}, {})
  rm = build.build_model(_validate(
      tiny("bradley_terry", **{"model.init_from": str(tmp_path / "sft")})).model, 32)
  assert rm.loaded_params["head"] is None  # build.merge_loaded keeps the fresh one
  for a, b in zip(jax.tree.leaves(rm.loaded_params["model"]), jax.tree.leaves(trunk)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # trains a tiny model (the module's SFT / LoRA run)
def test_init_from_names_the_differing_keys_before_building(sft_run, tmp_path):
  sft_dir, _ = sft_run
  cfg = _validate(tiny("dpo", **{"model.init_from": sft_dir, "model.d_model": 64,
                                 "model.mlp_dim": 96}))
  with pytest.raises(ValueError) as info:
    rundir.prepare(cfg, str(tmp_path / "x"), say=lambda m: None)
  msg = str(info.value)
  assert "model.d_model: 32 in the source run, 64 here" in msg
  assert "model.mlp_dim: 96" not in msg and "model.mlp_dim: 64 in the source run" in msg
  assert "config.py" in msg
  cfg = _validate(tiny("dpo", **{"model.init_from": sft_dir, "data.task.vocab_size": 40,
                                 "model.vocab_size": 64}))
  with pytest.raises(ValueError, match="tokenizer: the source run's is 'synthetic'"):
    rundir.prepare(cfg, str(tmp_path / "y"), say=lambda m: None)
  with pytest.raises(ValueError, match="no checkpoint at step 5; kept steps: \\[3\\]"):
    _validate(tiny("dpo", **{"model.init_from": f"{sft_dir}:5"}))
  with pytest.raises(ValueError, match="not a directory"):
    _validate(tiny("dpo", **{"model.init_from": str(tmp_path / "nowhere")}))


# --- export and generation -----------------------------------------------------------


def _jax_logits(arch, params, tokens, lora=None):
  from jaxalign.models import transformer
  pos = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  logits = jax.jit(transformer.logits, static_argnums=0)
  return np.asarray(logits(build.graphdef(arch), params, tokens, pos, lora=lora))


@pytest.mark.slow  # trains a tiny model (the module's SFT / LoRA run)
def test_export_loads_in_transformers_with_jaxalign_logits(sft_run, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from jaxalign import export
  workdir, sft = sft_run
  out = str(tmp_path / "hf")
  assert export.main(["--workdir", workdir, "--out", out]) == 0
  with open(os.path.join(out, "generation_config.json")) as f:
    assert json.load(f)["eos_token_id"] == 3  # the synthetic task's stop id
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  tokens = np.random.default_rng(0).integers(0, 32, (2, 12))
  with torch.no_grad():
    got = model.eval()(torch.from_numpy(tokens)).logits.numpy()
  # Oracle: jaxalign's forward of the run's own final params (in memory, not read
  # back from the checkpoint the export read).
  arch = build.resolved_arch(_validate(tiny("sft")).model)
  want = _jax_logits(arch, sft.state.params, tokens)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def _hf_greedy(model, prompt, max_new, eos, pad):
  import torch
  with torch.no_grad():
    out = model.generate(torch.from_numpy(np.asarray([prompt], np.int64)),
                         do_sample=False, max_new_tokens=max_new, eos_token_id=eos,
                         pad_token_id=pad, attention_mask=torch.ones(1, len(prompt),
                                                                     dtype=torch.long))
  new = out[0, len(prompt):].tolist()
  return new[:new.index(eos)] if eos in new else new


def _write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow  # trains a tiny model (the module's SFT / LoRA run)
def test_generate_from_a_workdir_equals_its_export_and_transformers(sft_run, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from jaxalign import export
  from jaxalign import generate
  workdir, _ = sft_run
  export.export(workdir, str(tmp_path / "hf"))
  prompts = [[1, 5, 9, 4, 2], [1, 7], [1, 12, 13, 14, 15, 6, 8], [1, 30, 29]]
  _write_jsonl(tmp_path / "p.jsonl", [{"prompt_ids": p, "id": i}
                                      for i, p in enumerate(prompts)])
  common = ["--prompts", str(tmp_path / "p.jsonl"), "--greedy", "--max_new_tokens",
            "10", "--batch_size", "3"]  # 4 prompts: a padded last batch
  assert generate.main(["--workdir", workdir, "--out", str(tmp_path / "w.jsonl")]
                       + common) == 0
  assert generate.main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "h.jsonl")]
                       + common) == 0
  ours, theirs = _read_jsonl(tmp_path / "w.jsonl"), _read_jsonl(tmp_path / "h.jsonl")
  assert [r["id"] for r in ours] == [0, 1, 2, 3]
  assert [r["completion_ids"] for r in ours] == [r["completion_ids"] for r in theirs]
  assert sum(r["completion_tokens"] for r in ours) >= 8  # not all stopped at once
  model = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "hf", dtype=torch.float32).eval()
  for r, p in zip(ours, prompts):
    assert r["prompt_tokens"] == len(p)
    assert r["completion_tokens"] == len(r["completion_ids"])
    assert r["completion_ids"] == _hf_greedy(model, p, 10, eos=3, pad=0)


def test_generate_on_a_transformers_checkpoint_matches_its_greedy_decoding(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from jaxalign import generate
  from jaxalign.data import tokenizer as tok_lib
  torch.manual_seed(0)
  # Weights large enough for peaked logits: greedy decoding is then not decided by
  # float noise between near-tied tokens.
  config = transformers.LlamaConfig(
      vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
      bos_token_id=2, eos_token_id=3, pad_token_id=0)
  model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  rundir.save_tokenizer(tok_lib.ByteTokenizer(), str(tmp_path / "hf" / "tok"))
  for name in os.listdir(tmp_path / "hf" / "tok"):  # the byte tokenizer's note
    os.replace(tmp_path / "hf" / "tok" / name, tmp_path / "hf" / name)
  records = [{"prompt": "Hello"}, {"prompt": "2 + 2 ="},
             {"messages": [{"role": "user", "content": "Hi there"}]}]
  _write_jsonl(tmp_path / "p.jsonl", records)
  assert generate.main(["--hf", str(tmp_path / "hf"), "--prompts",
                        str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                        "--greedy", "--max_new_tokens", "12", "--batch_size", "2"]) == 0
  out = _read_jsonl(tmp_path / "o.jsonl")
  assert [r["completion_tokens"] for r in out] == [12, 12, 12]  # eos 3 not drawn here
  tok = tok_lib.ByteTokenizer()
  for r in out:
    prompt = (generate.text_prompt_ids(tok, r["prompt"]) if "prompt" in r
              else generate.prompt_ids(tok, r["messages"]))
    assert r["prompt_tokens"] == len(prompt)
    assert r["completion_ids"] == _hf_greedy(model, prompt.tolist(), 12, eos=3, pad=0)
    assert r["completion"] == tok.decode(r["completion_ids"])
  # Sampling with a nucleus smaller than the top token's probability keeps only that
  # token: the sampled path must give the greedy completions.
  assert generate.main(["--hf", str(tmp_path / "hf"), "--prompts",
                        str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "s.jsonl"),
                        "--temperature", "0.7", "--top_p", "1e-6", "--max_new_tokens",
                        "12", "--batch_size", "2", "--seed", "3"]) == 0
  sampled = _read_jsonl(tmp_path / "s.jsonl")
  assert [r["completion_ids"] for r in sampled] == [r["completion_ids"] for r in out]


def test_generate_names_the_bad_line(tmp_path, capsys):
  from jaxalign import generate
  from jaxalign.data import tokenizer as tok_lib
  tok = tok_lib.ByteTokenizer()
  path = str(tmp_path / "p.jsonl")
  for line, why in (('{"prompt": 3}', '"prompt" must be a string'),
                    ('{"prompt": "a", "messages": []}', "exactly one of"),
                    ('{"messages": [{"role": "user"}]}', '"messages" must be'),
                    ('{"prompt": "a"', "Expecting"),
                    ('{"prompt_ids": [1, 999]}', "ids in \\[0, 260\\)")):
    _write_jsonl(path, [{"prompt": "fine"}, "", line])
    with pytest.raises(ValueError, match=f"^{path}:3: .*{why}"):
      generate.read_prompts(path, tok)
  # The command: exit code 2 and two lines on stderr (as jaxalign.main).
  code = generate.main(["--workdir", str(tmp_path / "none"), "--prompts", path,
                        "--out", str(tmp_path / "o.jsonl")])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 2 and err[0].startswith("error: --workdir=")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lora"))
  c = tiny("sft", steps=2, **{"model.lora.rank": 4, "model.lora.alpha": 8.0,
                              "optimizer.learning_rate": 0.05})
  cfg = _validate(c)
  return workdir, loop.run(cfg, workdir, log=lambda m: None), cfg


@pytest.mark.slow  # trains a tiny model (the module's SFT / LoRA run)
def test_lora_run_exports_as_peft_adapters_and_merged_and_chains(lora_run, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  from jaxalign import export
  from jaxalign.models import lora as lora_lib
  from jaxalign.parallel import mesh as mesh_lib
  workdir, result, cfg = lora_run
  # Oracle: the training code's own frozen base (`build.base_params`) with the run's
  # final adapters (in memory), through jaxalign's unmerged LoRA forward.
  model = build.build_model(cfg.model, 32)
  base, _ = build.base_params(model, mesh_lib.make_mesh(cfg.mesh), cfg.mesh.rules,
                              jax.random.key(cfg.seed))
  adapters = jax.device_get(result.state.params["lora"])
  tokens = np.random.default_rng(1).integers(0, 32, (2, 10))
  want = _jax_logits(model.arch, base, tokens, lora_lib.Adapters(adapters, cfg.model.lora))
  assert np.abs(want - _jax_logits(model.arch, base, tokens)).max() > 1e-3  # trained
  export.export(workdir, str(tmp_path / "adapter"))
  export.export(workdir, str(tmp_path / "merged"), lora="merged")
  base_pt = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "adapter" / "base", dtype=torch.float32)
  peft_model = peft.PeftModel.from_pretrained(base_pt, str(tmp_path / "adapter")).eval()
  merged_pt = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "merged", dtype=torch.float32).eval()
  with torch.no_grad():
    for m in (peft_model, merged_pt):
      got = m(torch.from_numpy(tokens)).logits.numpy()
      np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # model.init_from a LoRA run starts from base + adapters merged.
  chained = _validate(tiny("dpo", **{"model.init_from": workdir}))
  loaded = build.build_model(chained.model, 32).loaded_params
  np.testing.assert_allclose(_jax_logits(model.arch, loaded, tokens), want, atol=1e-4,
                             rtol=0)


def test_a_checkpoint_tokenizer_is_kept_and_exported_with_its_chat_template(tmp_path):
  transformers = pytest.importorskip("transformers")
  import test_checkpoint_tokenizer as ct
  from jaxalign.data import tokenizer as tok_lib
  from jaxalign.train import refcache
  ck = ct._checkpoint(tmp_path, "llama3", ct.LLAMA3_SPECIALS, ct.LLAMA3_TEMPLATE,
                      {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
                      generation={"bos_token_id": 0, "eos_token_id": [1, 4]},
                      post_bos="<|begin_of_text|>")
  tok = tok_lib.from_pretrained(ck)
  kept = str(tmp_path / "kept")
  rundir.save_tokenizer(tok, kept)
  again = rundir.load_tokenizer_dir(kept)
  assert refcache.fingerprint_tokenizer(again) == refcache.fingerprint_tokenizer(tok)
  assert again.eos_ids == tok.eos_ids and set(tok.eos_ids) == {1, 4}
  # What an export ships: transformers renders the conversation as jaxalign does.
  hf_tok = transformers.AutoTokenizer.from_pretrained(kept)
  for conv in ct.CONVERSATIONS:
    assert hf_tok.apply_chat_template(conv, tokenize=False) == tok.apply_chat_template(conv)


def test_sentencepiece_and_byte_tokenizers_are_kept_and_read_back(tmp_path):
  # The run directory keeps the tokenizer a run trained with; a SentencePiece model
  # (the HH recipe's) must come back with the same ids, not stop the run at setup.
  from jaxalign.data import tokenizer as tok_lib
  from jaxalign.train import refcache
  texts = [f"Human: question {i} about topic {i % 7}? Assistant: answer {i * 3}."
           for i in range(200)]
  spm_tok = tok_lib.SentencePieceTokenizer.train(texts, vocab_size=300)
  for name, tok in (("spm", spm_tok), ("byte", tok_lib.ByteTokenizer())):
    kept = str(tmp_path / name)
    rundir.save_tokenizer(tok, kept)
    again = rundir.load_tokenizer_dir(kept)
    assert type(again) is type(tok), name
    assert refcache.fingerprint_tokenizer(again) == refcache.fingerprint_tokenizer(tok)
    np.testing.assert_array_equal(again.encode(texts[3]), tok.encode(texts[3]), name)
