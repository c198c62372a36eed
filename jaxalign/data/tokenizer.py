"""Tokenizers with an exact round trip, and the chat template that marks completions.

Two tokenizers share one small interface (``Tokenizer``):

* ``SentencePieceTokenizer``: wraps a SentencePiece model, loaded from a file or
  trained here from text files / an iterator of strings. Training uses the identity
  normaliser, keeps repeated whitespace, makes ``"\\n"`` a user-defined symbol and turns
  on byte fallback, so ``decode(encode(x)) == x`` for any string (the default
  SentencePiece normaliser silently rewrites whitespace). ``add_dummy_prefix`` is off,
  so encoding two strings separately and concatenating the ids decodes to the
  concatenated strings: prompts and completions are tokenized separately. One known
  exception: a literal U+2581 (SentencePiece's whitespace meta symbol "▁") in the input
  decodes as a space (none occurs in the HH-RLHF files; the byte tokenizer is exact).
* ``ByteTokenizer``: UTF-8 bytes shifted by the special ids; no training, vocab 259.

Special ids are fixed for both: pad = 0 (batches pad with 0), unk = 1, bos = 2, eos = 3.

``ChatTemplate`` renders conversations (the HH-RLHF ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
form, or a generic list of ``{"role", "content"}`` messages) and returns token ids plus
a boolean mask that is True exactly on the final assistant completion (and its EOS).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import numpy as np
import sentencepiece as spm

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

HUMAN_MARKER = "\n\nHuman:"
ASSISTANT_MARKER = "\n\nAssistant:"


class Tokenizer(Protocol):
  """What parsers, the pipeline and the CLI need from a tokenizer."""

  pad_id: int
  bos_id: int
  eos_id: int

  @property
  def vocab_size(self) -> int:
    ...

  def encode(self, text: str) -> np.ndarray:
    """Token ids (int32, no BOS/EOS) with ``decode(encode(text)) == text``."""
    ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ...


def _as_int_list(ids: Sequence[int] | np.ndarray) -> list[int]:
  return [int(i) for i in np.asarray(ids).reshape(-1)]


class SentencePieceTokenizer:
  """A SentencePiece model with fixed special ids (pad 0, unk 1, bos 2, eos 3)."""

  pad_id = PAD_ID
  unk_id = UNK_ID
  bos_id = BOS_ID
  eos_id = EOS_ID

  def __init__(self, model_proto: bytes, *, source: str = "<in memory>"):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self._source = source
    expected = {"pad": (self._sp.pad_id(), PAD_ID), "unk": (self._sp.unk_id(), UNK_ID),
                "bos": (self._sp.bos_id(), BOS_ID), "eos": (self._sp.eos_id(), EOS_ID)}
    for name, (got, want) in expected.items():
      if got != want:
        raise ValueError(
            f"SentencePiece model {source}: {name}_id is {got}, but jaxalign needs "
            f"{name}_id={want} (batches pad with 0). Retrain with "
            "SentencePieceTokenizer.train(...) or pass pad_id=0, unk_id=1, bos_id=2, "
            "eos_id=3 to SentencePieceTrainer.")

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
    path = os.fspath(path)
    try:
      with open(path, "rb") as f:
        proto = f.read()
    except OSError as e:
      raise ValueError(f"Cannot read SentencePiece model file {path}: {e}. Pass the "
                       "path of a .model file written by SentencePiece.") from e
    try:
      return cls(proto, source=path)
    except RuntimeError as e:
      raise ValueError(f"{path} is not a valid SentencePiece model ({e}).") from e

  @classmethod
  def train(cls, texts: Iterable[str] | None = None, *,
            files: Sequence[str | os.PathLike] = (), vocab_size: int = 8000,
            model_type: str = "bpe", user_defined_symbols: Sequence[str] = (),
            max_sentence_length: int = 1 << 16, input_sentence_size: int = 0,
            num_threads: int = 1) -> "SentencePieceTokenizer":
    """Trains a round-trip-exact model from strings and/or text files.

    ``vocab_size`` must exceed 256 byte pieces + 4 specials + user symbols; when the
    text is too small to fill the vocabulary the model is smaller (hard limit off).
    """
    n_reserved = 256 + 4 + 1 + len(user_defined_symbols)
    if vocab_size <= n_reserved:
      raise ValueError(
          f"vocab_size={vocab_size} is too small: byte fallback needs 256 byte pieces "
          f"plus {n_reserved - 256} special/user symbols; use vocab_size > {n_reserved}.")

    def sentences() -> Iterator[str]:
      if texts is not None:
        yield from texts
      for path in files:
        with open(path, encoding="utf-8") as f:
          yield from f.read().splitlines(keepends=True)

    writer = io.BytesIO()
    symbols = ["\n"] + [s for s in user_defined_symbols if s != "\n"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=(s for s in sentences() if s),
        model_writer=writer,
        vocab_size=vocab_size,
        model_type=model_type,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=False,
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=symbols,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        hard_vocab_limit=False,
        max_sentence_length=max_sentence_length,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=num_threads,
        minloglevel=2,
    )
    return cls(writer.getvalue(), source="<trained>")

  def save(self, path: str | os.PathLike) -> None:
    with open(path, "wb") as f:
      f.write(self._proto)

  @property
  def model_proto(self) -> bytes:
    return self._proto

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts))]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._sp.decode(_as_int_list(ids))

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


class ByteTokenizer:
  """UTF-8 bytes as tokens: id = byte + 4; ids 0..3 are pad, unk, bos, eos."""

  pad_id = PAD_ID
  unk_id = UNK_ID
  bos_id = BOS_ID
  eos_id = EOS_ID
  _OFFSET = 4

  @property
  def vocab_size(self) -> int:
    return 256 + self._OFFSET

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self._OFFSET

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    arr = arr[arr >= self._OFFSET] - self._OFFSET
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# ------------------------------------------------------------------ chat template

_ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant",
                 "gpt": "assistant", "system": "system"}


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """Renders role/content messages as text in the HH-RLHF style.

  ``user`` turns render as ``"\\n\\nHuman: " + content``, ``assistant`` turns as
  ``"\\n\\nAssistant: " + content``, ``system`` as ``system_prefix + content`` at the
  start. The prompt ends with the final assistant marker; the completion is the final
  assistant turn's text (with its leading separator space), so prompt + completion
  reproduces the rendered conversation exactly.
  """

  user_prefix: str = HUMAN_MARKER + " "
  assistant_prefix: str = ASSISTANT_MARKER + " "
  system_prefix: str = ""
  add_bos: bool = True
  add_eos: bool = True

  def split_messages(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, str]:
    """(prompt text, completion text) for a conversation ending with an assistant turn.

    Raises ValueError (naming the message index and field) for malformed messages.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
      raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    parts: list[str] = []
    roles: list[str] = []
    for i, m in enumerate(messages):
      if not isinstance(m, Mapping):
        raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', "
                         f"got {type(m).__name__}")
      role, content = m.get("role"), m.get("content")
      if not isinstance(role, str) or role.lower() not in _ROLE_ALIASES:
        raise ValueError(f"messages[{i}].role must be one of "
                         f"{sorted(_ROLE_ALIASES)}, got {role!r}")
      if not isinstance(content, str):
        raise ValueError(f"messages[{i}].content must be a string, got "
                         f"{type(content).__name__}")
      role = _ROLE_ALIASES[role.lower()]
      if role == "system" and i != 0:
        raise ValueError(f"messages[{i}]: a system message may only come first")
      roles.append(role)
      parts.append({"user": self.user_prefix, "assistant": self.assistant_prefix,
                    "system": self.system_prefix}[role] + content)
    if roles[-1] != "assistant":
      raise ValueError(f"messages[{len(messages) - 1}].role must be 'assistant' (the "
                       "completion to score), got " + repr(messages[-1].get("role")))
    sep = self.assistant_prefix.rstrip(" ")
    last = parts[-1]
    prompt = "".join(parts[:-1]) + sep
    return prompt, last[len(sep):]

  @property
  def completion_separator(self) -> str:
    """What follows the assistant marker before the content (" " for HH)."""
    prefix = self.assistant_prefix
    return prefix[len(prefix.rstrip(" ")):]

  def render_prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
    """Text of a conversation ending with a user turn, plus the assistant marker."""
    prompt, _ = self.split_messages(list(messages) + [{"role": "assistant", "content": ""}])
    return prompt

  def encode_split(self, tokenizer: Tokenizer, prompt: str,
                   completion: str) -> tuple[np.ndarray, np.ndarray]:
    """Prompt ids (with BOS) and completion ids (with EOS), encoded separately."""
    p = tokenizer.encode(prompt)
    c = tokenizer.encode(completion)
    if self.add_bos:
      p = np.concatenate([np.asarray([tokenizer.bos_id], np.int32), p])
    if self.add_eos:
      c = np.concatenate([c, np.asarray([tokenizer.eos_id], np.int32)])
    return p.astype(np.int32), c.astype(np.int32)

  def encode(self, tokenizer: Tokenizer,
             conversation: str | Sequence[Mapping[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and a completion mask for a conversation.

    ``conversation`` is either HH-RLHF text (the completion is everything after the
    last ``"\\n\\nAssistant:"``) or a list of messages ending with an assistant turn.
    Returns ``(ids [T] int32, completion_mask [T] bool)``.
    """
    if isinstance(conversation, str):
      prompt, completion = split_hh_conversation(conversation)
    else:
      prompt, completion = self.split_messages(conversation)
    p, c = self.encode_split(tokenizer, prompt, completion)
    ids = np.concatenate([p, c]).astype(np.int32)
    mask = np.concatenate([np.zeros(len(p), bool), np.ones(len(c), bool)])
    return ids, mask


def split_hh_conversation(text: str) -> tuple[str, str]:
  """HH-RLHF text -> (prompt up to and including the last Assistant marker, completion)."""
  idx = text.rfind(ASSISTANT_MARKER)
  if idx < 0:
    raise ValueError(f"conversation has no {ASSISTANT_MARKER!r} turn; HH-RLHF text looks "
                     "like '\\n\\nHuman: ...\\n\\nAssistant: ...'")
  cut = idx + len(ASSISTANT_MARKER)
  return text[:cut], text[cut:]


def parse_hh_messages(text: str) -> list[dict[str, str]]:
  """HH-RLHF text -> role/content messages (content without the marker's space)."""
  messages: list[dict[str, str]] = []
  pos = 0
  markers = ((HUMAN_MARKER, "user"), (ASSISTANT_MARKER, "assistant"))
  if not any(text.startswith(m) for m, _ in markers):
    raise ValueError("HH-RLHF text must start with '\\n\\nHuman:' or '\\n\\nAssistant:'")
  while pos < len(text):
    marker, role = next((m, r) for m, r in markers if text.startswith(m, pos))
    start = pos + len(marker)
    nexts = [i for i in (text.find(HUMAN_MARKER, start), text.find(ASSISTANT_MARKER, start))
             if i >= 0]
    end = min(nexts) if nexts else len(text)
    content = text[start:end]
    messages.append({"role": role, "content": content[1:] if content.startswith(" ")
                     else content})
    pos = end
  return messages


def from_pretrained(path: str | os.PathLike):
  """A checkpoint directory's own tokenizer and chat template (``tokenizer.json`` or
  ``tokenizer.model``); see `jaxalign.data.hf_tokenizer`."""
  from jaxalign.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
  return hf_tokenizer.from_pretrained(path)
