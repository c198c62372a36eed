"""Tests for jaxalign.data.batching: indices, layout equivalence, efficiency, shapes.

Oracles: (1) a sequence table written here from the architecture's numbering rules
(pair i -> 2i / 2i+1, ranked i,k -> iK+k, KTO KL i -> N+i with completion (i+1) mod n),
checked slot by slot; (2) per-sequence log-prob sums computed by running every
sequence ALONE (plain causal, positions 0..n-1, no layout code involved), once with a
small NumPy attention model that follows the attention contract, once with the real
transformer. Tolerances are stated where used.
"""

from __future__ import annotations

import collections
import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.data import batching
from jaxalign.data.batching import LayoutConfig, iter_batches, make_batch
from jaxalign.data.examples import (
    PairExample,
    RankedExample,
    SFTExample,
    UnpairedExample,
)

VOCAB = 64


def _toks(rng, n):
  return rng.integers(4, VOCAB, size=n).astype(np.int32)


def _pairs(rng, n, prompt=(2, 9), comp=(1, 7)):
  return [PairExample(_toks(rng, rng.integers(*prompt)), _toks(rng, rng.integers(*comp)),
                      _toks(rng, rng.integers(*comp))) for _ in range(n)]


def _examples(kind, rng, n, k=3):
  if kind == "pair":
    return _pairs(rng, n)
  if kind == "sft":
    return [SFTExample(_toks(rng, rng.integers(1, 8)), _toks(rng, rng.integers(1, 7)))
            for _ in range(n)]
  if kind == "unpaired":
    return [UnpairedExample(_toks(rng, rng.integers(1, 8)), _toks(rng, rng.integers(1, 7)),
                            bool(i % 2)) for i in range(n)]
  return [RankedExample(_toks(rng, rng.integers(1, 8)),
                        tuple(_toks(rng, rng.integers(1, 6)) for _ in range(k)),
                        rng.normal(size=k).astype(np.float32)) for _ in range(n)]


def _expected_sequences(examples, n_slots):
  """{sequence index: (prompt, completion)} from the architecture's numbering."""
  out = {}
  n = len(examples)
  for i, e in enumerate(examples):
    if isinstance(e, SFTExample):
      out[i] = (e.prompt, e.completion)
    elif isinstance(e, PairExample):
      out[2 * i] = (e.prompt, e.chosen)
      out[2 * i + 1] = (e.prompt, e.rejected)
    elif isinstance(e, UnpairedExample):
      out[i] = (e.prompt, e.completion)
      out[n_slots + i] = (e.prompt, examples[(i + 1) % n].completion)
    else:
      kk = len(e.responses)
      for j, r in enumerate(e.responses):
        out[i * kk + j] = (e.prompt, r)
  return out


LAYOUTS = {
    "padded": LayoutConfig("padded", (8, 16, 32), 4),
    "packed": LayoutConfig("packed", (16, 32, 64), 4, rows_per_batch=3),
    "prefix": LayoutConfig("prefix_shared", (16, 32, 64), 4),
    "prefix_packed": LayoutConfig("prefix_shared", (32, 64, 128), 4, rows_per_batch=2),
}
# The same layouts with slot-per-position score arrays ([R, L]: slot t scores the
# token at row position t), what the slot-level tests read; LAYOUTS compact them.
SLOT_LAYOUTS = {k: dataclasses.replace(v, compact_scores=False)
                for k, v in LAYOUTS.items()}


# ----------------------------------------------------------------------------- indices


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind", ["pair", "sft", "unpaired", "ranked"])
def test_scored_slots_match_sequence_table(layout, kind):
  cfg = SLOT_LAYOUTS[layout]
  rng = np.random.default_rng(zlib.crc32(f"{layout}-{kind}".encode()))
  examples = _examples(kind, rng, 3)  # one empty slot: N = 4
  batch = make_batch(examples, cfg)
  expected = _expected_sequences(examples, cfg.examples_per_batch)
  r, l = batch["tokens"].shape
  num_seqs = batch["seq_last"].shape[0]
  for key in batching.ROW_KEYS:
    assert batch[key].shape == (r, l) and batch[key].dtype == np.int32, key
  assert batch["example_valid"].tolist() == [1, 1, 1, 0]
  assert l in cfg.buckets
  seen = set()
  for s in range(num_seqs):
    rows, cols = np.nonzero(batch["seq_ids"] == s)  # row-major = slot order
    if s not in expected:
      assert rows.size == 0 and batch["seq_last"][s] == -1
      continue
    seen.add(s)
    prompt, comp = expected[s]
    full = np.concatenate([prompt, comp])
    p = prompt.shape[0]
    assert len(set(rows.tolist())) == 1  # a sequence never spans rows
    row = rows[0]
    np.testing.assert_array_equal(batch["targets"][row, cols], comp)
    np.testing.assert_array_equal(batch["tokens"][row, cols], comp)
    # The predicting position holds the previous token of prompt + completion,
    # one position earlier, in the same segment.
    lp = batch["logit_pos"][row, cols]
    np.testing.assert_array_equal(batch["tokens"][row, lp], full[p - 1:-1])
    np.testing.assert_array_equal(batch["positions"][row, lp] + 1,
                                  batch["positions"][row, cols])
    np.testing.assert_array_equal(batch["positions"][row, cols], np.arange(p, full.size))
    assert np.all(batch["segment_ids"][row, lp] == batch["segment_ids"][row, cols[0]])
    assert batch["seq_last"][s] == row * l + cols[-1]
  assert seen == set(expected)
  assert np.all(batch["targets"][batch["seq_ids"] < 0] == 0)
  if kind == "unpaired":
    assert batch["labels"].tolist() == [0, 1, 0, 0]
  if kind == "ranked":
    np.testing.assert_array_equal(batch["scores"][:3], np.stack([e.scores for e in examples]))
    assert batch["scores"].shape == (4, 3)


def test_prefix_shared_layout_by_hand():
  # Prompt [2 5 6], chosen [7 8 3], rejected [9 3]: written out from the contract.
  ex = PairExample(np.array([2, 5, 6]), np.array([7, 8, 3]), np.array([9, 3]))
  b = make_batch([ex], LayoutConfig("prefix_shared", (8,), 1, compact_scores=False))
  assert b["tokens"].tolist() == [[2, 5, 6, 7, 8, 3, 9, 3]]
  assert b["positions"].tolist() == [[0, 1, 2, 3, 4, 5, 3, 4]]
  assert b["branch_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2]]
  assert b["segment_ids"].tolist() == [[1] * 8]
  assert b["logit_pos"].tolist() == [[0, 0, 0, 2, 3, 4, 2, 6]]
  assert b["seq_ids"].tolist() == [[-1, -1, -1, 0, 0, 0, 1, 1]]
  assert b["seq_last"].tolist() == [5, 7]
  # Compacted (the default): the 5 scored slots first, in row order, then unscored
  # slots up to the smallest width of score_widths(L) >= 5: L = 8 -> (2, 4, 8) -> 8;
  # L = 16 -> (4, 8, 16) -> 8, half the row.
  c = make_batch([ex], LayoutConfig("prefix_shared", (8,), 1))
  assert c["logit_pos"].tolist() == [[2, 3, 4, 2, 6, 0, 0, 0]]
  assert c["targets"].tolist() == [[7, 8, 3, 9, 3, 0, 0, 0]]
  assert c["seq_ids"].tolist() == [[0, 0, 0, 1, 1, -1, -1, -1]]
  c = make_batch([ex], LayoutConfig("prefix_shared", (16,), 1))
  assert c["tokens"].shape == (1, 16)
  assert c["logit_pos"].tolist() == [[2, 3, 4, 2, 6, 0, 0, 0]]
  assert c["targets"].tolist() == [[7, 8, 3, 9, 3, 0, 0, 0]]
  assert c["seq_ids"].tolist() == [[0, 0, 0, 1, 1, -1, -1, -1]]


# ----------------------------------------------------------------------------- equivalence


def _np_attention_model(params, tokens, positions, segment_ids, branch_ids):
  """One attention layer over token + position embeddings, contract mask (NumPy, f64)."""
  emb, pos_emb, wq, wk, wv = params
  x = emb[tokens] + pos_emb[positions]  # [B, T, D]
  q, k, v = x @ wq, x @ wk, x @ wv
  t = tokens.shape[1]
  idx = np.arange(t)
  mask = ((idx[None, :] <= idx[:, None])[None]
          & (segment_ids[:, :, None] == segment_ids[:, None, :])
          & (segment_ids[:, None, :] != 0)
          & ((branch_ids[:, None, :] == 0)
             | (branch_ids[:, None, :] == branch_ids[:, :, None])))
  att = np.einsum("bid,bjd->bij", q, k) / np.sqrt(q.shape[-1])
  att = np.where(mask, att, -1e30)
  att = np.exp(att - att.max(-1, keepdims=True)) * mask
  att = att / np.maximum(att.sum(-1, keepdims=True), 1e-30)
  return x + att @ v


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _alone_reference(run, seqs, num_seqs):
  """Sums/counts from running each sequence alone: right-padded rows, plain causal.

  `run(tokens, positions) -> logp [B, T, V]` (no segment or branch ids).
  """
  width = max(p.size + c.size for p, c in seqs.values())
  order = sorted(seqs)
  tokens = np.zeros((len(order), width), np.int32)
  for row, s in enumerate(order):
    full = np.concatenate(seqs[s])
    tokens[row, :full.size] = full
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
  logp = run(tokens, positions)
  sums = np.zeros(num_seqs)
  counts = np.zeros(num_seqs, np.int64)
  for row, s in enumerate(order):
    p, c = seqs[s]
    for j in range(p.size, p.size + c.size):
      sums[s] += logp[row, j - 1, tokens[row, j]]
    counts[s] = c.size
  return sums, counts


def _np_sequence_logps(hidden, unembed, batch, num_seqs):
  h = np.take_along_axis(hidden, batch["logit_pos"][..., None], axis=1)
  logp = np.take_along_axis(_log_softmax(h @ unembed), batch["targets"][..., None], -1)[..., 0]
  sums = np.zeros(num_seqs)
  counts = np.zeros(num_seqs, np.int64)
  scored = batch["seq_ids"] >= 0
  np.add.at(sums, batch["seq_ids"][scored], logp[scored])
  np.add.at(counts, batch["seq_ids"][scored], 1)
  return sums, counts


@pytest.mark.parametrize("kind", ["pair", "sft", "unpaired", "ranked"])
def test_layouts_match_sequences_run_alone_numpy_model(kind):
  rng = np.random.default_rng(7)
  d = 16
  params = (rng.normal(size=(VOCAB, d)), rng.normal(size=(64, d)),
            rng.normal(size=(d, d)), rng.normal(size=(d, d)), rng.normal(size=(d, d)))
  unembed = rng.normal(size=(d, VOCAB))
  examples = _examples(kind, rng, 3)

  def run(tokens, positions):
    ones = np.ones_like(tokens)
    return _log_softmax(
        _np_attention_model(params, tokens, positions, ones, 0 * ones) @ unembed)

  both = {**LAYOUTS, **{k + "_slots": v for k, v in SLOT_LAYOUTS.items()}}
  for name, cfg in both.items():
    batch = make_batch(examples, cfg)
    num_seqs = batch["seq_last"].shape[0]
    ref_sums, ref_counts = _alone_reference(
        run, _expected_sequences(examples, cfg.examples_per_batch), num_seqs)
    hidden = _np_attention_model(params, batch["tokens"], batch["positions"],
                                 batch["segment_ids"], batch["branch_ids"])
    sums, counts = _np_sequence_logps(hidden, unembed, batch, num_seqs)
    np.testing.assert_array_equal(counts, ref_counts, err_msg=name)
    # float64 throughout: only summation order differs.
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-9, atol=1e-9, err_msg=name)


def test_layouts_match_real_transformer():
  from jaxalign.models import transformer
  from jaxalign.ops.logprobs import sequence_logps

  # A large init scale so that attending to the wrong tokens moves the log-probs
  # far more than the tolerance (checked by the control at the end).
  cfg = transformer.TransformerConfig.tiny(vocab_size=VOCAB, d_model=32, n_layers=1,
                                           n_heads=2, n_kv_heads=1, mlp_dim=64,
                                           init_std=0.3)
  graphdef, params = transformer.init(cfg, jax.random.key(0))
  rng = np.random.default_rng(3)
  examples = _pairs(rng, 4, prompt=(3, 12), comp=(2, 9))

  @jax.jit
  def logp_alone(params, tokens, positions):
    hidden, unembed = transformer.forward(graphdef, params, tokens, positions)
    return jax.nn.log_softmax(jnp.einsum("btd,dv->btv", hidden, unembed), axis=-1)

  def run(tokens, positions):
    return np.asarray(logp_alone(params, tokens, positions))

  @jax.jit
  def layout_logps_jit(params, batch):
    hidden, unembed = transformer.forward(
        graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"],
        batch["branch_ids"])
    return sequence_logps(hidden, unembed, batch, 8, chunk_size=16)

  def layout_logps(batch, num_seqs):
    assert num_seqs == 8
    keys = ("tokens", "positions", "segment_ids", "branch_ids", "logit_pos", "targets",
            "seq_ids")
    return layout_logps_jit(params, {k: batch[k] for k in keys})

  ref_sums, ref_counts = _alone_reference(run, _expected_sequences(examples, 4), 8)
  layouts = {
      "padded": LayoutConfig("padded", (16, 32), 4),
      "packed": LayoutConfig("packed", (32, 64), 4, rows_per_batch=3),
      "prefix": LayoutConfig("prefix_shared", (32, 64), 4),
      "prefix_packed": LayoutConfig("prefix_shared", (64, 128), 4, rows_per_batch=2),
  }
  # The reference path: padded with slot-per-position score arrays (the head on every
  # slot); every layout is checked compacted (the default) and not.
  layouts = {"padded_slots": dataclasses.replace(layouts["padded"], compact_scores=False),
             **layouts,
             **{k + "_slots": dataclasses.replace(v, compact_scores=False)
                for k, v in layouts.items() if k != "padded"}}
  results = {}
  for name, lcfg in layouts.items():
    batch = make_batch(examples, lcfg)
    sums, counts = layout_logps({k: jnp.asarray(v) for k, v in batch.items()}, 8)
    results[name] = np.asarray(sums)
    np.testing.assert_array_equal(np.asarray(counts), ref_counts, err_msg=name)
    # f32 model: stated tolerance atol/rtol 1e-5.
    np.testing.assert_allclose(np.asarray(sums), ref_sums, rtol=1e-5, atol=1e-5, err_msg=name)
  for name in layouts:
    np.testing.assert_allclose(results[name], results["padded_slots"], rtol=1e-5,
                               atol=1e-5, err_msg=name)
  # The compacted layouts do cut the head's slots.
  assert make_batch(examples, layouts["prefix"])["seq_ids"].shape[1] < 64

  # Control: without branch ids the rejected branch sees the chosen one, so the
  # comparison above is sensitive to the attention rule.
  batch = make_batch(examples, layouts["prefix"])
  batch["branch_ids"] = np.zeros_like(batch["branch_ids"])
  sums, _ = layout_logps({k: jnp.asarray(v) for k, v in batch.items()}, 8)
  assert np.max(np.abs(np.asarray(sums)[1::2] - ref_sums[1::2])) > 1e-2


# ----------------------------------------------------------------------------- efficiency


def _hh_like_pairs(rng, n):
  # HH-like: long shared prompts, shorter completions.
  return _pairs(rng, n, prompt=(150, 400), comp=(20, 120))


def test_prefix_shared_uses_fewer_tokens_per_pair_than_padded():
  rng = np.random.default_rng(11)
  examples = _hh_like_pairs(rng, 64)
  buckets = (128, 256, 512, 1024)
  padded = batching.epoch_stats(examples, LayoutConfig("padded", buckets, 8))
  prefix = batching.epoch_stats(examples, LayoutConfig("prefix_shared", buckets, 8))
  assert padded["examples"] == prefix["examples"] == 64
  # Real tokens: the prompt once instead of twice, so strictly fewer per pair;
  # an exact count from the fixture is the oracle.
  prompt_total = sum(e.prompt.size for e in examples)
  assert padded["real_tokens"] - prefix["real_tokens"] == prompt_total
  assert prefix["tokens_per_example"] < padded["tokens_per_example"]


def test_packed_wastes_fewer_pad_tokens_than_padded():
  rng = np.random.default_rng(12)
  examples = _pairs(rng, 64, prompt=(5, 120), comp=(5, 120))
  buckets = (64, 128, 256, 512)
  padded = batching.epoch_stats(examples, LayoutConfig("padded", buckets, 8))
  packed = batching.epoch_stats(examples, LayoutConfig("packed", buckets, 8,
                                                       rows_per_batch=6))
  assert padded["real_tokens"] == packed["real_tokens"]  # same data, same tokens
  assert packed["pad_tokens"] < padded["pad_tokens"]
  assert packed["pad_fraction"] < padded["pad_fraction"]


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("cfg", [
    LayoutConfig("padded", (32, 64, 128), 4),
    LayoutConfig("packed", (32, 64, 128), 4, rows_per_batch=3),
    LayoutConfig("prefix_shared", (32, 64, 128), 4),
    LayoutConfig("prefix_shared", (64, 128, 256), 4, rows_per_batch=2),
], ids=["padded", "packed", "prefix", "prefix_packed"])
def test_distinct_shapes_bounded_and_no_example_lost(cfg):
  rng = np.random.default_rng(5)
  examples = _pairs(rng, 300, prompt=(1, 60), comp=(1, 30))
  shapes = set()
  seen = collections.Counter()
  traces = []

  @jax.jit
  def consume(batch):
    traces.append(1)  # runs once per trace, i.e. per compiled shape
    return sum(jnp.sum(v) for v in batch.values())

  for batch in iter_batches(examples, cfg):
    shapes.add(batching.batch_shape(batch))
    consume(batch)
    for s in range(0, batch["seq_last"].shape[0], 2):  # chosen sequences
      rows, cols = np.nonzero(batch["seq_ids"] == s)
      if rows.size:
        seen[batch["targets"][rows, cols].tobytes()] += 1
  # Row lengths: one per bucket at most; compact score arrays add at most
  # len(score_widths) widths per row length (issue 22).
  assert 1 <= len({dict(s)["tokens"] for s in shapes}) <= len(cfg.buckets)
  assert len(shapes) <= sum(len(batching.score_widths(b)) for b in cfg.buckets)
  assert len(traces) == len(shapes)
  # Every example's chosen completion comes out exactly once (carry, no drops).
  assert seen == collections.Counter(e.chosen.tobytes() for e in examples)


def test_iter_batches_carries_what_does_not_fit():
  rng = np.random.default_rng(6)
  # Each pair is ~2x50 tokens; 2 rows of 64 hold at most one pair per batch.
  examples = _pairs(rng, 5, prompt=(40, 45), comp=(5, 10))
  cfg = LayoutConfig("packed", (32, 64), 4, rows_per_batch=2)
  with pytest.raises(ValueError, match="rows_per_batch=2"):
    make_batch(examples[:4], cfg)
  batches = list(iter_batches(examples, cfg))
  assert [int(b["example_valid"].sum()) for b in batches] == [1] * 5


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_problem():
  ex = PairExample(np.arange(4, 40), np.array([5, 6]), np.array([7]))
  with pytest.raises(ValueError, match=r"example 3: .*38 tokens.*largest bucket 32"):
    make_batch([ex], LayoutConfig("padded", (16, 32), 2), example_ids=[3])
  with pytest.raises(ValueError, match="one example kind"):
    make_batch([ex, SFTExample(np.array([2]), np.array([5]))],
               LayoutConfig("padded", (64,), 2))
  with pytest.raises(ValueError, match=r"example 0: field 'rejected' is empty"):
    make_batch([PairExample(np.array([2]), np.array([5]), np.array([], np.int32))],
               LayoutConfig("padded", (64,), 2))
  with pytest.raises(ValueError, match=r"example 0: field 'prompt' holds a negative"):
    make_batch([SFTExample(np.array([2, -1]), np.array([5]))],
               LayoutConfig("padded", (64,), 2))
  with pytest.raises(ValueError, match="examples_per_batch=1"):
    make_batch([ex, ex], LayoutConfig("padded", (64,), 1))
  with pytest.raises(ValueError, match="rows_per_batch is required"):
    LayoutConfig("packed", (64,), 2)
  with pytest.raises(ValueError, match="strictly increasing"):
    LayoutConfig("padded", (64, 32), 2)
  with pytest.raises(ValueError, match="kind="):
    LayoutConfig("ragged", (64,), 2)
  ranked = [RankedExample(np.array([2]), (np.array([5]),) * k, np.zeros(k, np.float32))
            for k in (2, 3)]
  with pytest.raises(ValueError, match="example 1: RankedExample has 3 responses"):
    make_batch(ranked, LayoutConfig("padded", (64,), 2))


# ----------------------------------------------------------------------------- loss mask


def _masked_sft(rng, n):
  """SFT examples with random loss masks (>= 1 True); example 1 has none (all scored)."""
  out = []
  for i in range(n):
    prompt, comp = _toks(rng, rng.integers(1, 8)), _toks(rng, rng.integers(2, 8))
    mask = rng.random(comp.size) < 0.5
    mask[rng.integers(comp.size)] = True
    out.append(SFTExample(prompt, comp, None if i == 1 else mask))
  return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_loss_mask_scores_exactly_the_masked_tokens(layout):
  cfg = SLOT_LAYOUTS[layout]
  rng = np.random.default_rng(zlib.crc32(f"mask-{layout}".encode()))
  examples = _masked_sft(rng, 3)
  batch = make_batch(examples, cfg)
  l = batch["tokens"].shape[1]
  total = 0
  for i, e in enumerate(examples):
    # Oracle: a plain loop over the example. Completion token j is scored iff its mask
    # is True (or there is no mask); it sits at position p + j and is predicted by the
    # token before it in prompt + completion.
    full = np.concatenate([e.prompt, e.completion])
    p = e.prompt.size
    want = [(int(full[p + j]), int(full[p + j - 1]), p + j)
            for j in range(e.completion.size) if e.loss_mask is None or e.loss_mask[j]]
    rows, cols = np.nonzero(batch["seq_ids"] == i)  # row-major = slot order
    got = [(int(batch["targets"][r, c]), int(batch["tokens"][r, batch["logit_pos"][r, c]]),
            int(batch["positions"][r, c])) for r, c in zip(rows, cols)]
    assert got == want, i
    total += len(want)
    # Unscored completion tokens stay in the row (later turns attend to them), and
    # seq_last still points at the completion's last token.
    row = rows[0]
    seg = batch["segment_ids"][row, cols[0]]
    in_seq = np.nonzero((batch["segment_ids"][row] == seg)
                        & (batch["positions"][row] >= p)
                        & (batch["branch_ids"][row] == batch["branch_ids"][row, cols[0]]))[0]
    np.testing.assert_array_equal(batch["tokens"][row, in_seq], e.completion)
    assert batch["seq_last"][i] == row * l + in_seq[-1]
  assert np.count_nonzero(batch["seq_ids"] >= 0) == total
  assert np.all(batch["targets"][batch["seq_ids"] < 0] == 0)
  assert np.all(batch["logit_pos"][batch["seq_ids"] < 0] == 0)


def test_loss_mask_sums_match_sequences_run_alone_numpy_model():
  rng = np.random.default_rng(17)
  d = 16
  params = (rng.normal(size=(VOCAB, d)), rng.normal(size=(64, d)),
            rng.normal(size=(d, d)), rng.normal(size=(d, d)), rng.normal(size=(d, d)))
  unembed = rng.normal(size=(d, VOCAB))
  examples = _masked_sft(rng, 3)
  # Oracle: each sequence run alone (plain causal), log-probs summed over masked tokens.
  ref_sums, ref_counts = np.zeros(4), np.zeros(4, np.int64)
  for i, e in enumerate(examples):
    full = np.concatenate([e.prompt, e.completion])[None]
    pos = np.arange(full.shape[1])[None]
    ones = np.ones_like(full)
    logp = _log_softmax(_np_attention_model(params, full, pos, ones, 0 * ones) @ unembed)
    for j in range(e.completion.size):
      if e.loss_mask is None or e.loss_mask[j]:
        t = e.prompt.size + j
        ref_sums[i] += logp[0, t - 1, full[0, t]]
        ref_counts[i] += 1
  both = {**LAYOUTS, **{k + "_slots": v for k, v in SLOT_LAYOUTS.items()}}
  for name, cfg in both.items():
    batch = make_batch(examples, cfg)
    hidden = _np_attention_model(params, batch["tokens"], batch["positions"],
                                 batch["segment_ids"], batch["branch_ids"])
    sums, counts = _np_sequence_logps(hidden, unembed, batch, 4)
    np.testing.assert_array_equal(counts, ref_counts, err_msg=name)
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-9, atol=1e-9, err_msg=name)


def test_loss_mask_errors_name_the_example():
  cfg = LayoutConfig("padded", (16,), 2)
  with pytest.raises(ValueError, match=r"example 0: field 'loss_mask' .* one entry per "
                                       r"completion token \(2\), got shape \(3,\)"):
    make_batch([SFTExample(np.array([2]), np.array([5, 6]),
                           np.array([True, False, True]))], cfg)
  with pytest.raises(ValueError, match=r"example 0: field 'loss_mask' .* dtype int64"):
    make_batch([SFTExample(np.array([2]), np.array([5, 6]), np.array([1, 0]))], cfg)
  with pytest.raises(ValueError, match="example 0: field 'loss_mask' marks no completion"):
    make_batch([SFTExample(np.array([2]), np.array([5, 6]), np.array([False, False]))], cfg)


def test_compacted_micro_batches_stack_at_one_width_with_the_same_sums():
  # Two batches whose compacted score arrays differ in width stack (padded with
  # unscored slots) and keep their per-sequence sums (NumPy f64 oracle: the same
  # batches at full width, slot per position).
  from jaxalign.train import steps
  rng = np.random.default_rng(11)
  d = 16
  params = (rng.normal(size=(VOCAB, d)), rng.normal(size=(64, d)),
            rng.normal(size=(d, d)), rng.normal(size=(d, d)), rng.normal(size=(d, d)))
  unembed = rng.normal(size=(d, VOCAB))
  cfg = LayoutConfig("prefix_shared", (64,), 2)
  groups = [_pairs(rng, 2, prompt=(30, 31), comp=(2, 3)),
            _pairs(rng, 2, prompt=(2, 3), comp=(20, 24))]
  compact = [make_batch(g, cfg) for g in groups]
  widths = [b["seq_ids"].shape[1] for b in compact]
  assert widths[0] < widths[1] <= 64
  stacked = steps.stack_microbatches(compact)
  assert stacked["seq_ids"].shape == (2, 2, widths[1])
  for i, g in enumerate(groups):
    full = make_batch(g, dataclasses.replace(cfg, compact_scores=False))
    micro = {k: v[i] for k, v in stacked.items()}
    hidden = _np_attention_model(params, full["tokens"], full["positions"],
                                 full["segment_ids"], full["branch_ids"])
    want = _np_sequence_logps(hidden, unembed, full, 4)
    got = _np_sequence_logps(hidden, unembed, micro, 4)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-12)
