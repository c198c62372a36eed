"""The training data stream: examples from the config's source, adapted to the loss's
input kind, laid out into batches (`jaxalign.data.batching`), checkpointable.

`build_data(cfg, kind)` -> `Data`: the train iterator (`ExampleBatches`, with
``get_state`` / ``set_state``), the held-out eval set, the vocabulary size, the
file's data report, and the resolved `batching.LayoutConfig` (``data.buckets = ()``
derived from the loaded examples when the config could not bound them).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxalign import config as config_lib
from jaxalign import eval as eval_lib
from jaxalign import generate as generate_lib
from jaxalign.config import Config
from jaxalign.data import batching
from jaxalign.data import examples as ex_lib
from jaxalign.data import synthetic
from jaxalign.train import build
from jaxalign.train import steps as steps_lib


_KIND_EXAMPLE = {"sft": ex_lib.SFTExample, "pairwise": ex_lib.PairExample,
                 "reward": ex_lib.PairExample, "unpaired": ex_lib.UnpairedExample,
                 "ranked": ex_lib.RankedExample}


def convert_examples(examples: Sequence[Any], kind: str) -> list[Any]:
  """Adapts pairs to the loss's input kind (e.g. HH pairs for SFT, KTO or RRHF).

  pairs -> sft: the chosen response; -> unpaired: chosen desirable, rejected not;
  -> ranked: (chosen, rejected) with scores (1, 0). Other kinds pass through.
  """
  want = _KIND_EXAMPLE[kind]
  out = []
  for e in examples:
    if isinstance(e, want):
      out.append(e)
    elif isinstance(e, ex_lib.PairExample) and want is ex_lib.SFTExample:
      out.append(ex_lib.SFTExample(prompt=e.prompt, completion=e.chosen))
    elif isinstance(e, ex_lib.PairExample) and want is ex_lib.UnpairedExample:
      out.append(ex_lib.UnpairedExample(prompt=e.prompt, completion=e.chosen, label=True))
      out.append(ex_lib.UnpairedExample(prompt=e.prompt, completion=e.rejected,
                                        label=False))
    elif isinstance(e, ex_lib.PairExample) and want is ex_lib.RankedExample:
      out.append(ex_lib.RankedExample(prompt=e.prompt, responses=(e.chosen, e.rejected),
                                      scores=np.asarray([1.0, 0.0], np.float32)))
    else:
      raise ValueError(f"cannot use {type(e).__name__} data for a {kind!r} loss; "
                       "change config.data.format or config.loss.")
  return out


class ExampleBatches:
  """Batches from the checkpointable grain example iterator (`jaxalign.data.pipeline`).

  Examples come shuffled (a new permutation each epoch, repeated forever); each batch
  lays out the next ``examples_per_batch`` of them, or, with a packed layout, the
  longest run of them that fits its rows: the rest are carried, in stream order, to
  the front of the next batch (`batching.fill_batch`), so every example of the stream
  is laid out exactly once and a packed batch may hold fewer valid examples
  (``example_valid``). With ``micro_batches > 1`` a batch is that many micro-batches,
  each filled that way from the stream in turn and stacked ``[M, ...]``
  (`steps.stack_microbatches`), all laid out at the longest one's bucket.

  ``get_state`` / ``set_state`` are a grain iterator state (a JSON-able dict), taken
  between batches: the state from before the first carried example, so a restored
  iterator draws the carried examples again and yields exactly the batches that
  followed.

  The constructor checks every example against the layout before anything compiles
  (`check_examples_fit`): one that no batch could hold is an error naming it and the
  bucket it needs, not a crash at the step that first draws it.

  Every process iterates the same global stream (the per-sequence arrays of a batch
  carry global indices, so every process needs them whole); each then feeds only its
  own rows to the devices (`jaxalign.parallel.mesh.local_row_slice`).
  """

  def __init__(self, examples: Sequence[Any], layout: batching.LayoutConfig,
               seed: int, micro_batches: int = 1, *, check: bool = True):
    from jaxalign.data import pipeline  # pylint: disable=g-import-not-at-top
    n = layout.examples_per_batch * micro_batches
    if len(examples) < n:
      raise ValueError(f"{len(examples)} training examples cannot fill one batch of "
                       f"{n}; lower config.data.batch_size or add data.")
    self._examples = list(examples)
    self._layout = layout
    self._seed = seed
    self.micro_batches = micro_batches
    if check:
      check_examples_fit(self._examples, layout)
    self._it = pipeline.make_example_iterator(
        self._examples, lambda e: e, seed=seed, num_epochs=None,
        process_index=0, process_count=1)
    # Drawn from the iterator but not yet laid out, oldest first, each with the
    # iterator state from just before it was drawn.
    self._pending: list[tuple[dict, Any]] = []

  def fresh(self) -> "ExampleBatches":
    """A new iterator over the same stream, from its start."""
    return ExampleBatches(self._examples, self._layout, self._seed, self.micro_batches,
                          check=False)

  def get_state(self) -> dict:
    return self._pending[0][0] if self._pending else self._it.get_state()

  def set_state(self, state: dict) -> None:
    self._it.set_state(state)
    self._pending = []

  def __iter__(self) -> "ExampleBatches":
    return self

  def peek(self) -> dict:
    """The next batch, without consuming it (the state is restored afterwards)."""
    saved = self.get_state()
    first = next(self)
    self.set_state(saved)
    return first

  def _fill(self, start: int) -> tuple[dict, int]:
    """Lays out pending examples from ``start`` on; returns (batch, examples taken)."""
    n = self._layout.examples_per_batch
    while len(self._pending) < start + n:
      state = copy.deepcopy(self._it.get_state())
      self._pending.append((state, next(self._it)))
    return batching.fill_batch([e for _, e in self._pending[start:start + n]],
                               self._layout)

  def __next__(self) -> dict:
    micro, chunks, pos = [], [], 0
    for _ in range(self.micro_batches):
      batch, taken = self._fill(pos)
      micro.append(batch)
      chunks.append([e for _, e in self._pending[pos:pos + taken]])
      pos += taken
    if self.micro_batches > 1:
      micro = self._one_length(micro, chunks)
    del self._pending[:pos]
    return micro[0] if self.micro_batches == 1 else steps_lib.stack_microbatches(micro)

  def _one_length(self, micro: list[dict], chunks: list[list[Any]]) -> list[dict]:
    """The micro-batches laid out again at one row length (the longest one's)."""
    longest = max(np.shape(b["tokens"])[-1] for b in micro)
    if all(np.shape(b["tokens"])[-1] == longest for b in micro):
      return micro
    # First-fit-decreasing into longer rows practically always fits what fitted the
    # shorter ones, but it is not guaranteed to: then try the next bucket up.
    for length in (b for b in self._layout.buckets if b >= longest):
      same = dataclasses.replace(self._layout, buckets=(length,))
      out = [batching.fill_batch(c, same) for c in chunks]
      if all(taken == len(c) for (_, taken), c in zip(out, chunks)):
        return [b for b, _ in out]
    raise ValueError(
        f"the {len(chunks)} micro-batches of a step fit their rows at their own row "
        f"lengths but not all at one of {self._layout.buckets}; raise "
        "config.data.rows_per_batch or use one bucket.")


def _kto_top(examples: Sequence[Any]) -> list[int]:
  """The two longest KTO completions: an example's KL sequence pairs its prompt with
  another example's completion, any of them over the epochs, so the longest other
  completion is assumed."""
  return sorted((len(e.completion) for e in examples
                 if isinstance(e, ex_lib.UnpairedExample)), reverse=True)[:2]


def _completions(e: Any, kto_top: list[int]) -> list[int] | None:
  if isinstance(e, ex_lib.SFTExample):
    return [len(e.completion)]
  if isinstance(e, ex_lib.PairExample):
    return [len(e.chosen), len(e.rejected)]
  if isinstance(e, ex_lib.UnpairedExample):
    c = len(e.completion)
    top = kto_top
    return [c, c if len(top) == 1 else top[1] if top[0] == c else top[0]]
  if isinstance(e, ex_lib.RankedExample):
    return [len(r) for r in e.responses]
  return None  # make_batch names unsupported kinds


def row_need(e: Any, layout_kind: str, kto_top: list[int]) -> int:
  """The row length one example needs: padded and packed, its longest prompt +
  completion; prefix_shared, its prompt and all its completions."""
  comps = _completions(e, kto_top)
  if comps is None:
    return 0
  p = len(e.prompt)
  return p + sum(comps) if layout_kind == "prefix_shared" else p + max(comps)


def longest_need(examples: Sequence[Any], layout_kind: str) -> int:
  top = _kto_top(examples)
  return max((row_need(e, layout_kind, top) for e in examples), default=1)


def check_examples_fit(examples: Sequence[Any], layout: batching.LayoutConfig) -> None:
  """Raises a ValueError naming the first example no batch of ``layout`` can hold.

  What one row must hold: see `row_need` (KTO's KL sequence assumes the longest
  other completion). Packed: an example's sequences must also fit
  ``rows_per_batch`` rows together (the rest of a batch is carried). This is the
  load-time check for what the config cannot bound (`jaxalign.config.layout_need`:
  ``data.max_length = 0``, synthetic data, ranked files).
  """
  largest, kind = layout.buckets[-1], layout.kind
  top = _kto_top(examples)
  too_long, worst, first_long, first_rows, n_rows = 0, 0, None, None, 0
  for i, e in enumerate(examples):
    comps = _completions(e, top)
    if comps is None:
      continue
    p = len(e.prompt)
    seqs = [p + c for c in comps]
    need = row_need(e, kind, top)
    if need > largest:
      too_long += 1
      worst = max(worst, need)
      first_long = first_long or (i, p, comps, need)
    elif kind == "packed" and batching.first_fit_decreasing(
        seqs, layout.rows_per_batch, largest) is None:
      n_rows += 1
      first_rows = first_rows or (i, p, comps, seqs)
  if first_long is not None:
    raise _too_long_error(examples, layout, first_long, too_long, worst)
  if first_rows is not None:
    raise _too_many_rows_error(examples, layout, first_rows, n_rows)


def _kl_note(e: Any) -> str:
  return (" (the second: KTO's KL term, the longest other completion)"
          if isinstance(e, ex_lib.UnpairedExample) else "")


def _too_long_error(examples, layout, first_long, too_long, worst) -> ValueError:
  i, p, comps, need = first_long
  kind, largest = layout.kind, layout.buckets[-1]
  what = ("its prompt and all its completions share one row"
          if kind == "prefix_shared" else "each prompt + completion takes a row")
  return ValueError(
      f"config.data.buckets: training example {i} (prompt {p} tokens, completions "
      f"{comps}{_kl_note(examples[i])}) needs a row of {need} tokens with data.layout="
      f"{kind!r} ({what}), more than the largest bucket {largest} of data.buckets="
      f"{layout.buckets}; {too_long} of {len(examples)} training examples do not "
      f"fit, the longest needs {worst}. Add a bucket >= {worst} to data.buckets, set "
      "data.buckets=() to derive them from the data, or truncate the data "
      "(data.max_length / data.max_prompt_length; with data.max_length set, the "
      "config check bounds the buckets before loading).")


def _too_many_rows_error(examples, layout, first_rows, n_rows) -> ValueError:
  i, p, comps, seqs = first_rows
  return ValueError(
      f"config.data.rows_per_batch: training example {i} (prompt {p} tokens, "
      f"completions {comps}{_kl_note(examples[i])}) has sequences of {seqs} tokens that "
      f"do not fit data.rows_per_batch={layout.rows_per_batch} rows of the largest "
      f"bucket {layout.buckets[-1]} together ({n_rows} of {len(examples)} training "
      "examples do not); raise data.rows_per_batch or add a larger bucket to "
      "data.buckets.")


def layout_config(cfg: Config, examples_per_batch: int, responses: int | None = None,
                  layout: str | None = None, buckets: Sequence[int] | None = None
                  ) -> batching.LayoutConfig:
  """The batch layout of ``config.data`` (``layout`` / ``buckets`` override it)."""
  rows = cfg.data.rows_per_batch or None
  layout = layout or cfg.data.layout
  return batching.LayoutConfig(
      kind=layout, buckets=tuple(cfg.data.buckets if buckets is None else buckets),
      examples_per_batch=examples_per_batch,
      rows_per_batch=None if layout == "padded" else rows,
      responses_per_example=responses)


def make_batches(examples: Sequence[Any], layout: batching.LayoutConfig) -> list[dict]:
  """Lays out a finite example list in order; the last batch is padded (invalid slots)."""
  n = layout.examples_per_batch
  return [batching.make_batch(list(examples[i:i + n]), layout)
          for i in range(0, len(examples), n)]


@dataclasses.dataclass
class Data:
  train: Any  # iterator of batch dicts with get_state() / set_state()
  eval_set: eval_lib.EvalSet
  vocab_size: int
  report: Any = None  # formats.DataReport of file data: skipped / truncated, by reason
  layout: batching.LayoutConfig | None = None  # the train layout, buckets resolved
  # The held-out examples (any kind: their prompts are what `gen_eval` answers).
  eval_examples: list = dataclasses.field(default_factory=list)


def _synthetic(cfg: Config, kind: str):
  """(train examples, eval pairs, eval candidate sets, vocab) of the built-in task."""
  d = cfg.data
  k = d.task.num_candidates
  task = synthetic.SyntheticTaskConfig(vocab_size=d.task.vocab_size,
                                       target_len=d.task.target_len)
  rng = np.random.default_rng([cfg.seed, 1])
  makers = {"sft": synthetic.make_sft, "pairwise": synthetic.make_pairs,
            "reward": synthetic.make_pairs, "unpaired": synthetic.make_unpaired}
  if kind == "ranked":
    train = synthetic.make_ranked(rng, d.task.num_train, k, task)
  else:
    train = makers[kind](rng, d.task.num_train, task)
  eval_rng = np.random.default_rng([cfg.seed, 2])
  eval_pairs = synthetic.make_pairs(eval_rng, cfg.eval.num_examples, task)
  eval_cands = synthetic.make_ranked(eval_rng, cfg.eval.num_examples, k, task)
  return train, eval_pairs, eval_cands, task.vocab_size


def _from_files(cfg: Config, kind: str):
  """(train examples, eval pairs, [], vocab, data report, every held-out example) of
  ``data.path``."""
  from jaxalign.data import formats  # pylint: disable=g-import-not-at-top
  d = cfg.data
  tok = build.build_tokenizer(cfg)
  trunc = formats.Truncation(max_length=d.max_length or None,
                             max_prompt_length=d.max_prompt_length or None)
  report = formats.DataReport()
  load = functools.partial(formats.load_examples, fmt=d.format, tokenizer=tok,
                           on_error=d.on_error, truncation=trunc, report=report,
                           margin_field=d.margin_field)
  examples = load(d.path)
  if d.eval_path:
    held = load(d.eval_path)
  else:
    if len(examples) <= cfg.eval.num_examples:
      raise ValueError(f"config.data.path has {len(examples)} examples, not more than "
                       f"eval.num_examples={cfg.eval.num_examples}; set "
                       "data.eval_path or lower eval.num_examples.")
    examples, held = (examples[:-cfg.eval.num_examples],
                      examples[-cfg.eval.num_examples:])
  eval_pairs = [e for e in held if isinstance(e, ex_lib.PairExample)]
  return convert_examples(examples, kind), eval_pairs, [], tok.vocab_size, report, held


def build_data(cfg: Config, kind: str) -> Data:
  """Train iterator and held-out eval set for the loss's input kind.

  ``data.buckets = ()`` that the config could not bound (no ``data.max_length``,
  synthetic data) are derived here from the longest row the loaded training
  examples need (`jaxalign.config.derive_buckets`).
  """
  d = cfg.data
  k = d.task.num_candidates
  report = None
  if d.source == "arithmetic":
    raise ValueError("config.data.source='arithmetic' is a prompt stream for online RL "
                     "(an 'rl' section; its SFT warm-up is rl.sft_warmup_steps).")
  if d.source == "synthetic":
    train, eval_pairs, eval_cands, vocab = _synthetic(cfg, kind)
    held = eval_pairs
  else:
    train, eval_pairs, eval_cands, vocab, report, held = _from_files(cfg, kind)
  # Eval rows are padded (one per sequence), never longer than a training row of
  # the same data; held-out files may hold longer examples, so they count too.
  buckets = tuple(d.buckets) or config_lib.derive_buckets(max(
      longest_need(train, d.layout), longest_need(eval_pairs, "padded"),
      longest_need(eval_cands, "padded")))
  layout = layout_config(cfg, cfg.data.batch_size // d.micro_batches,
                         k if kind == "ranked" and d.source == "synthetic" else None,
                         buckets=buckets)
  train_it = ExampleBatches(train, layout, seed=d.shuffle_seed,
                            micro_batches=d.micro_batches)
  # Eval batches are always padded: one row per sequence, whatever trains.
  pad = functools.partial(layout_config, cfg, layout="padded", buckets=buckets)
  eval_set = eval_lib.EvalSet(
      pair_batches=(make_batches(eval_pairs, pad(cfg.eval.batch_size))
                    if eval_pairs else []),
      candidate_batches=(make_batches(eval_cands, pad(cfg.eval.batch_size, k))
                         if eval_cands else []))
  return Data(train=train_it, eval_set=eval_set, vocab_size=vocab, report=report,
              layout=layout, eval_examples=list(held))


# ----------------------------------------------------------------------------
# Online RL's prompt stream.


class PromptSource:
  """Prompts for iteration i: deterministic in (seed, i), so resuming needs no state
  and every process of a jax.distributed run draws the same global batch.

  File and ``arithmetic`` sources also keep the run's ``tokenizer`` and each prompt
  record's other fields (`fields`, read by reward functions); the built-in
  verifiable task (`jaxalign.data.verifiable`) adds its held-out split
  (``heldout``) and its train answers as SFT examples (``sft_examples``)."""

  def __init__(self, cfg: Config):
    self.cfg = cfg
    self.task = synthetic.SyntheticTaskConfig(vocab_size=cfg.data.task.vocab_size,
                                              target_len=cfg.data.task.target_len)
    self.vocab_size = self.task.vocab_size
    # What the sampler stops on: the task's token, or the tokenizer's own eos ids
    # (a checkpoint's end-of-turn is not the task's id 3).
    self.stops = dict(synthetic.SAMPLING_STOPS)
    self._pool, self._fields, self.tokenizer = None, None, None
    self.heldout, self.sft_examples = [], []
    if cfg.data.source in ("file", "arithmetic"):
      tok = build.build_tokenizer(cfg)
      examples = self._load(cfg, tok)
      self._pool = [np.asarray(e.prompt, np.int32) for e in examples]
      self._fields = [dict(getattr(e, "fields", None) or {}) for e in examples]
      self.tokenizer = tok
      self.vocab_size = tok.vocab_size
      self.stops = generate_lib.stop_tokens(tok)

  def _load(self, cfg: Config, tok: Any) -> list[Any]:
    if cfg.data.source == "arithmetic":
      from jaxalign.data import verifiable  # pylint: disable=g-import-not-at-top
      train, held = verifiable.records(verifiable.task_from_config(cfg))
      self.heldout = verifiable.prompt_examples(held, tok)
      self.sft_examples = verifiable.sft_examples(train, tok)
      return verifiable.prompt_examples(train, tok)
    from jaxalign.data import formats  # pylint: disable=g-import-not-at-top
    examples = formats.load_examples(cfg.data.path, cfg.data.format, tok,
                                     on_error=cfg.data.on_error)
    if not examples:
      raise ValueError(f"config.data.path={cfg.data.path!r}: no usable examples.")
    return examples

  def _indices(self, iteration: int) -> np.ndarray:
    n, rng = self.cfg.data.batch_size, np.random.default_rng([self.cfg.seed, iteration])
    return rng.choice(len(self._pool), size=n, replace=len(self._pool) < n)

  def __call__(self, iteration: int) -> list[np.ndarray]:
    if self._pool is None:
      rng = np.random.default_rng([self.cfg.seed, iteration])
      return synthetic.make_prompts(rng, self.cfg.data.batch_size, self.task)
    return [self._pool[i] for i in self._indices(iteration)]

  def longest_prompt(self) -> int:
    """Tokens in the longest prompt of the pool and the held-out split (0: synthetic)."""
    return max([len(p) for p in self._pool or []] +
               [len(e.prompt) for e in self.heldout], default=0)

  def fields(self, iteration: int) -> list[dict]:
    """The other fields of iteration ``iteration``'s prompt records, in the order of
    ``self(iteration)`` (empty dicts for the synthetic task)."""
    if self._pool is None:
      return [{} for _ in range(self.cfg.data.batch_size)]
    return [self._fields[i] for i in self._indices(iteration)]
