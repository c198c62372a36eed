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
  if loss == "bt":
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
  with pytest.raises(ValueError, match="no checkpoint at step 5; kept steps: \\[3\\]"):
    _validate(tiny("dpo", **{"model.init_from": f"{sft_dir}:5"}))
  with pytest.raises(ValueError, match="not a directory"):
    _validate(tiny("dpo", **{"model.init_from": str(tmp_path / "nowhere")}))
