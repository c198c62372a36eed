"""Issue 21 for online RL: the divergence guard judges each iteration (non-finite
losses or rewards, updates out of scale) and never saves a suspect one; a learning
rate of 1e30 stops with exit code 3 naming the last good checkpoint, and a rerun with
a sane learning rate rolls back to it (``checkpoint.restore_step``) and finishes; a
SIGTERM exits 75 with a checkpoint and the rerun finishes. Plots show step 0 and
their reference lines (checked on the plotted data, not the pixels)."""

import os

import numpy as np
import pytest

from jaxalign import checkpoint as ckpt_lib
from jaxalign import config as config_lib
from jaxalign.train import hooks
from jaxalign.train import logging as log_lib
from jaxalign.train import rl

_RUN_RL = rl.run_rl  # the real one (tests patch the module's)
EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "grpo.py")


# --- the per-iteration judgement (no model) ------------------------------------------


class _FakeRun:
  def __init__(self, ckpt_dir, max_in_a_row=1, max_nonfinite=3):
    self.cfg = config_lib.Config(
        max_nonfinite_in_a_row=max_nonfinite,
        divergence=config_lib.DivergenceConfig(max_in_a_row=max_in_a_row))
    self.ckpt = ckpt_lib.Checkpointer(str(ckpt_dir), save_every=1, keep=5)
    self.said = []
    self.say = self.said.append


def _mb(update_norm=0.01, param_norm=10.0, skipped=0.0, loss=0.5):
  return {"update_norm": update_norm, "param_norm": param_norm, "skipped": skipped,
          "loss": loss, "grad_norm": 1.0}


def _iteration(mbs, scores=0.3):
  """An iteration's host metrics as `rl._metrics` builds them from minibatches."""
  m = {k: float(np.mean([x[k] for x in mbs])) for k in mbs[0]}
  m.update(hooks.largest_update(mbs))
  m["objective/scores"] = scores
  return m


def test_largest_update_is_the_largest_applied_ratio():
  mbs = [_mb(1.0, 10.0), _mb(2.0, 4.0), _mb(50.0, 1.0, skipped=1.0)]
  assert hooks.largest_update(mbs) == {"update_norm": 2.0, "param_norm": 4.0}
  assert hooks.largest_update([_mb(skipped=1.0)]) == {}


def test_iteration_guard_holds_counts_and_stops(tmp_path):
  r = _FakeRun(tmp_path / "a", max_in_a_row=2)
  c = hooks.Counters(guard=hooks.DivergenceGuard(r.cfg.divergence))
  assert not hooks.check_iteration(r, c, _iteration([_mb(), _mb()]), 1)
  # One minibatch skipped: counted as non-finite and held, not saved.
  assert hooks.check_iteration(r, c, _iteration([_mb(), _mb(skipped=1.0)]), 2)
  assert c.skipped_total == 1 and c.in_a_row == 1
  # A non-finite reward is non-finite too.
  assert hooks.check_iteration(r, c, _iteration([_mb()], scores=float("nan")), 3)
  assert c.in_a_row == 2
  assert not hooks.check_iteration(r, c, _iteration([_mb()]), 4)
  assert c.in_a_row == 0
  # The applied minibatch of a partly skipped iteration is still judged: an update
  # 5 x the weights diverges (max_update_ratio=1), a second such iteration stops.
  bad = _iteration([_mb(50.0, 10.0), _mb(skipped=1.0)])
  assert hooks.check_iteration(r, c, bad, 5)
  assert "WARNING: step 5 diverged (its update was 5 x the norm" in r.said[-1]
  with pytest.raises(hooks.DivergenceError, match=r"step 5 diverged.*2 steps in a row "
                     r"up to step 6.*No checkpoint was saved before step 5"):
    hooks.check_iteration(r, c, bad, 6)
  r.ckpt.close()


def test_zero_advantage_iterations_do_not_make_the_next_real_one_divergent(tmp_path):
  """The false positive that stopped a GRPO run at iteration 2 (measured with
  experiments/grpo_verifiable.py:tiny and divergence.factor=100): its first iteration
  scored every group alike (zero advantages, gradient norm 2e-8) and Adam's update
  of that noise, 1/150 of the next real one, set the guard's scale. With the
  validated config's optimizer gain (lr / eps) it sets none."""
  cfg = config_lib.validate_rl(_grpo_tiny(), 8)[0]
  assert cfg.divergence.adam_gain == pytest.approx(1e-3 / 1e-8)
  r = _FakeRun(tmp_path / "z")
  r.cfg = cfg
  c = hooks.Counters(guard=hooks.DivergenceGuard(cfg.divergence))
  quiet = dict(_mb(update_norm=0.00182, param_norm=19.44, loss=1.8e-15), grad_norm=2e-8)
  real = dict(_mb(update_norm=0.277, param_norm=19.44, loss=1e-8), grad_norm=0.27)
  for it in (1, 2, 3):
    assert not hooks.check_iteration(r, c, _iteration([quiet, quiet], scores=0.0), it)
  assert not hooks.check_iteration(r, c, _iteration([real, quiet], scores=0.06), 4)
  assert c.divergent_in_a_row == 0 and r.said == []
  r.ckpt.close()


def _grpo_tiny():
  from experiments import grpo_verifiable
  return grpo_verifiable.get_config("tiny")


def test_nonfinite_iterations_in_a_row_stop(tmp_path):
  r = _FakeRun(tmp_path / "b", max_nonfinite=2)
  c = hooks.Counters(guard=hooks.DivergenceGuard(r.cfg.divergence))
  nan = _iteration([_mb(skipped=1.0)], scores=float("nan"))
  assert hooks.check_iteration(r, c, nan, 1)
  with pytest.raises(hooks.NonFiniteError, match=r"2 consecutive steps \(up to step 2\)"):
    hooks.check_iteration(r, c, nan, 2)
  r.ckpt.close()


# --- plots: step 0 and reference lines -----------------------------------------------


def test_plots_show_step_zero_and_reference_lines(tmp_path):
  """RL rollout statistics logged at iteration i describe the policy of iteration
  i - 1: drawn there, the first point is the initial policy's (step 0). The eval's
  oracle plot carries the reference policy's and the best candidate's values (from
  the latest eval record), the KL plots a 0 line."""
  w = str(tmp_path)
  log = log_lib.MetricsLogger(w, total_steps=3, tensorboard=False, progress_bar=False)
  for it, (score, kl, loss) in enumerate([(0.2, 0.0, 1.0), (0.4, 0.5, 0.8),
                                          (0.7, 1.5, 0.6)], start=1):
    log.write(it, {"objective/scores": score, "objective/kl": kl, "loss": loss})
  log.write(0, {"oracle_expected": 0.30, "oracle_reference": 0.30, "oracle_best": 0.9},
            split="eval")
  log.write(3, {"oracle_expected": 0.55, "oracle_reference": 0.31, "oracle_best": 0.92},
            split="eval")
  log.close()
  recs = log_lib.read_metrics(os.path.join(w, log_lib.METRICS_FILE))
  keys = {k[1]: k for k in hooks.RL_PLOT_KEYS}
  steps, vals, lines = log_lib.plot_data(recs, *keys["objective/scores"])
  np.testing.assert_array_equal(steps, [0, 1, 2])
  np.testing.assert_allclose(vals, [0.2, 0.4, 0.7])
  assert lines == []
  steps, vals, lines = log_lib.plot_data(recs, *keys["objective/kl"])
  assert steps[0] == 0 and vals[0] == 0.0 and lines == [("reference", 0.0)]
  steps, _, _ = log_lib.plot_data(recs, *keys["loss"])  # a training metric: unshifted
  np.testing.assert_array_equal(steps, [1, 2, 3])
  steps, vals, lines = log_lib.plot_data(recs, "eval", "oracle_expected")
  np.testing.assert_array_equal(steps, [0, 3])
  assert lines == [("reference policy", 0.31), ("best candidate", 0.92)]
  paths = log_lib.plot_metrics(w, hooks.RL_PLOT_KEYS + (("eval", "oracle_expected"),))
  assert len(paths) == 4  # scores, kl, loss, oracle (no rlhf_reward / length logged)


@pytest.mark.slow
def test_offline_eval_starts_at_step_zero_with_its_reference_lines(tmp_path):
  """A fresh offline run evaluates the initial policy (step 0) before training: its
  oracle point is the reference's own value (the initial policy is the reference) and
  its KL to the reference is 0; the plot draws both reference lines."""
  from experiments import _common
  from jaxalign.train import loop
  c = config_lib.base_config()
  c = _common.apply_variant(c, _common.experiment_arg("tiny"), num_steps=2)
  c.model.update(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, mlp_dim=64)
  c.data.batch_size, c.data.task.num_train = 16, 64
  c.eval.every_steps, c.eval.num_examples, c.eval.batch_size = 2, 16, 16
  c.log.tensorboard = c.log.progress_bar = False
  c.checkpoint.async_save = False
  workdir = str(tmp_path)
  loop.run(config_lib.validate(c, 8), workdir, log=lambda m: None)
  recs = log_lib.read_metrics(os.path.join(workdir, log_lib.METRICS_FILE))
  evals = [r for r in recs if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [0, 2]
  assert evals[0]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
  assert evals[0]["oracle_expected"] == pytest.approx(evals[0]["oracle_reference"],
                                                      abs=1e-6)
  steps, _, lines = log_lib.plot_data(recs, "eval", "oracle_expected")
  assert steps[0] == 0 and [label for label, _ in lines] == ["reference policy",
                                                              "best candidate"]
  assert os.path.exists(os.path.join(workdir, "plots", "eval_oracle_expected.png"))


# --- whole runs through jaxalign.main (in-process, programs shared) ------------------


@pytest.fixture(scope="module")
def compiled():
  return {}


def _main(monkeypatch, compiled, workdir, *overrides):
  """``jaxalign.main`` on the tiny GRPO config, in this process; runs of one
  optimizer config share their compiled programs. Returns the exit code."""
  from absl import flags
  from jaxalign import main as main_lib
  real = _RUN_RL
  lr = next(o for o in overrides if "learning_rate" in o)

  def run_rl(config, workdir, **kw):
    res = real(config, workdir, programs=compiled.get(lr), **kw)
    compiled[lr] = res.programs
    return res
  monkeypatch.setattr(rl, "run_rl", run_rl)
  argv = ["jaxalign.main", f"--config={EXPERIMENT}:tiny,runlocal", f"--workdir={workdir}",
          "--config.num_steps=3", "--config.optimizer.warmup_steps=1",
          "--config.log.progress_bar=False", "--config.log.tensorboard=False",
          "--config.checkpoint.async_save=False", *overrides]
  # config_flags reads the overrides from sys.argv and defines one flag per override.
  monkeypatch.setattr("sys.argv", argv)
  flags.FLAGS(argv)
  try:
    return main_lib.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)  # defined again by the next parse


def _kept(workdir):
  return ckpt_lib.complete_steps(os.path.join(workdir, "checkpoints"))


@pytest.mark.slow
def test_huge_learning_rate_stops_and_a_sane_rerun_rolls_back(tmp_path, monkeypatch,
                                                              compiled, capsys):
  """Warmup makes iteration 1's update 0 (saved); at iteration 2 adam moves every
  weight by ~1e30: finite, so only the update-ratio test can catch it."""
  workdir = str(tmp_path / "run")
  code = _main(monkeypatch, compiled, workdir, "--config.checkpoint.every_steps=1",
               "--config.optimizer.learning_rate=1e30")
  err = capsys.readouterr().err
  assert code == 3, err
  assert "DivergenceError: step 2 diverged: its update was" in err
  assert "The last good checkpoint is step 1" in err
  assert "--config.checkpoint.restore_step=1" in err
  assert _kept(workdir) == [1]  # the divergent iteration was not saved
  code = _main(monkeypatch, compiled, workdir, "--config.checkpoint.every_steps=1",
               "--config.optimizer.learning_rate=1e-3",
               "--config.checkpoint.restore_step=1")
  out = capsys.readouterr().out
  assert code == 0, out
  assert "rolling back to checkpoint step 1" in out
  assert "resumed from checkpoint iteration 1" in out
  assert "status=done iteration=3" in out
  assert _kept(workdir) == [1, 2, 3]
  recs = log_lib.read_metrics(os.path.join(workdir, log_lib.METRICS_FILE))
  assert [r["step"] for r in recs] == [1, 2, 3]  # the diverged line was not kept
  assert all(np.isfinite(r["loss"]) and r["update_norm"] < 1.0 for r in recs[1:])


@pytest.mark.slow
def test_preempted_run_exits_75_and_the_rerun_finishes(tmp_path, monkeypatch, compiled,
                                                       capsys):
  workdir = str(tmp_path / "run")
  sane = "--config.optimizer.learning_rate=1e-3"
  code = _main(monkeypatch, compiled, workdir, sane, "--config.checkpoint.every_steps=10",
               "--config.debug.sigterm_at_step=1")
  out = capsys.readouterr().out
  assert code == 75, out
  assert "preempted by signal 15 at iteration 1; checkpoint saved" in out
  assert "status=preempted iteration=1" in out
  assert _kept(workdir) == [1]  # forced: every_steps=10 would not have saved it
  code = _main(monkeypatch, compiled, workdir, sane, "--config.checkpoint.every_steps=10")
  out = capsys.readouterr().out
  assert code == 0 and "resumed from checkpoint iteration 1" in out, out
  assert "status=done iteration=3" in out and _kept(workdir) == [1, 3]
