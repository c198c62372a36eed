"""`hf_tokenizer.from_pretrained` on checkpoint directories written here, vs oracles.

Oracles: transformers' `AutoTokenizer` (ids, special ids, renderings), a hand-written
rendering mapped to tokens by the `tokenizers` library's character offsets (masks), a
word-level tokenizer whose expected tokens and masks are written out by hand, and
SentencePiece itself (plain text of a `tokenizer.model` checkpoint).

The checkpoints: a byte-level BPE trained on made-up text, saved with the real
Llama-3-Instruct template (BOS inside the template, header tokens, end-of-turn and
end-of-text eos) or a Qwen2.5-style ChatML one (default system prompt, `{%-`), and a
SentencePiece BPE with special ids that are not jaxalign's 0..3 and a Llama-2 template.
`test_checkpoint_tokenizer.py` holds the first tests of the same module.
"""

import json
import os
import shutil
from collections.abc import Mapping

import numpy as np
import pytest

from jaxalign.data import hf_tokenizer
from jaxalign.data import tokenizer as tok_lib
from jaxalign.train import refcache

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I make a cup of tea? Boil water, add the bag, wait three minutes.",
    "Ünïcödé, emoji 🙂 and  double  spaces\nand new lines\n\nare text too.",
    "def f(x):\n    return x * 2  # code\n\tTabs\ttoo.",
    "Human: what is the capital of France?\n\nAssistant: Paris, of course.",
    "日本語のテキストも少し。中文也有一点。",
] * 10

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]
# Meta-Llama-3-8B-Instruct's template, verbatim.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5-Instruct's template without the tool branches.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>'"
    " + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")


def _u(text):
  return {"role": "user", "content": text}


def _a(text):
  return {"role": "assistant", "content": text}


CONVERSATIONS = [
    [_u("How do I make a cup of tea?"), _a("Boil water, add the bag, wait.")],
    [{"role": "system", "content": "Be brief."}, _u("Capital of France?"), _a("Paris.")],
    [_u("Ünïcödé 🙂 and 日本語?"), _a("Both are text 中文."), _u("More?"),
     _a("  leading spaces"), _u("and\n\nnew lines"), _a("\n\nnew lines first\n")],
    [_u("  spaces around  "), _a("  spaces around  ")],
    [_u("tabs\tand\ttabs"), _a("\tindented\n\tcode")],
    [_u("empty reply next"), _a("")],
    [_u("a"), _a("b"), _u("c"), _a("d"), _u("e"), _a("f")],
    [_u("special text <|im_end|> and <|eot_id|> inside"), _a("echo <|im_start|>")],
    [_u("Human: nested markers\n\nAssistant: here"), _a("Assistant: yes")],
    [_u("x" * 300), _a("y " * 150)],
    [{"role": "system", "content": ""}, _u("empty system"), _a("ok")],
]
PLAIN_TEXTS = CORPUS[:6] + ["", " ", "  two leading", "trailing  ", "\n", "\n\nHuman: hi",
                            "<|im_end|><|eot_id|> specials", "🙂🙂🙂", "a\r\nb"]


def _bpe(specials, post_bos=None):
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  if post_bos is not None:  # Llama 3's post-processor prepends BOS to plain text
    tok.post_processor = processors.TemplateProcessing(
        single=f"{post_bos} $A", special_tokens=[(post_bos, tok.token_to_id(post_bos))])
  return tok


def _write(path, files):
  os.makedirs(path, exist_ok=True)
  for name, value in files.items():
    text = value if isinstance(value, str) else json.dumps(value)
    with open(os.path.join(path, name), "w", encoding="utf-8") as f:
      f.write(text)
  return str(path)


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
  """tokenizer.json of both BPEs, trained once."""
  root = tmp_path_factory.mktemp("bpe")
  _bpe(LLAMA3_SPECIALS, "<|begin_of_text|>").save(str(root / "llama3.json"))
  _bpe(CHATML_SPECIALS).save(str(root / "chatml.json"))
  return root


def _checkpoint(path, bpe_json, files):
  os.makedirs(path, exist_ok=True)
  shutil.copy(bpe_json, os.path.join(path, "tokenizer.json"))
  return _write(path, files)


@pytest.fixture(scope="module")
def llama3(bpe_files, tmp_path_factory):
  return _checkpoint(tmp_path_factory.mktemp("ckpt") / "llama3", bpe_files / "llama3.json", {
      "tokenizer_config.json": {
          "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": LLAMA3_TEMPLATE,
          "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
          "clean_up_tokenization_spaces": True},
      "generation_config.json": {"bos_token_id": 0, "eos_token_id": [1, 4]}})


@pytest.fixture(scope="module")
def chatml(bpe_files, tmp_path_factory):
  return _checkpoint(tmp_path_factory.mktemp("ckpt") / "chatml", bpe_files / "chatml.json", {
      "tokenizer_config.json": {
          "tokenizer_class": "PreTrainedTokenizerFast",
          "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
          "pad_token": "<|endoftext|>", "bos_token": None},
      "chat_template.jinja": CHATML_TEMPLATE,
      "generation_config.json": {"eos_token_id": [2, 0], "pad_token_id": 0}})


def _hf(path):
  return transformers.AutoTokenizer.from_pretrained(path)


def _hf_chat_ids(hf, messages, **kw):
  out = hf.apply_chat_template(messages, tokenize=True, **kw)
  # transformers 5 returns a BatchEncoding (return_dict defaults to True).
  ids = out["input_ids"] if isinstance(out, Mapping) else out
  return [int(i) for i in ids]


@pytest.mark.parametrize("which", ["llama3", "chatml"])
def test_chat_ids_equal_transformers(which, request):
  path = request.getfixturevalue(which)
  tok, hf = tok_lib.from_pretrained(path), _hf(path)
  for messages in CONVERSATIONS:
    ids, mask = tok.encode_chat(messages)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    assert ids.tolist() == _hf_chat_ids(hf, messages), messages
    for cut in range(1, len(messages) + 1):  # every prefix, with the generation prompt
      head = messages[:cut]
      assert tok.apply_chat_template(head, add_generation_prompt=True) == \
          hf.apply_chat_template(head, tokenize=False, add_generation_prompt=True)
      assert tok.encode(tok.apply_chat_template(head, add_generation_prompt=True)).tolist() \
          == _hf_chat_ids(hf, head, add_generation_prompt=True)
    prompt, (completion,) = tok.encode_chat_split(messages[:-1], [messages[-1:]])
    assert np.concatenate([prompt, completion]).tolist() == ids.tolist()


@pytest.mark.parametrize("which", ["llama3", "chatml"])
def test_special_ids_and_plain_text_equal_transformers(which, request):
  path = request.getfixturevalue(which)
  tok, hf = tok_lib.from_pretrained(path), _hf(path)
  assert tok.bos_id == hf.bos_token_id or (which == "chatml" and tok.bos_id is None)
  assert tok.eos_id == hf.eos_token_id
  assert tok.unk_id == hf.unk_token_id
  assert tok.pad_id == (hf.pad_token_id if hf.pad_token_id is not None else tok.eos_id)
  assert tok.vocab_size == len(hf)
  for text in PLAIN_TEXTS:
    want = hf.encode(text, add_special_tokens=False)
    assert tok.encode(text).tolist() == want, repr(text)
    assert tok.decode(want) == hf.decode(want, clean_up_tokenization_spaces=False)
    assert tok.decode(want, skip_special_tokens=True) == hf.decode(
        want, skip_special_tokens=True, clean_up_tokenization_spaces=False)
  batch = tok.encode_batch(PLAIN_TEXTS)
  assert [b.tolist() for b in batch] == [tok.encode(t).tolist() for t in PLAIN_TEXTS]
  # Plain text with the checkpoint's own specials: BOS where transformers puts one.
  with_specials = hf.encode("a cup of tea")
  assert tok.add_bos == (with_specials[0] == tok.bos_id)
  assert not tok.add_eos


def test_eos_ids_and_pad_fallbacks(llama3, chatml):
  llama = tok_lib.from_pretrained(llama3)
  # The tokenizer's eos (end-of-turn) first, then generation_config's other stop ids.
  assert llama.eos_id == 4 and llama.eos_ids == (4, 1)
  assert llama.bos_id == 0 and llama.add_bos
  assert llama.pad_id == llama.eos_id  # no pad anywhere: eos fills (never attended)
  qwen = tok_lib.from_pretrained(chatml)
  assert qwen.eos_ids == (2, 0) and qwen.pad_id == 0 and qwen.bos_id is None
  assert not qwen.add_bos


def _llama3_render(messages, add_generation_prompt=False):
  """Hand transcription of the Llama 3 template, with each assistant turn's span
  (content through <|eot_id|>) in characters."""
  text, spans = "<|begin_of_text|>", []
  for m in messages:
    text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
    start = len(text)
    text += m["content"].strip() + "<|eot_id|>"
    if m["role"] == "assistant":
      spans.append((start, len(text)))
  if add_generation_prompt:
    text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
  return text, spans


def _chatml_render(messages):
  text, spans = "", []
  if messages[0]["role"] != "system":
    text += "<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n"
  for m in messages:
    text += f"<|im_start|>{m['role']}\n"
    start = len(text)
    text += m["content"] + "<|im_end|>\n"
    if m["role"] == "assistant":
      spans.append((start, len(text)))
  return text, spans


def _offset_mask(path, text, spans):
  """Tokens overlapping a span, from the tokenizers library's character offsets."""
  enc = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json")).encode(
      text, add_special_tokens=False)
  mask = np.zeros(len(enc.ids), bool)
  for t, (s, e) in enumerate(enc.offsets):
    mask[t] = any(e > a and s < b for a, b in spans)
  return enc.ids, mask


@pytest.mark.parametrize("which,render", [("llama3", _llama3_render),
                                          ("chatml", _chatml_render)])
def test_masks_equal_offsets_of_a_hand_rendering(which, render, request):
  path = request.getfixturevalue(which)
  tok = tok_lib.from_pretrained(path)
  for messages in CONVERSATIONS:
    text, spans = render(messages)
    assert tok.apply_chat_template(messages) == text
    want_ids, want_all = _offset_mask(path, text, spans)
    ids, mask_all = tok.encode_chat(messages, assistant_turns="all")
    assert ids.tolist() == want_ids
    np.testing.assert_array_equal(mask_all, want_all, err_msg=repr(messages))
    _, want_final = _offset_mask(path, text, spans[-1:])
    _, mask_final = tok.encode_chat(messages)
    np.testing.assert_array_equal(mask_final, want_final, err_msg=repr(messages))
    # The end-of-turn token the model must emit is scored.
    eot = tok.eos_id
    assert eot in ids[mask_final].tolist()


def test_masks_of_a_word_level_template_by_hand(tmp_path):
  """A word-level vocabulary makes every token visible: masks written out by hand."""
  from tokenizers import models, pre_tokenizers
  words = ["<s>", "</s>", "<user>", "<assistant>", "hi", "there", "ok", "bye", "see", "you"]
  wl = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                             unk_token="<s>"))
  wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  wl.add_special_tokens(["<s>", "</s>"])
  path = tmp_path / "words"
  os.makedirs(path)
  wl.save(str(path / "tokenizer.json"))
  template = ("{% for m in messages %}<{{ m.role }}> {{ m.content }} </s> {% endfor %}"
              "{% if add_generation_prompt %}<assistant> {% endif %}")
  _write(path, {"tokenizer_config.json": {"eos_token": "</s>", "chat_template": template}})
  tok = tok_lib.from_pretrained(str(path))
  messages = [_u("hi there"), _a("ok"), _u("bye"), _a("see you")]
  ids, mask_all = tok.encode_chat(messages, assistant_turns="all")
  tokens = [words[i] for i in ids]
  assert tokens == ["<user>", "hi", "there", "</s>", "<assistant>", "ok", "</s>",
                    "<user>", "bye", "</s>", "<assistant>", "see", "you", "</s>"]
  assert mask_all.astype(int).tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1]
  _, mask_final = tok.encode_chat(messages)
  assert mask_final.astype(int).tolist() == [0] * 11 + [1, 1, 1]
  prompt, (chosen, rejected) = tok.encode_chat_split(messages[:3], [[_a("see you")],
                                                                  [_a("bye")]])
  assert [words[i] for i in prompt] == tokens[:11]
  assert [words[i] for i in chosen] == ["see", "you", "</s>"]
  assert [words[i] for i in rejected] == ["bye", "</s>"]


def _think_checkpoint(tmp_path, bpe_json):
  # As Qwen3's template: an assistant turn shows its reasoning only after the last user
  # query (found with a namespace), so a prefix ending in a reasoned assistant turn is
  # rendered differently once a user turn follows.
  template = (
      "{%- set ns = namespace(last_query=-1) %}"
      "{%- for m in messages %}{%- if m.role == 'user' %}"
      "{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
      "{%- for m in messages %}{%- set c = m.content %}"
      "{%- if m.role == 'assistant' and loop.index0 > ns.last_query and m.reasoning_content %}"
      "{%- set c = '<think>' + m.reasoning_content + '</think>' + c %}{%- endif %}"
      "{{- '<|im_start|>' + m.role + '\n' + c + '<|im_end|>\n' }}{%- endfor %}"
      "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
  return _checkpoint(tmp_path / "think", bpe_json, {"tokenizer_config.json": {
      "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
      "chat_template": template}})


def test_reasoning_fields_are_aliased_as_transformers_does(tmp_path, bpe_files):
  path = _think_checkpoint(tmp_path, bpe_files / "chatml.json")
  tok, hf = tok_lib.from_pretrained(path), _hf(path)
  for key in ("reasoning_content", "thinking", "reasoning"):
    messages = [_u("2+2?"), {"role": "assistant", "content": "4", key: "add",
                             "tool_calls": None}]
    text = tok.apply_chat_template(messages)
    assert "<think>add</think>4" in text
    assert text == hf.apply_chat_template(messages, tokenize=False)


def test_a_rewritten_turn_is_a_value_error_naming_it(tmp_path, bpe_files):
  path = _think_checkpoint(tmp_path, bpe_files / "chatml.json")
  tok = tok_lib.from_pretrained(path)
  reasoned = {"role": "assistant", "content": "b", "reasoning_content": "hmm"}
  messages = [_u("a"), reasoned, _u("c"), _a("d")]
  tok.encode_chat(messages)  # the final turn alone is fine
  with pytest.raises(ValueError, match=r"messages\[:2\] differently .*assistant message 1 "):
    tok.encode_chat(messages, assistant_turns="all")
  with pytest.raises(ValueError, match=r"messages\[:2\] differently .*assistant message 2 "):
    tok.encode_chat_split(messages[:2], [messages[2:]])


def test_template_sources_and_special_token_forms(tmp_path, bpe_files):
  base = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>"}
  named = [{"name": "tool_use", "template": "TOOLS"},
           {"name": "default", "template": "{{ messages[0]['content'] }}!{{ eos_token }}"}]
  path = _checkpoint(tmp_path / "named", bpe_files / "chatml.json",
                     {"tokenizer_config.json": {**base, "chat_template": named}})
  tok, hf = tok_lib.from_pretrained(path), _hf(path)
  assert tok.apply_chat_template([_u("x")]) == "x!<|im_end|>" == \
      hf.apply_chat_template([_u("x")], tokenize=False)
  # chat_template.jinja wins over the config's field, as in transformers.
  path = _checkpoint(tmp_path / "both", bpe_files / "chatml.json", {
      "tokenizer_config.json": {**base, "chat_template": "config"},
      "chat_template.jinja": "file"})
  assert tok_lib.from_pretrained(path).apply_chat_template([_u("x")]) == "file" == \
      _hf(path).apply_chat_template([_u("x")], tokenize=False)
  path = _checkpoint(tmp_path / "none", bpe_files / "chatml.json",
                     {"tokenizer_config.json": base})
  assert tok_lib.from_pretrained(path).chat_template is None
  with pytest.raises(ValueError, match="no chat template"):
    tok_lib.from_pretrained(path).encode_chat([_u("x")])


@pytest.mark.parametrize("with_decoder", [False, True])
def test_special_tokens_map_precedence_equals_transformers(tmp_path, bpe_files, with_decoder):
  # special_tokens_map.json overrides the config unless the config has an
  # added_tokens_decoder (transformers 5 then ignores the map).
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>",
            "chat_template": "{{ pad_token }}|{{ eos_token }}|{{ messages[0].content }}"}
  if with_decoder:
    config["added_tokens_decoder"] = {
        str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                 "normalized": False, "single_word": False}
        for i, t in enumerate(CHATML_SPECIALS)}
  path = _checkpoint(tmp_path / f"map{with_decoder}", bpe_files / "chatml.json", {
      "tokenizer_config.json": config,
      "special_tokens_map.json": {"pad_token": {"content": "<|endoftext|>"}}})
  tok, hf = tok_lib.from_pretrained(path), _hf(path)
  assert tok.pad_id == hf.pad_token_id and tok.eos_id == hf.eos_token_id
  assert tok.apply_chat_template([_u("x")]) == hf.apply_chat_template([_u("x")],
                                                                      tokenize=False)


def test_template_errors_are_value_errors(tmp_path, bpe_files):
  base = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>"}
  path = _checkpoint(tmp_path / "raise", bpe_files / "chatml.json", {
      "tokenizer_config.json": base,
      "chat_template.jinja": ("{% if messages[0]['role'] == 'system' %}"
                              "{{ raise_exception('System role not supported') }}{% endif %}"
                              "{{ messages[0]['content'] }}")})
  tok = tok_lib.from_pretrained(path)
  with pytest.raises(ValueError, match="System role not supported"):
    tok.encode_chat_split([{"role": "system", "content": "s"}, _u("u")], [[_a("x")]])
  path = _checkpoint(tmp_path / "syntax", bpe_files / "chatml.json", {
      "tokenizer_config.json": {**base, "chat_template": "{% for m in messages %}"}})
  with pytest.raises(ValueError, match=r"tokenizer_config.json chat_template: .*does not parse"):
    tok_lib.from_pretrained(path).apply_chat_template([_u("x")])
  # transformers' namespace refuses underscore attributes (CPython internals).
  path = _checkpoint(tmp_path / "dunder", bpe_files / "chatml.json", {
      "tokenizer_config.json": {**base, "chat_template": "{% set ns = namespace(_x=1) %}x"}})
  with pytest.raises(ValueError, match="underscore"):
    tok_lib.from_pretrained(path).apply_chat_template([_u("x")])
  with pytest.raises(ValueError, match="non-empty list of messages"):
    tok.encode_chat_split([_u("u")], [[]])


def test_unreadable_and_missing_files_are_named(tmp_path, bpe_files):
  with pytest.raises(ValueError, match="not a directory"):
    tok_lib.from_pretrained(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model"):
    tok_lib.from_pretrained(str(tmp_path))
  path = _checkpoint(tmp_path / "badconfig", bpe_files / "chatml.json",
                     {"tokenizer_config.json": "{not json"})
  with pytest.raises(ValueError, match=r"badconfig/tokenizer_config.json: cannot read it"):
    tok_lib.from_pretrained(path)
  path = _write(tmp_path / "badjson", {"tokenizer.json": "{}"})
  with pytest.raises(ValueError, match=r"badjson/tokenizer.json: not a tokenizers"):
    tok_lib.from_pretrained(path)
  path = _write(tmp_path / "badmodel", {"tokenizer.model": "not a model"})
  with pytest.raises(ValueError, match=r"badmodel/tokenizer.model: not a SentencePiece"):
    tok_lib.from_pretrained(path)
  path = _checkpoint(tmp_path / "noeos", bpe_files / "chatml.json", {})
  with pytest.raises(ValueError, match="no eos id"):
    tok_lib.from_pretrained(path)


# Llama-2-chat's template (without its default-system branch).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def sentencepiece_ckpt(tmp_path_factory):
  import sentencepiece as spm
  path = tmp_path_factory.mktemp("sp") / "llama2"
  os.makedirs(path)
  # Llama 2's normaliser settings (identity, whitespace kept, byte fallback) and special
  # ids that are not jaxalign's own (pad 0, unk 1, bos 2, eos 3).
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_prefix=str(path / "tokenizer"),
      vocab_size=420, model_type="bpe", byte_fallback=True, unk_id=3, bos_id=5, eos_id=7,
      pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
      minloglevel=2, hard_vocab_limit=False)
  _write(path, {"tokenizer_config.json": {
      "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
      "unk_token": "<unk>", "add_bos_token": True, "chat_template": LLAMA2_TEMPLATE}})
  return str(path)


def test_sentencepiece_checkpoint_keeps_its_ids_and_renders_as_transformers(
    sentencepiece_ckpt):
  import sentencepiece as spm
  tok, hf = tok_lib.from_pretrained(sentencepiece_ckpt), _hf(sentencepiece_ckpt)
  sp = spm.SentencePieceProcessor(
      model_file=os.path.join(sentencepiece_ckpt, "tokenizer.model"))
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.eos_ids) == (3, 5, 7, (7,))
  assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (3, 5, 7)
  assert tok.add_bos and tok.pad_id == tok.eos_id and tok.vocab_size == sp.get_piece_size()
  # Plain text: SentencePiece's own ids (the model's ground truth), and transformers'
  # wherever its conversion agrees (everything not starting with a space).
  for text in [t for t in PLAIN_TEXTS if "<|" not in t]:
    assert tok.encode(text).tolist() == sp.encode(text), repr(text)
    if not text.startswith(" "):
      assert tok.encode(text).tolist() == hf.encode(text, add_special_tokens=False)
  # Chat: the rendering holds <s> and </s> as text; they become the real ids.
  for messages in CONVERSATIONS:
    if any("<|" in m["content"] for m in messages):
      continue  # ChatML / Llama 3 token text: not this model's
    ids, mask = tok.encode_chat(messages, assistant_turns="all")
    want = _hf_chat_ids(hf, messages)
    assert ids.tolist() == want, messages
    assert tok.decode(ids) == hf.decode(want)
    assert ids.tolist().count(5) == sum(m["role"] == "user" for m in messages)
    assert mask.sum() > 0 and ids[mask][-1] == 7  # each reply ends with the scored eos
  messages = CONVERSATIONS[2]
  prompt, (completion,) = tok.encode_chat_split(messages[:-1], [messages[-1:]])
  whole, _ = tok.encode_chat(messages)
  assert np.concatenate([prompt, completion]).tolist() == whole.tolist()
  assert tok.decode(prompt).endswith("[/INST]") and completion[-1] == tok.eos_id
  assert tok.decode(completion) == hf.decode(completion.tolist()) == "new lines first </s>"


def test_sentencepiece_tokenizer_with_fixed_ids_still_refuses_a_checkpoint_model(
    sentencepiece_ckpt):
  # jaxalign's own SentencePieceTokenizer keeps insisting on 0..3; checkpoints go
  # through from_pretrained.
  with pytest.raises(ValueError, match="but jaxalign needs"):
    tok_lib.SentencePieceTokenizer.from_file(
        os.path.join(sentencepiece_ckpt, "tokenizer.model"))


def test_fingerprint_distinguishes_checkpoint_tokenizers(tmp_path, chatml):
  a = tmp_path / "a"
  shutil.copytree(chatml, a)
  fp = refcache.fingerprint_tokenizer
  same = fp(tok_lib.from_pretrained(str(a)))
  assert same == fp(tok_lib.from_pretrained(chatml))  # the same files elsewhere
  with open(a / "chat_template.jinja", "a", encoding="utf-8") as f:
    f.write("{# a different template #}")
  changed_template = fp(tok_lib.from_pretrained(str(a)))
  _write(a, {"generation_config.json": {"eos_token_id": [2], "pad_token_id": 0}})
  changed_eos = fp(tok_lib.from_pretrained(str(a)))
  assert len({same, changed_template, changed_eos}) == 3
  assert same != fp(tok_lib.ByteTokenizer())
  tok = tok_lib.from_pretrained(str(a))
  tok.chat_template = "{{ messages }}"  # changed after loading: still seen
  assert fp(tok) != changed_eos


def test_module_level_from_pretrained_is_the_same_loader(chatml):
  assert type(tok_lib.from_pretrained(chatml)) is hf_tokenizer.HFTokenizer
