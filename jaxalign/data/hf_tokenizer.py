"""A checkpoint's own tokenizer and chat template, without transformers at run time.

``from_pretrained(dir)`` reads what a Hugging Face checkpoint directory ships:

* ``tokenizer.json`` (BPE / Unigram / WordPiece, through the ``tokenizers`` library), or
  a SentencePiece ``tokenizer.model`` (Llama 2, Gemma 1) when there is no
  ``tokenizer.json``; the checkpoint's real special ids are kept (jaxalign's own
  SentencePiece models fix them at 0..3; a checkpoint's are whatever it trained with);
* special tokens from ``tokenizer_config.json`` / ``special_tokens_map.json`` (strings
  or ``{"content": ...}`` objects) and ids from ``generation_config.json``: ``eos_ids``
  holds every id generation stops on (Llama 3 Instruct: end-of-turn and end-of-text);
* the chat template (``chat_template.jinja`` or the ``chat_template`` field; a named
  list picks ``default``), rendered with jinja2 the way transformers'
  ``apply_chat_template`` does (sandboxed, ``trim_blocks``/``lstrip_blocks``, loop
  controls, its ``tojson``, ``raise_exception``, ``strftime_now``, and the special
  tokens as variables), and tokenised without adding special tokens.

Pad: the checkpoint's pad token, else its eos. A batch marks padding with
``segment_ids == 0``, so the pad id is never attended to or scored; it only fills.

Conversations are tokenised whole, because BPE merges across any boundary one might cut
the text at. Masks come from prefixes: the rendering of the turns before an assistant
turn (with the generation prompt) must be a string prefix of the whole rendering (a
template that rewrites earlier turns gets a ValueError naming the turn), and the
turn's tokens start where that prefix's tokens stop agreeing with the whole
conversation's (a token BPE merged across the boundary, e.g. a reply starting with
spaces after a newline, goes with the reply, as in transformers' character-span
masks). For ChatML the scored completion is
``content<|im_end|>\\n``: it includes the end-of-turn token the model must learn to
emit (and the newline the template writes after it).
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read it as JSON ({e}); restore the file from the "
                     "checkpoint.") from None


def _content(value: Any) -> str | None:
  if isinstance(value, Mapping):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
  if value is None:
    return []
  return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def compile_template(template: str):
  """The jinja2 template, in transformers' sandbox with its globals and filters."""
  import jinja2  # pylint: disable=g-import-not-at-top
  import jinja2.ext  # pylint: disable=g-import-not-at-top
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=g-import-not-at-top

  class _Generation(jinja2.ext.Extension):
    # Templates may wrap assistant text in {% generation %} for transformers' masks;
    # rendering only needs the body.
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


class HFTokenizer:
  """A checkpoint's tokenizer: ``encode`` / ``decode`` plus its chat template."""

  def __init__(self, backend: Any, *, specials: Mapping[str, str | None],
               eos_ids: Sequence[int], chat_template: str | None, add_bos: bool,
               source: str, files: Sequence[str] = ()):
    self._backend = backend
    self.source = source
    self.files = tuple(files)  # what fingerprint_tokenizer hashes
    self.special_tokens = {k: v for k, v in specials.items() if v is not None}
    self.chat_template = chat_template
    self._compiled = None
    ids = {k: self._id_of(v) for k, v in self.special_tokens.items()}
    self.bos_id = ids.get("bos_token")
    self.unk_id = ids.get("unk_token")
    eos = ids.get("eos_token")
    eos_all = [eos] if eos is not None else []
    eos_all += [i for i in eos_ids if i not in eos_all]
    if not eos_all:
      raise ValueError(f"{source}: the checkpoint names no eos token (tokenizer_config."
                       "json eos_token or generation_config.json eos_token_id); add one.")
    self.eos_id = eos_all[0]
    self.eos_ids = tuple(eos_all)
    pad = ids.get("pad_token")
    self.pad_id = pad if pad is not None else self.eos_id
    self.add_bos = bool(add_bos and self.bos_id is not None)

  def _id_of(self, token: str) -> int | None:
    return self._backend.token_to_id(token)

  @property
  def vocab_size(self) -> int:
    return self._backend.vocab_size

  def encode(self, text: str) -> np.ndarray:
    """Ids of ``text`` with no special tokens added (``add_special_tokens=False``)."""
    return np.asarray(self._backend.encode(text), np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
    return self._backend.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                skip_special_tokens)

  # ------------------------------------------------------------------ chat template

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                          add_generation_prompt: bool = False, **kwargs) -> str:
    """The template's text for ``messages`` (what transformers renders)."""
    if not self.chat_template:
      raise ValueError(f"{self.source}: the checkpoint has no chat template "
                       "(chat_template.jinja or tokenizer_config.json chat_template); "
                       "use string prompts/completions or add a template.")
    import jinja2  # pylint: disable=g-import-not-at-top
    if self._compiled is None:
      self._compiled = compile_template(self.chat_template)
    messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    try:
      return self._compiled.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt,
                                   **{**self.special_tokens, **kwargs})
    except jinja2.exceptions.TemplateError as e:
      raise ValueError(f"{self.source}: the chat template refused the conversation: "
                       f"{e}") from None

  def _ids(self, messages, add_generation_prompt=False) -> np.ndarray:
    return self.encode(self.apply_chat_template(messages,
                                                add_generation_prompt=add_generation_prompt))

  def _boundary(self, head: list, whole_text: str, whole_ids: np.ndarray, turn: int,
                add_generation_prompt: bool) -> int:
    """Token index in ``whole_ids`` where the rendering of ``head`` ends.

    The template must render ``head`` as a string prefix of the whole conversation
    (else it rewrites earlier turns: an error naming the turn). Tokens then agree up to
    the boundary, except where BPE merges the text on both sides of it (a reply that
    starts with spaces after a newline); the merged token belongs to what follows, as
    in transformers' character-span masks.
    """
    text = self.apply_chat_template(head, add_generation_prompt=add_generation_prompt)
    if not whole_text.startswith(text):
      raise ValueError(
          f"{self.source}: the chat template renders messages[:{len(head)}] differently "
          f"once later messages follow (it rewrites earlier turns), so the tokens of "
          f"assistant message {turn} cannot be told apart; use a template that renders "
          "earlier turns unchanged, or score only the final turn.")
    ids = self.encode(text)
    n = min(len(ids), len(whole_ids))
    diff = np.flatnonzero(ids[:n] != whole_ids[:n])
    return int(diff[0]) if diff.size else n

  def encode_chat(self, messages: Sequence[Mapping[str, Any]], *,
                  assistant_turns: str = "final") -> tuple[np.ndarray, np.ndarray]:
    """``(ids [T], mask [T])``: mask True on the final (or every) assistant turn."""
    if assistant_turns not in ("final", "all"):
      raise ValueError(f"assistant_turns must be 'final' or 'all', got {assistant_turns!r}")
    messages = list(messages)
    text = self.apply_chat_template(messages)
    ids = self.encode(text)
    mask = np.zeros(len(ids), bool)
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if assistant_turns == "final":
      turns = turns[-1:]
    for i in turns:
      start = self._boundary(messages[:i], text, ids, i, True)
      end = (len(ids) if i == len(messages) - 1
             else self._boundary(messages[:i + 1], text, ids, i, False))
      mask[start:end] = True
    return ids, mask

  def encode_chat_split(self, prompt_messages: Sequence[Mapping[str, Any]],
                        completions: Sequence[Sequence[Mapping[str, Any]]]
                        ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Prompt ids and, per completion, the rest of the ids of the whole conversation
    ``prompt_messages + completion``; ``prompt + completion_i`` is exactly the whole
    conversation's tokenisation. The prompt is the longest token prefix that every
    completion's conversation shares (the generation prompt's tokens, minus any that
    BPE merged with a completion's first characters)."""
    prompt_messages = list(prompt_messages)
    n = len(prompt_messages)
    if not completions:
      return self._ids(prompt_messages, add_generation_prompt=True), []
    wholes, cut = [], None
    for completion in completions:
      messages = prompt_messages + list(completion)
      text = self.apply_chat_template(messages)
      ids = self.encode(text)
      k = self._boundary(prompt_messages, text, ids, n, True)
      cut = k if cut is None else min(cut, k)
      wholes.append(ids)
    prompt = wholes[0][:cut]
    for ids in wholes[1:]:
      if not np.array_equal(ids[:cut], prompt):
        raise ValueError(f"{self.source}: the completions' conversations do not share "
                         f"the prompt's tokens (message {n}); the chat template renders "
                         "the prompt differently per completion.")
    return prompt, [ids[cut:] for ids in wholes]


# ---------------------------------------------------------------------- backends


class _TokenizersBackend:
  def __init__(self, path: str):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    try:
      self._tok = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on bad files
      raise ValueError(f"{path}: not a tokenizers tokenizer.json ({e}).") from None
    self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_specials(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=True).ids

  def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class _SentencePieceBackend:
  def __init__(self, path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    try:
      self._sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{path}: not a SentencePiece model ({e}).") from None
    self.vocab_size = self._sp.get_piece_size()

  def token_to_id(self, token: str) -> int | None:
    i = self._sp.piece_to_id(token)
    return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else int(i)

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def encode_with_specials(self, text: str) -> list[int]:
    bos = self._sp.bos_id()
    return ([bos] if bos >= 0 else []) + self.encode(text)

  def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    del skip_special_tokens  # SentencePiece never decodes control pieces to text
    return self._sp.decode(ids)


def _chat_template(path: str, config: Mapping[str, Any]) -> str | None:
  jinja_file = os.path.join(path, "chat_template.jinja")
  if os.path.exists(jinja_file):
    with open(jinja_file, encoding="utf-8") as f:
      return f.read()
  template = config.get("chat_template")
  if isinstance(template, list):  # named templates: [{"name", "template"}, ...]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    template = named.get("default")
  return template if isinstance(template, str) else None


def from_pretrained(path: str | os.PathLike) -> HFTokenizer:
  """The tokenizer and chat template of the checkpoint directory ``path``."""
  path = os.fspath(path)
  tok_json = os.path.join(path, "tokenizer.json")
  sp_model = os.path.join(path, "tokenizer.model")
  if os.path.exists(tok_json):
    backend, files = _TokenizersBackend(tok_json), [tok_json]
  elif os.path.exists(sp_model):
    backend, files = _SentencePieceBackend(sp_model), [sp_model]
  else:
    raise ValueError(f"{path}: no tokenizer.json or tokenizer.model; a checkpoint "
                     "directory ships one of them (copy it from the original release).")
  config = _read_json(os.path.join(path, "tokenizer_config.json"))
  special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
  gen = _read_json(os.path.join(path, "generation_config.json"))
  specials = {name: _content(config.get(name)) or _content(special_map.get(name))
              for name in _SPECIAL_NAMES}
  if specials["bos_token"] is None and gen.get("bos_token_id") is not None:
    specials["bos_token"] = _token_of(backend, int(gen["bos_token_id"]))
  template = _chat_template(path, config)
  if "add_bos_token" in config:
    add_bos = bool(config["add_bos_token"])
  else:  # What the post-processor does to plain text (Llama 3 prepends BOS).
    bos = backend.token_to_id(specials["bos_token"]) if specials["bos_token"] else None
    with_specials = backend.encode_with_specials("a")
    add_bos = bos is not None and bool(with_specials) and with_specials[0] == bos
  files += [os.path.join(path, n) for n in ("tokenizer_config.json", "chat_template.jinja",
                                            "special_tokens_map.json",
                                            "generation_config.json")
            if os.path.exists(os.path.join(path, n))]
  return HFTokenizer(backend, specials=specials, eos_ids=_ids(gen.get("eos_token_id")),
                     chat_template=template, add_bos=add_bos, source=path, files=files)


def _token_of(backend: Any, i: int) -> str | None:
  tok = getattr(backend, "_tok", None)
  if tok is not None:
    return tok.id_to_token(i)
  return backend._sp.id_to_piece(i)  # pylint: disable=protected-access
