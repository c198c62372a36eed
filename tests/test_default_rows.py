"""The default DPO-family layout packs two prefix-shared units per row (issue 22).

Oracles: the resolved config against the rule written out by hand (half a
micro-batch's examples when that divides over the data-parallel devices, buckets up
to two units); exactness: every batch of worst-case-length pairs takes all its
examples (nothing carried), and its per-sequence log-prob sums equal those of the
padded layout with full-width score arrays (the reference path) under a NumPy f64
attention model (test_batching's, tolerance 1e-9: only summation order differs).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from experiments import _common
from jaxalign import config as config_lib
from jaxalign.data import batching
from jaxalign.data.examples import PairExample
from tests import test_batching as tb


def _hh(**data):
  c = _common.apply_variant(config_lib.base_config(),
                            _common.experiment_arg("hh,path=/x.jsonl"), num_steps=20)
  c.loss = "dpo"
  c.reference.kind = "initial"
  for k, v in data.items():
    c.data[k] = v
  return c


@pytest.mark.parametrize("devices,batch,micro,rows", [
    (1, 8, 1, 4), (2, 8, 1, 4), (4, 8, 1, 4), (8, 8, 1, 0), (8, 16, 1, 8),
    (1, 8, 2, 2), (1, 6, 2, 0),
])
def test_auto_rows_half_a_micro_batch_when_it_splits(devices, batch, micro, rows):
  c = _hh(batch_size=batch, micro_batches=micro, max_length=64, max_prompt_length=32)
  c.eval.batch_size = 8 if batch % 8 == 0 else batch
  cfg = config_lib.validate(c, devices)
  assert cfg.data.layout == "prefix_shared"
  assert cfg.data.rows_per_batch == rows
  need = 1 + 2 * (64 - 1)  # a unit: 1-token prompt + two 63-token completions
  assert cfg.data.buckets[-1] >= (2 * need if rows else need)


def test_explicit_layout_or_rows_or_buckets_are_kept():
  for data in (dict(layout="prefix_shared"), dict(rows_per_batch=2),
               dict(buckets=(128, 256, 512))):
    cfg = config_lib.validate(_hh(max_length=256, **data), 1)
    assert cfg.data.rows_per_batch == data.get("rows_per_batch", 0), data
  sft = _hh(max_length=256)
  sft.loss, sft.reference.kind = "sft", "none"
  assert config_lib.validate(sft, 1).data.rows_per_batch == 0


def test_auto_rows_never_carry_and_keep_the_sums():
  cfg = config_lib.validate(_hh(max_length=24, max_prompt_length=12), 1)
  d = cfg.data
  layout = batching.LayoutConfig("prefix_shared", d.buckets, d.batch_size,
                                 rows_per_batch=d.rows_per_batch)
  assert layout.rows_per_batch == d.batch_size // 2
  rng = np.random.default_rng(22)
  params = (rng.normal(size=(tb.VOCAB, 16)), rng.normal(size=(64, 16)),
            rng.normal(size=(16, 16)), rng.normal(size=(16, 16)),
            rng.normal(size=(16, 16)))
  unembed = rng.normal(size=(16, tb.VOCAB))
  reference = dataclasses.replace(
      batching.LayoutConfig("padded", (24,), d.batch_size), compact_scores=False)
  for trial in range(6):
    # Worst cases first (1-token prompts, completions filling max_length), then mixed.
    worst = trial < 2
    pairs = [PairExample(tb._toks(rng, 1 if worst else rng.integers(1, 13)),
                         tb._toks(rng, 23 if worst else rng.integers(1, 12)),
                         tb._toks(rng, 23 if worst else rng.integers(1, 12)))
             for _ in range(d.batch_size)]
    batch, taken = batching.fill_batch(pairs, layout)
    assert taken == d.batch_size  # nothing carried to the next step
    want = _sums(params, unembed, batching.make_batch(pairs, reference))
    got = _sums(params, unembed, batch)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-9)


def _sums(params, unembed, batch):
  hidden = tb._np_attention_model(params, batch["tokens"], batch["positions"],
                                  batch["segment_ids"], batch["branch_ids"])
  return tb._np_sequence_logps(hidden, unembed, batch, batch["seq_last"].shape[0])
