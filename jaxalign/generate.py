"""Responses to prompts with the KV-cache sampler: the library side of generation.

`prompt_ids` renders a conversation the way training renders its prompts (the
checkpoint's chat template with the generation prompt, or the HH-style template of the
byte / SentencePiece tokenizers), and `generate` decodes batches of prompts with
`models.sampling.Sampler` (left-padded to one bucket, so one compiled program) and
returns the completion texts, cut at the tokenizer's EOS.
"""

from __future__ import annotations

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


def generate(arch: Any, params: Any, tokenizer: Any, prompts: Sequence[np.ndarray], *,
             max_new_tokens: int, batch_size: int = 8, greedy: bool = True,
             temperature: float = 1.0, seed: int = 0,
             prompt_len: int | None = None) -> list[str]:
  """Completion text (EOS and what follows dropped) for each prompt, in order."""
  prompt_len = prompt_len or max(len(p) for p in prompts)
  scfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, greedy=greedy,
                                 temperature=temperature, **stop_tokens(tokenizer))
  sampler = sampling.Sampler(arch, scfg, batch=batch_size, prompt_len=prompt_len)
  key = jax.random.key(seed)
  texts: list[str] = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    n_real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n_real)  # Same shape for the last batch.
    toks, lens = left_pad(chunk, prompt_len)
    out = sampler(params, toks, lens, jax.random.fold_in(key, start))
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    for i in range(n_real):
      ids = tokens[i][mask[i] > 0].tolist()
      if ids and ids[-1] in scfg.stop_ids:
        ids = ids[:-1]
      texts.append(tokenizer.decode(ids))
  return texts
