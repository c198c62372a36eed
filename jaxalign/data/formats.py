"""Record formats (JSON Lines, plain or .gz, and Parquet) -> text records -> typed examples.

Files: ``*.jsonl`` / ``*.jsonl.gz`` hold one JSON object per line; ``*.parquet`` files
hold one record per row (read with pyarrow, a row group at a time), and nested message
columns (``list<struct<role, content>>``) read as lists of ``{"role", "content"}``.

Formats (``--format`` in the CLI, ``fmt`` here). Each field that holds text takes either
a string (the *standard* form) or a list of messages (the *conversational* form,
``[{"role": "system"|"user"|"assistant", "content": str}, ...]``), as in TRL's dataset
formats:

============  =====================================================================
format        fields (per record)
============  =====================================================================
``sft``       ``messages``: a conversation with at least one assistant turn, or
              ``prompt`` + ``completion`` (strings, or messages).
``pairwise``  ``prompt`` + ``chosen`` + ``rejected`` (preference pairs; DPO family,
              reward models), or ``chosen`` + ``rejected`` alone as two full
              conversations (*implicit prompt*: the prompt is the longest message
              prefix they share that both continue with an assistant message;
              ``split_message_pair``).
``hh``        ``chosen`` + ``rejected``: full HH-RLHF texts
              ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` (implicit prompt, see below).
``unpaired``  ``prompt`` + ``completion`` + ``label`` (JSON boolean, true = desirable;
              KTO).
``ranked``    ``prompt`` + ``responses`` (k >= 2) + ``scores`` (k numbers, higher is
              better; RRHF).
``prompt``    ``prompt`` alone, for online RL; every other field (e.g. ``answer``) is
              kept as ``TextRecord.fields`` / ``PromptExample.fields``, a read-only
              mapping of JSON values that reward functions read.
============  =====================================================================

For example (``U`` / ``A`` stand for ``{"role": "user" / "assistant", "content": ...}``)::

    {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}           pairwise, standard
    {"prompt": [U("2+2?")], "chosen": [A("4")], "rejected": "5"}   pairwise, conversational
    {"chosen": [U("2+2?"), A("4")], "rejected": [U("2+2?"), A("5")]}   implicit prompt
    {"messages": [U("hi"), A("hello"), U("2+2?"), A("4")]}           sft, multi-turn
    {"prompt": [U("2+2?")], "completion": [A("4")], "label": true}   unpaired
    {"prompt": [U("2+2?")], "answer": "4"}                           prompt (online RL)

Standard vs conversational. With a string ``prompt`` every completion must be a string
too; they are used verbatim (completion text follows prompt text). With a message-list
``prompt`` a completion may be a string (it becomes one assistant message) or a list of
messages that starts and ends with an assistant message (the response to score; user
turns in between are allowed). A ``system`` message may only come first.

How conversations become tokens depends on the tokenizer (``encode_record``):

* A tokenizer with a chat template (``getattr(tokenizer, "chat_template", None)``,
  e.g. ``jaxalign.data.hf_tokenizer.HFTokenizer`` for a real checkpoint) renders the
  whole conversation itself, because BPE merges across the prompt/completion
  boundary: ``encode_chat_split(prompt_messages, completions)`` for the prompt and
  each completion, and for a multi-turn SFT conversation (a completion with more than
  one message) ``encode_chat(messages, assistant_turns="all")``: the prompt is every
  token before the first assistant token of the completion, and
  ``SFTExample.loss_mask`` scores only the assistant turns' tokens after it.
  Standard (string) records are tokenized as plain text: prompt text, then each
  completion text (BOS first when ``tokenizer.add_bos``; EOS appended), as TRL does
  for non-conversational data.
* Other tokenizers (byte, SentencePiece) tokenize the *text* the record also keeps,
  rendered by ``ChatTemplate`` in the HH style: the prompt ends with
  ``"\\n\\nAssistant:"`` and completions are assistant contents after the template's
  separator (a space). For an SFT conversation the text splits at the FINAL assistant
  turn (only it is scored; earlier turns are prompt), as before; other kinds score the
  whole completion.

HH. The prompt is the text the two share up to and including the last
``"\\n\\nAssistant:"`` inside their common prefix; the completions are the rest. (Using
the common prefix, not the last marker of each side, keeps responses that themselves
contain a hallucinated ``"\\n\\nAssistant:"`` whole; 5 of the 2,312 harmless-base test
pairs do.) The record also carries the conversation as messages
(``tokenizer.parse_hh_messages``); a text that does not start with a Human/Assistant
marker stays text-only.

Bad input never disappears. With ``on_error="raise"`` (the default) the first bad
record raises a ``ValueError`` naming the file, line (``file:N``; Parquet:
``file:row N``, counting rows from 0 like ``DataFrame.iloc``), field (``prompt[2]``
is message 2 of ``prompt``), and the fix. With ``on_error="skip"`` it is skipped and
counted by reason in a ``DataReport`` (the reasons are the constants below;
``DataReport.lines`` counts Parquet rows as lines).

Truncation is a policy, not an error (``Truncation``): prompts longer than
``max_prompt_length`` keep their END (the last turns survive; BOS is kept in front);
then each completion is cut from its end so that prompt + completion fits
``max_length`` (a cut completion loses its EOS: it did not end there; a loss mask is
cut with it). An example whose completion would vanish entirely (or keep no scored
token) is dropped and counted as ``"completion_truncated_away"``, and a pair whose two
completions become identical after truncation is dropped as
``"identical_after_truncation"``. Drops are always counted, under either ``on_error``,
never raised. Lengths are per sequence: prompt + one completion.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from jaxalign.data.examples import (Example, PairExample, PromptExample, RankedExample,
                                    SFTExample, UnpairedExample)
from jaxalign.data.tokenizer import (_ROLE_ALIASES, ASSISTANT_MARKER, ChatTemplate,
                                     Tokenizer, parse_hh_messages)

FORMATS = ("sft", "pairwise", "hh", "unpaired", "ranked", "prompt")
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
NO_SHARED_PROMPT = "no_shared_prompt"  # implicit-prompt pair with no common prefix
NOT_JSON_VALUE = "not_json_value"  # a ``prompt``-format extra field
# Truncation outcomes (counted, never raised).
PROMPT_TRUNCATED = "prompt_truncated"
COMPLETION_TRUNCATED = "completion_truncated"
COMPLETION_TRUNCATED_AWAY = "completion_truncated_away"
IDENTICAL_AFTER_TRUNCATION = "identical_after_truncation"

_DROPS = (COMPLETION_TRUNCATED_AWAY, IDENTICAL_AFTER_TRUNCATION)

DEFAULT_MAX_RECORD_CHARS = 1_000_000
_PARQUET_BATCH_ROWS = 1024


@dataclasses.dataclass
class DataReport:
  """What happened to the records of one or more files: counts by reason + samples."""

  max_samples: int = 3
  lines: int = 0  # lines of JSONL files, rows of Parquet files
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


class FrozenFields(dict):
  """A read-only dict of JSON values: a ``prompt`` record's extra fields.

  It is a ``dict`` (so ``json.dumps`` and ``==`` work, and it pickles for grain
  workers), but every mutating method raises ``TypeError``; use ``dict(fields)`` for
  a mutable copy. Values are canonical JSON values (lists, dicts, str, numbers, bool,
  None), deep-copied from the record when it was parsed.
  """

  __slots__ = ()

  def _read_only(self, *args, **kwargs):
    raise TypeError("record fields are read-only; use dict(fields) for a mutable copy")

  __setitem__ = __delitem__ = __ior__ = _read_only
  clear = pop = popitem = setdefault = update = _read_only

  def __reduce__(self):
    return (type(self), (dict(self),))

  def __repr__(self) -> str:
    return f"FrozenFields({dict.__repr__(self)})"


Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclasses.dataclass(frozen=True)
class TextRecord:
  """A validated record before tokenization (also what the TFDS dataset stores).

  ``kind``: "sft" | "pair" | "unpaired" | "ranked" | "prompt".
  ``prompt`` / ``completions``: the text form (rendered HH style for conversations;
  see the module docstring). ``completions``: sft/unpaired ``(completion,)``;
  pairwise/hh ``(chosen, rejected)``; ranked: the k responses; prompt: ``()``.
  ``label`` only for unpaired, ``scores`` only for ranked.

  Conversational records (and hh) also carry the conversation, for tokenizers with
  their own chat template: ``prompt_messages`` (the messages before the completions)
  and ``completion_messages`` (one message tuple per completion, in the order of
  ``completions``); both None for standard (string) records. For an SFT ``messages``
  conversation the prompt is everything before the FIRST assistant message and the
  completion is the rest (the text form splits at the final one instead).
  ``fields``: only for ``prompt`` records, the record's other fields.
  ``margin``: only for pairs read with a ``margin_field``, that field's number.
  """

  kind: str
  prompt: str
  completions: tuple[str, ...]
  label: bool | None = None
  scores: tuple[float, ...] | None = None
  source: str = ""  # "file:line" or "file:row N", for messages about this record
  prompt_messages: tuple[Message, ...] | None = None
  completion_messages: tuple[tuple[Message, ...], ...] | None = None
  fields: Mapping[str, Any] | None = None
  margin: float | None = None

  @property
  def conversational(self) -> bool:
    return self.prompt_messages is not None


class RecordError(ValueError):
  """A bad record: ``reason`` is the count key, the message names file/line/field.

  ``field`` is a field name, a tuple of names when the problem involves several, or
  None when it concerns the whole record.
  """

  def __init__(self, reason: str, field: str | tuple[str, ...] | None, message: str):
    super().__init__(message)
    self.reason = reason
    self.field = field
    self.detail = message


def _where(location: str, field: str | tuple[str, ...] | None) -> str:
  if isinstance(field, tuple):
    return f"{location}: fields " + " and ".join(f"'{f}'" for f in field)
  return f"{location}: field '{field}'" if field else f"{location}: record"


# ------------------------------------------------------------------ field checks

def _get(obj: Mapping[str, Any], field: str, fmt: str, hint: str = "") -> Any:
  if field not in obj:
    present = ", ".join(sorted(map(str, obj))) or "none"
    raise RecordError(MISSING_FIELD, field,
                      f"missing; format '{fmt}' needs it (fields present: {present}){hint}")
  return obj[field]


def _check_str(value: Any, field: str, *, allow_empty: bool = False) -> str:
  if not isinstance(value, str):
    raise RecordError(WRONG_TYPE, field,
                      f"must be a string, got {_json_type(value)} ({_short(value)})")
  if not allow_empty and not value.strip():
    raise RecordError(EMPTY_FIELD, field,
                      "is empty or whitespace only; remove the record or fill the field")
  return value


def _get_str(obj: Mapping[str, Any], field: str, fmt: str, *, allow_empty: bool = False) -> str:
  return _check_str(_get(obj, field, fmt), field, allow_empty=allow_empty)


def _json_type(value: Any) -> str:
  names = {list: "array", tuple: "array", dict: "object", str: "string", bool: "boolean",
           int: "number", float: "number", type(None): "null"}
  return names.get(type(value), type(value).__name__)


def _short(value: Any, n: int = 40) -> str:
  if isinstance(value, str):
    s = repr(value)
  else:
    try:
      s = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
      s = repr(value)
  return s if len(s) <= n else s[: n - 3] + "..."


# ------------------------------------------------------------------ messages

def _messages(value: Any, field: str, *, system_first: bool = True) -> tuple[Message, ...]:
  """A list of {role, content} objects -> a tuple of dicts with canonical roles.

  ``system_first``: the list starts a conversation, so message 0 may be a system
  message (a completion's may not).
  """
  if not isinstance(value, (list, tuple)):
    raise RecordError(WRONG_TYPE, field,
                      f"must be a list of {{'role', 'content'}} messages, got "
                      f"{_json_type(value)} ({_short(value)})")
  out = []
  for i, m in enumerate(value):
    where = f"{field}[{i}]"
    if not isinstance(m, Mapping):
      raise RecordError(INVALID_MESSAGES, where,
                        f"must be a message object with 'role' and 'content', got "
                        f"{_json_type(m)} ({_short(m)})")
    role, content = m.get("role"), m.get("content")
    if not isinstance(role, str) or role.lower() not in _ROLE_ALIASES:
      raise RecordError(INVALID_MESSAGES, where,
                        f"has role {role!r}; use 'system', 'user' or 'assistant' "
                        "('human' and 'gpt' are read as user and assistant)")
    if not isinstance(content, str):
      raise RecordError(INVALID_MESSAGES, where,
                        f"has 'content' of type {_json_type(content)}; content must be a "
                        "string (content parts, images and tool calls are not supported)")
    role = _ROLE_ALIASES[role.lower()]
    if role == "system" and (i != 0 or not system_first):
      raise RecordError(INVALID_MESSAGES, where,
                        "is a system message, but a system message may only come first "
                        "in the conversation")
    out.append({"role": role, "content": content})
  return tuple(out)


def _check_completion(messages: tuple[Message, ...], field: str,
                      offset: int = 0) -> tuple[Message, ...]:
  """A completion starts and ends with an assistant message, the last one non-empty.

  ``offset``: the index of ``messages[0]`` in ``field`` (for error messages).
  """
  if not messages:
    raise RecordError(EMPTY_FIELD, field,
                      "is an empty message list; a completion needs an assistant message")
  if messages[0]["role"] != "assistant":
    raise RecordError(INVALID_MESSAGES, f"{field}[{offset}]",
                      f"has role {messages[0]['role']!r}, but a completion starts with "
                      "the assistant's response; move earlier turns into 'prompt'")
  last = len(messages) - 1
  if messages[last]["role"] != "assistant":
    raise RecordError(INVALID_MESSAGES, f"{field}[{offset + last}]",
                      f"is the last message of '{field}' but has role "
                      f"{messages[last]['role']!r}; a completion must end with an "
                      "assistant message (the response to score)")
  if not messages[last]["content"].strip():
    raise RecordError(EMPTY_FIELD, f"{field}[{offset + last}]",
                      "is an assistant message with empty content; remove the record "
                      "or fill it")
  return messages


class _Prompt(NamedTuple):
  text: str  # str prompt verbatim, or messages rendered up to the assistant marker
  messages: tuple[Message, ...] | None  # None = standard (string) prompt


def _prompt(obj: Mapping[str, Any], fmt: str, template: ChatTemplate) -> _Prompt:
  value = _get(obj, "prompt", fmt)
  if isinstance(value, str):
    return _Prompt(value, None)  # An empty prompt is legal (unconditional completion).
  if isinstance(value, (list, tuple)):
    messages = _messages(value, "prompt")
    try:
      return _Prompt(template.render_prompt(messages), messages)
    except ValueError as e:
      raise RecordError(INVALID_MESSAGES, "prompt", f"is not a valid message list: {e}") from e
  raise RecordError(WRONG_TYPE, "prompt",
                    f"must be a string or a list of messages, got {_json_type(value)} "
                    f"({_short(value)})")


def _completion(value: Any, field: str, prompt: _Prompt) -> str | tuple[Message, ...]:
  """A string (standard), or (message prompt) a tuple of messages."""
  if prompt.messages is None:
    if isinstance(value, (list, tuple)):
      raise RecordError(WRONG_TYPE, field,
                        "is a list of messages but 'prompt' is a string; give 'prompt' "
                        f"as messages too (conversational) or '{field}' as a string "
                        "(standard)")
    return _check_str(value, field)
  if isinstance(value, str):
    _check_str(value, field)
    return ({"role": "assistant", "content": value},)
  if isinstance(value, (list, tuple)):
    return _check_completion(_messages(value, field, system_first=False), field)
  raise RecordError(WRONG_TYPE, field,
                    f"must be a string or a list of messages, got {_json_type(value)} "
                    f"({_short(value)})")


def _render(template: ChatTemplate, prompt: _Prompt,
            completions: Sequence[str | tuple[Message, ...]], field: str) -> tuple[str, ...]:
  """Completion texts: verbatim strings, or conversations rendered after the prompt."""
  if prompt.messages is None:
    return tuple(completions)  # type: ignore[arg-type]
  out = []
  for c in completions:
    try:
      full = "".join(template.split_messages(list(prompt.messages) + list(c)))
    except ValueError as e:
      raise RecordError(INVALID_MESSAGES, field, f"is not a valid conversation: {e}") from e
    if not full.startswith(prompt.text):  # Cannot happen with ChatTemplate's rendering.
      raise RecordError(INVALID_MESSAGES, field,
                        "does not render after the prompt with this ChatTemplate")
    out.append(full[len(prompt.text):])
  return tuple(out)


def _conversation(prompt: _Prompt, completions: Sequence[Any]) -> dict[str, Any]:
  """The TextRecord message fields (None for standard records)."""
  if prompt.messages is None:
    return {}
  return {"prompt_messages": prompt.messages,
          "completion_messages": tuple(tuple(c) for c in completions)}


# ------------------------------------------------------------------ parsers

def _parse_sft(obj, fmt, template):
  if "messages" in obj and "completion" not in obj:
    messages = _messages(obj["messages"], "messages")
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None:
      raise RecordError(INVALID_MESSAGES, "messages",
                        "has no assistant message; an SFT conversation needs at least "
                        "one assistant turn to learn")
    _check_completion(messages[first:], "messages", first)
    try:
      # The text form keeps splitting at the final assistant turn.
      prompt, completion = template.split_messages(messages)
    except ValueError as e:
      raise RecordError(INVALID_MESSAGES, "messages", f"is not a valid conversation: {e}") from e
    if not completion.strip():
      raise RecordError(EMPTY_FIELD, "messages", "the final assistant message is empty")
    return TextRecord("sft", prompt, (completion,), prompt_messages=messages[:first],
                      completion_messages=(messages[first:],))
  prompt = _prompt(obj, fmt, template)
  completion = _completion(_get(obj, "completion", fmt), "completion", prompt)
  if prompt.messages is None:
    return TextRecord("sft", prompt.text, (completion,))
  try:
    text_prompt, text_completion = template.split_messages(
        list(prompt.messages) + list(completion))
  except ValueError as e:
    raise RecordError(INVALID_MESSAGES, "completion", f"is not a valid conversation: {e}") from e
  return TextRecord("sft", text_prompt, (text_completion,),
                    **_conversation(prompt, [completion]))


def _check_pair(chosen: Any, rejected: Any) -> None:
  if chosen == rejected:
    raise RecordError(CHOSEN_EQUALS_REJECTED, "rejected",
                      "is identical to 'chosen', so the pair carries no preference; "
                      "remove the record")


def split_message_pair(chosen: Sequence[Message], rejected: Sequence[Message]
                       ) -> tuple[tuple[Message, ...], tuple[Message, ...], tuple[Message, ...]]:
  """(prompt, chosen completion, rejected completion) of two full conversations.

  The prompt is their common message prefix, cut back to where both continue with an
  assistant message (so each completion starts with the response, and a shared
  assistant turn that both continue differently stays in both completions).
  """
  chosen, rejected = tuple(chosen), tuple(rejected)
  k = 0
  while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
    k += 1
  for j in range(k, 0, -1):
    if (j < len(chosen) and j < len(rejected) and chosen[j]["role"] == "assistant"
        and rejected[j]["role"] == "assistant"):
      return chosen[:j], chosen[j:], rejected[j:]
  raise RecordError(
      NO_SHARED_PROMPT, ("chosen", "rejected"),
      f"share no prompt: their common prefix has {k} message(s) and is not followed by "
      "an assistant message in both. Implicit-prompt pairs are full conversations that "
      "agree up to an assistant turn; otherwise give the prompt explicitly in 'prompt' "
      "and only the responses in 'chosen' / 'rejected'")


def _parse_pairwise(obj, fmt, template):
  if "prompt" not in obj and isinstance(obj.get("chosen"), (list, tuple)):
    chosen = _messages(obj["chosen"], "chosen")
    rejected = _messages(_get(obj, "rejected", fmt), "rejected")
    _check_pair(chosen, rejected)
    pm, c, r = split_message_pair(chosen, rejected)
    _check_completion(c, "chosen", len(pm))
    _check_completion(r, "rejected", len(pm))
    prompt = _prompt({"prompt": list(pm)}, fmt, template)
    completions = (c, r)
  else:
    _get(obj, "prompt", fmt, hint="; or give 'chosen' and 'rejected' as full "
         "conversations (message lists) to use their shared prefix, or use format 'hh' "
         "for HH-RLHF texts")
    prompt = _prompt(obj, fmt, template)
    completions = tuple(_completion(_get(obj, f, fmt), f, prompt)
                        for f in ("chosen", "rejected"))
    _check_pair(*completions)
  texts = _render(template, prompt, completions, "chosen")
  return TextRecord("pair", prompt.text, texts, **_conversation(prompt, completions))


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


def _hh_conversation(prompt: str, completions: Sequence[str]) -> dict[str, Any]:
  """HH texts as messages; {} (text only) when a text does not start with a marker."""
  try:
    head = prompt[:-len(ASSISTANT_MARKER)]
    pm = tuple(parse_hh_messages(head)) if head else ()
    cm = tuple(tuple(parse_hh_messages(ASSISTANT_MARKER + c)) for c in completions)
  except ValueError:
    return {}
  return {"prompt_messages": pm, "completion_messages": cm}


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
  return TextRecord("pair", prompt, (c, r), **_hh_conversation(prompt, (c, r)))


def _parse_unpaired(obj, fmt, template):
  prompt = _prompt(obj, fmt, template)
  completion = _completion(_get(obj, "completion", fmt), "completion", prompt)
  label = _get(obj, "label", fmt)
  if not isinstance(label, bool):
    raise RecordError(WRONG_TYPE, "label",
                      f"must be a JSON boolean (true = desirable), got "
                      f"{type(label).__name__} ({_short(label)})")
  texts = _render(template, prompt, [completion], "completion")
  return TextRecord("unpaired", prompt.text, texts, label=label,
                    **_conversation(prompt, [completion]))


def _parse_ranked(obj, fmt, template):
  prompt = _prompt(obj, fmt, template)
  responses = _get(obj, "responses", fmt)
  scores = _get(obj, "scores", fmt)
  if not isinstance(responses, (list, tuple)):
    raise RecordError(WRONG_TYPE, "responses",
                      f"must be a list of strings or of message lists, got "
                      f"{type(responses).__name__}")
  if not isinstance(scores, (list, tuple)):
    raise RecordError(WRONG_TYPE, "scores",
                      f"must be a list of numbers, got {type(scores).__name__}")
  if len(responses) < 2:
    raise RecordError(TOO_FEW_RESPONSES, "responses",
                      f"has {len(responses)} response(s); ranking needs at least 2")
  if len(scores) != len(responses):
    raise RecordError(LENGTH_MISMATCH, "scores",
                      f"has {len(scores)} entries but 'responses' has {len(responses)}; "
                      "give one score per response")
  completions = [_completion(r, f"responses[{i}]", prompt) for i, r in enumerate(responses)]
  for i, s in enumerate(scores):
    if isinstance(s, bool) or not isinstance(s, (int, float)):
      raise RecordError(WRONG_TYPE, f"scores[{i}]",
                        f"must be a number, got {type(s).__name__} ({_short(s)})")
    if not math.isfinite(s):
      raise RecordError(NON_FINITE_SCORE, f"scores[{i}]", f"is {s}; scores must be finite")
  texts = _render(template, prompt, completions, "responses")
  return TextRecord("ranked", prompt.text, texts, scores=tuple(float(s) for s in scores),
                    **_conversation(prompt, completions))


def _parse_prompt(obj, fmt, template):
  prompt = _prompt(obj, fmt, template)
  if prompt.messages is None:
    _check_str(prompt.text, "prompt")
  elif not prompt.messages:
    raise RecordError(EMPTY_FIELD, "prompt", "is an empty message list")
  fields = {}
  for key, value in obj.items():
    if key == "prompt":
      continue
    try:  # A canonical deep copy; fails for values JSON cannot hold.
      fields[key] = json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
      raise RecordError(NOT_JSON_VALUE, str(key),
                        f"holds a {type(value).__name__} ({_short(value)}), which is not a "
                        "JSON value; extra fields of 'prompt' records must be JSON "
                        "(strings, numbers, booleans, null, lists, objects)") from e
  return TextRecord("prompt", prompt.text, (), prompt_messages=prompt.messages,
                    fields=FrozenFields(fields))


_PARSERS = {"sft": _parse_sft, "pairwise": _parse_pairwise, "hh": _parse_hh,
            "unpaired": _parse_unpaired, "ranked": _parse_ranked, "prompt": _parse_prompt}


def _check_format(fmt: str) -> None:
  if fmt not in _PARSERS:
    raise ValueError(f"unknown record format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _check_on_error(on_error: str) -> None:
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def parse_object(obj: Any, fmt: str, template: ChatTemplate | None = None, *,
                 margin_field: str = "") -> TextRecord:
  """One decoded JSON value -> TextRecord, or RecordError (reason, field, message).

  ``margin_field`` (pairwise / hh only; "" = none): a numeric field every record must
  carry, kept as ``TextRecord.margin`` (a reward model's preference margin).
  """
  _check_format(fmt)
  _check_margin_field(margin_field, fmt)
  if not isinstance(obj, dict):
    raise RecordError(NOT_AN_OBJECT, None,
                      f"is a JSON {_json_type(obj)}, but each line must be one JSON object "
                      "with the format's fields")
  record = _PARSERS[fmt](obj, fmt, template or ChatTemplate())
  if margin_field:
    record = dataclasses.replace(record, margin=_margin(obj, margin_field, fmt))
  return record


def _check_margin_field(margin_field: str, fmt: str) -> None:
  if margin_field and fmt not in ("pairwise", "hh"):
    raise ValueError(f"margin_field={margin_field!r}: a margin belongs to preference "
                     f"pairs (format 'pairwise' or 'hh'), not format {fmt!r}.")


def _margin(obj: Mapping[str, Any], field: str, fmt: str) -> float:
  """The record's margin: a finite JSON number."""
  value = _get(obj, field, fmt, hint=f" (the margin_field; give every pair a "
               f"number, 0 for no margin)")
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise RecordError(WRONG_TYPE, field, f"must be a number (the pair's margin), got "
                      f"{_json_type(value)} ({_short(value)})")
  if not math.isfinite(value):
    raise RecordError(NON_FINITE_SCORE, field, f"is {value}; a margin must be finite")
  return float(value)


# ------------------------------------------------------------------ files

def is_parquet(path: str | os.PathLike) -> bool:
  return os.fspath(path).endswith(".parquet")


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


def iter_parquet_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
  """(0-based row number, row as a dict of Python values) of a Parquet file.

  Reads a batch of rows at a time (never the whole file); struct columns become
  dicts and list columns lists, so ``list<struct<role, content>>`` message columns
  read as lists of ``{"role", "content"}`` dicts.
  """
  path = os.fspath(path)
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"reading {path} needs pyarrow: pip install pyarrow") from e
  try:
    f = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises OSError or ArrowInvalid.  # pylint: disable=broad-except
    raise ValueError(f"cannot open record file {path}: {e} (is it a Parquet file?)") from e
  row = 0
  with f:
    try:
      for batch in f.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for obj in batch.to_pylist():
          yield row, obj
          row += 1
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path}: cannot read past row {row}: {e}") from e


def _text_size(value: Any) -> int:
  """Characters of text in a decoded row (for the max_record_chars limit)."""
  if isinstance(value, str):
    return len(value)
  if isinstance(value, Mapping):
    return sum(len(str(k)) + _text_size(v) for k, v in value.items())
  if isinstance(value, (list, tuple)):
    return sum(_text_size(v) for v in value)
  return 8


def _iter_objects(path: str, report: DataReport, max_record_chars: int
                  ) -> Iterator[tuple[str, Any]]:
  """(location, decoded object or the RecordError it raised) of each non-blank record."""
  if is_parquet(path):
    for row, obj in iter_parquet_rows(path):
      report.lines += 1
      where = f"{path}:row {row}"
      if _text_size(obj) > max_record_chars:
        yield where, RecordError(RECORD_TOO_LONG, None,
                                 f"holds over {max_record_chars} characters of text "
                                 "(max_record_chars); split or remove it, or raise the limit")
      else:
        yield where, obj
    return
  for lineno, raw in iter_lines(path):
    report.lines += 1
    if not raw.strip():
      report.blank_lines += 1  # Blank lines (e.g. a trailing newline) hold no record.
      continue
    yield f"{path}:{lineno}", _decode_line(raw, max_record_chars)


def _decode_line(raw: bytes, max_record_chars: int) -> Any:
  if len(raw) > max_record_chars * 4:
    return RecordError(RECORD_TOO_LONG, None, f"is {len(raw)} bytes long")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return RecordError(INVALID_UTF8, None,
                       f"is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                       "re-encode the file as UTF-8")
  if len(text) > max_record_chars:
    return RecordError(RECORD_TOO_LONG, None,
                       f"is {len(text)} characters, over max_record_chars="
                       f"{max_record_chars}; split or remove it, or raise the limit")
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    return RecordError(MALFORMED_JSON, None,
                       f"is not valid JSON ({e.msg} at column {e.colno}); each line "
                       "must be one complete JSON object")


def iter_text_records(path: str | os.PathLike, fmt: str, *, on_error: OnError = "raise",
                      report: DataReport | None = None, template: ChatTemplate | None = None,
                      max_record_chars: int = DEFAULT_MAX_RECORD_CHARS,
                      margin_field: str = "") -> Iterator[TextRecord]:
  """Validated text records of one file (.jsonl, .jsonl.gz or .parquet).

  Bad records raise (``RecordError``, naming file, line or row, and field) or are
  counted in ``report``, as ``on_error`` says. ``margin_field``: see `parse_object`.
  """
  _check_format(fmt)
  _check_on_error(on_error)
  _check_margin_field(margin_field, fmt)
  path = os.fspath(path)
  report = report if report is not None else DataReport()
  template = template or ChatTemplate()
  for where, obj in _iter_objects(path, report, max_record_chars):
    try:
      if isinstance(obj, RecordError):
        raise obj
      record = parse_object(obj, fmt, template, margin_field=margin_field)
    except RecordError as e:
      message = f"{_where(where, e.field)} {e.detail} [reason: {e.reason}]"
      if on_error == "raise":
        raise RecordError(e.reason, e.field, message) from e
      report.add_error(e.reason, message)
      continue
    report.records += 1
    yield dataclasses.replace(record, source=where)


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


class EncodedRecord(NamedTuple):
  """Untruncated int32 ids of one record.

  ``loss_masks``: None (every completion token is scored), or one entry per
  completion: None or a bool array of its length (True = scored; SFT conversations
  tokenized by a chat template).
  """

  prompt: np.ndarray
  completions: list[np.ndarray]
  loss_masks: list[np.ndarray | None] | None = None


def uses_chat_template(record: TextRecord, tokenizer: Any) -> bool:
  """True when ``encode_record`` lets the tokenizer's own chat template render it."""
  return record.prompt_messages is not None and bool(getattr(tokenizer, "chat_template", None))


def _ids(x: Any) -> np.ndarray:
  return np.asarray(x, dtype=np.int32).reshape(-1)


def _encode_text(record: TextRecord, tokenizer: Tokenizer,
                 template: ChatTemplate) -> EncodedRecord:
  bos = getattr(tokenizer, "bos_id", None)
  eos = getattr(tokenizer, "eos_id", None)
  add_bos = template.add_bos and bool(getattr(tokenizer, "add_bos", True)) and bos is not None
  add_eos = template.add_eos and eos is not None
  prompt = _ids(tokenizer.encode(record.prompt))
  if add_bos:
    prompt = np.concatenate([np.asarray([bos], np.int32), prompt])
  completions = []
  for text in record.completions:
    c = _ids(tokenizer.encode(text))
    if add_eos:
      c = np.concatenate([c, np.asarray([eos], np.int32)])
    completions.append(c)
  return EncodedRecord(prompt, completions)


def _encode_chat(record: TextRecord, tokenizer: Any) -> EncodedRecord:
  prompt_msgs = [dict(m) for m in record.prompt_messages or ()]
  comps = [[dict(m) for m in c] for c in record.completion_messages or ()]
  where = record.source or "record"
  if record.kind == "sft" and len(comps[0]) > 1:
    # Multi-turn: the template renders the whole conversation and marks every
    # assistant turn; the completion starts at the first assistant token after the
    # prompt, and only assistant tokens are scored.
    ids, mask = tokenizer.encode_chat(prompt_msgs + comps[0], assistant_turns="all")
    ids = _ids(ids)
    mask = np.asarray(mask, bool).reshape(-1)
    if mask.shape != ids.shape:
      raise ValueError(f"{where}: the tokenizer's encode_chat returned {ids.size} ids but "
                       f"a mask of {mask.size}")
    start = 0
    if any(m["role"] == "assistant" for m in prompt_msgs):
      start = len(_ids(tokenizer.encode_chat_split(prompt_msgs, comps)[0]))
    scored = np.flatnonzero(mask[start:])
    if not scored.size:
      raise ValueError(
          f"{where}: the tokenizer's chat template marked no assistant token in the "
          "completion, so nothing would be learned; check that the template marks "
          "assistant turns ({% generation %} blocks) or use prompt/completion records")
    cut = start + int(scored[0])
    loss_mask = mask[cut:]
    return EncodedRecord(ids[:cut], [ids[cut:]], [None if loss_mask.all() else loss_mask])
  prompt, completions = tokenizer.encode_chat_split(prompt_msgs, comps)
  completions = [_ids(c) for c in completions]
  if len(completions) != len(comps):
    raise ValueError(f"{where}: the tokenizer's encode_chat_split returned "
                     f"{len(completions)} completions for {len(comps)}")
  return EncodedRecord(_ids(prompt), completions)


def encode_record(record: TextRecord, tokenizer: Tokenizer,
                  template: ChatTemplate | None = None) -> EncodedRecord:
  """Untruncated int32 ids: (prompt, [completion, ...], loss masks or None).

  A conversational record and a tokenizer with a chat template: the tokenizer renders
  the conversation (``encode_chat_split``; multi-turn SFT: ``encode_chat`` with a loss
  mask). Otherwise the record's text: prompt (with BOS unless ``template.add_bos`` or
  ``tokenizer.add_bos`` is false), each completion (with EOS unless
  ``template.add_eos`` is false), tokenized separately.
  """
  if uses_chat_template(record, tokenizer):
    return _encode_chat(record, tokenizer)
  return _encode_text(record, tokenizer, template or ChatTemplate())


def truncate_encoded(record: TextRecord, prompt: np.ndarray, completions: Sequence[np.ndarray],
                     truncation: Truncation, *, bos_id: int | None,
                     report: DataReport | None = None,
                     loss_masks: Sequence[np.ndarray | None] | None = None) -> Example | None:
  """Applies ``truncation`` to encoded ids; the typed example, or None if dropped.

  ``loss_masks`` (from ``EncodedRecord``) are cut with their completions; a
  completion left with no scored token counts as COMPLETION_TRUNCATED_AWAY.
  """
  prompt, completions, outcomes = truncate(prompt, completions, truncation, bos_id=bos_id)
  masks = None
  if loss_masks is not None:
    masks = [None if m is None else np.asarray(m, bool)[:len(c)]
             for m, c in zip(loss_masks, completions)]
    if any(m is not None and len(m) and not m.any() for m in masks):
      outcomes.add(COMPLETION_TRUNCATED_AWAY)
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
  return make_example(record, prompt, completions, loss_masks=masks)


def tokenize_record(record: TextRecord, tokenizer: Tokenizer, *,
                    truncation: Truncation = Truncation(),
                    template: ChatTemplate | None = None,
                    report: DataReport | None = None) -> Example | None:
  """TextRecord -> typed example, or None when truncation dropped it (counted)."""
  enc = encode_record(record, tokenizer, template)
  # A kept leading BOS only where the tokenizer prepends one: ChatML checkpoints name
  # <|im_start|> their bos, and keeping it would glue it to a cut turn.
  bos = getattr(tokenizer, "bos_id", None) if getattr(tokenizer, "add_bos", True) else None
  return truncate_encoded(record, enc.prompt, enc.completions, truncation,
                          bos_id=bos, report=report, loss_masks=enc.loss_masks)


def make_example(record: TextRecord, prompt: np.ndarray, completions: Sequence[np.ndarray],
                 *, loss_masks: Sequence[np.ndarray | None] | None = None) -> Example:
  if record.kind == "sft":
    mask = loss_masks[0] if loss_masks else None
    if mask is not None and mask.all():
      mask = None
    return SFTExample(prompt=prompt, completion=completions[0], loss_mask=mask)
  if record.kind == "pair":
    return PairExample(prompt=prompt, chosen=completions[0], rejected=completions[1],
                       margin=record.margin)
  if record.kind == "unpaired":
    return UnpairedExample(prompt=prompt, completion=completions[0], label=bool(record.label))
  if record.kind == "ranked":
    return RankedExample(prompt=prompt, responses=tuple(completions),
                         scores=np.asarray(record.scores, np.float32))
  if record.kind == "prompt":
    return PromptExample(prompt=prompt, fields=record.fields)
  raise ValueError(f"unknown record kind {record.kind!r} in {record.source or 'record'}")


def load_examples(paths: str | os.PathLike | Iterable[str | os.PathLike], fmt: str,
                  tokenizer: Tokenizer, *, on_error: OnError = "raise",
                  truncation: Truncation = Truncation(), report: DataReport | None = None,
                  template: ChatTemplate | None = None,
                  max_record_chars: int = DEFAULT_MAX_RECORD_CHARS,
                  margin_field: str = "") -> list[Example]:
  """Parses, validates, tokenizes and truncates record files into typed examples.

  ``margin_field``: read each pair's margin from this field (`parse_object`)."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  report = report if report is not None else DataReport()
  template = template or ChatTemplate()
  out: list[Example] = []
  for path in paths:
    for record in iter_text_records(path, fmt, on_error=on_error, report=report,
                                    template=template, max_record_chars=max_record_chars,
                                    margin_field=margin_field):
      ex = tokenize_record(record, tokenizer, truncation=truncation, template=template,
                           report=report)
      if ex is not None:
        out.append(ex)
  return out
