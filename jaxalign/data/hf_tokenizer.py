"""A checkpoint's own tokenizer and chat template, without transformers at run time.

``from_pretrained(dir)`` reads what a Hugging Face checkpoint directory ships:

* ``tokenizer.json`` (BPE / Unigram / WordPiece, through the ``tokenizers`` library), or
  a SentencePiece ``tokenizer.model`` (Llama 2, Gemma 1) when there is no
  ``tokenizer.json``; the checkpoint's real special ids are kept (jaxalign's own
  SentencePiece models fix them at 0..3; a checkpoint's are whatever it trained with);
* special tokens from ``tokenizer_config.json`` / ``special_tokens_map.json`` (strings
  or ``{"content": ...}`` objects; the map overrides the config unless the config has
  ``added_tokens_decoder``, as transformers 5 reads them) and ids from
  ``generation_config.json``: ``eos_ids`` holds every id generation stops on (Llama 3
  Instruct: end-of-turn and end-of-text), ``eos_id`` is the tokenizer's own eos;
* the chat template (``chat_template.jinja``, else the ``chat_template`` field; a named
  list picks ``default``), rendered with jinja2 the way transformers 5.2x's
  ``apply_chat_template`` does (sandboxed, ``trim_blocks``/``lstrip_blocks``, loop
  controls, its ``tojson``, ``raise_exception``, ``strftime_now``, messages without
  None-valued keys and with reasoning under all its names, every ``*_token`` as a
  variable), and tokenised without adding special tokens (transformers calls the
  tokenizer with ``add_special_tokens=False`` on the rendering).

Pad: the checkpoint's pad token, else ``generation_config.json``'s ``pad_token_id``,
else its eos. A batch marks padding with ``segment_ids == 0``, so the pad id is never
attended to or scored; it only fills rows (and the sampler's finished rows).

Conversations are tokenised whole, because BPE merges across any boundary one might cut
the text at. Masks come from prefixes: the rendering of the turns before an assistant
turn (with the generation prompt) must be a string prefix of the whole rendering (a
template that rewrites earlier turns gets a ValueError naming the turn), and the
turn's tokens start where that prefix's tokens stop agreeing with the whole
conversation's. Usually the prefix's tokens are all a prefix of the whole's and the
turn starts right after them; where BPE merged the text on both sides of the boundary
(a reply that starts with spaces after the template's newline) the merged token goes
with the reply, as in transformers' ``{% generation %}`` character-span masks. A turn
ends where the rendering of the conversation up to it ends, so it holds the
end-of-turn token the template writes after a reply, which the model must learn to
emit: ChatML ``content<|im_end|>\\n``, Llama 3 ``content<|eot_id|>``, Llama 2
`` content </s>``.

Not reproduced: special tokens a config names but the vocabulary lacks (transformers
appends them as new ids; here they have no id), added tokens a config lists that
``tokenizer.json`` lacks, ``lstrip``/``rstrip`` of added tokens in the SentencePiece
path, ``sanitize_control_tokens`` (off by default in transformers),
``continue_final_message``, and ``clean_up_tokenization_spaces`` in ``decode``
(transformers 5 skips it for BPE models).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Names a message's reasoning arrives under; templates read the first (Qwen3) or
# ``thinking`` (gpt-oss), so transformers fills all of them from whichever is given.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# ---------------------------------------------------------------------- config files


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read it as JSON ({e}); restore the file from the "
                     "checkpoint's original release.") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}; "
                     "restore the file from the checkpoint's original release.")
  return value


def _content(value: Any) -> str | None:
  """A token given as a string or as an AddedToken object ``{"content": ...}``."""
  if isinstance(value, Mapping):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
  if value is None:
    return []
  return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def special_tokens(config: Mapping[str, Any], special_map: Mapping[str, Any]
                   ) -> dict[str, str]:
  """Named special tokens: ``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``, ...
  and a config's model-specific ``*_token`` keys (e.g. ``image_token``), all of which
  transformers hands the template as variables.

  transformers 5 reads ``special_tokens_map.json`` only when ``tokenizer_config.json``
  has no ``added_tokens_decoder``, and then lets the map override the config.
  """
  merged = dict(config)
  if "added_tokens_decoder" not in config:
    merged.update(special_map)
  tokens = {}
  for key, value in merged.items():
    if key.endswith("_token") and _content(value) is not None:
      tokens[key] = _content(value)
  return tokens


def _added_token_strings(config: Mapping[str, Any], special_map: Mapping[str, Any],
                         named: Mapping[str, str]) -> list[str]:
  """Every token a config registers as an added token: what the SentencePiece path
  must cut out of rendered text before SentencePiece sees it."""
  out = list(named.values())
  for source in (config, special_map):
    for key in ("additional_special_tokens", "extra_special_tokens"):
      value = source.get(key)
      if isinstance(value, Mapping):
        value = list(value.values())
      for token in value or ():
        out.append(_content(token))
  decoder = config.get("added_tokens_decoder")
  if isinstance(decoder, Mapping):
    out += [_content(t) for t in decoder.values()]
  return list(dict.fromkeys(t for t in out if t))


def _chat_template(path: str, config: Mapping[str, Any]) -> tuple[str | None, str]:
  """(template, where it came from): ``chat_template.jinja`` wins over the config."""
  jinja_file = os.path.join(path, "chat_template.jinja")
  if os.path.exists(jinja_file):
    try:
      with open(jinja_file, encoding="utf-8") as f:
        return f.read(), jinja_file
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"{jinja_file}: cannot read the chat template ({e}); restore it "
                       "from the checkpoint's original release.") from None
  where = os.path.join(path, "tokenizer_config.json") + " chat_template"
  template = config.get("chat_template")
  if isinstance(template, list):  # named templates: [{"name", "template"}, ...]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    if "default" not in named:
      raise ValueError(f"{where}: named templates {sorted(map(str, named))} and none is "
                       "'default'; name the one to use 'default'.")
    template, where = named["default"], where + "['default']"
  return (template if isinstance(template, str) else None), where


# ---------------------------------------------------------------------- chat template


@functools.lru_cache(maxsize=16)
def compile_template(template: str):
  """The jinja2 template in transformers' sandbox, with its globals and filters."""
  import jinja2  # pylint: disable=g-import-not-at-top
  import jinja2.ext  # pylint: disable=g-import-not-at-top
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=g-import-not-at-top

  class _Generation(jinja2.ext.Extension):
    # Templates may wrap assistant text in {% generation %} for transformers' masks;
    # rendering only needs the body (masks here come from prefixes).
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
    # jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  class _Namespace(jinja2.utils.Namespace):
    # As transformers: no underscore attributes, which would reach CPython internals.
    def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
      self, attrs = args[0], dict(*args[1:], **kwargs)
      for name in attrs:
        _Namespace._check(name)
      jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
      _Namespace._check(name)
      jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
      if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates cannot store underscore attributes on a namespace ({name!r})")

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  env.globals["namespace"] = _Namespace
  return env.from_string(template)


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The messages as transformers hands them to a template: copies without keys whose
  value is None (templates test ``is defined``, and would print "None"), with the
  reasoning under every name templates read it by."""
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise ValueError(f"messages[{i}] is a {type(message).__name__}; a message is a "
                       "mapping like {'role': 'user', 'content': '...'}.")
    m = {k: v for k, v in message.items() if v is not None}
    reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
    if reasoning is not None:
      m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
    out.append(m)
  return out


# ---------------------------------------------------------------------- tokenizer


class HFTokenizer:
  """A checkpoint's tokenizer: ``encode`` / ``decode`` plus its chat template.

  Attributes: ``pad_id``, ``bos_id`` (None if the checkpoint has none), ``eos_id`` (the
  tokenizer's eos), ``eos_ids`` (every id generation stops on, ``eos_id`` first),
  ``unk_id``, ``vocab_size`` (largest id + 1, added tokens included),
  ``chat_template`` (str or None), ``add_bos`` / ``add_eos`` (whether the checkpoint
  puts BOS / EOS around plain text; chat templates write their own),
  ``special_tokens`` (the template's token variables), ``source`` (the directory),
  ``files`` (what ``refcache.fingerprint_tokenizer`` hashes).
  """

  def __init__(self, backend: Any, *, special_tokens: Mapping[str, str], bos_id: int | None,
               eos_ids: Sequence[int], pad_id: int, unk_id: int | None,
               chat_template: str | None, add_bos: bool, add_eos: bool, source: str,
               template_source: str = "", files: Sequence[str] = ()):
    if not eos_ids:
      raise ValueError(f"{source}: no eos id (tokenizer_config.json eos_token or "
                       "generation_config.json eos_token_id); add one.")
    self._backend = backend
    self.special_tokens = dict(special_tokens)
    self.bos_id = bos_id
    self.eos_id = int(eos_ids[0])
    self.eos_ids = tuple(int(i) for i in eos_ids)
    self.pad_id = int(pad_id)
    self.unk_id = unk_id
    self.chat_template = chat_template
    self.add_bos = bool(add_bos and bos_id is not None)
    self.add_eos = bool(add_eos)
    self.source = source
    self.template_source = template_source or source
    self.files = tuple(files)

  @property
  def vocab_size(self) -> int:
    return self._backend.vocab_size

  def __repr__(self) -> str:
    return (f"HFTokenizer({self.source!r}, vocab {self.vocab_size}, bos {self.bos_id}, "
            f"eos {self.eos_ids}, pad {self.pad_id})")

  def encode(self, text: str) -> np.ndarray:
    """Ids of ``text`` with no special tokens added (``add_special_tokens=False``);
    special tokens written in the text are still recognised, as in transformers."""
    return np.asarray(self._backend.encode(text), np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32) for ids in self._backend.encode_batch(list(texts))]

  def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
    return self._backend.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                skip_special_tokens)

  # ------------------------------------------------------------------ chat template

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                          add_generation_prompt: bool = False, **kwargs) -> str:
    """The template's text for ``messages``, as transformers renders it; ``kwargs``
    reach the template (e.g. ``tools``, ``enable_thinking``) and override the special
    token variables."""
    if not self.chat_template:
      raise ValueError(f"{self.source}: the checkpoint has no chat template "
                       "(chat_template.jinja or tokenizer_config.json chat_template); "
                       "use string prompts/completions or add a template.")
    if not messages:
      raise ValueError("apply_chat_template: the conversation is empty; pass at least "
                       "one message.")
    import jinja2  # pylint: disable=g-import-not-at-top
    try:
      template = compile_template(self.chat_template)
    except jinja2.exceptions.TemplateSyntaxError as e:
      raise ValueError(f"{self.template_source}: the chat template does not parse (line "
                       f"{e.lineno}: {e.message}); fix the template.") from None
    variables = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
    try:
      return template.render(messages=template_messages(messages),
                             add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
      raise ValueError(f"{self.template_source}: the chat template refused the "
                       f"conversation: {e}") from None

  def _boundary(self, head: list, whole_text: str, whole_ids: np.ndarray, turn: int,
                add_generation_prompt: bool) -> int:
    """Token index in ``whole_ids`` where the rendering of ``head`` ends.

    The template must render ``head`` as a string prefix of the whole conversation
    (else it rewrites earlier turns: an error naming the turn). Tokens then agree up to
    the boundary, except where BPE merges the text on both sides of it; the merged
    token belongs to what follows, as in transformers' character-span masks.
    """
    text = self.apply_chat_template(head, add_generation_prompt=add_generation_prompt)
    if not whole_text.startswith(text):
      at = next((k for k, (a, b) in enumerate(zip(text, whole_text)) if a != b),
                min(len(text), len(whole_text)))
      raise ValueError(
          f"{self.source}: the chat template renders messages[:{len(head)}] differently "
          f"once later messages follow (from character {at}: {text[at:at + 40]!r} vs "
          f"{whole_text[at:at + 40]!r}), so it rewrites earlier turns and the tokens of "
          f"assistant message {turn} cannot be told apart; use a template that renders "
          "earlier turns unchanged, or score only the final turn.")
    ids = self.encode(text)
    n = min(len(ids), len(whole_ids))
    diff = np.flatnonzero(ids[:n] != whole_ids[:n])
    return int(diff[0]) if diff.size else n

  def encode_chat(self, messages: Sequence[Mapping[str, Any]], *,
                  assistant_turns: str = "final") -> tuple[np.ndarray, np.ndarray]:
    """``(ids [T] int32, mask [T] bool)`` of the whole conversation.

    ``ids`` is ``encode(apply_chat_template(messages))``, exactly transformers'
    ``apply_chat_template(messages, tokenize=True)``. ``mask`` is True on the tokens of
    the final assistant message (``"final"``) or of every one (``"all"``): from the
    generation prompt's end to the end of that message's rendering (its end-of-turn
    token included; for the last message, to the end).
    """
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
    """``(prompt_ids, [completion_ids, ...])`` with ``prompt + completion_i`` exactly the
    tokens of the whole conversation ``prompt_messages + completions[i]``.

    The prompt is the generation prompt's tokens (``prompt_messages`` rendered with
    ``add_generation_prompt=True``), shortened by any token that BPE merged with a
    completion's first characters (a reply starting with spaces): all completions share
    it. A completion is the rest: for ChatML ``content<|im_end|>\\n``, for Llama 3
    ``content<|eot_id|>``, so the end-of-turn token is scored. ValueError, naming the
    message, when the template renders the prompt differently once a completion follows.
    """
    prompt_messages = list(prompt_messages)
    n = len(prompt_messages)
    for k, completion in enumerate(completions):
      if isinstance(completion, Mapping) or not completion:
        raise ValueError(f"completions[{k}] must be a non-empty list of messages (e.g. "
                         "[{'role': 'assistant', 'content': '...'}]).")
    if not completions:
      text = self.apply_chat_template(prompt_messages, add_generation_prompt=True)
      return self.encode(text), []
    wholes, cut = [], None
    for completion in completions:
      messages = prompt_messages + list(completion)
      text = self.apply_chat_template(messages)
      ids = self.encode(text)
      k = self._boundary(prompt_messages, text, ids, n, True)
      cut = k if cut is None else min(cut, k)
      wholes.append(ids)
    prompt = wholes[0][:cut]
    for k, ids in enumerate(wholes[1:], start=1):
      if not np.array_equal(ids[:cut], prompt):
        raise ValueError(f"{self.source}: completions[0] and completions[{k}] do not share "
                         f"the prompt's tokens (message {n}); the chat template renders "
                         "the prompt differently per completion.")
    return prompt, [ids[cut:] for ids in wholes]


# ---------------------------------------------------------------------- backends


class _TokenizersBackend:
  """``tokenizer.json`` through the ``tokenizers`` library (what transformers 5 runs)."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    try:
      self._tok = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on bad files
      raise ValueError(f"{path}: not a tokenizers tokenizer.json ({e}); restore it from "
                       "the checkpoint's original release.") from None
    self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_token(self, i: int) -> str | None:
    return self._tok.id_to_token(i)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def encode_with_specials(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=True).ids

  def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class _SentencePieceBackend:
  """A ``tokenizer.model`` with the checkpoint's own ids.

  Rendered chat text holds special tokens as text (``<s>[INST] ...``), which
  SentencePiece would spell out piece by piece, so the text is cut at every token the
  config registers (as transformers' added tokens do) and each piece between them is
  encoded by SentencePiece. As in transformers 5 (Metaspace ``prepend_scheme="first"``),
  only the piece at the start of the text gets the model's dummy-prefix space. Plain
  text is encoded by SentencePiece itself, which differs from transformers 5's
  conversion of the model in one place: text that starts with spaces keeps
  SentencePiece's extra prefix space (``" hi"`` -> ``▁▁hi``; transformers: ``▁hi``).
  """

  def __init__(self, path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    try:
      with open(path, "rb") as f:
        proto = f.read()
      self._sp = spm.SentencePieceProcessor(model_proto=proto)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{path}: not a SentencePiece model ({e}); restore it from the "
                       "checkpoint's original release.") from None
    self._inner = self._without_dummy_prefix(spm, proto)
    self.vocab_size = self._sp.get_piece_size()
    self._control_ids = {i for i in range(self.vocab_size) if self._sp.is_control(i)}
    self.register_added_tokens(())

  def register_added_tokens(self, tokens: Sequence[str]) -> None:
    """Tokens to cut out of text (those the model has; longest first, as transformers)."""
    self._added = {t: i for t in tokens if (i := self.token_to_id(t)) is not None}
    alternatives = sorted(self._added, key=len, reverse=True)
    self._split = (re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
                   if alternatives else None)
    self._special_ids = self._control_ids | set(self._added.values())

  def _without_dummy_prefix(self, spm, proto: bytes):
    """The same model without the dummy prefix, for text that follows a special token.

    The flag lives in the model's normaliser spec, so the processor is rebuilt from an
    edited proto (protobuf comes with orbax)."""
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    if not model.normalizer_spec.add_dummy_prefix:
      return self._sp
    model.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=model.SerializeToString())

  def token_to_id(self, token: str) -> int | None:
    i = self._sp.piece_to_id(token)
    return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else int(i)

  def id_to_token(self, i: int) -> str | None:
    return self._sp.id_to_piece(i) if 0 <= i < self.vocab_size else None

  def own_special(self, name: str) -> str | None:
    """The model's own bos / eos / unk piece (transformers' LlamaTokenizer defaults)."""
    i = {"bos_token": self._sp.bos_id(), "eos_token": self._sp.eos_id(),
         "unk_token": self._sp.unk_id()}.get(name, -1)
    return self._sp.id_to_piece(i) if i >= 0 else None

  def encode(self, text: str) -> list[int]:
    if self._split is None:
      return list(self._sp.encode(text))
    ids, offset = [], 0
    for k, piece in enumerate(self._split.split(text)):
      if k % 2:  # a registered token
        ids.append(self._added[piece])
      elif piece:
        ids += (self._sp if offset == 0 else self._inner).encode(piece)
      offset += len(piece)
    return ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def encode_with_specials(self, text: str) -> list[int]:
    bos = self._sp.bos_id()
    return ([bos] if bos >= 0 else []) + self.encode(text)

  def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    # SentencePiece drops control pieces and strips the dummy prefix of every call, so
    # specials are written here and only the first run loses its prefix space.
    out, run, first = [], [], True

    def flush():
      nonlocal first
      if run:
        out.append((self._sp if first else self._inner).decode(run))
        run.clear()
      first = False

    for i in ids:
      if i in self._special_ids:
        flush()
        if not skip_special_tokens:
          out.append(self._sp.id_to_piece(i))
      else:
        run.append(i)
    flush()
    return "".join(out)


# ---------------------------------------------------------------------- loading


def _add_flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
  return bool(config[key]) if key in config and config[key] is not None else default


def from_pretrained(path: str | os.PathLike) -> HFTokenizer:
  """The tokenizer and chat template of the checkpoint directory ``path``."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ValueError(f"{path}: not a directory; pass a checkpoint directory holding "
                     "tokenizer.json or tokenizer.model.")
  config = _read_json(os.path.join(path, "tokenizer_config.json"))
  special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
  gen = _read_json(os.path.join(path, "generation_config.json"))
  tokens = special_tokens(config, special_map)
  tok_json = os.path.join(path, "tokenizer.json")
  sp_model = os.path.join(path, "tokenizer.model")
  if os.path.exists(tok_json):
    backend, files = _TokenizersBackend(tok_json), [tok_json]
  elif os.path.exists(sp_model):
    backend, files = _SentencePieceBackend(sp_model), [sp_model]
    for name in ("bos_token", "eos_token", "unk_token"):
      if name not in tokens and backend.own_special(name):
        tokens[name] = backend.own_special(name)  # transformers' LlamaTokenizer defaults
    backend.register_added_tokens(_added_token_strings(config, special_map, tokens))
  else:
    raise ValueError(f"{path}: no tokenizer.json or tokenizer.model; a checkpoint "
                     "directory ships one of them (copy it from the original release).")

  ids = {name: backend.token_to_id(t) for name, t in tokens.items()}
  bos_id = ids.get("bos_token")
  if bos_id is None and _ids(gen.get("bos_token_id")):
    bos_id = _ids(gen.get("bos_token_id"))[0]
  eos_ids = [ids["eos_token"]] if ids.get("eos_token") is not None else []
  eos_ids += [i for i in _ids(gen.get("eos_token_id")) if i not in eos_ids]
  pad_id = ids.get("pad_token")
  if pad_id is None:  # never attended or scored (segment_ids == 0): any id fills
    pad_id = next(iter(_ids(gen.get("pad_token_id")) + eos_ids), 0)

  # What the checkpoint puts around plain text: the config's flags when it has them
  # (transformers then rebuilds the post-processor from them), else the backend's own
  # post-processor (Llama 3 prepends BOS; SmolLM2 and Qwen add nothing). SentencePiece
  # models without flags get BOS, as Llama 2 and Gemma were trained.
  with_specials = backend.encode_with_specials("a")
  plain = backend.encode("a")
  add_bos = _add_flag(config, "add_bos_token", bool(
      bos_id is not None and with_specials[:1] == [bos_id] and plain[:1] != [bos_id]))
  add_eos = _add_flag(config, "add_eos_token", bool(
      eos_ids and with_specials[-1:] == [eos_ids[0]] and plain[-1:] != [eos_ids[0]]))
  template, template_source = _chat_template(path, config)
  files += [os.path.join(path, n) for n in ("tokenizer_config.json", "chat_template.jinja",
                                            "special_tokens_map.json",
                                            "generation_config.json")
            if os.path.exists(os.path.join(path, n))]
  return HFTokenizer(backend, special_tokens=tokens, bos_id=bos_id, eos_ids=eos_ids,
                     pad_id=pad_id, unk_id=ids.get("unk_token"), chat_template=template,
                     add_bos=add_bos, add_eos=add_eos, source=path,
                     template_source=template_source, files=files)
