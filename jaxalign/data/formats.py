"""Record formats (JSON Lines, plain or .gz) -> text records -> typed examples.

Formats (``--format`` in the CLI, ``fmt`` here), one JSON object per line:

* ``sft``: ``{"prompt": str | messages, "completion": str}`` or ``{"messages": [...]}``
  whose last message is the assistant completion. A string prompt is used verbatim and
  completions follow it verbatim; a message-list prompt is rendered up to the
  ``"\n\nAssistant:"`` marker and its completions are assistant contents (prefixed
  with the template's separator, a space, exactly as ``messages`` renders them).
* ``pairwise``: ``{"prompt": str | messages, "chosen": str, "rejected": str}``.
* ``hh``: ``{"chosen": str, "rejected": str}``, full HH-RLHF conversations. The prompt
  is the text the two share up to and including the last ``"\\n\\nAssistant:"`` inside
  their common prefix; the completions are the rest. (Using the common prefix, not the
  last marker of each side, keeps responses that themselves contain a hallucinated
  ``"\\n\\nAssistant:"`` whole; 5 of the 2,312 harmless-base test pairs do.)
* ``unpaired``: ``{"prompt": ..., "completion": str, "label": bool}`` (KTO).
* ``ranked``: ``{"prompt": ..., "responses": [str, ...], "scores": [number, ...]}``
  (RRHF; k >= 2, higher score is better).

``messages`` are lists of ``{"role": "system"|"user"|"assistant", "content": str}``
rendered by ``ChatTemplate``.

Bad input never disappears. With ``on_error="raise"`` (the default) the first bad
record raises a ``ValueError`` naming the file, line, field, and the fix. With
``on_error="skip"`` it is skipped and counted by reason in a ``DataReport``.

Truncation is a policy, not an error (``Truncation``): prompts longer than
``max_prompt_length`` keep their END (the last turns survive; BOS is kept in front);
then each completion is cut from its end so that prompt + completion fits
``max_length`` (a cut completion loses its EOS: it did not end there). An example whose
completion would vanish entirely is dropped and counted as
``"completion_truncated_away"``, and a pair whose two completions become identical
after truncation is dropped as ``"identical_after_truncation"``. Drops are always
counted, under either ``on_error``, never raised. Lengths are per sequence: prompt +
one completion.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from jaxalign.data.examples import (Example, PairExample, RankedExample, SFTExample,
                                    UnpairedExample)
from jaxalign.data.tokenizer import ASSISTANT_MARKER, ChatTemplate, Tokenizer

FORMATS = ("sft", "pairwise", "hh", "unpaired", "ranked")
OnError = Literal["raise", "skip"]

# Error reasons (stable strings: logs and tests key on them).
INVALID_UTF8 = "invalid_utf8"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_FIELD = "empty_field"
CHOSEN_EQUALS_REJECTED = "chosen_equals_rejected"
NO_ASSISTANT_TURN = "no_assistant_turn"
INVALID_MESSAGES = "invalid_messages"
LENGTH_MISMATCH = "length_mismatch"
TOO_FEW_RESPONSES = "too_few_responses"
NON_FINITE_SCORE = "non_finite_score"
RECORD_TOO_LONG = "record_too_long"
# Truncation outcomes (counted, never raised).
PROMPT_TRUNCATED = "prompt_truncated"
COMPLETION_TRUNCATED = "completion_truncated"
COMPLETION_TRUNCATED_AWAY = "completion_truncated_away"
IDENTICAL_AFTER_TRUNCATION = "identical_after_truncation"

_DROPS = (COMPLETION_TRUNCATED_AWAY, IDENTICAL_AFTER_TRUNCATION)

DEFAULT_MAX_RECORD_CHARS = 1_000_000


@dataclasses.dataclass
class DataReport:
  """What happened to the records of one or more files: counts by reason + samples."""

  max_samples: int = 3
  lines: int = 0
  blank_lines: int = 0
  records: int = 0  # records that parsed into text records
  examples: int = 0  # typed examples produced (after truncation drops)
  errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  error_samples: dict = dataclasses.field(default_factory=dict)
  truncation: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  truncation_samples: dict = dataclasses.field(default_factory=dict)

  def add_error(self, reason: str, message: str) -> None:
    self.errors[reason] += 1
    samples = self.error_samples.setdefault(reason, [])
    if len(samples) < self.max_samples:
      samples.append(message)

  def add_truncation(self, reason: str, where: str) -> None:
    self.truncation[reason] += 1
    samples = self.truncation_samples.setdefault(reason, [])
    if len(samples) < self.max_samples:
      samples.append(where)

  @property
  def num_errors(self) -> int:
    return sum(self.errors.values())

  @property
  def num_dropped(self) -> int:
    return sum(self.truncation[r] for r in _DROPS)

  def to_dict(self) -> dict[str, Any]:
    return {"lines": self.lines, "blank_lines": self.blank_lines,
            "records": self.records, "examples": self.examples,
            "errors": dict(self.errors), "error_samples": dict(self.error_samples),
            "truncation": dict(self.truncation),
            "truncation_samples": dict(self.truncation_samples)}

  def summary(self) -> str:
    lines = [f"lines={self.lines} (blank {self.blank_lines}) records={self.records} "
             f"examples={self.examples} errors={self.num_errors} "
             f"dropped_by_truncation={self.num_dropped}"]
    for reason, n in sorted(self.errors.items()):
      lines.append(f"  error {reason}: {n}")
      lines.extend(f"    e.g. {m}" for m in self.error_samples.get(reason, []))
    for reason, n in sorted(self.truncation.items()):
      lines.append(f"  truncation {reason}: {n}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class TextRecord:
  """A validated record before tokenization (also what the TFDS dataset stores).

  ``completions``: sft/unpaired ``(completion,)``; pairwise/hh ``(chosen, rejected)``;
  ranked: the k responses. ``label`` only for unpaired, ``scores`` only for ranked.
  """

  kind: str  # "sft" | "pair" | "unpaired" | "ranked"
  prompt: str
  completions: tuple[str, ...]
  label: bool | None = None
  scores: tuple[float, ...] | None = None
  source: str = ""  # "file:line", for messages about this record


class RecordError(ValueError):
  """A bad record: ``reason`` is the count key, the message names file/line/field."""

  def __init__(self, reason: str, field: str | None, message: str):
    super().__init__(message)
    self.reason = reason
    self.field = field
    self.detail = message


def _where(path: str, lineno: int, field: str | None) -> str:
  return f"{path}:{lineno}: field '{field}'" if field else f"{path}:{lineno}: record"


# ------------------------------------------------------------------ field checks

def _get(obj: Mapping[str, Any], field: str, fmt: str) -> Any:
  if field not in obj:
    present = ", ".join(sorted(map(str, obj))) or "none"
    raise RecordError(MISSING_FIELD, field,
                      f"missing; format '{fmt}' needs it (fields present: {present})")
  return obj[field]


def _get_str(obj: Mapping[str, Any], field: str, fmt: str, *, allow_empty: bool = False) -> str:
  value = _get(obj, field, fmt)
  if not isinstance(value, str):
    raise RecordError(WRONG_TYPE, field,
                      f"must be a string, got {type(value).__name__} ({_short(value)})")
  if not allow_empty and not value.strip():
    raise RecordError(EMPTY_FIELD, field,
                      "is empty or whitespace only; remove the record or fill the field")
  return value


def _json_type(value: Any) -> str:
  names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
           type(None): "null"}
  return names.get(type(value), type(value).__name__)


def _short(value: Any, n: int = 40) -> str:
  s = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
  return s if len(s) <= n else s[: n - 3] + "..."


def _prompt_text(obj: Mapping[str, Any], fmt: str, template: ChatTemplate) -> tuple[str, str]:
  """(prompt text, separator to put before each completion).

  A string prompt is used verbatim and completions follow it verbatim. A message-list
  prompt is rendered up to the assistant marker, and its completions are assistant
  contents, so they get the template's separator (" " for HH), as in ``messages``.
  """
  value = _get(obj, "prompt", fmt)
  if isinstance(value, str):
    return value, ""  # An empty prompt is legal (unconditional completion).
  if isinstance(value, list):
    try:
      return template.render_prompt(value), template.completion_separator
    except ValueError as e:
      raise RecordError(INVALID_MESSAGES, "prompt", f"is not a valid message list: {e}") from e
  raise RecordError(WRONG_TYPE, "prompt",
                    f"must be a string or a list of messages, got {type(value).__name__}")


def _parse_sft(obj, fmt, template):
  if "messages" in obj and "completion" not in obj:
    messages = obj["messages"]
    if not isinstance(messages, list):
      raise RecordError(WRONG_TYPE, "messages",
                        f"must be a list of messages, got {type(messages).__name__}")
    try:
      prompt, completion = template.split_messages(messages)
    except ValueError as e:
      raise RecordError(INVALID_MESSAGES, "messages", f"is not a valid conversation: {e}") from e
    if not completion.strip():
      raise RecordError(EMPTY_FIELD, "messages", "the final assistant message is empty")
    return TextRecord("sft", prompt, (completion,))
  prompt, sep = _prompt_text(obj, fmt, template)
  return TextRecord("sft", prompt, (sep + _get_str(obj, "completion", fmt),))


def _check_pair(chosen: str, rejected: str) -> None:
  if chosen == rejected:
    raise RecordError(CHOSEN_EQUALS_REJECTED, "rejected",
                      "is identical to 'chosen', so the pair carries no preference; "
                      "remove the record")


def _parse_pairwise(obj, fmt, template):
  prompt, sep = _prompt_text(obj, fmt, template)
  chosen = _get_str(obj, "chosen", fmt)
  rejected = _get_str(obj, "rejected", fmt)
  _check_pair(chosen, rejected)
  return TextRecord("pair", prompt, (sep + chosen, sep + rejected))


def split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
  """(prompt, chosen completion, rejected completion) of an HH-RLHF pair."""
  common = os.path.commonprefix([chosen, rejected])
  idx = common.rfind(ASSISTANT_MARKER)
  if idx < 0:
    raise RecordError(NO_ASSISTANT_TURN, "chosen",
                      f"'chosen' and 'rejected' share no {ASSISTANT_MARKER!r} turn; HH "
                      "records are full conversations '\\n\\nHuman: ...\\n\\nAssistant: ...' "
                      "that differ only after the last shared Assistant marker")
  cut = idx + len(ASSISTANT_MARKER)
  return chosen[:cut], chosen[cut:], rejected[cut:]


def _parse_hh(obj, fmt, template):
  del template
  chosen = _get_str(obj, "chosen", fmt)
  rejected = _get_str(obj, "rejected", fmt)
  _check_pair(chosen, rejected)
  prompt, c, r = split_hh_pair(chosen, rejected)
  for field, text in (("chosen", c), ("rejected", r)):
    if not text.strip():
      raise RecordError(EMPTY_FIELD, field,
                        "has an empty final Assistant response; remove the record")
  return TextRecord("pair", prompt, (c, r))


def _parse_unpaired(obj, fmt, template):
  prompt, sep = _prompt_text(obj, fmt, template)
  completion = sep + _get_str(obj, "completion", fmt)
  label = _get(obj, "label", fmt)
  if not isinstance(label, bool):
    raise RecordError(WRONG_TYPE, "label",
                      f"must be a JSON boolean (true = desirable), got "
                      f"{type(label).__name__} ({_short(label)})")
  return TextRecord("unpaired", prompt, (completion,), label=label)


def _parse_ranked(obj, fmt, template):
  prompt, sep = _prompt_text(obj, fmt, template)
  responses = _get(obj, "responses", fmt)
  scores = _get(obj, "scores", fmt)
  if not isinstance(responses, list):
    raise RecordError(WRONG_TYPE, "responses",
                      f"must be a list of strings, got {type(responses).__name__}")
  if not isinstance(scores, list):
    raise RecordError(WRONG_TYPE, "scores",
                      f"must be a list of numbers, got {type(scores).__name__}")
  if len(responses) < 2:
    raise RecordError(TOO_FEW_RESPONSES, "responses",
                      f"has {len(responses)} response(s); ranking needs at least 2")
  if len(scores) != len(responses):
    raise RecordError(LENGTH_MISMATCH, "scores",
                      f"has {len(scores)} entries but 'responses' has {len(responses)}; "
                      "give one score per response")
  for i, r in enumerate(responses):
    if not isinstance(r, str):
      raise RecordError(WRONG_TYPE, f"responses[{i}]",
                        f"must be a string, got {type(r).__name__}")
    if not r.strip():
      raise RecordError(EMPTY_FIELD, f"responses[{i}]", "is empty or whitespace only")
  for i, s in enumerate(scores):
    if isinstance(s, bool) or not isinstance(s, (int, float)):
      raise RecordError(WRONG_TYPE, f"scores[{i}]",
                        f"must be a number, got {type(s).__name__} ({_short(s)})")
    if not math.isfinite(s):
      raise RecordError(NON_FINITE_SCORE, f"scores[{i}]", f"is {s}; scores must be finite")
  return TextRecord("ranked", prompt, tuple(sep + r for r in responses),
                    scores=tuple(float(s) for s in scores))


_PARSERS = {"sft": _parse_sft, "pairwise": _parse_pairwise, "hh": _parse_hh,
            "unpaired": _parse_unpaired, "ranked": _parse_ranked}


def _check_format(fmt: str) -> None:
  if fmt not in _PARSERS:
    raise ValueError(f"unknown record format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _check_on_error(on_error: str) -> None:
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def parse_object(obj: Any, fmt: str, template: ChatTemplate | None = None) -> TextRecord:
  """One decoded JSON value -> TextRecord, or RecordError (reason, field, message)."""
  _check_format(fmt)
  if not isinstance(obj, dict):
    raise RecordError(NOT_AN_OBJECT, None,
                      f"is a JSON {_json_type(obj)}, but each line must be one JSON object "
                      "with the format's fields")
  return _PARSERS[fmt](obj, fmt, template or ChatTemplate())


# ------------------------------------------------------------------ files

def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
  """(1-based line number, raw bytes without the newline) of a .jsonl or .jsonl.gz file."""
  path = os.fspath(path)
  try:
    if path.endswith(".gz"):
      f = gzip.open(path, "rb")
    else:
      f = open(path, "rb")
  except OSError as e:
    raise ValueError(f"cannot open record file {path}: {e}") from e
  with f:
    lineno = 0
    try:
      for lineno, raw in enumerate(f, start=1):
        yield lineno, raw.rstrip(b"\r\n")
    except (OSError, EOFError, gzip.BadGzipFile) as e:
      raise ValueError(f"{path}: cannot read past line {lineno}: {e} (is the .gz file "
                       "complete and really gzip?)") from e


def iter_text_records(path: str | os.PathLike, fmt: str, *, on_error: OnError = "raise",
                      report: DataReport | None = None, template: ChatTemplate | None = None,
                      max_record_chars: int = DEFAULT_MAX_RECORD_CHARS) -> Iterator[TextRecord]:
  """Validated text records of one file; bad ones raise or are counted in ``report``."""
  _check_format(fmt)
  _check_on_error(on_error)
  path = os.fspath(path)
  report = report if report is not None else DataReport()
  template = template or ChatTemplate()
  for lineno, raw in iter_lines(path):
    report.lines += 1
    if not raw.strip():
      report.blank_lines += 1  # Blank lines (e.g. a trailing newline) hold no record.
      continue
    try:
      if len(raw) > max_record_chars * 4:
        raise RecordError(RECORD_TOO_LONG, None, f"is {len(raw)} bytes long")
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise RecordError(INVALID_UTF8, None,
                          f"is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                          "re-encode the file as UTF-8") from e
      if len(text) > max_record_chars:
        raise RecordError(RECORD_TOO_LONG, None,
                          f"is {len(text)} characters, over max_record_chars="
                          f"{max_record_chars}; split or remove it, or raise the limit")
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        raise RecordError(MALFORMED_JSON, None,
                          f"is not valid JSON ({e.msg} at column {e.colno}); each line "
                          "must be one complete JSON object") from e
      record = parse_object(obj, fmt, template)
    except RecordError as e:
      message = f"{_where(path, lineno, e.field)} {e.detail} [reason: {e.reason}]"
      if on_error == "raise":
        raise RecordError(e.reason, e.field, message) from e
      report.add_error(e.reason, message)
      continue
    report.records += 1
    yield dataclasses.replace(record, source=f"{path}:{lineno}")


# ------------------------------------------------------------------ tokenize + truncate

@dataclasses.dataclass(frozen=True)
class Truncation:
  """Length policy in tokens (see the module docstring). None = no limit."""

  max_length: int | None = None
  max_prompt_length: int | None = None

  def __post_init__(self):
    for name in ("max_length", "max_prompt_length"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"Truncation.{name} must be a positive int or None, got {v!r}")
    if (self.max_length is not None and self.max_prompt_length is not None
        and self.max_prompt_length >= self.max_length):
      raise ValueError(
          f"Truncation.max_prompt_length={self.max_prompt_length} must be smaller than "
          f"max_length={self.max_length}, or no completion token would fit")


def truncate(prompt: np.ndarray, completions: Sequence[np.ndarray], policy: Truncation, *,
             bos_id: int | None = None) -> tuple[np.ndarray, list[np.ndarray], set[str]]:
  """Applies ``policy``; returns (prompt, completions, outcome reasons).

  The prompt keeps its end (and a leading ``bos_id`` if present); completions keep
  their start. Reasons: PROMPT_TRUNCATED, COMPLETION_TRUNCATED,
  COMPLETION_TRUNCATED_AWAY (some completion has no token left: drop the example).
  """
  outcomes: set[str] = set()
  m = policy.max_prompt_length
  if m is not None and len(prompt) > m:
    outcomes.add(PROMPT_TRUNCATED)
    if bos_id is not None and len(prompt) and prompt[0] == bos_id and m > 1:
      prompt = np.concatenate([prompt[:1], prompt[len(prompt) - (m - 1):]])
    else:
      prompt = prompt[len(prompt) - m:]
  out = list(completions)
  if policy.max_length is not None:
    budget = policy.max_length - len(prompt)
    for i, c in enumerate(out):
      if len(c) > budget:
        outcomes.add(COMPLETION_TRUNCATED)
        out[i] = c[:max(budget, 0)]
    if any(len(c) == 0 for c in out):
      outcomes.add(COMPLETION_TRUNCATED_AWAY)
  return prompt, out, outcomes


def encode_record(record: TextRecord, tokenizer: Tokenizer,
                  template: ChatTemplate | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
  """Untruncated int32 ids: (prompt with BOS, [completion with EOS, ...])."""
  template = template or ChatTemplate()
  prompt = tokenizer.encode(record.prompt)
  if template.add_bos:
    prompt = np.concatenate([np.asarray([tokenizer.bos_id], np.int32), prompt])
  completions = []
  for text in record.completions:
    c = tokenizer.encode(text)
    if template.add_eos:
      c = np.concatenate([c, np.asarray([tokenizer.eos_id], np.int32)])
    completions.append(c.astype(np.int32))
  return prompt.astype(np.int32), completions


def truncate_encoded(record: TextRecord, prompt: np.ndarray, completions: Sequence[np.ndarray],
                     truncation: Truncation, *, bos_id: int | None,
                     report: DataReport | None = None) -> Example | None:
  """Applies ``truncation`` to encoded ids; the typed example, or None if dropped."""
  prompt, completions, outcomes = truncate(prompt, completions, truncation, bos_id=bos_id)
  if (record.kind == "pair" and COMPLETION_TRUNCATED_AWAY not in outcomes
      and np.array_equal(completions[0], completions[1])):
    outcomes.add(IDENTICAL_AFTER_TRUNCATION)
  if report is not None:
    # A dropped example counts once, under its drop reason.
    drop = next((r for r in _DROPS if r in outcomes), None)
    for reason in ([drop] if drop else sorted(outcomes)):
      report.add_truncation(reason, record.source)
  if COMPLETION_TRUNCATED_AWAY in outcomes or IDENTICAL_AFTER_TRUNCATION in outcomes:
    return None
  if report is not None:
    report.examples += 1
  return make_example(record, prompt, completions)


def tokenize_record(record: TextRecord, tokenizer: Tokenizer, *,
                    truncation: Truncation = Truncation(),
                    template: ChatTemplate | None = None,
                    report: DataReport | None = None) -> Example | None:
  """TextRecord -> typed example, or None when truncation dropped it (counted)."""
  template = template or ChatTemplate()
  prompt, completions = encode_record(record, tokenizer, template)
  return truncate_encoded(record, prompt, completions, truncation,
                          bos_id=tokenizer.bos_id if template.add_bos else None,
                          report=report)


def make_example(record: TextRecord, prompt: np.ndarray,
                 completions: Sequence[np.ndarray]) -> Example:
  if record.kind == "sft":
    return SFTExample(prompt=prompt, completion=completions[0])
  if record.kind == "pair":
    return PairExample(prompt=prompt, chosen=completions[0], rejected=completions[1])
  if record.kind == "unpaired":
    return UnpairedExample(prompt=prompt, completion=completions[0], label=bool(record.label))
  if record.kind == "ranked":
    return RankedExample(prompt=prompt, responses=tuple(completions),
                         scores=np.asarray(record.scores, np.float32))
  raise ValueError(f"unknown record kind {record.kind!r} in {record.source or 'record'}")


def load_examples(paths: str | os.PathLike | Iterable[str | os.PathLike], fmt: str,
                  tokenizer: Tokenizer, *, on_error: OnError = "raise",
                  truncation: Truncation = Truncation(), report: DataReport | None = None,
                  template: ChatTemplate | None = None,
                  max_record_chars: int = DEFAULT_MAX_RECORD_CHARS) -> list[Example]:
  """Parses, validates, tokenizes and truncates record files into typed examples."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  report = report if report is not None else DataReport()
  template = template or ChatTemplate()
  out: list[Example] = []
  for path in paths:
    for record in iter_text_records(path, fmt, on_error=on_error, report=report,
                                    template=template, max_record_chars=max_record_chars):
      ex = tokenize_record(record, tokenizer, truncation=truncation, template=template,
                           report=report)
      if ex is not None:
        out.append(ex)
  return out
