"""What both trainers build from a validated config before anything compiles.

Today: the tokenizer, and the check that it is the tokenizer of every checkpoint the
run loads (policy, reference). Its ids must mean the same tokens to the model: a byte
tokenizer's ids fed to a 49,152-token BPE model train without an error but on noise,
so a mismatch stops the run here, naming both sides, before any data is tokenised.
"""

from __future__ import annotations

import json
import os
from typing import Any

AUTO = "auto"
BYTE = "byte"


def tokenizer_spec(data_tokenizer: str, hf_path: str) -> str:
  """The tokenizer a run uses: ``auto`` means the checkpoint's own when ``hf_path`` is
  set, else the byte tokenizer (what random-init runs have always used)."""
  if data_tokenizer == AUTO:
    return hf_path or BYTE
  return data_tokenizer


def load_tokenizer(spec: str):
  """``byte``, a SentencePiece ``.model`` file trained by jaxalign, or a checkpoint
  directory (``tokenizer.json`` or ``tokenizer.model``, with its chat template)."""
  from jaxalign.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  if spec == BYTE:
    return tok_lib.ByteTokenizer()
  if os.path.isdir(spec):
    return tok_lib.from_pretrained(spec)
  if os.path.isfile(spec):
    return tok_lib.SentencePieceTokenizer.from_file(spec)
  raise ValueError(f"config.data.tokenizer={spec!r}: not 'auto', 'byte', a checkpoint "
                   "directory (tokenizer.json / tokenizer.model) or a SentencePiece "
                   ".model file. Use 'auto' to take model.hf_path's tokenizer.")


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON ({e}).") from None


def _ids(value: Any) -> set[int]:
  if value is None:
    return set()
  if isinstance(value, (list, tuple)):
    return {int(v) for v in value}
  return {int(value)}


def checkpoint_special_ids(hf_dir: str) -> dict[str, Any]:
  """vocab size, bos and eos ids a checkpoint's config.json / generation_config.json
  declare (eos may be several ids, e.g. Llama-3's end-of-turn and end-of-text)."""
  config = _read_json(os.path.join(hf_dir, "config.json"))
  config = config.get("text_config", config)  # Multimodal configs nest the LM's.
  gen = _read_json(os.path.join(hf_dir, "generation_config.json"))
  return {"vocab_size": config.get("vocab_size"),
          "bos": _ids(config.get("bos_token_id")) | _ids(gen.get("bos_token_id")),
          "eos": _ids(config.get("eos_token_id")) | _ids(gen.get("eos_token_id"))}


def _describe(tok: Any, spec: str) -> str:
  return (f"{spec!r} ({type(tok).__name__}, vocab {tok.vocab_size}, bos "
          f"{getattr(tok, 'bos_id', None)}, eos {getattr(tok, 'eos_id', None)})")


def check_tokenizer_matches(tok: Any, spec: str, hf_dir: str, key: str) -> None:
  """ValueError unless ``tok`` can be the tokenizer of the checkpoint at ``hf_dir``.

  Checked: every id the tokenizer can produce exists in the model's embedding, its
  EOS is one the checkpoint stops on, and its BOS is the checkpoint's.
  """
  ck = checkpoint_special_ids(hf_dir)
  problems = []
  if ck["vocab_size"] is not None and tok.vocab_size > int(ck["vocab_size"]):
    problems.append(f"the tokenizer has {tok.vocab_size} ids but the model's vocabulary "
                    f"has {ck['vocab_size']}")
  eos = getattr(tok, "eos_id", None)
  if ck["eos"] and eos is not None and int(eos) not in ck["eos"]:
    problems.append(f"the tokenizer's eos id {eos} is not the checkpoint's "
                    f"{sorted(ck['eos'])}")
  bos = getattr(tok, "bos_id", None)
  if ck["bos"] and bos is not None and int(bos) not in ck["bos"]:
    problems.append(f"the tokenizer's bos id {bos} is not the checkpoint's "
                    f"{sorted(ck['bos'])}")
  if problems:
    raise ValueError(
        f"config.data.tokenizer={_describe(tok, spec)} does not belong to config.{key}="
        f"{hf_dir!r} (vocab {ck['vocab_size']}, bos {sorted(ck['bos'])}, eos "
        f"{sorted(ck['eos'])}): " + "; ".join(problems) + ". Set data.tokenizer='auto' "
        "(or the checkpoint directory) to use the checkpoint's own tokenizer; models "
        "with different tokenizers in one run are not supported yet.")


def build_tokenizer(cfg: Any):
  """The run's tokenizer, checked against every checkpoint the run loads."""
  spec = tokenizer_spec(cfg.data.tokenizer, cfg.model.hf_path)
  tok = load_tokenizer(spec)
  if cfg.model.hf_path:
    check_tokenizer_matches(tok, spec, cfg.model.hf_path, "model.hf_path")
  if cfg.reference.kind == "hf" and cfg.reference.hf_path:
    check_tokenizer_matches(tok, spec, cfg.reference.hf_path, "reference.hf_path")
  return tok
