"""The run's tokenizer: the checkpoint's own by default, and a mismatch stops the run."""

import json

import pytest

import jax

from jaxalign import config as config_lib
from jaxalign.data import tokenizer as tok_lib
from jaxalign.models import hf, transformer
from jaxalign.train import build


def _checkpoint(tmp_path, vocab_size, bos=2, eos=3, gen_eos=None):
  cfg = transformer.TransformerConfig.tiny(vocab_size=vocab_size)
  _, params = transformer.init(cfg, jax.random.key(0))
  path = str(tmp_path / "ckpt")
  hf.save_hf(path, cfg, jax.device_get(params), "llama")
  with open(f"{path}/config.json") as f:
    c = json.load(f)
  c.update(bos_token_id=bos, eos_token_id=eos)
  with open(f"{path}/config.json", "w") as f:
    json.dump(c, f)
  if gen_eos is not None:
    with open(f"{path}/generation_config.json", "w") as f:
      json.dump({"eos_token_id": gen_eos}, f)
  return path


def test_auto_means_the_checkpoints_tokenizer_else_bytes():
  assert build.tokenizer_spec("auto", "") == "byte"
  assert build.tokenizer_spec("auto", "/ckpt") == "/ckpt"
  assert build.tokenizer_spec("byte", "/ckpt") == "byte"
  assert config_lib.base_config().data.tokenizer == "auto"


def test_byte_ids_fit_a_byte_sized_checkpoint(tmp_path):
  path = _checkpoint(tmp_path, vocab_size=300)
  build.check_tokenizer_matches(tok_lib.ByteTokenizer(), "byte", path, "model.hf_path")


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
  path = _checkpoint(tmp_path, vocab_size=128)
  with pytest.raises(ValueError) as e:
    build.check_tokenizer_matches(tok_lib.ByteTokenizer(), "byte", path, "model.hf_path")
  msg = str(e.value)
  assert "config.data.tokenizer='byte'" in msg and "vocab 260" in msg
  assert "config.model.hf_path=" in msg and "vocab 128" in msg
  assert "260 ids but the model's vocabulary has 128" in msg


def test_special_ids_must_be_the_checkpoints(tmp_path):
  # Several eos ids (Llama-3 style): the tokenizer's eos must be one of them.
  path = _checkpoint(tmp_path, vocab_size=300, bos=1, eos=2, gen_eos=[2, 7])
  with pytest.raises(ValueError) as e:
    build.check_tokenizer_matches(tok_lib.ByteTokenizer(), "byte", path, "reference.hf_path")
  msg = str(e.value)
  assert "eos id 3 is not the checkpoint's [2, 7]" in msg
  assert "bos id 2 is not the checkpoint's [1]" in msg
  assert "config.reference.hf_path" in msg and "not supported yet" in msg
