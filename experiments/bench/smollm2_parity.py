"""SmolLM2-135M-Instruct through jaxalign vs transformers on real HH-RLHF conversations.

For the first ``--conversations`` chosen conversations of the HH file, rendered with the
checkpoint's chat template by jaxalign's tokenizer (ids checked equal to transformers'
``apply_chat_template``): the max abs difference of the logits (f32, eager attention
in transformers). Then greedy generation of ``--new_tokens`` tokens for the prompts of
the file's last 8 records with jaxalign's KV-cache sampler vs ``generate``.

  .venv/bin/python experiments/bench/smollm2_parity.py \
      --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time

import numpy as np

_DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                             "data", "hh-rlhf-harmless-base-test.jsonl.gz")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default=_DEFAULT_DATA)
  p.add_argument("--conversations", type=int, default=64)
  p.add_argument("--prompts", type=int, default=8)
  p.add_argument("--new_tokens", type=int, default=32)
  args = p.parse_args()
  import jax
  import jax.numpy as jnp
  import torch
  import transformers
  from jaxalign import generate
  from jaxalign.data import tokenizer as tok_lib
  from jaxalign.models import hf, packaged, transformer

  path = packaged.smollm2_135m_instruct()
  with gzip.open(args.data, "rt", encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  tok = tok_lib.from_pretrained(path)
  hf_tok = transformers.AutoTokenizer.from_pretrained(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager").eval()
  cfg, params = hf.load(path)
  graphdef, _ = transformer.init(cfg, jax.random.key(0))
  fwd = jax.jit(lambda p, t: jnp.einsum(
      "btd,dv->btv", *transformer.forward(graphdef, p, t, jnp.arange(t.shape[1])[None])))

  worst, n_tokens, max_logit, t0 = 0.0, 0, 0.0, time.time()
  for r in records[:args.conversations]:
    messages = tok_lib.parse_hh_messages(r["chosen"])
    ids, _ = tok.encode_chat(messages)
    ref_ids = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert list(ids) == list(ref_ids), "token ids differ from transformers'"
    ids = ids[:512]
    # One compiled shape per 64-token bucket keeps compiles few.
    t = -(-len(ids) // 64) * 64
    padded = np.zeros((1, t), np.int32)
    padded[0, :len(ids)] = ids
    ours = np.asarray(fwd(params, jnp.asarray(padded)))[0, :len(ids)]
    with torch.no_grad():
      theirs = model(torch.tensor([ids.tolist()])).logits[0].numpy()
    worst = max(worst, float(np.abs(ours - theirs).max()))
    max_logit = max(max_logit, float(np.abs(theirs).max()))
    n_tokens += len(ids)
  print(f"logits: {args.conversations} HH conversations, {n_tokens} tokens: max abs diff "
        f"{worst:.2e} (|logit| up to {max_logit:.1f}), {time.time() - t0:.0f}s")

  prompts = [tok_lib.parse_hh_messages(r["chosen"])[:-1] for r in records[-args.prompts:]]
  ids = [generate.prompt_ids(tok, m)[-256:] for m in prompts]
  ours = generate.generate(cfg, params, tok, ids, max_new_tokens=args.new_tokens,
                           batch_size=len(ids))
  same = 0
  for i, (m, ours_text) in enumerate(zip(ids, ours)):
    with torch.no_grad():
      out = model.generate(torch.tensor([m.tolist()]), max_new_tokens=args.new_tokens,
                           do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    gen = out[0, len(m):].tolist()
    if gen and gen[-1] == tok.eos_id:
      gen = gen[:-1]
    theirs_text = tok.decode(gen)
    same += ours_text == theirs_text
    if ours_text != theirs_text:
      print(f"prompt {i}: jaxalign {ours_text!r}\n          transformers {theirs_text!r}")
  print(f"greedy: {same}/{len(ids)} prompts x {args.new_tokens} tokens identical")


if __name__ == "__main__":
  main()
