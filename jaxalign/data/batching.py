"""Batch layouts: typed examples -> the static-shape batch dict of the architecture.

Three layouts turn a list of typed examples (``jaxalign.data.examples``) into the
batch of ``docs/architecture.md`` section 2. Every batch holds ``N =
examples_per_batch`` example slots and ``S`` sequences, with ``S`` fixed by the example
kind (SFT ``N``, pairs ``2N``, ranked ``N*K``, unpaired/KTO ``2N``).

* ``padded``: one sequence (prompt + completion) per row, row ``r`` holds sequence
  ``r``, so ``R = S``. A pair costs two rows and its prompt twice.
* ``packed``: every sequence is a packing unit; first-fit-decreasing puts them into a
  fixed ``R = rows_per_batch`` rows. ``segment_ids`` number the sequences within a row
  (1, 2, ...) and ``positions`` restart at 0 for each of them.
* ``prefix_shared``: every example is one unit: its prompt once (branch 0), then each
  completion as its own branch (pairs: chosen = 1, rejected = 2; ranked: response k =
  k + 1; KTO: own completion = 1, mismatched KL completion = 2; SFT: completion = 1).
  Each branch's positions continue from the prompt's end, and the model's attention
  rule (segment + branch ids) keeps branches apart. With ``rows_per_batch=None`` each
  example gets its own row (``R = N``); with ``rows_per_batch`` set, the units are
  packed first-fit-decreasing like ``packed``. A unit holds the prompt and ALL
  completions, so when truncation bounds each sequence by ``max_length``, give this
  layout a largest bucket of about ``2 * max_length`` (or ``K * max_length``).

Scored slots. Slot ``t`` of a row scores the token at row position ``t`` when it is a
completion token: ``targets[r, t] = tokens[r, t]`` and ``logit_pos[r, t]`` is the
position whose hidden state predicts it, i.e. ``t - 1``, except for the first token
of every prefix-shared branch, which is predicted from the prompt's last position.
Unscored slots have ``seq_ids = -1``, ``targets = 0``, ``logit_pos = 0``. An SFT
example's ``loss_mask`` (bool, one entry per completion token) leaves the completion
tokens it marks False unscored the same way (the user turns inside a multi-turn
conversation), in every layout; those tokens still sit in the row, so the scored
tokens after them attend to them.

Static shapes. Row length ``L`` is the smallest bucket that holds the batch (padded:
the longest sequence; packed layouts: the smallest bucket for which
first-fit-decreasing fits every unit into the ``R`` rows). ``R``, ``N``, ``S`` and the
extras' shapes are fixed by the config, so one layout produces at most
``len(buckets)`` distinct batch shapes per example kind. A batch whose units do not fit
``R`` rows of the largest bucket is an error in ``make_batch``; ``iter_batches`` instead
carries the examples that do not fit to the next batch (no example is dropped), and
pads a short last batch with ``example_valid = 0`` slots.

Compact score arrays (``LayoutConfig.compact_scores``, on by default). The score
arrays ``logit_pos``, ``targets`` and ``seq_ids`` name, slot by slot, which hidden
state predicts which token for which sequence; nothing reads their slot index as a row
position. So each row's scored slots are moved to its front (in row order) and the
three arrays are cut to ``[R, K]``, ``K`` the smallest of ``score_widths(L)`` (L/4,
L/2, L) that holds the row with the most scored slots: the log-prob head (a
``[D, V]`` matmul per slot, forward, backward and reference) then runs on ``R * K``
slots instead of ``R * L``. The per-sequence sums are the same sums (issue 22). A batch
takes at most ``3 * len(buckets)`` distinct shapes this way.

Extras beside the ``[R, L]`` arrays: ``seq_last [S]``, ``example_valid [N]`` (int32),
``labels [N]`` (int32, KTO: 1 = desirable), ``scores [N, K]`` (float32, ranked) and
``margins [N]`` (float32, pairs that carry a ``margin``; 0 in empty slots).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from jaxalign.data.examples import (
    Example,
    PairExample,
    RankedExample,
    SFTExample,
    UnpairedExample,
)

LAYOUT_KINDS = ("padded", "packed", "prefix_shared")
ROW_KEYS = ("tokens", "positions", "segment_ids", "branch_ids", "logit_pos",
            "targets", "seq_ids")
# The per-slot score arrays (module docstring: compact score arrays) and what an
# unscored slot holds in each.
SCORE_KEYS = ("logit_pos", "targets", "seq_ids")
_SCORE_FILL = {"logit_pos": 0, "targets": 0, "seq_ids": -1}


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
  """How examples become a batch.

  Attributes:
    kind: "padded", "packed" or "prefix_shared".
    buckets: sorted row lengths to choose from (strictly increasing, positive).
    examples_per_batch: N, the static number of example slots per batch.
    rows_per_batch: R for "packed" (required) and packed "prefix_shared" (optional;
      None = one example per row). Must be None for "padded" (R = S there).
    responses_per_example: K for ranked examples; None infers it from the first
      batch's examples (it must then stay constant, since S = N * K is static).
    compact_scores: score arrays cut to the scored slots (module docstring); False
      keeps them ``[R, L]``, slot t scoring the token at row position t.
  """
  kind: str = "padded"
  buckets: tuple[int, ...] = (128, 256, 512, 1024)
  examples_per_batch: int = 8
  rows_per_batch: int | None = None
  responses_per_example: int | None = None
  compact_scores: bool = True

  def __post_init__(self):
    if self.kind not in LAYOUT_KINDS:
      raise ValueError(
          f"LayoutConfig.kind={self.kind!r} is not one of {LAYOUT_KINDS}.")
    buckets = tuple(int(b) for b in self.buckets)
    if not buckets or any(b <= 0 for b in buckets) or any(
        a >= b for a, b in zip(buckets, buckets[1:])):
      raise ValueError(
          f"LayoutConfig.buckets={self.buckets!r} must be a non-empty, strictly "
          "increasing tuple of positive row lengths, e.g. (128, 256, 512, 1024).")
    object.__setattr__(self, "buckets", buckets)
    if self.examples_per_batch < 1:
      raise ValueError(
          f"LayoutConfig.examples_per_batch={self.examples_per_batch} must be >= 1.")
    if self.kind == "padded" and self.rows_per_batch is not None:
      raise ValueError(
          "LayoutConfig.rows_per_batch must be None for kind='padded' (the padded "
          "layout uses one row per sequence); use kind='packed' to set rows.")
    if self.kind == "packed" and self.rows_per_batch is None:
      raise ValueError(
          "LayoutConfig.rows_per_batch is required for kind='packed': set the static "
          "number of rows the sequences of examples_per_batch examples are packed "
          "into.")
    if self.rows_per_batch is not None and self.rows_per_batch < 1:
      raise ValueError(
          f"LayoutConfig.rows_per_batch={self.rows_per_batch} must be >= 1.")
    if self.responses_per_example is not None and self.responses_per_example < 1:
      raise ValueError(
          f"LayoutConfig.responses_per_example={self.responses_per_example} must "
          "be >= 1.")


# ---------------------------------------------------------------------------
# Examples -> groups (prompt + numbered completions) -> packing units.


@dataclasses.dataclass(frozen=True)
class _Group:
  example_id: Any
  prompt: np.ndarray
  # (sequence index, tokens, loss mask or None = every token scored)
  completions: tuple[tuple[int, np.ndarray, np.ndarray | None], ...]


@dataclasses.dataclass(frozen=True)
class _Unit:
  """A contiguous run of row positions, laid out relative to its own start."""
  tokens: np.ndarray
  positions: np.ndarray
  branch_ids: np.ndarray
  logit_rel: np.ndarray  # -1 = unscored, else the in-unit predicting position
  seq_ids: np.ndarray  # -1 = unscored
  seq_last: tuple[tuple[int, int], ...]  # (sequence index, in-unit position)

  @property
  def length(self) -> int:
    return int(self.tokens.shape[0])


def _kind_name(example: Example) -> str:
  return type(example).__name__


def _as_tokens(x: Any, example_id: Any, field: str, *, allow_empty: bool) -> np.ndarray:
  arr = np.asarray(x)
  if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
    raise ValueError(
        f"example {example_id}: field {field!r} must be a 1-D integer token array, "
        f"got shape {arr.shape} dtype {arr.dtype}.")
  if arr.size and int(arr.min()) < 0:
    raise ValueError(
        f"example {example_id}: field {field!r} holds a negative token id "
        f"{int(arr.min())}; token ids must be >= 0 (pad = 0).")
  if not allow_empty and arr.size == 0:
    raise ValueError(
        f"example {example_id}: field {field!r} is empty; every prompt needs at least "
        "one token (e.g. BOS) and every completion at least one token to score. Drop "
        "or fix the example upstream.")
  return arr.astype(np.int32)


def _as_loss_mask(x: Any, completion: np.ndarray, example_id: Any) -> np.ndarray | None:
  if x is None:
    return None
  mask = np.asarray(x)
  if mask.dtype != np.bool_ or mask.shape != completion.shape:
    raise ValueError(
        f"example {example_id}: field 'loss_mask' must be a bool array with one entry "
        f"per completion token ({completion.shape[0]}), got shape {mask.shape} dtype "
        f"{mask.dtype}.")
  if not mask.any():
    raise ValueError(
        f"example {example_id}: field 'loss_mask' marks no completion token, so the "
        "example would teach nothing; drop it upstream.")
  return mask


def _example_kind(examples: Sequence[Example]) -> type:
  kinds = {type(e) for e in examples}
  if len(kinds) != 1:
    raise ValueError(
        "a batch must hold one example kind, got "
        f"{sorted(k.__name__ for k in kinds)}; split the examples by kind first.")
  kind = kinds.pop()
  if kind not in (SFTExample, PairExample, UnpairedExample, RankedExample):
    raise ValueError(
        f"unsupported example type {kind.__name__}; expected one of SFTExample, "
        "PairExample, UnpairedExample, RankedExample.")
  return kind


def num_sequences(kind: type, cfg: LayoutConfig, num_responses: int | None = None) -> int:
  """S, the static number of sequences for a batch of `kind` examples."""
  n = cfg.examples_per_batch
  if kind is SFTExample:
    return n
  if kind in (PairExample, UnpairedExample):
    return 2 * n
  if kind is RankedExample:
    k = cfg.responses_per_example or num_responses
    if k is None:
      raise ValueError("ranked batches need LayoutConfig.responses_per_example.")
    return n * k
  raise ValueError(f"unsupported example type {kind.__name__}.")


def _groups(examples: Sequence[Example], ids: Sequence[Any], n_slots: int,
            num_responses: int | None) -> list[_Group]:
  """Numbers every completion by the architecture's sequence numbering."""
  kind = type(examples[0])
  n_real = len(examples)
  groups = []
  for i, (ex, ex_id) in enumerate(zip(examples, ids)):
    prompt = _as_tokens(ex.prompt, ex_id, "prompt", allow_empty=False)
    if kind is SFTExample:
      comp = _as_tokens(ex.completion, ex_id, "completion", allow_empty=False)
      comps = ((i, comp, _as_loss_mask(getattr(ex, "loss_mask", None), comp, ex_id)),)
    elif kind is PairExample:
      comps = ((2 * i, _as_tokens(ex.chosen, ex_id, "chosen", allow_empty=False), None),
               (2 * i + 1, _as_tokens(ex.rejected, ex_id, "rejected",
                                      allow_empty=False), None))
    elif kind is UnpairedExample:
      # The KL estimate pairs prompt i with the completion of example i+1 (mod the
      # real examples), so the mismatched sequence never shares its own completion
      # unless the batch holds a single example.
      nxt = examples[(i + 1) % n_real]
      nxt_id = ids[(i + 1) % n_real]
      comps = ((i, _as_tokens(ex.completion, ex_id, "completion", allow_empty=False), None),
               (n_slots + i, _as_tokens(nxt.completion, nxt_id, "completion",
                                        allow_empty=False), None))
    else:  # RankedExample
      if len(ex.responses) != num_responses:
        raise ValueError(
            f"example {ex_id}: RankedExample has {len(ex.responses)} responses but the "
            f"batch uses K={num_responses} (LayoutConfig.responses_per_example or the "
            "first example); every ranked example needs the same number of responses.")
      comps = tuple(
          (i * num_responses + k,
           _as_tokens(r, ex_id, f"responses[{k}]", allow_empty=False), None)
          for k, r in enumerate(ex.responses))
    groups.append(_Group(ex_id, prompt, comps))
  return groups


def _scored_ids(seq: int, length: int, mask: np.ndarray | None) -> np.ndarray:
  """seq_ids of one completion: ``seq`` where scored (mask True or no mask), else -1."""
  if mask is None:
    return np.full((length,), seq, np.int32)
  return np.where(mask, seq, -1).astype(np.int32)


def _sequence_unit(prompt: np.ndarray, seq: int, completion: np.ndarray,
                   mask: np.ndarray | None = None) -> _Unit:
  p, c = prompt.shape[0], completion.shape[0]
  n = p + c
  logit_rel = np.full((n,), -1, np.int32)
  logit_rel[p:] = np.arange(p - 1, n - 1, dtype=np.int32)
  seq_ids = np.full((n,), -1, np.int32)
  seq_ids[p:] = _scored_ids(seq, c, mask)
  return _Unit(
      tokens=np.concatenate([prompt, completion]),
      positions=np.arange(n, dtype=np.int32),
      branch_ids=np.zeros((n,), np.int32),
      logit_rel=logit_rel,
      seq_ids=seq_ids,
      seq_last=((seq, n - 1),),
  )


def _prefix_unit(group: _Group) -> _Unit:
  p = group.prompt.shape[0]
  tokens = [group.prompt]
  positions = [np.arange(p, dtype=np.int32)]
  branch = [np.zeros((p,), np.int32)]
  logit_rel = [np.full((p,), -1, np.int32)]
  seq_ids = [np.full((p,), -1, np.int32)]
  seq_last = []
  start = p
  for b, (seq, comp, mask) in enumerate(group.completions, start=1):
    c = comp.shape[0]
    tokens.append(comp)
    positions.append(p + np.arange(c, dtype=np.int32))
    branch.append(np.full((c,), b, np.int32))
    # The first token of every branch is predicted from the prompt's last token.
    rel = np.arange(start - 1, start + c - 1, dtype=np.int32)
    rel[0] = p - 1
    logit_rel.append(rel)
    seq_ids.append(_scored_ids(seq, c, mask))
    seq_last.append((seq, start + c - 1))
    start += c
  return _Unit(
      tokens=np.concatenate(tokens),
      positions=np.concatenate(positions),
      branch_ids=np.concatenate(branch),
      logit_rel=np.concatenate(logit_rel),
      seq_ids=np.concatenate(seq_ids),
      seq_last=tuple(seq_last),
  )


def _units(groups: Sequence[_Group], kind: str) -> list[tuple[Any, _Unit]]:
  if kind == "prefix_shared":
    return [(g.example_id, _prefix_unit(g)) for g in groups]
  return [(g.example_id, _sequence_unit(g.prompt, seq, comp, mask))
          for g in groups for seq, comp, mask in g.completions]


# ---------------------------------------------------------------------------
# Placement: (row, offset) for every unit, and the row length bucket.


def first_fit_decreasing(lengths: Sequence[int], num_rows: int,
                         row_length: int) -> list[tuple[int, int]] | None:
  """Places items into `num_rows` bins of `row_length`; None if they do not fit.

  Returns (row, offset) per item, in input order. Items are taken longest first
  (ties in input order) and each goes into the first row with room.
  """
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  used = [0] * num_rows
  place: list[tuple[int, int] | None] = [None] * len(lengths)
  for i in order:
    n = lengths[i]
    for r in range(num_rows):
      if used[r] + n <= row_length:
        place[i] = (r, used[r])
        used[r] += n
        break
    else:
      return None
  return place  # type: ignore[return-value]


def _check_fits_largest(units: Sequence[tuple[Any, _Unit]], cfg: LayoutConfig,
                        what: str) -> None:
  largest = cfg.buckets[-1]
  for ex_id, unit in units:
    if unit.length > largest:
      raise ValueError(
          f"example {ex_id}: its {what} has {unit.length} tokens, more than the "
          f"largest bucket {largest} (LayoutConfig.buckets={cfg.buckets}); truncate "
          "it upstream or add a larger bucket.")


def _place(units: Sequence[tuple[Any, _Unit]], cfg: LayoutConfig, num_seqs: int,
           n_slots: int) -> tuple[int, int, list[tuple[int, int]]] | None:
  """Returns (R, L, [(row, offset)]) or None when the units do not fit R rows."""
  lengths = [u.length for _, u in units]
  longest = max(lengths)
  if cfg.kind == "padded":
    num_rows = num_seqs
    length = next(b for b in cfg.buckets if b >= longest)
    return num_rows, length, [(u.seq_last[0][0], 0) for _, u in units]
  if cfg.kind == "prefix_shared" and cfg.rows_per_batch is None:
    length = next(b for b in cfg.buckets if b >= longest)
    return n_slots, length, [(i, 0) for i in range(len(units))]
  num_rows = cfg.rows_per_batch
  total = sum(lengths)
  for length in cfg.buckets:
    if length < longest or length * num_rows < total:
      continue
    place = first_fit_decreasing(lengths, num_rows, length)
    if place is not None:
      return num_rows, length, place
  return None


# ---------------------------------------------------------------------------
# Public API.


class _DoesNotFit(ValueError):
  pass


def _resolve_k(kind: type, examples: Sequence[Example], cfg: LayoutConfig) -> int | None:
  if kind is not RankedExample:
    return None
  return cfg.responses_per_example or len(examples[0].responses)


def _check_example_count(examples: Sequence[Example], n: int) -> None:
  if not examples:
    raise ValueError("make_batch needs at least one example.")
  if len(examples) > n:
    raise ValueError(
        f"got {len(examples)} examples but LayoutConfig.examples_per_batch={n}; pass "
        "at most that many (iter_batches splits a stream for you).")


def _place_or_raise(units: Sequence[tuple[Any, _Unit]], cfg: LayoutConfig, num_seqs: int,
                    n: int, ids: list[Any]) -> tuple[int, int, list[tuple[int, int]]]:
  """`_place`'s (num_rows, length, place), or `_DoesNotFit` naming the examples."""
  _check_fits_largest(
      units, cfg,
      "prompt + all completions" if cfg.kind == "prefix_shared"
      else "prompt + completion")
  placed = _place(units, cfg, num_seqs, n)
  if placed is None:
    need = sum(u.length for _, u in units)
    raise _DoesNotFit(
        f"examples {ids[0]}..{ids[-1]}: {len(units)} units ({need} tokens) do not fit "
        f"LayoutConfig.rows_per_batch={cfg.rows_per_batch} rows of the largest bucket "
        f"{cfg.buckets[-1]}; raise rows_per_batch, lower examples_per_batch, or use "
        "iter_batches, which carries what does not fit to the next batch.")
  return placed


def _write_rows(units: Sequence[tuple[Any, _Unit]], num_rows: int, length: int,
                place: Sequence[tuple[int, int]], num_seqs: int) -> dict[str, np.ndarray]:
  """The row arrays (ROW_KEYS) and seq_last of units placed at (row, offset)."""
  batch = {key: np.zeros((num_rows, length), np.int32) for key in ROW_KEYS}
  batch["seq_ids"][:] = -1
  seq_last = np.full((num_seqs,), -1, np.int32)
  # Segment ids count units within a row in offset order.
  order = sorted(range(len(units)), key=lambda i: place[i])
  next_segment = [1] * num_rows
  for i in order:
    unit = units[i][1]
    row, off = place[i]
    seg = next_segment[row]
    next_segment[row] += 1
    sl = slice(off, off + unit.length)
    batch["tokens"][row, sl] = unit.tokens
    batch["positions"][row, sl] = unit.positions
    batch["segment_ids"][row, sl] = seg
    batch["branch_ids"][row, sl] = unit.branch_ids
    scored = unit.seq_ids >= 0
    batch["seq_ids"][row, sl] = unit.seq_ids
    batch["targets"][row, sl] = np.where(scored, unit.tokens, 0)
    batch["logit_pos"][row, sl] = np.where(scored, unit.logit_rel + off, 0)
    for seq, pos in unit.seq_last:
      seq_last[seq] = row * length + off + pos
  batch["seq_last"] = seq_last
  return batch


def _ranked_scores(examples: Sequence[RankedExample], ids: list[Any], n: int,
                   k: int) -> np.ndarray:
  scores = np.zeros((n, k), np.float32)
  for i, (e, ex_id) in enumerate(zip(examples, ids)):
    s = np.asarray(e.scores, np.float32)
    if s.shape != (k,):
      raise ValueError(
          f"example {ex_id}: RankedExample.scores has shape {s.shape}, expected "
          f"({k},) to match its responses.")
    scores[i] = s
  return scores


def _pair_margins(examples: Sequence[PairExample], ids: list[Any], n: int) -> np.ndarray:
  margins = np.zeros((n,), np.float32)
  for i, (e, ex_id) in enumerate(zip(examples, ids)):
    if e.margin is None:
      raise ValueError(
          f"example {ex_id}: PairExample.margin is None while other pairs of the batch "
          "have one; give every pair a margin (data.margin_field) or none.")
    margins[i] = e.margin
  return margins


def _example_fields(examples: Sequence[Example], ids: list[Any], kind: type, n: int,
                    k: int | None) -> dict[str, np.ndarray]:
  """Per-example-slot arrays: example_valid, and labels, scores or margins for their
  kinds."""
  valid = np.zeros((n,), np.int32)
  valid[:len(examples)] = 1
  fields = {"example_valid": valid}
  if kind is UnpairedExample:
    labels = np.zeros((n,), np.int32)
    labels[:len(examples)] = [int(bool(e.label)) for e in examples]
    fields["labels"] = labels
  if kind is RankedExample:
    fields["scores"] = _ranked_scores(examples, ids, n, k)
  if kind is PairExample and any(e.margin is not None for e in examples):
    fields["margins"] = _pair_margins(examples, ids, n)
  return fields


def _build(examples: Sequence[Example], cfg: LayoutConfig,
           example_ids: Sequence[Any] | None) -> dict[str, np.ndarray]:
  n = cfg.examples_per_batch
  _check_example_count(examples, n)
  ids = list(range(len(examples))) if example_ids is None else list(example_ids)
  kind = _example_kind(examples)
  k = _resolve_k(kind, examples, cfg)
  num_seqs = num_sequences(kind, cfg, k)
  groups = _groups(examples, ids, n, k)
  units = _units(groups, cfg.kind)
  num_rows, length, place = _place_or_raise(units, cfg, num_seqs, n, ids)
  batch = _write_rows(units, num_rows, length, place, num_seqs)
  if cfg.compact_scores:
    batch = compact_scores(batch)
  batch.update(_example_fields(examples, ids, kind, n, k))
  return batch


def score_widths(length: int) -> tuple[int, ...]:
  """The widths ``K`` a compacted score array of rows of ``length`` may take."""
  return tuple(sorted({max(length // 4, 1), max(length // 2, 1), length}))


def compact_scores(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """``batch`` with each row's scored slots moved to the front of the score arrays
  (``SCORE_KEYS``, slot order kept) and those arrays cut to the smallest
  `score_widths` entry that holds every row's scored slots. Other keys unchanged."""
  seq_ids = np.asarray(batch["seq_ids"])
  scored = seq_ids >= 0
  need = int(scored.sum(axis=1).max(initial=0))
  width = next(w for w in score_widths(seq_ids.shape[1]) if w >= need)
  # A stable sort on "unscored" puts the scored slots first, in row order; the cut
  # keeps only unscored slots (seq_ids -1, targets 0, logit_pos 0) past `need`.
  order = np.argsort(~scored, axis=1, kind="stable")[:, :width]
  out = dict(batch)
  for key in SCORE_KEYS:
    out[key] = np.take_along_axis(np.asarray(batch[key]), order, axis=1)
  return out


def widen_scores(batch: dict[str, Any], width: int) -> dict[str, Any]:
  """``batch`` with its score arrays padded (unscored slots) to ``width`` columns;
  what lets compacted micro-batches of one row length stack."""
  out = dict(batch)
  for key in SCORE_KEYS:
    a = np.asarray(batch[key])
    if a.shape[-1] < width:
      pad = [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])]
      out[key] = np.pad(a, pad, constant_values=_SCORE_FILL[key])
  return out


def make_batch(examples: Sequence[Example], cfg: LayoutConfig, *,
               example_ids: Sequence[Any] | None = None) -> dict[str, np.ndarray]:
  """Lays out up to `cfg.examples_per_batch` examples of one kind as a batch dict.

  Args:
    examples: 1..N examples, all of the same type. Fewer than N leaves trailing
      example slots empty (``example_valid = 0``, their sequences absent).
    cfg: the layout.
    example_ids: names for the examples in error messages (default: list index).

  Returns:
    The batch dict described in the module docstring.

  Raises:
    ValueError: mixed kinds, an empty prompt or completion, an example longer than
      the largest bucket, or (packed layouts) units that do not fit the rows.
  """
  return _build(examples, cfg, example_ids)


def iter_batches(examples: Iterable[Example], cfg: LayoutConfig) -> Iterator[dict[str, np.ndarray]]:
  """Yields batches over a stream, carrying examples that do not fit forward.

  Each batch takes up to N examples (carried ones first). If the packed units do not
  fit the rows of the largest bucket, trailing examples move to the next batch. The
  stream index of each example names it in errors. The last batch may be short.
  """
  pending: list[tuple[int, Example]] = []
  stream = iter(enumerate(examples))
  exhausted = False
  n = cfg.examples_per_batch
  while True:
    while not exhausted and len(pending) < n:
      try:
        pending.append(next(stream))
      except StopIteration:
        exhausted = True
    if not pending:
      return
    batch, take = fill_batch([e for _, e in pending], cfg,
                             example_ids=[i for i, _ in pending])
    pending = pending[take:]
    yield batch


def fill_batch(examples: Sequence[Example], cfg: LayoutConfig, *,
               example_ids: Sequence[Any] | None = None
               ) -> tuple[dict[str, np.ndarray], int]:
  """Lays out the longest prefix of `examples` (at most N) that fits the rows.

  Returns ``(batch, taken)``: the batch of ``examples[:taken]``; the caller carries
  ``examples[taken:]`` to the next batch (`iter_batches`, and the training loop's
  checkpointable stream). Only packed layouts ever take fewer than offered.

  Raises:
    ValueError: as `make_batch`, and when the first example alone does not fit.
  """
  ids = list(range(len(examples))) if example_ids is None else list(example_ids)
  take = min(len(examples), cfg.examples_per_batch)
  while True:
    try:
      return _build(examples[:take], cfg, ids[:take]), take
    except _DoesNotFit:
      if take == 1:
        raise ValueError(
            f"example {ids[0]}: its sequences alone do not fit "
            f"LayoutConfig.rows_per_batch={cfg.rows_per_batch} rows of "
            f"{cfg.buckets[-1]} tokens; raise rows_per_batch.") from None
      take -= 1


def batch_shape(batch: dict[str, np.ndarray]) -> tuple[tuple[str, tuple[int, ...]], ...]:
  """The full shape signature of a batch (what decides a recompilation)."""
  return tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))


def batch_stats(batch: dict[str, np.ndarray]) -> dict[str, float]:
  """Token accounting for one batch.

  total_tokens = R * L row slots; real_tokens = slots holding a token (segment != 0);
  pad_tokens = the rest; scored_tokens = completion tokens scored; score_slots = the
  slots of the score arrays (what the log-prob head computes); per-example
  figures divide by the number of valid examples (a pair is one example).
  """
  seg = batch["segment_ids"]
  total = int(seg.size)
  real = int(np.count_nonzero(seg))
  valid = int(batch["example_valid"].sum())
  return {
      "rows": int(seg.shape[0]),
      "row_length": int(seg.shape[1]),
      "examples": valid,
      "total_tokens": total,
      "real_tokens": real,
      "pad_tokens": total - real,
      "pad_fraction": (total - real) / total,
      "scored_tokens": int(np.count_nonzero(batch["seq_ids"] >= 0)),
      # Slots the log-prob head runs on: R * K with compact score arrays, else R * L.
      "score_slots": int(np.size(batch["seq_ids"])),
      "tokens_per_example": total / max(valid, 1),
      "real_tokens_per_example": real / max(valid, 1),
  }


def epoch_stats(examples: Iterable[Example], cfg: LayoutConfig) -> dict[str, float]:
  """Sums `batch_stats` over `iter_batches` and counts distinct batch shapes."""
  totals = {"batches": 0, "examples": 0, "total_tokens": 0, "real_tokens": 0,
            "pad_tokens": 0, "scored_tokens": 0}
  shapes = set()
  for batch in iter_batches(examples, cfg):
    s = batch_stats(batch)
    totals["batches"] += 1
    for key in ("examples", "total_tokens", "real_tokens", "pad_tokens",
                "scored_tokens"):
      totals[key] += s[key]
    shapes.add(batch_shape(batch))
  out: dict[str, float] = dict(totals)
  out["distinct_shapes"] = len(shapes)
  out["pad_fraction"] = totals["pad_tokens"] / max(totals["total_tokens"], 1)
  out["tokens_per_example"] = totals["total_tokens"] / max(totals["examples"], 1)
  out["real_tokens_per_example"] = totals["real_tokens"] / max(totals["examples"], 1)
  return out
