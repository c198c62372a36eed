"""TFDS array_record builder (no TensorFlow) and the grain example iterator."""

import importlib.util
import json

import numpy as np
import pytest

from jaxalign.data import formats as F
from jaxalign.data import pipeline
from jaxalign.data import tfds_builder as TB
from jaxalign.data.examples import PairExample
from jaxalign.data.tokenizer import ByteTokenizer

N_PAIRS = 23


def _write(path, lines):
  path.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
  return path


def _pair_lines(n, offset=0):
  return [json.dumps({"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "chosen": f" good {i} ü",
                      "rejected": f" bad  {i}\n"}) for i in range(offset, offset + n)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  train = _write(root / "train.jsonl", _pair_lines(N_PAIRS) + ["{broken", json.dumps(
      {"prompt": "p", "chosen": "x", "rejected": "x"})])
  val = _write(root / "val.jsonl", _pair_lines(4, offset=100))
  sources, reports = TB.build_data_sources({"train": [train], "validation": [val]},
                                           "pairwise", root / "data", on_error="skip")
  return train, val, sources, reports


def test_tensorflow_is_not_installed():
  # The builder tests below are only meaningful as "works without TensorFlow" if so.
  assert importlib.util.find_spec("tensorflow") is None


def test_tfds_builds_and_reads_back_the_same_records(built):
  train, val, sources, reports = built
  for split, path in (("train", train), ("validation", val)):
    expected = list(F.iter_text_records(path, "pairwise", on_error="skip"))
    source = sources[split]
    assert len(source) == len(expected)
    assert [TB.record_from_features(source[i]) for i in range(len(source))] == expected
  # Bad records were counted by reason while preparing.
  assert dict(reports["train"].errors) == {F.MALFORMED_JSON: 1, F.CHOSEN_EQUALS_REJECTED: 1}
  assert reports["train"].records == N_PAIRS


def test_tfds_round_trips_labels_and_scores(tmp_path):
  ranked = _write(tmp_path / "r.jsonl", [
      json.dumps({"prompt": "p", "responses": ["a", "bb", "c"], "scores": [0.25, -1, 3]}),
      json.dumps({"prompt": "", "responses": ["x", "y"], "scores": [1, 2]})])
  unpaired = _write(tmp_path / "u.jsonl", [
      json.dumps({"prompt": "p", "completion": "c", "label": True}),
      json.dumps({"prompt": "q", "completion": "d", "label": False})])
  for fmt, path in (("ranked", ranked), ("unpaired", unpaired)):
    sources, _ = TB.build_data_sources({"train": [path]}, fmt, tmp_path / fmt)
    got = [TB.record_from_features(r) for r in sources["train"]]
    assert got == list(F.iter_text_records(path, fmt))


def test_edited_source_is_rebuilt_not_read_stale(tmp_path):
  path = _write(tmp_path / "d.jsonl", _pair_lines(3))
  sources, _ = TB.build_data_sources({"train": [path]}, "pairwise", tmp_path / "data")
  assert len(sources["train"]) == 3
  again, reports = TB.build_data_sources({"train": [path]}, "pairwise", tmp_path / "data")
  assert len(again["train"]) == 3 and not reports  # Unchanged input: reused.
  _write(path, _pair_lines(5))
  edited, _ = TB.build_data_sources({"train": [path]}, "pairwise", tmp_path / "data")
  assert len(edited["train"]) == 5


def test_builder_rejects_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="unknown record format 'csv'"):
    TB.JsonlRecordsBuilder(files={"train": ["x"]}, fmt="csv", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="files must map"):
    TB.JsonlRecordsBuilder(files={}, fmt="hh", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"record file .*nope.jsonl \(split 'train'\)"):
    TB.JsonlRecordsBuilder(files={"train": [tmp_path / "nope.jsonl"]}, fmt="hh",
                           data_dir=str(tmp_path))


def _records(n):
  return [F.TextRecord("pair", f"p{i}", (f" c{i}", f" r{i}"), source=f"f:{i + 1}")
          for i in range(n)]


def _key(ex):
  return (ex.prompt.tobytes(), ex.chosen.tobytes(), ex.rejected.tobytes())


@pytest.mark.parametrize("use_tfds", [False, True])
def test_restored_state_yields_exactly_the_remaining_items(built, use_tfds):
  source = built[2]["train"] if use_tfds else _records(N_PAIRS)
  tokenize = pipeline.make_tokenize_fn(ByteTokenizer())

  def make():
    return pipeline.make_example_iterator(source, tokenize, seed=7, num_epochs=2,
                                          process_index=1, process_count=2)

  full = [_key(ex) for ex in make()]
  assert len(full) == 2 * (N_PAIRS // 2)
  for k in (5, 11 + 3):  # Mid first epoch, and mid second epoch.
    it = make()
    head = [_key(next(it)) for _ in range(k)]
    state = json.loads(json.dumps(it.get_state()))  # Must survive JSON (checkpoints).
    resumed = make()
    resumed.set_state(state)
    assert head + [_key(ex) for ex in resumed] == full


def test_iterator_yields_typed_tokenized_examples():
  tok = ByteTokenizer()
  records = _records(4)
  got = list(pipeline.make_example_iterator(records, pipeline.make_tokenize_fn(tok),
                                            seed=0, shuffle=False))
  assert all(isinstance(ex, PairExample) for ex in got)
  for rec, ex in zip(records, got):  # shuffle=False keeps source order.
    np.testing.assert_array_equal(ex.prompt, [2] + [b + 4 for b in rec.prompt.encode()])
    np.testing.assert_array_equal(ex.chosen, [b + 4 for b in rec.completions[0].encode()] + [3])


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("drop_remainder", [False, True])
def test_process_shards_are_disjoint_and_cover_each_epoch(count, drop_remainder):
  records = _records(N_PAIRS)
  epochs = 2
  shards = [list(pipeline.make_example_iterator(
      records, lambda r: r.source, seed=3, num_epochs=epochs, process_index=i,
      process_count=count, drop_remainder=drop_remainder)) for i in range(count)]
  all_sources = {r.source for r in records}
  per_epoch = N_PAIRS // count if drop_remainder else None
  for e in range(epochs):
    seen = []
    for i, shard in enumerate(shards):
      size = per_epoch if drop_remainder else len(range(i, N_PAIRS, count))
      seen.append(shard[e * size:(e + 1) * size])
    flat = [s for part in seen for s in part]
    assert len(flat) == len(set(flat))  # Disjoint (and no repeats within an epoch).
    if drop_remainder:
      assert all(len(part) == per_epoch for part in seen)
      assert len(all_sources - set(flat)) == N_PAIRS % count
    else:
      assert set(flat) == all_sources  # Cover.


def test_shuffle_is_seeded_and_reshuffles_each_epoch():
  records = _records(N_PAIRS)

  def order(seed, shuffle=True):
    return list(pipeline.make_example_iterator(records, lambda r: r.source, seed=seed,
                                               shuffle=shuffle, num_epochs=2))

  a = order(1)
  assert a == order(1)
  assert a != order(2)
  assert sorted(a[:N_PAIRS]) == sorted(a[N_PAIRS:]) == sorted(r.source for r in records)
  assert a[:N_PAIRS] != a[N_PAIRS:]
  assert order(1, shuffle=False) == [r.source for r in records] * 2


def test_dropped_examples_are_filtered_and_counted():
  records = [F.TextRecord("pair", "p" * (10 if i % 2 else 1), (" c", " r"), source=f"f:{i}")
             for i in range(6)]
  report = F.DataReport()
  tokenize = pipeline.make_tokenize_fn(ByteTokenizer(), truncation=F.Truncation(max_length=6),
                                       report=report)
  got = list(pipeline.make_example_iterator(records, tokenize, seed=0, shuffle=False))
  assert len(got) == 3  # The three with a 1-byte prompt fit; the rest lose their completion.
  assert report.truncation[F.COMPLETION_TRUNCATED_AWAY] == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(process_index=2, process_count=2), "process_index=2 must be < process_count=2"),
    (dict(process_count=0), "process_count must be an int >= 1"),
    (dict(num_epochs=0), "num_epochs must be an int >= 1"),
    (dict(process_count=30), "cannot give each of process_count=30"),
])
def test_iterator_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pipeline.make_example_iterator(_records(N_PAIRS), lambda r: r, seed=0, **kwargs)
  with pytest.raises(ValueError, match="record source is empty"):
    pipeline.make_example_iterator([], lambda r: r, seed=0)
