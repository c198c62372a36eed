"""Entry point: ``python -m jaxalign.export --workdir W [--step N] --out DIR [--lora
adapter|merged] [--architecture NAME]``.

Writes a jaxalign run's checkpoint (the latest, or ``--step``) as a Hugging Face
directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads: config.json
+ model.safetensors (`jaxalign.models.hf.save_hf`, f32 as trained) and the run's
tokenizer (``W/tokenizer``: an HF checkpoint's tokenizer files with its chat template
and generation_config.json; for the byte / SentencePiece / synthetic tokenizers a
``jaxalign_tokenizer.json`` note, which ``python -m jaxalign.generate --hf`` reads,
and a generation_config.json with their bos / eos / pad ids). ``--architecture``:
the HF model type to write (default: the one ``model.hf_path`` came as, else llama).

LoRA runs: ``--lora adapter`` (default) writes the PEFT layout (adapter_config.json,
adapter_model.safetensors; `jaxalign.models.lora.save_peft`) for
``peft.PeftModel.from_pretrained(base, DIR)``; its base is ``model.hf_path`` when the
run started from one, else the base is written too, under ``DIR/base`` (the seed's
init, or an ``init_from`` run's weights). ``--lora merged`` writes W + alpha/r A B
as a plain HF directory. A reward-model run (scalar head) is written as
``XForSequenceClassification`` (`jaxalign.models.hf.save_hf_reward`: ``score.weight``
[1, D], ``pad_token_id`` the tokenizer's pad id), which ``rl.reward_model`` and
transformers' ``AutoModelForSequenceClassification`` read (a LoRA reward model:
``--lora merged``). transformers reads the score at the last token that is not the
pad id: where jaxalign trained it unless the pad id is also an EOS id (then one token
earlier; the export note says so), and its score layer has no bias (a non-zero head
bias is kept as ``score.bias`` for jaxalign; transformers' scores lack that constant).

Exit code 2 with a one-line message for a user error (as ``jaxalign.main``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

EXPORT_NOTE = "jaxalign_export.json"
LORA_MODES = ("adapter", "merged")


def _generation_config(tok: Any) -> dict:
  ids = {"bos_token_id": getattr(tok, "bos_id", None), "eos_token_id": tok.eos_id,
         "pad_token_id": getattr(tok, "pad_id", None)}
  return {k: int(v) for k, v in ids.items() if v is not None}


def copy_tokenizer(workdir: str, out: str) -> None:
  """The run's ``tokenizer/`` into ``out``, with a generation_config.json (stop ids)
  when the tokenizer brings none."""
  from jaxalign.train import rundir  # pylint: disable=g-import-not-at-top
  src = os.path.join(workdir, rundir.TOKENIZER_DIR)
  tok = rundir.load_tokenizer_dir(src)  # fails here, not in a later load
  for name in sorted(os.listdir(src)):
    shutil.copy2(os.path.join(src, name), os.path.join(out, name))
  gen = os.path.join(out, "generation_config.json")
  if not os.path.exists(gen):
    with open(gen, "w", encoding="utf-8") as f:
      json.dump(_generation_config(tok), f, indent=2)


def _check_args(record: dict, lora: str, workdir: str) -> None:
  if lora not in LORA_MODES:
    raise ValueError(f"--lora={lora!r}: one of {LORA_MODES}.")
  lcfg = _lora_enabled(record)
  if record["config"]["model"].get("head") == "scalar" and lcfg and lora == "adapter":
    raise ValueError(f"--workdir={workdir!r} is a LoRA reward model: export it with "
                     "--lora merged (a sequence-classification directory; PEFT's "
                     "adapter layout holds no reward head).")


def _lora_enabled(record: dict) -> bool:
  from jaxalign.train import rundir  # pylint: disable=g-import-not-at-top
  return rundir.lora_config(record["config"]["model"]).enabled


def _export_reward(workdir: str, step: int, out: str, arch: Any, architecture: str
                   ) -> dict:
  """A reward-model run as ``XForSequenceClassification`` (module doc)."""
  from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
  from jaxalign.train import rundir  # pylint: disable=g-import-not-at-top
  lm, head, _ = rundir.run_lm_params(workdir, step, "--workdir")
  tok = rundir.load_tokenizer_dir(os.path.join(workdir, rundir.TOKENIZER_DIR))
  pad = getattr(tok, "pad_id", None)
  hf.save_hf_reward(out, arch, lm, head, architecture, pad_token_id=pad)
  note = {"reward_model": True, "pad_token_id": pad, "score_bias": float(head["b"])}
  eos = {tok.eos_id, *getattr(tok, "eos_ids", ())}
  if pad is not None and pad in eos:
    note["warning"] = (f"pad id {pad} is an EOS id: transformers reads the score one "
                       "token before a trailing EOS, jaxalign at the EOS")
  return note


def export(workdir: str, out: str, *, step: int | None = None, lora: str = "adapter",
           architecture: str = "") -> dict:
  """Writes the export (see the module doc); returns what was written."""
  from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
  from jaxalign.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from jaxalign.train import objectives  # pylint: disable=g-import-not-at-top
  from jaxalign.train import rundir  # pylint: disable=g-import-not-at-top
  record = rundir.read_run_record(workdir, "--workdir")
  _check_args(record, lora, workdir)
  step = rundir.resolve_step(workdir, step, "--workdir")
  model = record["config"]["model"]
  arch = rundir.arch_from_record(record["resolved"]["arch"])
  architecture = architecture or record["resolved"].get("hf_model_type") or "llama"
  lcfg = rundir.lora_config(model)
  os.makedirs(out, exist_ok=True)
  note = {"workdir": os.path.abspath(workdir), "step": step, "architecture": architecture}
  if model.get("head") == "scalar":
    note.update(_export_reward(workdir, step, out, arch, architecture))
    note["lora"] = "merged" if lcfg.enabled else "none"
  elif lcfg.enabled and lora == "adapter":
    adapters = rundir.checkpoint_params(workdir, step)[objectives.LORA_KEY]
    base = model.get("hf_path") if not model.get("init_from") else ""
    if not base:
      base = os.path.join(os.path.abspath(out), "base")
      hf.save_hf(base, arch, rundir.initial_lm_params(record, lcfg.base_dtype),
                 architecture)
      copy_tokenizer(workdir, base)
    lora_lib.save_peft(out, arch, adapters, lcfg, base_model=base)
    note.update(lora="adapter", base=base)
  else:
    params = rundir.run_lm_params(workdir, step, "--workdir")[0]
    hf.save_hf(out, arch, params, architecture)
    note["lora"] = "merged" if lcfg.enabled else "none"
  copy_tokenizer(workdir, out)
  with open(os.path.join(out, EXPORT_NOTE), "w", encoding="utf-8") as f:
    json.dump(note, f, indent=1)
  return note


def parse_args(argv: list[str]):
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m jaxalign.export",
                              description=__doc__.split("\n\n")[1])
  p.add_argument("--workdir", required=True, help="the run directory to export")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--lora", default="adapter", choices=LORA_MODES,
                 help="LoRA runs: PEFT adapter layout, or merged weights")
  p.add_argument("--architecture", default="", help="HF model type to write "
                 "(default: model.hf_path's, else llama)")
  p.add_argument("--debug", action="store_true", help="show tracebacks")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from jaxalign import main as main_lib  # pylint: disable=g-import-not-at-top
  try:
    note = export(args.workdir, args.out, step=args.step, lora=args.lora,
                  architecture=args.architecture)
  except (ValueError, FileNotFoundError) as e:
    if args.debug:
      raise
    print(f"error: {e}\n(add --debug for the traceback)", file=sys.stderr, flush=True)
    return main_lib.EXIT_USER_ERROR
  print(f"exported step {note['step']} of {note['workdir']} to {args.out} "
        f"({note['architecture']}, lora: {note['lora']})", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
