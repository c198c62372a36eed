"""Every offline experiment config runs (tiny variant, a few steps); the demo learns.

The per-config runs happen in ONE child process (this file run as a script, on one
CPU device) that shares a JAX persistent compilation cache between the configs, so
the programs they have in common (init, reference copy, eval scoring) compile once;
each config still compiles its own train step. One device, not the tests' 8 fake
ones: the sharded step is covered by tests/test_steps.py, and a full 8-device loop
on this 2-core machine twice died in an XLA:CPU collective rendezvous (one device
thread stuck in an all-reduce while the other seven waited in an all-gather). The demo
runs as the README runs it, through ``python -m jaxalign.main``.

Files in experiments/ without a ``get_config`` (runnable scripts) are not configs.
The online-RL configs (those with an ``rl`` section: ppo, grpo, rloo, rrhf_online)
belong to ``jaxalign.train.rl`` and are exercised by its own tests; here they are only
checked to carry a launch command and to be routed by main (see test_main).
"""

import glob
import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest

from experiments import _common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _is_config_file(path: str) -> bool:
  # experiments/ also holds runnable scripts (e.g. frontier.py); configs define
  # get_config.
  with open(path, encoding="utf-8") as f:
    return "\ndef get_config(" in f.read()


ALL_CONFIGS = sorted(os.path.basename(p)[:-3]
                     for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
                     if _is_config_file(p))
RUN_STEPS = 2
TIMEOUT_S = 900


def load_config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(
      f"experiment_{name}", os.path.join(ROOT, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert "python -m jaxalign.main --config experiments/" in module.__doc__, name
  return module.get_config(arg)


def _is_rl(name: str) -> bool:
  return "rl" in load_config(name, "tiny")


OFFLINE = [n for n in ALL_CONFIGS if not _is_rl(n)]


def test_every_algorithm_has_a_config():
  want = {"demo", "sft", "reward", "dpo", "ipo", "kto", "cpo", "orpo", "simpo", "rrhf"}
  assert want <= set(OFFLINE)


def _quick(c, steps=RUN_STEPS):
  c.num_steps = steps
  c.log.tensorboard = False
  c.log.plots = False
  c.log.progress_bar = False
  c.eval.every_steps = 0  # final eval only
  return c


def _hh_small(c):
  c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64)
  c.data.buckets = ()  # derived: (128,) for prefix-shared pairs under max_length 64
  c.data.max_length = 64
  c.data.max_prompt_length = 40
  return c


def _child(out_path: str, hh_path: str, workroot: str) -> None:
  """Runs every offline config for RUN_STEPS steps; writes one record per run."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxalign import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxalign.train import build, loop  # pylint: disable=g-import-not-at-top

  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
  from jaxalign.models import transformer  # pylint: disable=g-import-not-at-top
  from jaxalign.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  # An HF checkpoint directory with the tiny architecture (random weights, seed 42).
  hf_dir = os.path.join(workroot, "hf_tiny")
  arch = transformer.TransformerConfig(**_common.TINY_MODEL)
  _, hf_params = transformer.init(arch, jax.random.key(42))
  hf.save_hf(hf_dir, arch, jax.tree.map(np.asarray, hf_params), "llama")

  jobs = [(n, n, "tiny,runlocal") for n in OFFLINE]
  jobs += [("dpo-hh", "dpo", f"hh,path={hh_path},runlocal"),
           ("dpo-hf", "dpo", f"tiny,runlocal,hf_path={hf_dir}")]
  results = {}
  for key, name, arg in jobs:
    t0 = time.perf_counter()
    try:
      c = _quick(load_config(name, arg))
      if arg.startswith("hh"):
        c = _hh_small(c)
      cfg = config_lib.validate(c, jax.device_count())
      workdir = os.path.join(workroot, key)
      extra = {}
      if key == "dpo-hf":
        # The initial policy is the checkpoint's weights, bit for bit.
        model = build.build_model(cfg.model, 32)
        state, _ = build.initial_state(
            model, build.make_optimizer(cfg.optimizer, 1),
            mesh_lib.make_mesh(cfg.mesh), cfg.mesh.rules, jax.random.key(0))
        extra["hf_params_equal"] = all(
            np.array_equal(np.asarray(a), np.asarray(b, np.float32))
            for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(hf_params)))
      r = loop.run(cfg, workdir)
      train = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
      results[key] = {"status": r.status, "step": r.step, "eval": r.eval_metrics,
                      "reference": cfg.reference.kind, "source": cfg.data.source,
                      "train": [t for t in train if t["split"] == "train"],
                      "seconds": time.perf_counter() - t0, **extra}
    except Exception as e:  # pylint: disable=broad-except
      results[key] = {"error": f"{type(e).__name__}: {e}"}
  with open(out_path, "w", encoding="utf-8") as f:
    json.dump(results, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("experiments")
  hh = root / "hh.jsonl.gz"
  _hh_fixture(hh)
  out = root / "results.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out), str(hh),
                         str(root / "runs")], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=TIMEOUT_S, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.load(open(out))


def test_every_config_runs_a_few_steps(runs):
  # One test, not one per config: under pytest-xdist each worker that received one of
  # the parametrized tests ran the `runs` child process again (~250 s each).
  failed = {}
  for key in OFFLINE + ["dpo-hh", "dpo-hf"]:
    try:
      _check_run(runs[key], key)
    except AssertionError as e:
      failed[key] = str(e) or "assertion failed"
  assert not failed, failed


def _check_run(r, key):
  assert "error" not in r, r.get("error")
  assert r["status"] == "done" and r["step"] == RUN_STEPS
  assert [t["step"] for t in r["train"]] == list(range(1, RUN_STEPS + 1))
  assert all(t["loss"] is not None and math.isfinite(t["loss"]) for t in r["train"])
  ev = r["eval"]
  assert 0.0 <= ev["pair_accuracy"] <= 1.0
  if r["source"] == "synthetic":
    assert ev["oracle_best"] >= ev["oracle_expected"] - 1e-9
  if key == "dpo-hf":
    assert r["hf_params_equal"]
  # KL to the reference is reported exactly when there is a reference.
  assert ("kl_to_reference" in ev) == (r["reference"] != "none" and
                                       r["source"] == "synthetic")


def _hh_fixture(path):
  """A few HH-format records (made up here; the real data never enters the tests)."""
  rows = []
  for i in range(24):
    prompt = f"\n\nHuman: what is {i} plus {i}?\n\nAssistant:"
    rows.append({"chosen": prompt + f" It is {2 * i}.",
                 "rejected": prompt + f" I will not say{'!' * (i % 3 + 1)}"})
  with gzip.open(path, "wt", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


DEMO_STEPS = 100
# Chance is 0.5 exactly at step 0 (all implicit rewards are 0, ties count half). With
# 256 held-out pairs the standard error of an accuracy near 0.5 is ~0.031, so 0.58 is
# ~2.5 standard errors above chance; the demo reaches ~0.64 at 100 steps.
DEMO_MIN_ACCURACY = 0.58


def test_demo_job_trains(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  cmd = [sys.executable, "-m", "jaxalign.main", "--config", "experiments/demo.py",
         f"--workdir={tmp_path}", f"--config.num_steps={DEMO_STEPS}",
         "--config.eval.every_steps=0", "--config.eval.num_examples=256",
         "--config.log.progress_bar=False"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = json.load(open(tmp_path / "final_eval.json"))
  assert final["step"] == DEMO_STEPS
  assert final["pair_accuracy"] >= DEMO_MIN_ACCURACY, final
  # The true (oracle) reward of the policy restricted to held-out candidate sets rose
  # above the reference's: the preference signal generalised, not just memorised.
  assert final["oracle_expected"] > final["oracle_reference"] + 0.05, final
  assert os.path.exists(tmp_path / "plots" / "train_loss.png")
  assert os.listdir(tmp_path / "tensorboard")


if __name__ == "__main__":
  _child(*sys.argv[1:4])
