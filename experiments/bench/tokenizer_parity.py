"""A checkpoint's chat-template token ids: jaxalign vs transformers on real HH conversations.

Every ``chosen`` and ``rejected`` conversation of the HH file is parsed into messages
(``parse_hh_messages``), rendered with the checkpoint's chat template and tokenised by
jaxalign (``tokenizer.from_pretrained(dir).encode_chat``) and by
``transformers.AutoTokenizer.apply_chat_template(..., tokenize=True)``; prints how many
are identical and the first differences.

  .venv/bin/python experiments/bench/tokenizer_parity.py            # packaged SmolLM2
  .venv/bin/python experiments/bench/tokenizer_parity.py --hf_dir DIR --data FILE
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time

_DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                             "data", "hh-rlhf-harmless-base-test.jsonl.gz")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default=_DEFAULT_DATA)
  p.add_argument("--hf_dir", default="", help="checkpoint directory (default: SmolLM2)")
  args = p.parse_args()
  import transformers
  from jaxalign.data import tokenizer as tok_lib
  from jaxalign.models import packaged
  path = args.hf_dir or packaged.smollm2_135m_instruct()
  tok = tok_lib.from_pretrained(path)
  ref = transformers.AutoTokenizer.from_pretrained(path)
  with gzip.open(args.data, "rt", encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  total = same = 0
  t0 = time.perf_counter()
  for lineno, record in enumerate(records, start=1):
    for side in ("chosen", "rejected"):
      messages = tok_lib.parse_hh_messages(record[side])
      ids, _ = tok.encode_chat(messages)
      want = ref.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
      total += 1
      if ids.tolist() == list(want):
        same += 1
      elif total - same <= 3:
        print(f"line {lineno} {side}: {len(ids)} vs {len(want)} tokens differ")
  print(f"{path}: {same} / {total} conversations ({len(records)} records x chosen, "
        f"rejected) tokenise identically to transformers; {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
  main()
