"""Responses to prompts with the KV-cache sampler, and the ``python -m jaxalign.generate``
command.

`prompt_ids` renders a conversation the way training renders its prompts (the
checkpoint's chat template with the generation prompt, or the HH-style template of the
byte / SentencePiece tokenizers), and `generate` decodes batches of prompts with
`models.sampling.Sampler` (left-padded to one bucket, so one compiled program) and
returns the completion texts, cut at the tokenizer's EOS.

The command::

  python -m jaxalign.generate (--workdir W [--step N] | --hf DIR) --prompts P.jsonl \\
      --out OUT.jsonl [--greedy | --temperature T --top_p P] [--max_new_tokens N] \\
      [--batch_size B] [--seed S]

loads a run's checkpoint (`load_model`: its recorded architecture and tokenizer; a
LoRA run merged) or an HF directory (a jaxalign export, or a transformers checkpoint
with its tokenizer), reads one JSON object per line with ``"prompt"`` (plain text,
encoded as training encodes it), ``"messages"`` (a chat list, rendered with the
generation prompt) or ``"prompt_ids"`` (token ids: the synthetic task), and writes
each record back with ``completion``, ``completion_ids``, ``prompt_tokens``,
``completion_tokens`` and ``stopped`` (ended on an eos id). A bad line is an error
naming ``file:line`` (exit code 2, as ``jaxalign.main``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxalign.models import sampling


def prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> np.ndarray:
  """Token ids of a conversation that ends with a user turn, ready for the reply."""
  if getattr(tokenizer, "chat_template", None):
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    ids = tokenizer.encode(text)
  else:
    from jaxalign.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
    template = tok_lib.ChatTemplate()
    ids = tokenizer.encode(template.render_prompt(messages))
    if template.add_bos:
      ids = np.concatenate([[tokenizer.bos_id], ids])
  return np.asarray(ids, np.int32)


def left_pad(prompts: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
  """[B, length] left-padded prompts (pad 0, never attended) and their lengths."""
  out = np.zeros((len(prompts), length), np.int32)
  lens = np.zeros((len(prompts),), np.int32)
  for i, p in enumerate(prompts):
    if len(p) > length:
      raise ValueError(f"prompt {i} has {len(p)} tokens, more than the prompt bucket "
                       f"{length}; raise max_prompt_length.")
    out[i, length - len(p):] = p
    lens[i] = len(p)
  return out, lens


def stop_tokens(tokenizer: Any) -> dict[str, Any]:
  """`sampling.SamplingConfig` stop fields of a tokenizer: its eos id, every other
  id it stops on (a checkpoint's ``eos_ids``) and its pad id."""
  eos = int(tokenizer.eos_id)
  extra = tuple(int(i) for i in getattr(tokenizer, "eos_ids", ()) if int(i) != eos)
  pad = getattr(tokenizer, "pad_id", None)
  return {"eos_id": eos, "extra_eos_ids": extra, "pad_id": 0 if pad is None else int(pad)}


def generate_ids(arch: Any, params: Any, tokenizer: Any, prompts: Sequence[np.ndarray], *,
                 max_new_tokens: int, batch_size: int = 8, greedy: bool = True,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 prompt_len: int | None = None) -> list[tuple[list[int], bool]]:
  """``(completion ids without the stop token, whether it stopped)`` per prompt, in
  order: batches of ``batch_size`` rows, left-padded to one prompt bucket (one
  compiled program), stopping on the tokenizer's eos ids (`stop_tokens`)."""
  prompt_len = prompt_len or max(len(p) for p in prompts)
  scfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, greedy=greedy,
                                 temperature=temperature, top_p=top_p,
                                 **stop_tokens(tokenizer))
  sampler = sampling.Sampler(arch, scfg, batch=batch_size, prompt_len=prompt_len)
  key = jax.random.key(seed)
  out_ids: list[tuple[list[int], bool]] = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    n_real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n_real)  # Same shape for the last batch.
    toks, lens = left_pad(chunk, prompt_len)
    out = sampler(params, toks, lens, jax.random.fold_in(key, start))
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    for i in range(n_real):
      ids = tokens[i][mask[i] > 0].tolist()
      stopped = bool(ids) and ids[-1] in scfg.stop_ids
      out_ids.append((ids[:-1] if stopped else ids, stopped))
  return out_ids


def generate(arch: Any, params: Any, tokenizer: Any, prompts: Sequence[np.ndarray], *,
             max_new_tokens: int, batch_size: int = 8, greedy: bool = True,
             temperature: float = 1.0, seed: int = 0,
             prompt_len: int | None = None) -> list[str]:
  """Completion text (EOS and what follows dropped) for each prompt, in order."""
  ids = generate_ids(arch, params, tokenizer, prompts, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, greedy=greedy, temperature=temperature,
                     seed=seed, prompt_len=prompt_len)
  return [tokenizer.decode(i) for i, _ in ids]


# ----------------------------------------------------------------------------
# The command: a model (a run's checkpoint or an HF directory) and a prompts file.


def load_model(*, workdir: str = "", step: int | None = None, hf_dir: str = ""
               ) -> tuple[Any, Any, Any, str]:
  """``(arch, params, tokenizer, description)`` of a jaxalign run's checkpoint (the
  latest or ``step``; a LoRA run's adapters merged into its base) or of an HF
  directory (a jaxalign export or a transformers checkpoint)."""
  from jaxalign.train import rundir  # pylint: disable=g-import-not-at-top
  if bool(workdir) == bool(hf_dir):
    raise ValueError("give one of --workdir (a jaxalign run) or --hf (an HF directory).")
  if hf_dir:
    from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
    arch, params = hf.load(hf_dir)
    return arch, params, rundir.load_tokenizer_dir(hf_dir), f"--hf {hf_dir}"
  step = rundir.resolve_step(workdir, step, "--workdir")
  params, head, record = rundir.run_lm_params(workdir, step, "--workdir")
  if head is not None:
    raise ValueError(f"--workdir={workdir!r} is a reward-model run (scalar head): it "
                     "scores text, it does not generate it; give a policy run.")
  arch = rundir.arch_from_record(record["resolved"]["arch"])
  tok = rundir.load_tokenizer_dir(os.path.join(workdir, rundir.TOKENIZER_DIR))
  return arch, params, tok, f"--workdir {workdir} step {step}"


def text_prompt_ids(tokenizer: Any, text: str) -> np.ndarray:
  """A plain-text prompt as training encodes one (`jaxalign.data.formats`): BOS first
  when the tokenizer (and jaxalign's template) put one before plain text."""
  from jaxalign.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  ids = np.asarray(tokenizer.encode(text), np.int32).reshape(-1)
  bos = getattr(tokenizer, "bos_id", None)
  if (tok_lib.ChatTemplate().add_bos and getattr(tokenizer, "add_bos", True)
      and bos is not None):
    ids = np.concatenate([np.asarray([bos], np.int32), ids])
  return ids


def _record_ids(tokenizer: Any, record: Any) -> np.ndarray:
  if not isinstance(record, dict):
    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
  fields = [k for k in ("prompt", "messages", "prompt_ids") if k in record]
  if len(fields) != 1:
    raise ValueError("needs exactly one of \"prompt\" (a string), \"messages\" (a chat "
                     f"list) or \"prompt_ids\" (token ids); it has {fields or 'none'}")
  value = record[fields[0]]
  if fields[0] == "prompt":
    if not isinstance(value, str):
      raise ValueError(f"\"prompt\" must be a string, got {type(value).__name__}")
    ids = text_prompt_ids(tokenizer, value)
  elif fields[0] == "messages":
    if not (isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in value)):
      raise ValueError("\"messages\" must be a non-empty list of {\"role\": str, "
                       "\"content\": str}")
    ids = prompt_ids(tokenizer, value)
  else:
    if not (isinstance(value, list) and value and all(
        isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in value)):
      raise ValueError(f"\"prompt_ids\" must be a non-empty list of ids in [0, "
                       f"{tokenizer.vocab_size})")
    ids = np.asarray(value, np.int32)
  if not len(ids):
    raise ValueError("the prompt encodes to no tokens")
  return ids


def read_prompts(path: str, tokenizer: Any) -> list[tuple[dict, np.ndarray]]:
  """(record, prompt ids) per non-empty line of a JSONL file; a bad line raises a
  ValueError naming ``path:line``."""
  if not os.path.isfile(path):
    raise ValueError(f"--prompts={path!r}: no such file.")
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        out.append((record, _record_ids(tokenizer, record)))
      except ValueError as e:  # json.JSONDecodeError included
        raise ValueError(f"{path}:{n}: {e}") from None
  if not out:
    raise ValueError(f"--prompts={path!r}: no prompts (one JSON object per line).")
  return out


def run(args: Any) -> int:
  """Generates for every prompt of ``args.prompts`` into ``args.out``; returns the count."""
  arch, params, tok, source = load_model(workdir=args.workdir, step=args.step,
                                         hf_dir=args.hf)
  prompts = read_prompts(args.prompts, tok)
  ids = generate_ids(arch, params, tok, [p for _, p in prompts],
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                     greedy=args.greedy, temperature=args.temperature, top_p=args.top_p,
                     seed=args.seed)
  with open(args.out, "w", encoding="utf-8") as f:
    for (record, p), (completion, stopped) in zip(prompts, ids):
      f.write(json.dumps({**record, "completion": tok.decode(completion),
                          "completion_ids": completion, "prompt_tokens": len(p),
                          "completion_tokens": len(completion), "stopped": stopped,
                          "model": source}, ensure_ascii=False) + "\n")
  return len(prompts)


def parse_args(argv: Sequence[str]) -> Any:
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m jaxalign.generate",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="", help="a jaxalign run directory")
  p.add_argument("--step", type=int, default=None, help="its checkpoint (latest)")
  p.add_argument("--hf", default="", help="an HF directory (e.g. a jaxalign export)")
  p.add_argument("--prompts", required=True, help="JSONL: \"prompt\", \"messages\" "
                 "or \"prompt_ids\" per line")
  p.add_argument("--out", required=True, help="JSONL written: each record with its "
                 "completion and token counts")
  p.add_argument("--greedy", action="store_true", help="argmax decoding")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--max_new_tokens", type=int, default=128)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--debug", action="store_true", help="show tracebacks")
  return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    n = run(args)
  except (ValueError, FileNotFoundError) as e:
    if args.debug:
      raise
    print(f"error: {e}\n(add --debug for the traceback)", file=sys.stderr, flush=True)
    return 2  # jaxalign.main.EXIT_USER_ERROR
  print(f"wrote {n} completions to {args.out}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
