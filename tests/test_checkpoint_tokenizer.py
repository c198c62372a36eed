"""A checkpoint's tokenizer and chat template vs transformers (the oracle).

The checkpoints are made here: a byte-level BPE trained with the `tokenizers` library
on a few sentences, saved with a Llama-3-style template (header tokens, several eos)
or a ChatML one (default system prompt, `{% generation %}` blocks so that transformers
can compute its own assistant masks), and a SentencePiece model with non-0..3 ids.
"""

import json
import os

import numpy as np
import pytest

from jaxalign.data import tokenizer as tok_lib

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I make a cup of tea? Boil water, add the bag, wait three minutes.",
    "Ünïcödé, emoji 🙂 and  double  spaces\nand new lines\n\nare text too.",
    "def f(x):\n    return x * 2  # code",
] * 20

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "How do I make a cup of tea?"},
     {"role": "assistant", "content": "Boil water, add the bag, wait three minutes."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Ünïcödé and emoji 🙂?"},
     {"role": "assistant", "content": "Both  are\ntext."},
     {"role": "user", "content": "And code?\n\ndef f(x): return x"},
     {"role": "assistant", "content": "    return x * 2  # also text"}],
    [{"role": "user", "content": "  leading and trailing spaces  "},
     {"role": "assistant", "content": "\n\nnew lines first"}],
]


def _bpe(specials, post_bos=None):
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  if post_bos is not None:  # Llama 3's post-processor prepends BOS to plain text
    tok.post_processor = processors.TemplateProcessing(
        single=f"{post_bos} $A", special_tokens=[(post_bos, tok.token_to_id(post_bos))])
  return tok


def _checkpoint(tmp_path, name, specials, template, config, generation=None, post_bos=None):
  path = tmp_path / name
  os.makedirs(path)
  _bpe(specials, post_bos).save(str(path / "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
            **config}
  (path / "tokenizer_config.json").write_text(json.dumps(config))
  if generation is not None:
    (path / "generation_config.json").write_text(json.dumps(generation))
  return str(path)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("llama3")
  return _checkpoint(tmp, "llama3", LLAMA3_SPECIALS, LLAMA3_TEMPLATE,
                     {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
                     generation={"bos_token_id": 0, "eos_token_id": [1, 4]},
                     post_bos="<|begin_of_text|>")


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("chatml")
  return _checkpoint(tmp, "chatml", CHATML_SPECIALS, CHATML_TEMPLATE,
                     {"bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>",
                      "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})


def _hf_ids(hf, messages, **kw):
  out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
  return [int(i) for i in out["input_ids"]]


@pytest.mark.parametrize("which", ["llama3", "chatml"])
def test_ids_equal_transformers(which, request):
  path = request.getfixturevalue(which)
  tok = tok_lib.from_pretrained(path)
  hf = transformers.AutoTokenizer.from_pretrained(path)
  for messages in CONVERSATIONS:
    ids, _ = tok.encode_chat(messages)
    assert ids.tolist() == _hf_ids(hf, messages)
    prompt = messages[:-1]
    assert tok.apply_chat_template(prompt, add_generation_prompt=True) == \
        hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
  for text in CORPUS[:4] + ["<|im_end|> inside text", ""]:
    assert tok.encode(text).tolist() == hf.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == hf.decode(hf.encode(text, add_special_tokens=False))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
      hf.bos_token_id, hf.eos_token_id, hf.pad_token_id if hf.pad_token_id is not None
      else hf.eos_token_id)
  assert tok.vocab_size == len(hf)


def test_llama3_specials_and_plain_text_bos(llama3):
  tok = tok_lib.from_pretrained(llama3)
  assert tok.eos_id == 4 and tok.eos_ids == (4, 1)  # <|eot_id|>, then <|end_of_text|>
  assert tok.bos_id == 0 and tok.add_bos  # the post-processor prepends BOS to text
  assert tok.pad_id == tok.eos_id  # no pad token: eos fills (never attended or scored)


def test_masks_equal_transformers_generation_spans(chatml):
  """Our prefix-derived masks vs transformers' character-span masks of the template's
  {% generation %} blocks (an independent computation)."""
  tok = tok_lib.from_pretrained(chatml)
  hf = transformers.AutoTokenizer.from_pretrained(chatml)
  for messages in CONVERSATIONS:
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    every = np.asarray(out["assistant_masks"], bool)
    ids, mask_all = tok.encode_chat(messages, assistant_turns="all")
    assert ids.tolist() == list(out["input_ids"])
    np.testing.assert_array_equal(mask_all, every)
    _, mask_final = tok.encode_chat(messages, assistant_turns="final")
    last_start = int(np.flatnonzero(np.diff(np.r_[0, every.astype(int)]) == 1)[-1])
    want = every.copy()
    want[:last_start] = False
    np.testing.assert_array_equal(mask_final, want)
    # The reply's tokens (a token BPE merged across the boundary, "\n" + the
    # reply's leading spaces, goes with the reply, as in transformers' spans).
    assert tok.decode(ids[mask_final]).endswith(messages[-1]["content"] + "<|im_end|>\n")


def test_split_completion_is_the_tail_of_the_whole_conversation(chatml):
  tok = tok_lib.from_pretrained(chatml)
  messages = CONVERSATIONS[1]
  prompt, (chosen, rejected) = tok.encode_chat_split(
      messages[:-1], [[messages[-1]], [{"role": "assistant", "content": "No."}]])
  whole, _ = tok.encode_chat(messages)
  assert np.concatenate([prompt, chosen]).tolist() == whole.tolist()
  rejected_whole, _ = tok.encode_chat(
      messages[:-1] + [{"role": "assistant", "content": "No."}])
  assert np.concatenate([prompt, rejected]).tolist() == rejected_whole.tolist()
  # The chosen reply's leading spaces merged with the prompt's last "\n": the shared
  # prompt stops before that token, so both completions start with their "\n".
  assert tok.decode(rejected) == "\nNo.<|im_end|>\n"
  assert tok.eos_id in chosen.tolist()  # the end-of-turn token is scored


def test_template_that_rewrites_earlier_turns_names_the_turn(tmp_path):
  # Drops the reasoning of every assistant turn but the last (as reasoning models'
  # templates do): the prompt before the last turn is then not a prefix.
  template = (
      "{% for m in messages %}{% set c = m['content'] %}"
      "{% if m['role'] == 'assistant' and not loop.last %}"
      "{% set c = c.split('</think>')[-1] %}{% endif %}"
      "{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}{% endfor %}"
      "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
  path = _checkpoint(tmp_path, "think", CHATML_SPECIALS, template,
                     {"eos_token": "<|im_end|>"})
  tok = tok_lib.from_pretrained(path)
  messages = [{"role": "user", "content": "a"},
              {"role": "assistant", "content": "<think>hmm</think>b"},
              {"role": "user", "content": "c"},
              {"role": "assistant", "content": "d"}]
  tok.encode_chat(messages)  # the final turn alone is fine
  with pytest.raises(ValueError, match=r"messages\[:2\] differently .* assistant message 1 "):
    tok.encode_chat(messages, assistant_turns="all")


def test_raise_exception_in_a_template_is_a_value_error(tmp_path):
  template = ("{% if messages[0]['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}"
              "{% for m in messages %}{{ m['content'] }}{% endfor %}")
  path = _checkpoint(tmp_path, "nosys", CHATML_SPECIALS, template, {"eos_token": "<|im_end|>"})
  with pytest.raises(ValueError, match="System role not supported"):
    tok_lib.from_pretrained(path).apply_chat_template([{"role": "system", "content": "x"}])


def test_sentencepiece_checkpoint_keeps_its_real_ids(tmp_path):
  import sentencepiece as spm
  path = tmp_path / "sp"
  os.makedirs(path)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_prefix=str(path / "tokenizer"), vocab_size=120,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, hard_vocab_limit=False)
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
  tok = tok_lib.from_pretrained(str(path))
  sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
  assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)  # not jaxalign's 1, 2, 3
  assert tok.add_bos and tok.pad_id == 2 and tok.vocab_size == sp.get_piece_size()
  for text in CORPUS[:4]:
    assert tok.encode(text).tolist() == sp.encode(text)
    assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))


def test_missing_files_are_named(tmp_path):
  with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model"):
    tok_lib.from_pretrained(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer.json"):
    tok_lib.from_pretrained(str(tmp_path))


def test_rl_and_generation_stop_on_the_checkpoints_eos_ids(llama3, tmp_path):
  """Online RL sampled with the synthetic task's stop id 3 whatever the tokenizer: a
  checkpoint's end-of-turn never ended a rollout. The stops now come from the
  tokenizer (every eos id it declares)."""
  import jax.numpy as jnp

  from experiments import _common
  from jaxalign import config as config_lib
  from jaxalign import generate
  from jaxalign.models import sampling
  from jaxalign.train import stream

  tok = tok_lib.from_pretrained(llama3)
  stops = generate.stop_tokens(tok)
  assert stops["eos_id"] == tok.eos_id and set(stops["extra_eos_ids"]) | {
      tok.eos_id} == {1, 4}
  scfg = sampling.SamplingConfig(**stops)
  tokens = jnp.asarray([[7, 4, 9, 1], [7, 8, 1, 4], [7, 8, 9, 3]])
  # Oracle: 1 up to and including the first of ids {1, 4}; id 3 is an ordinary token.
  np.testing.assert_array_equal(sampling.completion_mask(tokens, scfg),
                                [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])

  data = tmp_path / "hh.jsonl"
  data.write_text(json.dumps({"chosen": "\n\nHuman: hi there\n\nAssistant: hello",
                              "rejected": "\n\nHuman: hi there\n\nAssistant: go"}) + "\n")
  c = _common.rl_config("grpo", f"hh,path={data},reward_path=/rm")
  c.data.tokenizer = llama3
  cfg, _ = config_lib.validate_rl(c, 8)
  assert stream.PromptSource(cfg).stops == stops
