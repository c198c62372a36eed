"""bco_pair's running delta (issue 18): kept in TrainState.loss_state by the step,
checkpointed, restored on resume. Oracle: the running mean recomputed in NumPy from
the logged rewards (BCO, Jung et al. 2024: delta = mean of the past implicit rewards)."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import _common
from jaxalign import config as config_lib
from jaxalign import losses
from jaxalign.data import batching
from jaxalign.data.examples import PairExample
from jaxalign.models import transformer as tr
from jaxalign.train import logging as log_lib
from jaxalign.train import loop
from jaxalign.train import objectives as ob

CFG = tr.TransformerConfig.tiny(vocab_size=64, d_model=16, n_layers=1, n_heads=2,
                                n_kv_heads=1, mlp_dim=32)


def test_running_mean_update_matches_numpy():
  rng = np.random.default_rng(0)
  batches = [rng.normal(size=k) for k in (6, 2, 10)]
  mean, count = jnp.float32(0.0), jnp.int32(0)
  for b in batches:
    mean, count = losses.running_mean_update(mean, count, jnp.float32(b.mean()), b.size)
  np.testing.assert_allclose(float(mean), np.concatenate(batches).mean(), rtol=1e-6)
  assert int(count) == 18
  # An empty batch (all slots padding) changes nothing.
  assert float(losses.running_mean_update(mean, count, jnp.float32(5.0), 0)[0]) == (
      float(mean))


def test_initial_loss_state_only_for_bco_pair():
  assert ob.initial_loss_state("dpo") is None
  assert ob.initial_loss_state((("dpo", 1.0), ("nll", 1.0))) is None
  state = ob.initial_loss_state((("bco_pair", 1.0), ("nll", 0.5)))
  assert float(state["bco_delta"]["mean"]) == 0.0


@functools.lru_cache(maxsize=None)
def _graphdef():
  out = []
  jax.eval_shape(lambda k: out.append(tr.init(CFG, k)[0]), jax.random.key(0))
  return out[0]


def test_objective_passes_the_state_delta_to_the_loss():
  """The loss under loss_state == the loss with that delta bound as a hyperparameter."""
  rng = np.random.default_rng(1)
  tok = lambda k: rng.integers(1, CFG.vocab_size, k).astype(np.int32)
  pairs = [PairExample(tok(3), tok(4), tok(5)) for _ in range(3)]
  batch = batching.make_batch(pairs, batching.LayoutConfig(
      kind="padded", buckets=(16,), examples_per_batch=4))
  params = [jax.jit(lambda k: tr.init(CFG, k)[1])(jax.random.key(s)) for s in (1, 2)]

  def objective(hparams):
    fn, _ = losses.resolve("bco_pair", hparams)
    return ob.make_objective("pairwise", loss_fn=fn,
                             forward_fn=ob.model_forward_fn(_graphdef()),
                             needs_reference=True, chunk_size=16)
  state = {"bco_delta": {"mean": jnp.float32(0.7), "count": jnp.int32(8)}}
  got, metrics = objective({"beta": 0.5})(*params, batch, loss_state=state)
  want, _ = objective({"beta": 0.5, "delta": 0.7})(*params, batch)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  assert float(metrics["loss_state/delta"]) == pytest.approx(0.7)
  plain, _ = objective({"beta": 0.5})(*params, batch)
  assert abs(float(plain) - float(want)) > 1e-3  # delta matters at these values


def _config(num_steps):
  c = config_lib.base_config()
  c = _common.apply_variant(c, _common.experiment_arg("tiny"), num_steps=num_steps)
  c.loss = "bco_pair"
  c.loss_hparams.beta = 0.5
  c.model.update(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=32)
  c.model.logprob_chunk = 16
  c.data.batch_size = 8
  c.data.task.num_train = 32
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.5
  c.eval.enabled = False
  c.log.update(every_steps=1, tensorboard=False, progress_bar=False, plots=False)
  c.checkpoint.async_save = False
  return config_lib.validate(c, 8)


def _train_records(workdir):
  return [r for r in log_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
          if r.get("split", "train") == "train" and "loss" in r]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("bco4"))
  return loop.run(_config(4), workdir, log=lambda m: None), workdir


def test_delta_is_the_running_mean_of_the_logged_rewards(straight_run):
  result, workdir = straight_run
  records = _train_records(workdir)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  # Every batch is full (8 pairs, 16 rewards), so each step's mean weighs the same.
  batch_means = np.array([(r["rewards/chosen"] + r["rewards/rejected"]) / 2
                          for r in records], np.float64)
  want_delta = np.concatenate([[0.0], np.cumsum(batch_means)[:-1] / np.arange(1, 4)])
  got_delta = np.array([r["loss_state/delta"] for r in records])
  # f32 running mean vs float64: rtol 1e-5 (atol for the step-0 delta of 0).
  np.testing.assert_allclose(got_delta, want_delta, rtol=1e-5, atol=1e-7)
  assert np.ptp(got_delta[1:]) > 1e-4  # the rewards (and so delta) really move
  final = result.state.loss_state["bco_delta"]
  np.testing.assert_allclose(float(final["mean"]), batch_means.mean(), rtol=1e-5)
  assert int(final["count"]) == 4 * 16


def test_resume_restores_the_running_delta(straight_run, tmp_path):
  """2 steps, a checkpoint, then 2 more from it == 4 steps straight."""
  result, workdir = straight_run
  loop.run(_config(2), str(tmp_path), log=lambda m: None)
  resumed = loop.run(_config(4), str(tmp_path), log=lambda m: None)
  assert resumed.step == 4
  want = _train_records(workdir)
  got = _train_records(str(tmp_path))
  assert [r["step"] for r in got] == [1, 2, 3, 4]
  # Same program, same data order: equal up to f32 noise.
  np.testing.assert_allclose([r["loss_state/delta"] for r in got],
                             [r["loss_state/delta"] for r in want], rtol=1e-5, atol=1e-7)
  for key in ("mean", "count"):
    np.testing.assert_allclose(
        np.asarray(resumed.state.loss_state["bco_delta"][key]),
        np.asarray(result.state.loss_state["bco_delta"][key]), rtol=1e-5)


def test_a_set_delta_is_refused_for_bco_pair():
  # A value the loop would overwrite with its running mean: a config error, not a
  # silently ignored key.
  c = config_lib.base_config()
  c.loss = "bco_pair"
  c.loss_hparams.delta = 0.5
  with pytest.raises(ValueError, match=r"loss_hparams\.delta.*running mean"):
    config_lib.validate(c, jax.device_count())
