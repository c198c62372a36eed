"""The grain pipeline: records -> shuffled, sharded, repeated, tokenized examples.

``make_example_iterator`` is the seam between data I/O and batch layout: it yields
typed examples (``jaxalign.data.examples``) one at a time; the batching module groups
them into layouts. The iterator's ``get_state()`` is a small JSON-serialisable dict
and ``set_state()`` resumes exactly where it was, so the state goes into checkpoints.

Order of operations (each process runs the same code with its own ``process_index``):

1. ``shuffle`` (seeded; the same permutation on every process, a new one each epoch),
2. with ``drop_remainder`` the permutation is cut to a multiple of ``process_count``
   so every process gets the same number of examples per epoch (multi-host steps
   stay in lockstep; the cut items differ from epoch to epoch),
3. this process's shard: positions ``process_index::process_count`` of the epoch,
   so the shards of one epoch are disjoint and together cover it,
4. ``repeat`` for ``num_epochs`` (None = forever),
5. ``tokenize_fn`` (a record -> example or None; None, e.g. dropped by truncation, is
   filtered out, so counts are per record, not per yielded example).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import grain

from jaxalign.data import formats
from jaxalign.data.examples import Example
from jaxalign.data.tfds_builder import record_from_features
from jaxalign.data.tokenizer import ChatTemplate, Tokenizer


def _validate(name: str, value: Any, *, minimum: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def make_example_iterator(source: Sequence[Any], tokenize_fn: Callable[[Any], Example | None],
                          *, seed: int, shuffle: bool = True, num_epochs: int | None = 1,
                          process_index: int = 0, process_count: int = 1,
                          drop_remainder: bool = True,
                          read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator of typed examples for one process.

  Args:
    source: random-access records (``len`` and ``__getitem__``): a TFDS data source from
      ``tfds_builder``, a list of ``formats.TextRecord``, or anything ``tokenize_fn`` eats.
    tokenize_fn: record -> example, or None to drop it (see ``make_tokenize_fn``).
    seed: shuffle seed; must be the same on every process.
    shuffle: shuffle within each epoch.
    num_epochs: passes over the data; None repeats forever.
    process_index, process_count: this process's shard (pass ``jax.process_index()``
      and ``jax.process_count()``; nothing global is read here).
    drop_remainder: equal shard sizes per epoch (see the module docstring).
    read_options: grain prefetch threads / buffer.

  Returns:
    A ``grain.DatasetIterator`` with ``get_state()`` / ``set_state()``.
  """
  _validate("process_count", process_count, minimum=1)
  _validate("process_index", process_index, minimum=0)
  _validate("seed", seed, minimum=0)
  if process_index >= process_count:
    raise ValueError(f"process_index={process_index} must be < process_count={process_count}")
  if num_epochs is not None:
    _validate("num_epochs", num_epochs, minimum=1)
  n = len(source)
  if n == 0:
    raise ValueError("the record source is empty; check the files and the DataReport "
                     "(were all records skipped as errors?)")
  ds = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  usable = (n // process_count) * process_count if drop_remainder else n
  if usable == 0:
    raise ValueError(f"{n} record(s) cannot give each of process_count={process_count} "
                     "processes one; use more data or drop_remainder=False")
  ds = ds.slice(slice(process_index, usable, process_count))
  ds = ds.repeat(num_epochs)
  ds = ds.map(tokenize_fn).filter(lambda ex: ex is not None)
  return iter(ds.to_iter_dataset(read_options))


def make_tokenize_fn(tokenizer: Tokenizer, *,
                     truncation: formats.Truncation = formats.Truncation(),
                     template: ChatTemplate | None = None,
                     report: formats.DataReport | None = None) -> Callable[[Any], Example | None]:
  """record (TextRecord or TFDS feature dict) -> typed example, or None if dropped.

  Truncation outcomes are counted in ``report``. The report is not part of the
  iterator state (after a restore it counts only what this run has seen), and grain
  prefetches, so it may count records read ahead of the last one consumed.
  """
  template = template or ChatTemplate()
  bos_id = getattr(tokenizer, "bos_id", None)  # Kept in front of a truncated prompt.
  # grain maps on a thread pool; the report's counters are updated under a lock.
  lock = threading.Lock()

  def tokenize(record: Any) -> Example | None:
    if not isinstance(record, formats.TextRecord):
      record = record_from_features(record)
    enc = formats.encode_record(record, tokenizer, template)
    with lock:
      return formats.truncate_encoded(record, enc.prompt, enc.completions, truncation,
                                      bos_id=bos_id, report=report,
                                      loss_masks=enc.loss_masks)

  return tokenize
