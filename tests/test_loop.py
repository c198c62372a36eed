"""Loop pieces: eval metrics vs independent oracles, data-iterator resume, optimizer
schedule, preemption handler, metrics logging. (Whole runs: test_main, test_experiments.)"""

import dataclasses
import json
import math
import os
import signal

import numpy as np
import optax
import pytest

from experiments import _common
from jaxalign import config as config_lib
from jaxalign import eval as eval_lib
from jaxalign.data import batching
from jaxalign.data import examples as ex_lib
from jaxalign.data import synthetic
from jaxalign.train import logging as log_lib
from jaxalign.train import build
from jaxalign.train import hooks
from jaxalign.train import loop
from jaxalign.train import stream


# --- eval metrics --------------------------------------------------------------


def test_pair_metrics_match_a_plain_loop():
  rng = np.random.default_rng(0)
  c = rng.normal(size=50).round(1)  # rounding makes ties
  r = rng.normal(size=50).round(1)
  v = (rng.uniform(size=50) > 0.2).astype(np.int32)
  got = eval_lib.pair_metrics(c, r, v)
  wins, margin, n = 0.0, 0.0, 0
  for ci, ri, vi in zip(c, r, v):
    if vi:
      n += 1
      wins += 1.0 if ci > ri else 0.5 if ci == ri else 0.0
      margin += ci - ri
  assert any(ci == ri for ci, ri in zip(c, r))
  assert got["pair_accuracy"] == pytest.approx(wins / n, abs=1e-12)
  assert got["pair_margin"] == pytest.approx(margin / n, abs=1e-12)


def test_candidate_metrics_match_a_plain_loop():
  rng = np.random.default_rng(1)
  pol, ref, rew = (rng.normal(size=(6, 4)) * 3 for _ in range(3))
  got = eval_lib.candidate_metrics(pol, ref, rew)
  exp_r, pref_r, ref_r, kl = 0.0, 0.0, 0.0, 0.0
  for i in range(6):
    zp = sum(math.exp(x) for x in pol[i])
    zq = sum(math.exp(x) for x in ref[i])
    p = [math.exp(x) / zp for x in pol[i]]
    q = [math.exp(x) / zq for x in ref[i]]
    exp_r += sum(pk * rk for pk, rk in zip(p, rew[i])) / 6
    ref_r += sum(qk * rk for qk, rk in zip(q, rew[i])) / 6
    pref_r += rew[i][max(range(4), key=lambda k: pol[i][k])] / 6
    kl += sum(pk * math.log(pk / qk) for pk, qk in zip(p, q)) / 6
  assert got["oracle_expected"] == pytest.approx(exp_r, rel=1e-10)
  assert got["oracle_reference"] == pytest.approx(ref_r, rel=1e-10)
  assert got["oracle_preferred"] == pytest.approx(pref_r, rel=1e-10)
  assert got["kl_to_reference"] == pytest.approx(kl, rel=1e-10)
  assert got["oracle_best"] == pytest.approx(rew.max(1).mean(), rel=1e-12)


def test_candidate_metrics_identities():
  rng = np.random.default_rng(2)
  pol, rew = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  same = eval_lib.candidate_metrics(pol, pol + 7.0, rew)  # softmax is shift-invariant
  assert same["kl_to_reference"] == pytest.approx(0.0, abs=1e-12)
  assert same["oracle_expected"] == pytest.approx(same["oracle_reference"], abs=1e-12)
  assert "kl_to_reference" not in eval_lib.candidate_metrics(pol, None, rew)


def test_evaluate_reads_the_sequence_numbering():
  """Pairs: chosen 2i, rejected 2i+1; candidates: i*K + k; invalid slots ignored."""
  task = synthetic.SyntheticTaskConfig()
  rng = np.random.default_rng(3)
  pairs = synthetic.make_pairs(rng, 3, task)
  cands = synthetic.make_ranked(rng, 3, 2, task)
  layout = batching.LayoutConfig(kind="padded", buckets=(32,), examples_per_batch=4)
  cl = batching.LayoutConfig(kind="padded", buckets=(32,), examples_per_batch=4,
                             responses_per_example=2)
  eval_set = eval_lib.EvalSet(pair_batches=stream.make_batches(pairs, layout),
                              candidate_batches=stream.make_batches(cands, cl))
  # A "model" whose score is the sequence's number of tokens (its row's length).
  def score_fn(params, batch):
    del params
    s = batch["seq_last"].shape[0]
    return np.asarray([np.count_nonzero(batch["seq_ids"] == j) for j in range(s)],
                      np.float64)
  got = eval_lib.evaluate(score_fn, None, None, eval_set)
  lens_c = np.asarray([len(p.chosen) for p in pairs], np.float64)
  lens_r = np.asarray([len(p.rejected) for p in pairs], np.float64)
  want = eval_lib.pair_metrics(lens_c, lens_r)
  assert got["pair_accuracy"] == pytest.approx(want["pair_accuracy"])
  assert got["pair_margin"] == pytest.approx(want["pair_margin"])
  lens = np.asarray([[len(y) for y in e.responses] for e in cands], np.float64)
  scores = np.stack([e.scores for e in cands])
  want_c = eval_lib.candidate_metrics(lens, None, scores)
  assert got["oracle_expected"] == pytest.approx(want_c["oracle_expected"], rel=1e-6)
  # With a reference equal to the policy, implicit rewards are all zero: accuracy 1/2.
  got_ref = eval_lib.evaluate(score_fn, "policy", "reference", eval_set, beta=0.1)
  assert got_ref["pair_accuracy"] == 0.5 and got_ref["pair_margin"] == 0.0
  assert got_ref["kl_to_reference"] == pytest.approx(0.0, abs=1e-12)


# --- data ---------------------------------------------------------------------


def test_example_batches_resume_exactly_across_epochs():
  exs = synthetic.make_pairs(np.random.default_rng(4), 10, synthetic.SyntheticTaskConfig())
  layout = batching.LayoutConfig(kind="padded", buckets=(32,), examples_per_batch=4)
  it = stream.ExampleBatches(exs, layout, seed=7)
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # survives JSON, as in checkpoints
  after = [next(it) for _ in range(4)]  # crosses an epoch boundary (10 examples)
  again = stream.ExampleBatches(exs, layout, seed=7)
  again.set_state(state)
  for a, b in zip(after, [next(again) for _ in range(4)]):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_convert_examples_from_pairs():
  p = ex_lib.PairExample(prompt=np.array([2, 5]), chosen=np.array([6, 3]),
                         rejected=np.array([7, 3]))
  (sft,) = stream.convert_examples([p], "sft")
  assert np.array_equal(sft.completion, p.chosen)
  good, bad = stream.convert_examples([p], "unpaired")
  assert good.label and not bad.label and np.array_equal(bad.completion, p.rejected)
  (ranked,) = stream.convert_examples([p], "ranked")
  assert ranked.scores.tolist() == [1.0, 0.0]
  with pytest.raises(ValueError, match="config.data.format"):
    stream.convert_examples([sft], "pairwise")


# --- optimizer ----------------------------------------------------------------


def test_optimizer_warmup_then_linear_decay():
  """SGD on f(p) = p (gradient 1): the update at step t is -lr(t), lr from the formula."""
  c = config_lib.validate(config_lib.base_config(), 8).optimizer
  c = dataclasses.replace(c, name="sgd", learning_rate=0.5, schedule="linear",
                          warmup_steps=4, grad_clip_norm=0.0)
  opt = build.make_optimizer(c, num_steps=12)
  state = opt.init(np.zeros((), np.float32))
  for t in range(12):
    upd, state = opt.update(np.ones((), np.float32), state)
    want = 0.5 * t / 4 if t < 4 else 0.5 * (1 - (t - 4) / 8)
    assert float(-upd) == pytest.approx(want, abs=1e-7), t


def test_optimizer_clips_the_global_norm():
  c = config_lib.validate(config_lib.base_config(), 8).optimizer
  c = dataclasses.replace(c, name="sgd", learning_rate=1.0, grad_clip_norm=1.0)
  opt = build.make_optimizer(c, num_steps=10)
  g = {"a": np.asarray([3.0], np.float32), "b": np.asarray([4.0], np.float32)}  # norm 5
  upd, _ = opt.update(g, opt.init(g))
  assert float(-upd["a"][0]) == pytest.approx(0.6) and float(-upd["b"][0]) == pytest.approx(0.8)


# --- preemption ----------------------------------------------------------------


def test_preemption_flag_and_handler_restore():
  before = signal.getsignal(signal.SIGTERM)
  with hooks.Preemption() as p:
    assert not p.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert p.requested and p.signal == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) == before


# --- logging --------------------------------------------------------------------


def test_metrics_logger_jsonl_resume_truncation_and_plots(tmp_path):
  w = str(tmp_path)
  log = log_lib.MetricsLogger(w, total_steps=6, tensorboard=True, progress_bar=False)
  for s in range(1, 6):
    log.write(s, {"loss": 1.0 / s, "grad_norm": float("nan") if s == 3 else 1.0})
  log.write(4, {"pair_accuracy": 0.75}, split="eval")
  log.close()
  recs = log_lib.read_metrics(os.path.join(w, log_lib.METRICS_FILE))
  assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 4]
  assert recs[2]["grad_norm"] is None  # non-finite stays visible as null
  assert os.listdir(os.path.join(w, "tensorboard"))
  # A run resumed from step 3 drops what it will redo.
  log = log_lib.MetricsLogger(w, total_steps=6, start_step=3, tensorboard=False,
                              progress_bar=False)
  log.write(4, {"loss": 0.2})
  log.close()
  recs = log_lib.read_metrics(os.path.join(w, log_lib.METRICS_FILE))
  assert [(r["step"], r["split"]) for r in recs] == [(1, "train"), (2, "train"),
                                                    (3, "train"), (4, "train")]
  steps, vals = log_lib.series(recs, "loss", "train")
  np.testing.assert_allclose(vals, [1.0, 0.5, 1 / 3, 0.2])
  paths = log_lib.plot_metrics(w, [("train", "loss"), ("eval", "missing")])
  assert [os.path.basename(p) for p in paths] == ["train_loss.png"]
  with open(paths[0], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# --- whole tiny loop runs: micro-batching and the reference cache ------------------


def _tiny_run_config(**overrides):
  """DPO on the synthetic task, a 1-layer d_model 32 model, 3 steps, nothing extra."""
  c = config_lib.base_config()
  c = _common.apply_variant(c, _common.experiment_arg("tiny"), num_steps=3)
  c.loss = "dpo"
  c.loss_hparams.beta = 0.1
  c.model.update(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, mlp_dim=64)
  c.model.logprob_chunk = 16
  c.data.batch_size = 16
  c.data.task.num_train = 64
  c.eval.enabled = False
  c.log.every_steps = 1
  c.log.tensorboard = False
  c.log.progress_bar = False
  c.log.plots = False
  c.checkpoint.async_save = False
  for k, v in overrides.items():
    section, _, name = k.partition(".")
    c[section][name] = v
  return config_lib.validate(c, 8)


def _losses(workdir):
  return np.asarray([r["loss"] for r in log_lib.read_metrics(
      os.path.join(workdir, "metrics.jsonl")) if r.get("split", "train") == "train"
                     and "loss" in r])


def _flat_params(result):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(result.state.params)]


_SGD = {"optimizer.name": "sgd", "optimizer.learning_rate": 0.5}


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
  """The plain run (live reference, one batch per step) the others are checked against."""
  workdir = tmp_path_factory.mktemp("live")
  return loop.run(_tiny_run_config(**_SGD), str(workdir)), workdir


def test_micro_batched_loop_matches_the_full_batch_loop(tmp_path, live_run):
  # Oracle: each micro-batch's loss is divided by the valid-example count of the
  # whole step (steps.grad_step, tested at the steps level), so 2 micro-batches of 8
  # pairs give the gradient of the same 16 pairs in one batch; the stream hands both
  # runs the same 16 examples per step. SGD, not Adam: Adam's g / sqrt(v) turns f32
  # summation-order noise in near-zero gradient entries into lr-sized differences,
  # while SGD's params are linear in the gradients being compared.
  full, full_dir = live_run
  micro = loop.run(_tiny_run_config(**_SGD, **{"data.micro_batches": 2}),
                   str(tmp_path / "m2"))
  assert full.status == micro.status == "done" and micro.step == 3
  lf, lm = _losses(full_dir), _losses(tmp_path / "m2")
  assert len(lf) == 3 and abs(lf[-1] - lf[0]) > 1e-4  # it trained
  np.testing.assert_allclose(lm, lf, rtol=1e-5)  # f32, summation order differs
  for a, b in zip(_flat_params(micro), _flat_params(full)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_reference_cache_matches_live_reference_and_is_keyed(tmp_path, monkeypatch,
                                                            live_run):
  cache = str(tmp_path / "refcache")
  live, live_dir = live_run
  cached = dict(_SGD, **{"reference.cache_dir": cache})
  msgs = []
  loop.run(_tiny_run_config(**cached), str(tmp_path / "built"), log=msgs.append)
  assert any("computed (3 batches)" in m for m in msgs), msgs
  # Oracle: the live run's per-step losses (the same reference forward, run once
  # ahead of time instead of inside the step).
  np.testing.assert_allclose(_losses(tmp_path / "built"), _losses(live_dir),
                             rtol=1e-6)
  assert all(r.get("ref_cache_misses", 0) == 0 for r in log_lib.read_metrics(
      os.path.join(tmp_path, "built", "metrics.jsonl")))

  # A valid cache: the reference is never loaded (its loader would raise).
  def no_reference(*args, **kwargs):
    raise AssertionError("the reference was loaded despite a valid cache")
  monkeypatch.setattr(build, "reference_params", no_reference)
  msgs.clear()
  again = loop.run(_tiny_run_config(**cached), str(tmp_path / "again"),
                   log=msgs.append)
  assert any("loaded (3 batches)" in m for m in msgs), msgs
  for a, b in zip(_flat_params(again), _flat_params(live)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)

  # Different data (another shuffle, or more examples): a different key, so the old
  # entries are not used and the reference is needed again to recompute.
  for change in ({"data.shuffle_seed": 1}, {"data.task.num_train": 80}):
    with pytest.raises(AssertionError, match="reference was loaded"):
      c = dict(cached, **{k: v for k, v in change.items() if k.count(".") == 1})
      cfg = _tiny_run_config(**c)
      if "data.task.num_train" in change:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, task=dataclasses.replace(cfg.data.task, num_train=80)))
      loop.run(cfg, str(tmp_path / "other"))


def test_micro_batches_are_the_stream_split_and_share_one_bucket():
  tok = lambda k: np.arange(1, k + 1, dtype=np.int32)
  # Pairs 0-1 fit a row of 8 tokens, pairs 2-3 need 32: two buckets across the step.
  exs = [ex_lib.PairExample(tok(2), tok(2), tok(3)),
         ex_lib.PairExample(tok(2), tok(3), tok(2)),
         ex_lib.PairExample(tok(9), tok(9), tok(9)),
         ex_lib.PairExample(tok(9), tok(8), tok(9))]
  layout = batching.LayoutConfig(kind="padded", buckets=(8, 32), examples_per_batch=2)
  # The same stream one micro-batch at a time (seed 1 happens to put the short pairs
  # first): its own buckets differ ...
  single = stream.ExampleBatches(exs, layout, seed=1)
  assert sorted(next(single)["tokens"].shape[1] for _ in range(2)) == [8, 32]
  got = next(stream.ExampleBatches(exs, layout, seed=1, micro_batches=2))
  assert got["tokens"].shape == (2, 4, 32)
  # ... so the stacked step holds both laid out at the longer one (the oracle: the
  # one-at-a-time stream with that single bucket).
  fixed = stream.ExampleBatches(exs, dataclasses.replace(layout, buckets=(32,)), seed=1)
  for m in range(2):
    # Compacted score arrays of the step are padded to its widest micro-batch's width
    # with unscored slots (steps.stack_microbatches; issue 22).
    want = batching.widen_scores(next(fixed), got["seq_ids"].shape[-1])
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k][m], want[k], err_msg=k)


def test_reference_cache_miss_is_computed_live_and_counted():
  from jaxalign.train import refcache
  calls = []
  ref = object.__new__(refcache.CachedReference)  # noqa: SLF001  (no model needed)
  ref.cache = refcache.ReferenceCache({}, "k")
  ref.misses, ref._params, ref._say = 0, None, calls.append
  ref._load = lambda: calls.append("load") or "params"
  ref._logprob = lambda p, b: np.full(np.shape(b["seq_last"]), 2.5 if p == "params"
                                      else np.nan, np.float32)
  batch = {"tokens": np.ones((2, 4), np.int32), "seq_last": np.array([3, 7])}
  out = ref.attach(batch)
  np.testing.assert_array_equal(out["ref_logps"], [2.5, 2.5])
  assert ref.misses == 1 and calls.count("load") == 1
  assert any("WARNING" in str(c) for c in calls)


# --- packed streams carry what does not fit; examples checked at load (issue 17) ---


def _uid_pairs(n, seed=0):
  """Pairs whose prompt starts with a unique id 1..n; sequences of 3..9 tokens."""
  rng = np.random.default_rng(seed)
  out = []
  for uid in range(1, n + 1):
    p = int(rng.integers(1, 4))
    prompt = np.concatenate([[uid], rng.integers(1, 50, p - 1)]).astype(np.int32)
    chosen, rejected = (rng.integers(1, 50, int(rng.integers(2, 7))).astype(np.int32)
                        for _ in range(2))
    out.append(ex_lib.PairExample(prompt, chosen, rejected))
  return out


def _uids(batch):
  """The example ids of a packed batch (or of each micro-batch), each once per pair."""
  if batch["tokens"].ndim == 3:
    return [u for m in range(batch["tokens"].shape[0])
            for u in _uids({k: v[m] for k, v in batch.items()})]
  starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
  ids = sorted(batch["tokens"][starts].tolist())
  assert ids[::2] == ids[1::2]  # chosen and rejected travel together
  assert len(ids) // 2 == int(batch["example_valid"].sum())
  return ids[::2]


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_packed_stream_carries_what_does_not_fit_exactly_once(micro_batches):
  # 4 pairs (8 sequences of 3..12 tokens) rarely fit 2 rows of 16: today's make_batch
  # raised "do not fit" mid-run; the stream must carry the rest to the next batch.
  n = 23
  exs = _uid_pairs(n)
  layout = batching.LayoutConfig(kind="packed", buckets=(8, 16), examples_per_batch=4,
                                 rows_per_batch=2)
  it = stream.ExampleBatches(exs, layout, seed=3, micro_batches=micro_batches)
  per_batch, shapes = [], set()
  while sum(map(len, per_batch)) < 3 * n:  # three epochs
    b = next(it)
    shapes.add(b["tokens"].shape)
    per_batch.append(_uids(b))
  assert min(map(len, per_batch)) < 4 * micro_batches  # carrying happened
  assert len(shapes) <= 2 and all(s[-2] == 2 for s in shapes)
  # In the order of the shuffled stream (carrying delays, never reorders or drops):
  # batch i holds the next len(batch i) examples of the stream ...
  total = sum(map(len, per_batch))
  order = [int(e.prompt[0]) for e in _stream(exs, seed=3, count=total)]
  pos = 0
  for got in per_batch:
    assert sorted(got) == sorted(order[pos:pos + len(got)])
    pos += len(got)
  # ... so each epoch's n examples are laid out exactly once.
  for e in range(3):
    assert sorted(order[e * n:(e + 1) * n]) == list(range(1, n + 1))


def _stream(exs, seed, count):
  from jaxalign.data import pipeline
  it = pipeline.make_example_iterator(exs, lambda e: e, seed=seed, num_epochs=None)
  return [next(it) for _ in range(count)]


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_packed_stream_resumes_exactly_with_carried_examples(micro_batches):
  exs = _uid_pairs(17, seed=1)
  layout = batching.LayoutConfig(kind="packed", buckets=(8, 16), examples_per_batch=4,
                                 rows_per_batch=2)
  it = stream.ExampleBatches(exs, layout, seed=5, micro_batches=micro_batches)
  states, batches = [], []
  for _ in range(14):  # crosses epoch boundaries
    states.append(json.loads(json.dumps(it.get_state())))  # as in checkpoints
    batches.append(next(it))
  for start in (1, 4, 9):
    again = stream.ExampleBatches(exs, layout, seed=5, micro_batches=micro_batches)
    again.set_state(states[start])
    for want in batches[start:start + 4]:
      got = next(again)
      assert got.keys() == want.keys()
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # _peek-style look-ahead (get_state / next / set_state) changes nothing.
  fresh = stream.ExampleBatches(exs, layout, seed=5, micro_batches=micro_batches)
  for want in batches[:6]:
    saved = fresh.get_state()
    next(fresh)
    fresh.set_state(saved)
    np.testing.assert_array_equal(next(fresh)["tokens"], want["tokens"])


def test_example_no_batch_can_hold_is_named_before_any_batch():
  tok = lambda k: np.arange(1, k + 1, dtype=np.int32)
  exs = [ex_lib.PairExample(tok(3), tok(4), tok(4)) for _ in range(5)]
  exs[3] = ex_lib.PairExample(tok(20), tok(25), tok(30))  # one row needs 75 tokens
  prefix = batching.LayoutConfig(kind="prefix_shared", buckets=(16, 64),
                                 examples_per_batch=2)
  with pytest.raises(ValueError, match=r"config\.data\.buckets: training example 3 "
                     r"\(prompt 20 tokens, completions \[25, 30\]\) needs a row of 75 "
                     r"tokens.*prefix_shared.*largest bucket 64.*bucket >= 75"):
    stream.ExampleBatches(exs, prefix, seed=0)
  padded = dataclasses.replace(prefix, kind="padded")
  stream.ExampleBatches(exs, padded, seed=0)  # 50 tokens a row: fits
  # Packed: each sequence fits a row but one row cannot hold both.
  exs[3] = ex_lib.PairExample(tok(20), tok(30), tok(30))
  packed = batching.LayoutConfig(kind="packed", buckets=(64,), examples_per_batch=2,
                                 rows_per_batch=1)
  with pytest.raises(ValueError, match=r"config\.data\.rows_per_batch: training "
                     r"example 3 .*\[50, 50\]"):
    stream.ExampleBatches(exs, packed, seed=0)


def test_kto_examples_are_checked_with_the_longest_other_completion():
  tok = lambda k: np.arange(1, k + 1, dtype=np.int32)
  exs = [ex_lib.UnpairedExample(tok(10), tok(5), True) for _ in range(3)]
  exs.append(ex_lib.UnpairedExample(tok(2), tok(20), False))
  layout = batching.LayoutConfig(kind="padded", buckets=(16, 24), examples_per_batch=2)
  # Every own sequence fits 24, but prompt 10 + the other completion 20 = 30 does not.
  with pytest.raises(ValueError, match=r"training example 0 .*completions \[5, 20\].*"
                     r"KL.*needs a row of 30 tokens"):
    stream.ExampleBatches(exs, layout, seed=0)
  stream.ExampleBatches(exs, dataclasses.replace(layout, buckets=(16, 32)), seed=0)


# --- issue 21: the divergence guard, the update norm, start-up and preemption --------


def _guard(**kw):
  return hooks.DivergenceGuard(dataclasses.replace(config_lib.DivergenceConfig(), **kw))


def _m(loss=0.7, grad_norm=1.0, update_norm=1e-3, param_norm=1.0, skipped=False):
  return dict(loss=loss, grad_norm=grad_norm, update_norm=update_norm,
              param_norm=param_norm, skipped=skipped)


def test_divergence_guard_catches_an_update_larger_than_the_weights_from_step_one():
  g = _guard()
  assert g.check(_m(update_norm=0.0)) is None  # a warmup's lr-0 step: no scale set
  assert list(g.windows["update_ratio"]) == []
  why = g.check(_m(update_norm=3e30, param_norm=10.0))  # lr 1e30, no history yet
  assert why is not None and "3e+29 x the norm of the weights" in why
  assert "max_update_ratio=1" in why


def test_divergence_guard_factor_over_the_running_median_and_its_state():
  g = _guard(factor=100.0, window=4)
  for r in (1e-3, 2e-3, 4e-3, 3e-3, 2e-3):  # window keeps the last 4: median 2.5e-3
    assert g.check(_m(update_norm=r)) is None
  assert g.check(_m(update_norm=0.2)) is None  # 80 x the median: healthy
  why = g.check(_m(update_norm=0.9))  # 0.9 / median(2e-3, 4e-3, 3e-3, 0.2) = 257
  assert why is not None and "divergence.factor=100" in why
  assert len(g.windows["update_ratio"]) == 4 and 0.9 not in g.windows["update_ratio"]
  # A resumed guard (from a checkpoint's meta) judges exactly the same.
  again = hooks.DivergenceGuard(g.cfg, json.loads(json.dumps(g.state())))
  assert again.check(_m(update_norm=0.9)) == why
  # Skipped (non-finite) steps are the other guard's; the opt-in tests are off.
  assert g.check(_m(loss=1e9, grad_norm=1e9, skipped=True)) is None
  assert g.check(_m(loss=1e9, grad_norm=1e9)) is None


def test_divergence_guard_updates_without_signal_set_no_scale():
  """A zero-advantage GRPO iteration (measured: gradient norm 2e-8, update 1.8e-3 on
  weights of norm 19.4, adamw at lr 1e-3) followed by real ones (gradient 0.27,
  update 0.28): the first is Adam's eps at work (update ~ (lr / eps) ||g||) and sets
  no scale, so the real update is not judged against it; a huge one still is."""
  g = _guard(adam_gain=1e-3 / 1e-8)
  quiet = _m(grad_norm=2e-8, update_norm=1.8e-3, param_norm=19.4)
  for _ in range(3):
    assert g.check(quiet) is None
  assert list(g.windows["update_ratio"]) == [] and list(g.windows["grad_norm"]) == []
  assert len(g.windows["loss"]) == 3  # the loss is measured all the same
  assert g.check(_m(grad_norm=0.27, update_norm=0.28, param_norm=19.4)) is None
  assert g.check(_m(grad_norm=0.005, update_norm=0.21, param_norm=19.4)) is None
  assert g.check(quiet) is None
  assert g.windows["update_ratio"][0] == pytest.approx(0.28 / 19.4)
  assert len(g.windows["update_ratio"]) == 2
  # 200 x the median relative update (~0.0126): divergent, silent steps or not.
  why = g.check(_m(grad_norm=0.3, update_norm=0.0126 * 200 * 19.4, param_norm=19.4))
  assert why is not None and "divergence.factor=100" in why
  # Without the optimizer's gain (sgd, or a guard built without validation) every
  # update sets the scale, and the same real update after silent ones is flagged.
  g = _guard()
  assert g.check(quiet) is None
  assert "x the median" in g.check(_m(grad_norm=0.27, update_norm=0.28, param_norm=19.4))


def test_divergence_guard_opt_in_loss_and_grad_tests():
  g = _guard(loss_factor=10.0, grad_factor=10.0)
  for loss in (0.7, 0.6, 0.5):
    assert g.check(_m(loss=loss)) is None
  assert "its loss 7 is 11.7 x the median 0.6" in g.check(_m(loss=7.0))
  assert "config.divergence.grad_factor=10" in g.check(_m(grad_norm=11.0))


class _FakeRun:
  def __init__(self, ckpt_dir, max_in_a_row=1):
    self.cfg = config_lib.Config(
        divergence=config_lib.DivergenceConfig(max_in_a_row=max_in_a_row))
    from jaxalign import checkpoint as ckpt_lib
    self.ckpt = ckpt_lib.Checkpointer(ckpt_dir, save_every=1, keep=5)
    self.said = []
    self.say = self.said.append


def test_divergent_step_stops_naming_the_checkpoint_or_none(tmp_path):
  r = _FakeRun(tmp_path / "a")
  c = hooks.Counters(guard=_guard())
  assert not hooks.check_step(r, c, _m(), 1)
  with pytest.raises(hooks.DivergenceError) as info:
    hooks.check_step(r, c, _m(update_norm=50.0), 2)
  msg = str(info.value)
  assert msg.startswith("step 2 diverged: its update was 50 x the norm")
  assert "No checkpoint was saved before step 2: a rerun starts from step 0" in msg
  assert "None" not in msg
  import jax.numpy as jnp
  r.ckpt.save(1, {"w": jnp.zeros(2)}, {})
  with pytest.raises(hooks.DivergenceError) as info:
    hooks.check_step(r, hooks.Counters(guard=_guard()), _m(update_norm=50.0), 2)
  assert ("The last good checkpoint is step 1" in str(info.value)
          and "--config.checkpoint.restore_step=1" in str(info.value))
  r.ckpt.close()


def test_divergent_streak_holds_saves_until_a_healthy_step(tmp_path):
  r = _FakeRun(tmp_path / "b", max_in_a_row=3)
  c = hooks.Counters(guard=_guard())
  assert hooks.check_step(r, c, _m(update_norm=50.0), 1)  # divergent: not saved
  assert hooks.check_step(r, c, _m(skipped=True), 2)  # the streak goes on
  assert "WARNING: step 1 diverged" in r.said[0]
  assert not hooks.check_step(r, c, _m(), 3)  # healthy: saved again
  assert c.divergent_in_a_row == 0 and c.skipped_total == 1
  hooks.check_step(r, c, _m(update_norm=50.0), 4)
  hooks.check_step(r, c, _m(skipped=True), 5)
  with pytest.raises(hooks.DivergenceError, match=r"step 4 diverged.*3 steps in a row "
                     r"up to step 6"):
    hooks.check_step(r, c, _m(skipped=True), 6)
  r.ckpt.close()


def test_train_step_reports_the_update_and_param_norms():
  """SGD's update is -lr * g: its norm is lr * ||g|| (oracle: the analytic gradient
  of sum(w^2)/2, which is w), and param_norm is ||w|| before the step."""
  import jax.numpy as jnp
  from jaxalign.train import state as state_lib
  from jaxalign.train import steps as steps_lib
  w = jnp.asarray([3.0, 4.0])

  def objective(params, ref_params, batch):
    del ref_params, batch
    return 0.5 * jnp.sum(params["w"] ** 2), {}
  opt = optax.sgd(0.1)
  st = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params={"w": w},
                            opt_state=opt.init({"w": w}), rng=None)
  new, metrics = steps_lib.train_step(st, None, {}, objective=objective, optimizer=opt)
  assert float(metrics["param_norm"]) == pytest.approx(5.0, rel=1e-6)
  assert float(metrics["update_norm"]) == pytest.approx(0.5, rel=1e-6)
  np.testing.assert_allclose(np.asarray(new.params["w"]), [2.7, 3.6], rtol=1e-6)


def test_progress_bar_starts_after_the_first_step(tmp_path):
  log = log_lib.MetricsLogger(str(tmp_path), total_steps=10, start_step=4,
                              tensorboard=False, progress_bar=True)
  assert log._bar is None  # nothing while the first step compiles
  log.write(5, {"loss": 0.5})
  log.advance()
  assert log._bar is not None and log._bar.n == 5 and log._bar.initial == 5
  log.advance()
  assert log._bar.n == 6
  log.close()


def test_truncation_warning_above_a_quarter():
  from jaxalign.data import formats
  rep = formats.DataReport()
  rep.examples = 7
  for _ in range(2):
    rep.add_truncation(formats.COMPLETION_TRUNCATED, "f:1")
  rep.add_truncation(formats.COMPLETION_TRUNCATED_AWAY, "f:2")  # dropped
  warning = log_lib.truncation_warning(rep, 256, 192)
  assert warning.startswith("3 of 8 examples (38%) lose completion tokens")
  assert "max_length=256" in warning and "1 dropped" in warning
  rep.examples = 20
  assert log_lib.truncation_warning(rep, 256, 192) is None  # 3 of 21


def test_preemption_is_acknowledged_at_once():
  import time
  said = []
  with hooks.Preemption(said.append) as p:
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):  # the watcher thread, not the step loop, answers
      if said:
        break
      time.sleep(0.01)
    assert p.requested
  assert said and said[0].startswith("received SIGTERM: stopping after the current step")
