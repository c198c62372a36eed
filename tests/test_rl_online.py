"""On-policy distillation (GKD) and online DPO (issue 15, item 5): the losses against
NumPy float64 transcriptions of the papers' formulas, the chunked full-vocab JSD
against the unchunked one, config errors naming their keys, and tiny end-to-end runs
(online DPO's labels equal the oracle's preferences; GKD lowers the student's KL to a
trained teacher)."""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses
from jaxalign.ops import divergence

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


# ----------------------------------------------------------------------------- oracles


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kl(log_a, log_b):
  return (np.exp(log_a) * (log_a - log_b)).sum(-1)


def _np_jsd(student, teacher, beta):
  """Agarwal et al. 2024, eq. 2: beta KL(P||M) + (1-beta) KL(Q||M), M = beta P +
  (1-beta) Q, P the teacher, Q the student (full softmaxes, float64)."""
  q, p = np.exp(_np_log_softmax(student)), np.exp(_np_log_softmax(teacher))
  m = beta * p + (1 - beta) * q
  return beta * (p * np.log(p / m)).sum(-1) + (1 - beta) * (q * np.log(q / m)).sum(-1)


def _np_online_dpo(pol, ref, scores, beta):
  """Guo et al. 2024 (DPO on judged on-policy pairs), pair by pair in float64."""
  out, ties = [], []
  for (p0, p1), (r0, r1), (s0, s1) in zip(pol, ref, scores):
    if s0 == s1:
      out.append(0.0)
      ties.append(1.0)
      continue
    (pw, rw), (pl, rl_) = ((p0, r0), (p1, r1)) if s0 > s1 else ((p1, r1), (p0, r0))
    h = beta * ((pw - rw) - (pl - rl_))
    out.append(np.log1p(np.exp(-h)))
    ties.append(0.0)
  return np.array(out), np.array(ties)


# ----------------------------------------------------------------------------- losses


def test_online_dpo_matches_numpy_on_hand_pairs():
  pol = np.array([[-3.0, -5.0], [-4.0, -2.5], [-1.0, -1.0], [-7.0, -6.0]])
  ref = np.array([[-3.5, -4.0], [-4.0, -3.0], [-2.0, -1.5], [-6.0, -6.5]])
  scores = np.array([[1.0, 0.0], [0.2, 0.7], [0.5, 0.5], [-1.0, 2.0]])
  loss, m = jax.jit(lambda a, b, c: losses.online_dpo(a, b, c, beta=0.3))(
      jnp.asarray(pol, jnp.float32), jnp.asarray(ref, jnp.float32),
      jnp.asarray(scores, jnp.float32))
  want, ties = _np_online_dpo(pol, ref, scores, 0.3)
  np.testing.assert_allclose(np.asarray(loss), want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(m["tie"]), ties)
  assert float(loss[2]) == 0.0  # the tie carries no preference


def test_online_dpo_gradient_only_from_preferred_pairs():
  pol = jnp.array([[-3.0, -5.0], [-1.0, -1.0]])
  ref = jnp.zeros((2, 2))
  scores = jnp.array([[1.0, 0.0], [0.5, 0.5]])
  g = jax.grad(lambda p: jnp.sum(losses.online_dpo(p, ref, scores, beta=1.0)[0]))(pol)
  # d/d rho_w of -log sigmoid(rho_w - rho_l) = -(1 - sigmoid(h)), h = -3 - (-5) = 2
  s = 1.0 / (1.0 + np.exp(-2.0))
  np.testing.assert_allclose(np.asarray(g), [[-(1 - s), 1 - s], [0.0, 0.0]], rtol=1e-6)


def test_best_worst_pairs_of_groups():
  rng = np.random.default_rng(4)
  pol, ref = (rng.normal(size=(5, 4)).astype(np.float32) for _ in range(2))
  scores = rng.integers(0, 3, size=(5, 4)).astype(np.float32)
  scores[0] = 1.0  # an all-equal group: a tie
  got = [np.asarray(x) for x in losses.best_worst_pairs(
      jnp.asarray(pol), jnp.asarray(ref), jnp.asarray(scores))]
  for i in range(5):
    hi, lo = int(np.argmax(scores[i])), int(np.argmin(scores[i]))
    np.testing.assert_array_equal(got[0][i], [pol[i, hi], pol[i, lo]])
    np.testing.assert_array_equal(got[1][i], [ref[i, hi], ref[i, lo]])
    np.testing.assert_array_equal(got[2][i], [scores[i].max(), scores[i].min()])
  loss, m = losses.online_dpo(*[jnp.asarray(x) for x in got], beta=0.5)
  want, ties = _np_online_dpo(got[0], got[1], got[2], 0.5)
  np.testing.assert_allclose(np.asarray(loss), want, rtol=1e-6)
  assert ties[0] == 1.0 and np.asarray(m["tie"])[0] == 1.0


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_numpy(beta):
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(3, 5, 17)) * 2, rng.normal(size=(3, 5, 17)) * 2
  got = losses.generalized_jsd(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                               beta=beta)
  np.testing.assert_allclose(np.asarray(got), _np_jsd(s, t, beta), rtol=2e-5, atol=1e-6)


def test_generalized_jsd_limits_and_symmetry():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(4, 11)) * 2, rng.normal(size=(4, 11)) * 2
  ls, lt = _np_log_softmax(s), _np_log_softmax(t)
  f = lambda a, b, beta: np.asarray(losses.generalized_jsd(  # noqa: E731
      jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), beta=beta))
  forward, reverse = _np_kl(lt, ls), _np_kl(ls, lt)  # KL(P||Q), KL(Q||P)
  np.testing.assert_allclose(f(s, t, 0.0), forward, rtol=1e-5)
  np.testing.assert_allclose(f(s, t, 1.0), reverse, rtol=1e-5)
  # the endpoints are the scaled limits of the mixture formula (f64 transcription)
  np.testing.assert_allclose(_np_jsd(s, t, 1e-5) / 1e-5, forward, rtol=1e-3)
  np.testing.assert_allclose(_np_jsd(s, t, 1 - 1e-5) / 1e-5, reverse, rtol=1e-3)
  np.testing.assert_allclose(f(s, t, 0.5), f(t, s, 0.5), rtol=1e-5)  # symmetric JSD
  assert not np.allclose(f(s, t, 0.3), f(t, s, 0.3), rtol=1e-3)
  np.testing.assert_allclose(f(s, s, 0.3), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="beta"):
    losses.generalized_jsd(jnp.zeros(3), jnp.zeros(3), beta=1.5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_jsd_equals_unchunked(beta):
  rng = np.random.default_rng(2)
  b, n, d, e, v = 2, 7, 6, 10, 13
  hs, ws = rng.normal(size=(b, n, d)), rng.normal(size=(d, v))
  ht, wt = rng.normal(size=(b, n, e)), rng.normal(size=(e, v))
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731

  def chunked(hs_, ws_, chunk):
    return divergence.token_generalized_jsd(hs_, ws_, f32(ht), f32(wt), beta=beta,
                                            chunk_size=chunk, temperature=0.7,
                                            student_softcap=5.0)

  def plain(hs_, ws_):
    z_s = 5.0 * jnp.tanh(hs_ @ ws_ / 5.0) / 0.7
    return losses.generalized_jsd(z_s, (f32(ht) @ f32(wt)) / 0.7, beta=beta)

  # numpy f64 oracle of the same transform
  z_s = 5.0 * np.tanh(hs @ ws / 5.0) / 0.7
  z_t = ht @ wt / 0.7
  want = (_np_kl(_np_log_softmax(z_t), _np_log_softmax(z_s)) if beta == 0 else
          _np_kl(_np_log_softmax(z_s), _np_log_softmax(z_t)) if beta == 1 else
          _np_jsd(z_s, z_t, beta))
  for chunk in (2, 6, 1024):  # 1, 3 positions per chunk (with padding), and one chunk
    np.testing.assert_allclose(np.asarray(chunked(f32(hs), f32(ws), chunk)), want,
                               rtol=2e-4, atol=1e-6)
  w = jnp.asarray(rng.normal(size=(b, n)), jnp.float32)
  g_c = jax.grad(lambda h, u: jnp.sum(chunked(h, u, 4) * w), argnums=(0, 1))(
      f32(hs), f32(ws))
  g_p = jax.grad(lambda h, u: jnp.sum(plain(h, u) * w), argnums=(0, 1))(f32(hs), f32(ws))
  for a, bb in zip(g_c, g_p):
    np.testing.assert_allclose(np.asarray(a), np.asarray(bb), rtol=1e-4, atol=1e-6)


def test_chunked_jsd_stops_teacher_gradient():
  rng = np.random.default_rng(3)
  hs, ws = jnp.asarray(rng.normal(size=(1, 3, 4)), jnp.float32), jnp.asarray(
      rng.normal(size=(4, 5)), jnp.float32)
  ht = jnp.asarray(rng.normal(size=(1, 3, 4)), jnp.float32)
  g = jax.grad(lambda h: jnp.sum(divergence.token_generalized_jsd(
      hs, ws, h, ws, beta=0.5)))(ht)
  assert float(jnp.abs(g).max()) == 0.0


# ----------------------------------------------------------------------------- config


def _experiment(arg):
  spec = importlib.util.spec_from_file_location("online", os.path.join(EXPERIMENTS,
                                                                       "online.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  c.log.progress_bar = c.log.tensorboard = False
  c.checkpoint.async_save = False
  return c


def _validate(c):
  from jaxalign import config as config_lib
  return config_lib.validate_rl(c, jax.device_count())


@pytest.mark.parametrize("arg, edit, key", [
    ("online_dpo", {"group_size": 1}, "rl.group_size"),
    ("online_dpo", {"kl_coef": 0.0}, "rl.kl_coef"),
    ("online_dpo", {"teacher": "/tmp/x"}, "rl.teacher"),
    ("online_dpo", {"loss_agg": "dapo"}, "rl.loss_agg"),
    ("gkd", {}, "rl.teacher"),
    ("gkd,teacher=/tmp/x", {"kl_coef": 0.05}, "rl.kl_coef"),
    ("gkd,teacher=/tmp/x", {"gkd_beta": 1.5}, "rl.gkd_beta"),
])
def test_config_errors_name_the_key(arg, edit, key):
  c = _experiment(arg)
  for k, v in edit.items():
    c.rl[k] = v
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    _validate(c)


def test_teacher_errors_before_compiling(tmp_path):
  from jaxalign.train import rl
  c = _experiment(f"gkd,teacher={tmp_path / 'missing'}")
  cfg, rlc = _validate(c)
  with pytest.raises(ValueError, match=r"config\.rl\.teacher=.*not a directory"):
    rl.setup(cfg, rlc, str(tmp_path / "run"), log=lambda m: None)
  hf = tmp_path / "hf"  # an HF dir whose vocabulary is not the student's
  hf.mkdir()
  (hf / "config.json").write_text('{"model_type": "llama", "vocab_size": 999, '
                                  '"hidden_size": 16, "intermediate_size": 32, '
                                  '"num_hidden_layers": 1, "num_attention_heads": 2, '
                                  '"num_key_value_heads": 2}')
  c = _experiment(f"gkd,teacher={hf}")
  cfg, rlc = _validate(c)
  with pytest.raises(ValueError, match=r"config\.rl\.teacher=.*999 ids"):
    rl.setup(cfg, rlc, str(tmp_path / "run2"), log=lambda m: None)


# ----------------------------------------------------------------------------- runs


def _tiny(arg, steps, **rl_edits):
  c = _experiment(arg)
  c.num_steps = steps
  c.data.batch_size = 8
  c.rl.max_new_tokens = 8
  for k, v in rl_edits.items():
    c.rl[k] = v
  return c


def test_online_dpo_pairs_are_labelled_by_the_oracle(tmp_path):
  """One iteration by hand: the rollout's scores are the oracle's of its completions;
  the first update (policy = reference) has loss log 2 on the judged pairs and the
  oracle's tie fraction; after it, the oracle-preferred completion of each judged pair
  gained log-ratio on the other one (the labels point the right way)."""
  from jaxalign.data import synthetic
  from jaxalign.train import rl
  cfg, rlc = _validate(_tiny("online_dpo", 1, kl_coef=1.0))
  run = rl.setup(cfg, rlc, str(tmp_path), log=lambda m: None)
  t, state = run.trainer, run.state
  prompts = [p for p in t.prompts(0) for _ in range(2)]
  it_key = jax.random.fold_in(state.rollout_key, 0)
  # pylint: disable=protected-access
  batch, out = rl._rollout(t, state, prompts, jax.random.fold_in(it_key, 0))
  rollout, _ = rl._score(t, state, batch, prompts, out, 0)
  # pylint: enable=protected-access
  completions = np.asarray(rollout["tokens"])[:, rlc.prompt_len:]
  oracle = synthetic.oracle_reward(prompts, completions, t.prompts.task).reshape(-1, 2)
  np.testing.assert_allclose(np.asarray(rollout["scores"]).reshape(-1, 2), oracle,
                             rtol=1e-6)
  ties = oracle[:, 0] == oracle[:, 1]
  assert not ties.all()
  ref_params = state.ref_params
  new_state, metrics = rl.iteration(t, state, 0)  # the same key: the same rollout
  np.testing.assert_allclose(metrics["online_dpo/tie_frac"], ties.mean(), atol=1e-6)
  np.testing.assert_allclose(metrics["loss/online_dpo"], np.log(2.0), rtol=1e-5)
  after = t.programs.score(new_state.policy.params, ref_params, None, None, batch)
  rho = np.asarray(jnp.sum(after["old_logp"] - after["ref_logp"], 1)).reshape(-1, 2)
  first_wins = oracle[:, 0] > oracle[:, 1]
  gain = np.where(first_wins, rho[:, 0] - rho[:, 1], rho[:, 1] - rho[:, 0])[~ties]
  assert gain.mean() > 0 and (gain > 0).mean() >= 0.75, gain


@pytest.mark.heavy
def test_online_dpo_raises_the_oracle_reward(tmp_path):
  """The recipe (experiments/online.py:online_dpo, 40 iterations of 8 pairs, ~60-80 s):
  the oracle reward of the samples rises (measured 0.16 -> 0.63, first / last 5). The
  default run covers the same path with one iteration
  (`test_online_dpo_pairs_are_labelled_by_the_oracle`)."""
  from jaxalign.train import rl
  c = _experiment("online_dpo")
  c.num_steps = 40
  res = rl.run_rl(c, str(tmp_path), log=lambda m: None)
  oracle = [h["objective/oracle"] for h in res.history]
  assert np.mean(oracle[-5:]) > np.mean(oracle[:5]) + 0.2, oracle


class _NoCheckpoints:
  def latest_step(self):
    return None


def _onpolicy_kl(sampler, student, teacher, params, teacher_params, prompts, rlc):
  """Mean over completion tokens of KL(student || teacher) of the full next-token
  distributions (logits / T, float64 NumPy) on the student's own samples."""
  from jaxalign.train import rl_steps
  p_BxP, len_B = rl_steps.left_pad(prompts, rlc.prompt_len)
  kls, masks = [], []
  for seed in range(3):
    out = sampler(params, p_BxP, len_B, jax.random.key(100 + seed))
    batch = rl_steps.rollout_batch(p_BxP, len_B, out)
    logits = []
    for forward, p in ((student, params), (teacher, teacher_params)):
      h, w = rl_steps.response_hidden(forward, p, batch, rlc.prompt_len)
      logits.append(np.asarray(h, np.float64) @ np.asarray(w, np.float64)
                    / rlc.temperature)
    kls.append(_np_kl(_np_log_softmax(logits[0]), _np_log_softmax(logits[1])))
    masks.append(np.asarray(batch["mask"], np.float64))
  kl, mask = np.concatenate(kls), np.concatenate(masks)
  return float((kl * mask).sum() / mask.sum())


@pytest.mark.slow
def test_gkd_lowers_the_students_kl_to_a_trained_teacher(tmp_path):
  """A teacher trained by a short jaxalign run (WORKDIR); a student from another init
  distils from it with GKD (beta 0.5); its on-policy KL to the teacher, measured
  independently in NumPy from both models' full softmaxes, falls."""
  from jaxalign.parallel import mesh as mesh_lib
  from jaxalign.train import build
  from jaxalign.train import rl
  from jaxalign.train import rl_distill
  teacher_dir = str(tmp_path / "teacher")  # a trained tiny policy: online DPO steps
  rl.run_rl(_tiny("online_dpo", 3), teacher_dir, log=lambda m: None)
  c = _tiny(f"gkd,teacher={teacher_dir}", 8)
  c.seed = 1  # another init than the teacher's: a large KL to close
  c.optimizer.learning_rate = 3e-3
  cfg, rlc = _validate(c)
  res = rl.run_rl(c, str(tmp_path / "student"), log=lambda m: None)
  assert res.iteration == 8
  run = rl.setup(cfg, rlc, str(tmp_path / "fresh"), log=lambda m: None)  # the init
  policy = build.build_model(cfg.model, run.trainer.prompts.vocab_size)
  teacher = rl_distill.load_teacher(cfg, rlc, policy, mesh_lib.make_mesh(cfg.mesh),
                                    _NoCheckpoints())
  assert teacher.meta["teacher_source"].startswith("rl.teacher=")
  kl = functools.partial(_onpolicy_kl, run.trainer.programs.sampler,
                         build.make_forward(policy), build.make_forward(teacher.model),
                         teacher_params=teacher.params,
                         prompts=run.trainer.prompts(1000), rlc=rlc)
  before, after = kl(run.state.policy.params), kl(res.state.policy.params)
  assert after < 0.6 * before, (before, after)
  losses_ = [h["loss/gkd"] for h in res.history]
  assert losses_[-1] < losses_[0], losses_
  # a resume against another teacher (here: the distilled student's own run) is refused
  c2 = _tiny(f"gkd,teacher={tmp_path / 'student'}", 8)
  c2.seed, c2.optimizer.learning_rate = 1, 3e-3
  with pytest.raises(ValueError, match=r"trained against rl\.teacher=.*teacher:3'"):
    rl.setup(*_validate(c2), str(tmp_path / "student"), log=lambda m: None)
