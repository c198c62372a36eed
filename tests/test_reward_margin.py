"""A reward model's margin read from a data field (issue 18; Llama 2, Touvron et al.
2023: loss = -log sigmoid(r_c - r_r - m)). Oracle: NumPy float64 transcription."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import _common
from jaxalign import config as config_lib
from jaxalign import losses
from jaxalign.data import batching, formats
from jaxalign.data.examples import PairExample
from jaxalign.data.tokenizer import ByteTokenizer
from jaxalign.train import objectives as ob

TOK = ByteTokenizer()


def _write(path, records):
  path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n"
                          for r in records))
  return path


def _pair(i, **extra):
  return {"prompt": f"q{i}?", "chosen": f" good{i}", "rejected": f" bad{i}!", **extra}


def test_margin_field_reaches_the_pair_examples(tmp_path):
  path = _write(tmp_path / "p.jsonl", [_pair(0, margin=2), _pair(1, margin=-0.5)])
  got = formats.load_examples(path, "pairwise", TOK, margin_field="margin")
  assert [e.margin for e in got] == [2.0, -0.5]
  # Without margin_field the field is ignored, as any other extra field.
  assert [e.margin for e in formats.load_examples(path, "pairwise", TOK)] == [None] * 2


@pytest.mark.parametrize("record,reason,detail", [
    (_pair(1), "missing_field", "field 'margin' missing"),
    (_pair(1, margin="3"), "wrong_type", "must be a number"),
    (_pair(1, margin=True), "wrong_type", "must be a number"),
    (_pair(1, margin=None), "wrong_type", "got null"),
    ('{"prompt": "q", "chosen": " a", "rejected": " b", "margin": Infinity}\n',
     "non_finite_score", "a margin must be finite"),
])
def test_bad_margin_names_file_line_and_field(tmp_path, record, reason, detail):
  path = _write(tmp_path / "p.jsonl", [_pair(0, margin=1.0), record])
  with pytest.raises(ValueError) as info:
    formats.load_examples(path, "pairwise", TOK, margin_field="margin")
  message = str(info.value)
  assert f"{path}:2" in message and detail in message and reason in message, message
  # on_error="skip" drops it and counts the reason instead.
  report = formats.DataReport()
  kept = formats.load_examples(path, "pairwise", TOK, margin_field="margin",
                               on_error="skip", report=report)
  assert len(kept) == 1 and report.errors[reason] == 1


def test_margin_field_is_for_pairs_only():
  with pytest.raises(ValueError, match="margin_field='m'.*not format 'sft'"):
    formats.parse_object({"prompt": "a", "completion": "b"}, "sft", margin_field="m")


def test_batch_margins_and_reward_objective_match_numpy():
  """Reward objective with margins == mean_i -log sig(r_c - r_r - s m_i), r read at
  each completion's last token from a lookup-table reward (the oracle reads the
  example tokens directly, no batch layout)."""
  rng = np.random.default_rng(0)
  tok = lambda k: rng.integers(1, 50, k).astype(np.int32)
  margins = [1.5, -0.25, 0.0]
  pairs = [PairExample(tok(3), tok(4), tok(2), margin=m) for m in margins]
  layout = batching.LayoutConfig(kind="prefix_shared", buckets=(16,),
                                 examples_per_batch=4)
  batch = batching.make_batch(pairs, layout)
  np.testing.assert_array_equal(batch["margins"], np.float32(margins + [0.0]))
  table = jnp.asarray(rng.normal(size=64), jnp.float32)

  def reward_fn(params, b):
    return params[b["tokens"]]  # [R, L]: the reward of the token at each position

  scale = 0.5
  fn, _ = losses.resolve("bradley_terry", {"margin_scale": scale})
  objective = ob.make_objective("reward", loss_fn=fn, reward_fn=reward_fn)
  loss, metrics = jax.jit(objective)(table, None, batch)
  t = np.asarray(table, np.float64)
  r_c = np.array([t[p.chosen[-1]] for p in pairs])
  r_r = np.array([t[p.rejected[-1]] for p in pairs])
  want = np.mean(np.logaddexp(0.0, -(r_c - r_r - scale * np.array(margins))))
  # f32 vs float64 on O(1) values: rtol 1e-6.
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  without = np.mean(np.logaddexp(0.0, -(r_c - r_r)))
  assert abs(want - without) > 1e-2  # the margin matters here
  np.testing.assert_allclose(float(metrics["rewards/chosen"]), r_c.mean(), rtol=1e-6)


def test_mixed_margins_in_one_batch_are_an_error():
  pairs = [PairExample(np.int32([1, 2]), np.int32([3]), np.int32([4]), margin=1.0),
           PairExample(np.int32([1, 2]), np.int32([5]), np.int32([6]))]
  with pytest.raises(ValueError, match="example 1: PairExample.margin is None"):
    batching.make_batch(pairs, batching.LayoutConfig(kind="padded", buckets=(8,),
                                                     examples_per_batch=2))


def test_config_margin_field_needs_a_reward_model_on_pairs(tmp_path):
  c = _common.apply_variant(config_lib.base_config(), _common.experiment_arg("tiny"),
                            num_steps=2)
  c.data.margin_field = "margin"
  with pytest.raises(ValueError, match=r"config\.data\.margin_field.*head 'lm'"):
    config_lib.validate(c, 8)
  c.data.update(source="file", path=str(tmp_path / "p.jsonl"), format="pairwise")
  c.loss = "bradley_terry"
  c.reference.kind = "none"
  c.model.head = "scalar"
  assert config_lib.validate(c, 8).data.margin_field == "margin"
