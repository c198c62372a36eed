"""experiments/frontier.py: the --quick smoke run end to end, and its pure helpers."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from jaxalign.data import synthetic

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "frontier.py")
_spec = importlib.util.spec_from_file_location("experiments_frontier", _PATH)
frontier = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = frontier  # dataclasses look their module up by name
_spec.loader.exec_module(frontier)


@pytest.mark.slow
def test_quick_run_writes_plot_table_and_consistent_points(tmp_path):
  out = str(tmp_path)
  with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
    f.write("# Results\n\nHand-written intro.\n\n<!-- frontier:begin -->\nold table\n"
            "<!-- frontier:end -->\n\nHand-written discussion.\n")
  result = frontier.main(["--out", out, "--quick", "--json",
                          os.path.join(out, "frontier.json")])

  points = result["points"]
  assert [(p["algorithm"], p["value"]) for p in points] == [("ppo", 0.05), ("dpo", 0.1)]
  ref = result["reference"]
  # Identity: the reference scored against itself has a zero log-ratio (two f32
  # forwards of the same params in one program may fuse differently: 1e-5 nats/seq).
  assert abs(ref["kl"]) < 1e-5 and ref["kl_se"] < 1e-5
  for p in [ref] + points:
    assert np.isfinite([p["reward"], p["kl"], p["length"]]).all()
    # Two implementations of the policy's log-probs of the same samples (full
    # forward used for the KL vs the sampler's KV-cache decode), f32: 1e-3 nats/seq.
    assert p["logp_cache_gap"] < 1e-3
    # Completions are 1..max_new_tokens tokens long.
    assert 1.0 <= p["length"] <= frontier.QUICK.max_new_tokens
  # Trained policies moved away from the reference (a KL estimate, not identically 0).
  assert all(abs(p["kl"]) > 1e-3 for p in points)

  with open(os.path.join(out, "frontier.json"), encoding="utf-8") as f:
    assert json.load(f)["points"] == json.loads(json.dumps(points))
  assert 0 < os.path.getsize(os.path.join(out, "frontier.png")) < 200_000
  text = open(os.path.join(out, "results.md"), encoding="utf-8").read()
  assert "Hand-written intro." in text and "Hand-written discussion." in text
  assert "old table" not in text
  assert "| ppo | kl_coef=0.05 |" in text and "| dpo | beta=0.1 |" in text


def test_unknown_hyperparameter_is_rejected_before_compiling(tmp_path):
  bad = {"dpo": frontier.Sweep("dpo", "pairwise", "betta", (0.1,))}
  with pytest.raises(ValueError, match="betta"):
    frontier.run(str(tmp_path), sweeps=bad, budget=frontier.QUICK)
  assert not os.listdir(tmp_path)


def test_dominated_share_by_hand():
  pts = [dict(algorithm="a", kl=1.0, reward=1.0), dict(algorithm="a", kl=2.0, reward=3.0),
         dict(algorithm="b", kl=1.5, reward=0.5),  # dominated by a@1
         dict(algorithm="b", kl=3.0, reward=4.0),  # dominated by nothing
         dict(algorithm="b", kl=2.0, reward=3.0)]  # ties count (weak dominance)
  assert frontier.dominated_share(pts, "a", "b") == (2, 3)
  # b's (1.5, 0.5) has a higher KL than a@1, (2, 3) ties a@2: only the tie dominates.
  assert frontier.dominated_share(pts, "b", "a") == (1, 2)


def test_best_within_is_the_upper_concave_envelope_by_hand():
  ref = dict(kl=0.0, reward=1.0)
  pts = [dict(algorithm="a", kl=2.0, reward=3.0), dict(algorithm="a", kl=4.0, reward=3.5),
         dict(algorithm="a", kl=1.0, reward=1.5),  # below the chord ref -> (2, 3)
         dict(algorithm="b", kl=5.0, reward=9.0)]
  # KL 1: max(point (1, 1.5), chord (0, 1)-(2, 3) at 1 = 2.0, chord (0,1)-(4,3.5) = 1.625)
  assert frontier.best_within(pts, "a", 1.0, ref) == pytest.approx(2.0, abs=1e-12)
  # KL 3: chord (2, 3)-(4, 3.5) at 3 = 3.25.
  assert frontier.best_within(pts, "a", 3.0, ref) == pytest.approx(3.25, abs=1e-12)
  # Beyond the largest KL: the best point; below every point: the reference.
  assert frontier.best_within(pts, "a", 10.0, ref) == 3.5
  assert frontier.best_within(pts, "b", 0.0, ref) == 1.0
  assert frontier.best_within(pts, "b", 2.5, ref) == pytest.approx(1.0 + 8.0 / 2,
                                                                   abs=1e-12)


def test_every_input_kind_sees_the_same_pairs_at_each_step():
  pairs = synthetic.make_pairs(np.random.default_rng(0), 12,
                               synthetic.SyntheticTaskConfig())
  from jaxalign.train import stream
  pw = frontier.aligned_batches(pairs, 1, 4, 5, seed=3, k=None)
  kto = frontier.aligned_batches(stream.convert_examples(pairs, "unpaired"), 2, 4, 5,
                                 seed=3, k=None)
  rk = frontier.aligned_batches(stream.convert_examples(pairs, "ranked"), 1, 4, 5,
                                seed=3, k=2)
  assert len(pw) == len(kto) == len(rk) == 5

  def seqs(batch, s):
    # Completion tokens of sequence s, read through the batch's own indices.
    return tuple(batch["targets"][batch["seq_ids"] == s].tolist())

  for b_pw, b_kto, b_rk in zip(pw, kto, rk):
    for i in range(4):
      chosen, rejected = seqs(b_pw, 2 * i), seqs(b_pw, 2 * i + 1)
      # KTO example 2i = chosen (desirable), 2i + 1 = rejected; RRHF i*K + k.
      assert (seqs(b_kto, 2 * i), seqs(b_kto, 2 * i + 1)) == (chosen, rejected)
      assert b_kto["labels"][2 * i] and not b_kto["labels"][2 * i + 1]
      assert (seqs(b_rk, 2 * i), seqs(b_rk, 2 * i + 1)) == (chosen, rejected)
  # Over the first epoch (3 batches of 4 pairs) every pair appears exactly once.
  firsts = sorted(seqs(b, 2 * i) for b in pw[:3] for i in range(4))
  assert firsts == sorted(tuple(p.chosen.tolist()) for p in pairs)
