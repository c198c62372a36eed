"""Issue 18: learning-rate defaults for where a run starts, and ``steps=N``.

``optimizer.learning_rate = 0`` ("auto") resolves in `config.validate`: 1e-3 from
random init; from a trained model (``model.hf_path`` / ``model.init_from``) the
per-objective rate of the fine-tuning literature (the oracle here: the values the
docstring cites, written out, not read from the table); LoRA 10x. The run's record
holds the resolved number, so a resume of an older run recorded at 1e-3 is accepted.
"""

import json

import pytest

from experiments import _common
from jaxalign import checkpoint as ckpt_lib
from jaxalign import config as config_lib
from jaxalign.train import rundir


def _cfg(loss="dpo", lr=0.0, hf_path="", lora_rank=0, **over):
  c = config_lib.base_config()
  c.loss = loss
  c.reference.kind = "initial" if loss not in ("sft", "bradley_terry") else "none"
  c.model.head = "scalar" if loss == "bradley_terry" else "lm"
  c.data.format = {"sft": "sft", "kto": "unpaired", "rrhf": "ranked"}.get(loss, "hh")
  c.optimizer.learning_rate = lr
  c.model.hf_path = hf_path
  c.model.lora.rank = lora_rank
  for k, v in over.items():
    c[k] = v
  return c


def _validate(c):
  return config_lib.validate(c, 8)


def test_auto_from_random_init_is_the_scratch_rate():
  cfg = _validate(_cfg())
  assert cfg.optimizer.learning_rate == 1e-3 and cfg.optimizer.learning_rate_auto
  assert cfg.optimizer.learning_rate_note == ""  # the rate every run had: nothing to say
  assert config_lib.base_config().optimizer.learning_rate == 0.0  # auto by default
  # lr / eps of adamw: what the divergence guard's no-signal test compares with.
  assert cfg.divergence.adam_gain == pytest.approx(1e-3 / 1e-8)


@pytest.mark.parametrize("loss,full,lora", [
    ("dpo", 1e-6, 1e-5), ("ipo", 1e-6, 1e-5), ("rrhf", 1e-6, 1e-5),
    ("kto", 5e-7, 5e-6), ("sft", 2e-5, 2e-4), ("bradley_terry", 1e-5, 1e-4)])
def test_auto_from_a_trained_model_per_objective(loss, full, lora):
  cfg = _validate(_cfg(loss, hf_path="/ckpt/sft"))
  assert cfg.optimizer.learning_rate == full
  assert cfg.optimizer.learning_rate_note.startswith(
      f"optimizer.learning_rate: auto -> {full:g} (trained start (model.hf_path), ")
  assert cfg.optimizer.learning_rate_note.endswith("full fine-tuning)")
  if loss not in ("bradley_terry",):
    cfg = _validate(_cfg(loss, hf_path="/ckpt/sft", lora_rank=8))
    assert cfg.optimizer.learning_rate == lora
    assert cfg.optimizer.learning_rate_note.endswith("LoRA rank 8)")


def test_auto_from_init_from_and_for_online_rl(monkeypatch):
  # init_from resolves a real run directory; here its resolution is the identity.
  monkeypatch.setattr(config_lib, "_init_from", lambda v: v)
  c = _cfg("dpo")
  c.model.init_from = "/runs/sft:100"
  cfg = _validate(c)
  assert cfg.optimizer.learning_rate == 1e-6
  assert "(trained start (model.init_from), preference, full" in (
      cfg.optimizer.learning_rate_note)
  for arg, want in (("tiny", 1e-3), ("tiny,hf_path=/ckpt/sft", 1e-6)):
    r = _common.rl_config("grpo", arg)
    cfg, _ = config_lib.validate_rl(r, 8)
    assert cfg.optimizer.learning_rate == want, arg
  r = _common.rl_config("grpo", "tiny")
  r.model.init_from = "/runs/sft:100"
  cfg, _ = config_lib.validate_rl(r, 8)
  assert cfg.optimizer.learning_rate == 1e-6
  assert "rl, full fine-tuning" in cfg.optimizer.learning_rate_note


def test_explicit_rates_are_kept_and_a_high_one_on_a_trained_model_warned():
  cfg = _validate(_cfg(lr=3e-4))
  assert cfg.optimizer.learning_rate == 3e-4 and not cfg.optimizer.learning_rate_auto
  assert cfg.optimizer.learning_rate_note == ""
  assert _validate(_cfg(lr=5e-7, hf_path="/ckpt")).optimizer.learning_rate_note == ""
  cfg = _validate(_cfg(lr=1e-3, hf_path="/ckpt"))
  assert cfg.optimizer.learning_rate == 1e-3
  note = cfg.optimizer.learning_rate_note
  assert note.startswith("WARNING: config.optimizer.learning_rate=0.001 fine-tunes "
                         "every weight of a trained model (model.hf_path)")
  assert "rates for preference are 5e-7..1e-6" in note and "auto -> 1e-06" in note
  # LoRA's adapters start at zero and take higher rates: no warning.
  cfg = _validate(_cfg(lr=1e-3, hf_path="/ckpt", lora_rank=8))
  assert cfg.optimizer.learning_rate_note == ""
  with pytest.raises(ValueError, match=r"config\.optimizer\.learning_rate: must be > 0"):
    _validate(_cfg(lr=-1e-3))


def test_derived_fields_are_no_config_keys():
  c = _cfg()
  assert "learning_rate_auto" not in c.optimizer and "adam_gain" not in c.divergence
  c.optimizer.learning_rate_auto = True
  with pytest.raises(ValueError, match=r"config\.optimizer\.learning_rate_auto: "
                     r"unknown key"):
    _validate(c)


def test_record_holds_the_resolved_rate_and_an_old_1e3_run_resumes(tmp_path, monkeypatch):
  cfg = _validate(_cfg())
  record = rundir.config_record(cfg)
  assert record["optimizer"]["learning_rate"] == 1e-3
  assert "learning_rate_auto" not in record["optimizer"]
  assert "adam_gain" not in record["divergence"]
  # An old run recorded an explicit 1e-3 (the presets' rate before "auto") and saved
  # a checkpoint: the same command, now "auto", resolves to 1e-3 and resumes.
  old = _validate(_cfg(lr=1e-3))
  said = []
  rundir.prepare(old, str(tmp_path), say=said.append).release()
  assert said == [f"run dir {tmp_path}: new run (run.lock held, run.json recorded)"]
  monkeypatch.setattr(ckpt_lib, "complete_steps", lambda d: [10])
  said.clear()
  rundir.prepare(cfg, str(tmp_path), say=said.append).release()
  assert said == [f"run dir {tmp_path}: resuming"]
  with open(tmp_path / "run.json") as f:
    assert json.load(f)["config"]["optimizer"]["learning_rate"] == 1e-3
  # A run recorded at another rate is refused, and the refusal says how to resume.
  with pytest.raises(rundir.RunDirError) as info:
    rundir.prepare(_validate(_cfg(lr=3e-4)), str(tmp_path), say=said.append)
  assert "config.optimizer.learning_rate: 0.001 -> 0.0003" in str(info.value)
  other = tmp_path / "other"
  monkeypatch.setattr(ckpt_lib, "complete_steps", lambda d: [])
  rundir.prepare(_validate(_cfg(lr=3e-4)), str(other), say=said.append).release()
  monkeypatch.setattr(ckpt_lib, "complete_steps", lambda d: [10])
  with pytest.raises(rundir.RunDirError) as info:
    rundir.prepare(cfg, str(other), say=said.append)
  assert ("optimizer.learning_rate is auto here (-> 0.001, jaxalign.config."
          "OptimizerConfig); the recorded run trained at 0.0003: to resume it as it "
          "was, add --config.optimizer.learning_rate=0.0003.") in str(info.value)
  # A trained start prints what auto chose, first.
  said.clear()
  monkeypatch.setattr(ckpt_lib, "complete_steps", lambda d: [])
  trained = _validate(_cfg(hf_path=str(tmp_path / "missing")))
  with pytest.raises(ValueError, match="no config.json"):  # no checkpoint there
    rundir.prepare(trained, str(tmp_path / "third"), say=said.append)
  assert said[0] == ("optimizer.learning_rate: auto -> 1e-06 (trained start "
                     "(model.hf_path), preference, full fine-tuning)")
  assert said[1].startswith("run dir ") and len(said) == 2


@pytest.mark.parametrize("name", ["dpo", "sft", "kto", "reward", "demo"])
def test_steps_rescale_warmup_eval_checkpoint_and_log(name):
  import importlib
  mod = importlib.import_module(f"experiments.{name}")
  for steps, warm, ev, ck, log in ((40, 4, 8, 10, 4), (1000, 10, 200, 250, 10),
                                   (3, 0, 1, 1, 1)):
    c = mod.get_config(f"tiny,steps={steps}")
    assert (c.num_steps, c.optimizer.warmup_steps, c.eval.every_steps,
            c.checkpoint.every_steps, c.log.every_steps) == (steps, warm, ev, ck, log)
  # The presets that chose 1e-3 for random init now say "auto".
  assert mod.get_config("tiny").optimizer.learning_rate == config_lib.AUTO_LR


def test_steps_rescale_online_rl_presets():
  from experiments import grpo_verifiable
  for steps in (8, 100):
    c = _common.rl_config("grpo", f"tiny,steps={steps}")
    assert c.num_steps == steps and c.checkpoint.every_steps == max(steps // 4, 1)
    c = grpo_verifiable.get_config(f"full,steps={steps}")
    assert c.num_steps == steps and c.checkpoint.every_steps == steps // 2
