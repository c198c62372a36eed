"""Evaluation by generation inside offline training (`jaxalign.train.gen_eval`).

Oracles: the cached sampler's greedy responses against `sampling.generate_uncached`
(the full forward re-run at every step), scored by `synthetic.oracle_reward` directly;
lengths, EOS rate and win rate counted in plain Python loops; the reward model's
scores against a plain forward over each unpadded prompt + response.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import _common
from jaxalign import config as config_lib
from jaxalign.data import synthetic
from jaxalign.models import heads
from jaxalign.models import sampling
from jaxalign.models import transformer
from jaxalign.train import build
from jaxalign.train import gen_eval
from jaxalign.train import logging as log_lib
from jaxalign.train import loop
from jaxalign.train import rundir


def tiny(loss="dpo", steps=2, **overrides):
  """The synthetic task, a 1-layer d_model 32 model, 16 held-out examples."""
  c = config_lib.base_config()
  c = _common.apply_variant(c, _common.experiment_arg("tiny"), num_steps=steps)
  c.loss = loss
  if loss == "bradley_terry":
    c.model.head = "scalar"
  c.model.update(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, mlp_dim=64)
  c.model.logprob_chunk = 16
  c.data.batch_size = 16
  c.data.task.num_train = 64
  c.eval.update(num_examples=16, batch_size=8, every_steps=1)
  c.log.update(every_steps=1, tensorboard=False, progress_bar=False, plots=False)
  c.checkpoint.update(async_save=False, every_steps=1000)
  for key, value in overrides.items():
    node = c
    *parents, name = key.split(".")
    for p in parents:
      node = node[p]
    node[name] = value
  return c


def _validate(c):
  return config_lib.validate(c, jax.device_count())


# --- pieces, against plain loops ----------------------------------------------


def test_lengths_and_win_rate_match_plain_loops():
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 8, size=(40, 6))
  toks[::5] = 4  # rows with no stop token
  stops = (3, 7)
  got_len, got_stop = gen_eval.response_lengths(toks, stops)
  for row, n, s in zip(toks, got_len, got_stop):
    first = next((i for i, t in enumerate(row) if t in stops), None)
    assert n == (len(row) if first is None else first) and s == (first is not None)
  pol, ref = rng.integers(0, 3, size=50), rng.integers(0, 3, size=50)  # many ties
  wins = sum(1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(pol, ref))
  assert any(pol == ref)
  assert gen_eval.win_rate(pol, ref) == pytest.approx(wins / 50, abs=1e-12)


# --- config -------------------------------------------------------------------


def test_defaults_on_for_the_builtin_task_off_for_a_reward_model():
  cfg = _validate(tiny())
  assert (cfg.eval.generate_prompts, cfg.eval.judge) == (16, "oracle")
  rm = _validate(tiny("bradley_terry"))
  assert (rm.eval.generate_prompts, rm.eval.judge) == (0, "")
  assert _validate(tiny(**{"eval.enabled": False})).eval.generate_prompts == 0
  no_ref = _validate(tiny("sft", **{"reference.kind": "none"}))
  assert (no_ref.eval.generate_prompts, no_ref.eval.judge) == (16, "")


@pytest.mark.parametrize("overrides, match", [
    ({"eval.judge": "best"}, "config.eval.judge"),
    ({"eval.judge": "reward_model"}, "needs eval.reward_model"),
    ({"eval.generate_prompts": 17}, "config.eval.generate_prompts.*eval.num_examples"),
    ({"eval.generate_prompts": 0, "eval.judge": "oracle"}, "generate_prompts=0"),
    ({"eval.temperature": -1.0}, "config.eval.temperature"),
    ({"eval.max_new_tokens": -2}, "config.eval.max_new_tokens"),
    ({"loss": "sft", "reference.kind": "none", "eval.judge": "oracle"},
     "reference.kind='none'"),
    ({"eval.reward_model": "/nonexistent/run"}, "config.eval.reward_model"),
])
def test_config_errors_name_the_key(overrides, match):
  c = tiny(overrides.pop("loss", "dpo"), **overrides)
  with pytest.raises(ValueError, match=match):
    _validate(c)


def test_scalar_and_file_data_errors():
  with pytest.raises(ValueError, match="does not generate"):
    _validate(tiny("bradley_terry", **{"eval.generate_prompts": 4}))
  c = tiny(**{"data.source": "file", "data.path": "x.jsonl", "data.format": "pairwise",
              "eval.judge": "oracle", "eval.generate_prompts": 4})
  with pytest.raises(ValueError, match="'oracle' needs the built-in task"):
    _validate(c)


# --- the scores against an independent generation -----------------------------


def _uncached(arch, params, prompts, new_tokens):
  """Greedy responses [n, N] of the full forward re-run at every step."""
  scfg = sampling.SamplingConfig(max_new_tokens=new_tokens, greedy=True,
                                 **synthetic.SAMPLING_STOPS)
  p = max(len(x) for x in prompts)
  buf = np.zeros((len(prompts), p), np.int32)
  for i, x in enumerate(prompts):
    buf[i, p - len(x):] = x
  lens = np.asarray([len(x) for x in prompts], np.int32)
  params = jax.device_get(params)
  toks, _, _ = sampling.generate_uncached(build.graphdef(arch), params, scfg,
                                          jnp.asarray(buf), jnp.asarray(lens),
                                          jax.random.key(0))
  return np.asarray(toks)


def _perturbed(params, scale=0.6):
  """``params`` plus Gaussian noise (host NumPy), in their shardings."""
  rng = np.random.default_rng(7)
  noisy = jax.tree.map(lambda p: (p + scale * rng.normal(size=p.shape)).astype(p.dtype),
                       jax.device_get(params))
  return jax.device_put(noisy, jax.tree.map(lambda x: x.sharding, params))


def test_scores_equal_an_uncached_generation_scored_by_the_oracle(tmp_path):
  cfg = _validate(tiny())
  run = loop.setup(cfg, str(tmp_path / "w"), log=lambda m: None)
  g = run.gen_eval
  prompts = [e.prompt for e in run.data.eval_examples[:16]]
  n_new = max(len(r) for e in run.data.eval_examples[:16] for r in (e.chosen, e.rejected))
  assert g.sampler.scfg.max_new_tokens == n_new and g.sampler.scfg.greedy
  ref = run.eval_ref_params
  policy = _perturbed(run.state.params)
  got = g(policy)
  task = synthetic.SyntheticTaskConfig(vocab_size=cfg.data.task.vocab_size,
                                       target_len=cfg.data.task.target_len)
  want = {}
  for name, params in (("policy", policy), ("reference", ref)):
    toks = _uncached(cfg.model.arch, params, prompts, n_new)
    want[name] = synthetic.oracle_reward(prompts, toks, task)
    if name == "policy":
      lengths = [next((i for i, t in enumerate(r) if t == 3), len(r)) for r in toks]
      stopped = [3 in r.tolist() for r in toks]
  assert got["gen_oracle_reward"] == pytest.approx(want["policy"].mean(), abs=1e-12)
  assert got["gen_reference_oracle_reward"] == pytest.approx(want["reference"].mean(),
                                                             abs=1e-12)
  assert got["gen_length"] == pytest.approx(np.mean(lengths), abs=1e-12)
  assert got["gen_eos_rate"] == pytest.approx(np.mean(stopped), abs=1e-12)
  wins = sum(1.0 if p > r else 0.5 if p == r else 0.0
             for p, r in zip(want["policy"], want["reference"]))
  assert got["gen_win_rate"] == pytest.approx(wins / 16, abs=1e-12)
  assert got["gen_oracle_reward"] != got["gen_reference_oracle_reward"]  # not vacuous
  # The policy before any step is the reference: it ties with itself.
  same = g(run.state.params)
  assert same["gen_win_rate"] == 0.5
  assert same["gen_oracle_reward"] == got["gen_reference_oracle_reward"]


def test_lora_policy_decodes_with_adapters_reference_without(tmp_path):
  cfg = _validate(tiny(**{"model.lora.rank": 4, "eval.generate_prompts": 8}))
  run = loop.setup(cfg, str(tmp_path / "w"), log=lambda m: None)
  g = run.gen_eval
  assert g.base is not None and g(run.state.params)["gen_win_rate"] == 0.5  # B = 0
  adapters = _perturbed(run.state.params, scale=2.0)
  got = g(adapters)
  from jaxalign.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  merged = lora_lib.merge(jax.device_get(g.base), jax.device_get(adapters["lora"]),
                          cfg.model.lora)
  prompts = [e.prompt for e in run.data.eval_examples[:8]]
  toks = _uncached(cfg.model.arch, merged, prompts, g.sampler.scfg.max_new_tokens)
  task = synthetic.SyntheticTaskConfig(vocab_size=cfg.data.task.vocab_size,
                                       target_len=cfg.data.task.target_len)
  assert got["gen_oracle_reward"] == pytest.approx(
      synthetic.oracle_reward(prompts, toks, task).mean(), abs=1e-5)


# --- whole runs -----------------------------------------------------------------


def test_run_logs_gen_metrics_at_each_eval_and_in_final_eval(tmp_path):
  w = str(tmp_path / "dpo")
  c = tiny(steps=2, **{"log.plots": True, "log.tensorboard": True})
  loop.run(_validate(c), w, log=lambda m: None)
  recs = [r for r in log_lib.read_metrics(os.path.join(w, "metrics.jsonl"))
          if r.get("split") == "eval"]
  assert [r["step"] for r in recs] == [0, 1, 2]
  keys = ("gen_oracle_reward", "gen_win_rate", "gen_length", "gen_eos_rate",
          "pair_accuracy")
  assert all(k in r for r in recs for k in keys)
  with open(os.path.join(w, "final_eval.json")) as f:
    final = json.load(f)
  assert all(final[k] == recs[-1][k] for k in keys)
  assert os.path.exists(os.path.join(w, "plots", "eval_gen_oracle_reward.png"))
  assert os.listdir(os.path.join(w, "tensorboard"))
  with pytest.raises(ValueError, match="config.eval.reward_model.*not a reward model"):
    _validate(tiny(**{"eval.reward_model": w}))  # a policy run
  # Preempted after step 1 and resumed: the reference's responses are regenerated at
  # setup, and every gen_ metric equals the uninterrupted run's.
  r = str(tmp_path / "resumed")
  first = loop.run(_validate(tiny(steps=2, **{"debug.sigterm_at_step": 1})), r,
                   log=lambda m: None)
  assert first.status == "preempted"
  loop.run(_validate(tiny(steps=2)), r, log=lambda m: None)
  resumed = [x for x in log_lib.read_metrics(os.path.join(r, "metrics.jsonl"))
             if x.get("split") == "eval"]
  assert [x["step"] for x in resumed] == [0, 1, 2]
  for a, b in zip(recs, resumed):
    assert {k: v for k, v in a.items() if k.startswith("gen_")} == {
        k: v for k, v in b.items() if k.startswith("gen_")}


def test_reward_model_scores_equal_a_plain_forward(tmp_path):
  rm_dir = str(tmp_path / "rm")
  loop.run(_validate(tiny("bradley_terry", steps=2, **{"eval.enabled": False})), rm_dir,
           log=lambda m: None)
  cfg = _validate(tiny(**{"eval.reward_model": rm_dir, "eval.judge": "reward_model",
                          "eval.generate_prompts": 8}))
  assert cfg.eval.reward_model == f"{os.path.abspath(rm_dir)}:2"
  run = loop.setup(cfg, str(tmp_path / "w"), log=lambda m: None)
  policy = _perturbed(run.state.params)
  got = run.gen_eval(policy)
  lm, head, _ = rundir.run_lm_params(rm_dir, 2, "test")
  prompts = [e.prompt for e in run.data.eval_examples[:8]]
  n_new = run.gen_eval.sampler.scfg.max_new_tokens
  gd = build.graphdef(cfg.model.arch)
  # Unpadded prompt + response (up to its EOS), right-padded: causal attention keeps
  # the padding out of every real position; the score is the last real token's.
  token_scores = jax.jit(lambda toks: heads.token_scores(transformer.forward(
      gd, lm, toks, jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape))[0], head))
  scores = []
  for params in (policy, run.eval_ref_params):
    toks = _uncached(cfg.model.arch, params, prompts, n_new)
    seqs = []
    for x, r in zip(prompts, toks):
      stop = [i for i, t in enumerate(r) if t == 3]
      seqs.append(np.concatenate([x, r[:stop[0] + 1] if stop else r]))
    buf = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, q in enumerate(seqs):
      buf[i, :len(q)] = q
    per_token = np.asarray(token_scores(jnp.asarray(buf)))
    scores.append(np.asarray([per_token[i, len(q) - 1] for i, q in enumerate(seqs)]))
  assert got["gen_reward_model"] == pytest.approx(scores[0].mean(), abs=1e-4)
  assert got["gen_reference_reward_model"] == pytest.approx(scores[1].mean(), abs=1e-4)
  wins = sum(1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(*scores))
  assert got["gen_win_rate"] == pytest.approx(wins / 8, abs=1e-12)


def test_file_data_without_a_scorer_reports_lengths(tmp_path):
  rng = np.random.default_rng(0)
  words = ["a", "bb", "ccc", "yes", "no"]
  recs = [{"prompt": " ".join(rng.choice(words, 3)) + "?",
           "chosen": " ".join(rng.choice(words, 2)), "rejected": str(rng.choice(words))}
          for _ in range(40)]
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in recs))
  c = tiny(**{"data.source": "file", "data.path": str(path), "data.format": "pairwise",
              "data.buckets": (64,), "model.vocab_size": 320})
  assert _validate(c).eval.generate_prompts == 0  # no scorer: off unless asked
  c.eval.generate_prompts = 8
  cfg = _validate(c)
  assert cfg.eval.judge == ""
  run = loop.setup(cfg, str(tmp_path / "w"), log=lambda m: None)
  got = run.gen_eval(run.state.params)
  assert sorted(got) == ["gen_eos_rate", "gen_length"]
  assert 0 <= got["gen_length"] <= run.gen_eval.sampler.scfg.max_new_tokens


def test_judge_with_a_reference_cache_loads_the_same_reference(tmp_path):
  live = loop.setup(_validate(tiny(**{"eval.generate_prompts": 8})), str(tmp_path / "a"),
                    log=lambda m: None)
  cached = loop.setup(_validate(tiny(**{"eval.generate_prompts": 8,
                                        "reference.cache_dir": str(tmp_path / "c")})),
                      str(tmp_path / "b"), log=lambda m: None)
  assert cached.eval_ref_params is None  # not loaded for the implicit-reward eval
  np.testing.assert_array_equal(cached.gen_eval.reference["scores"],
                                live.gen_eval.reference["scores"])


def test_a_resume_may_change_what_generation_measures():
  old = {"config": {"eval": {"generate_prompts": 16, "judge": "oracle",
                             "max_new_tokens": 0, "temperature": 0.0,
                             "reward_model": ""}}, "fingerprints": {}}
  new = {"config": {"eval": {"generate_prompts": 0, "judge": "",
                             "max_new_tokens": 8, "temperature": 0.7,
                             "reward_model": "/rm:3"}}, "fingerprints": {}}
  diff = rundir.compare(old, new, rollback=False)
  assert not diff.refused and len(diff.allowed) == 5
  old["config"]["eval"]["num_examples"], new["config"]["eval"]["num_examples"] = 16, 32
  refused = rundir.compare(old, new, rollback=False).refused  # the held-out split
  assert [k for k, *_ in refused] == ["config.eval.num_examples"]
