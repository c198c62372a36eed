"""A checkpoint's chat-template token ids: jaxalign vs transformers on real HH conversations.

Every ``chosen`` and ``rejected`` conversation of the HH file is parsed into messages
(``parse_hh_messages``), rendered with the checkpoint's chat template and tokenised by
jaxalign (``tokenizer.from_pretrained(dir).encode_chat``) and by
``transformers.AutoTokenizer.apply_chat_template(..., tokenize=True)``. Reported:

* ``whole``: conversations whose ids are identical (the goal: all of them);
* ``prompt``: prompts (every turn before the final reply, with the generation prompt)
  whose ids are identical to transformers' ``add_generation_prompt=True`` ids;
* ``split``: pairs whose ``encode_chat_split`` prompt + chosen / rejected completion is
  exactly each whole conversation, and whose completions contain an eos id (the
  end-of-turn token is scored), and how many prompts BPE shortened at the boundary;
* the first mismatches, with the token position and the text around it.

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


def first_difference(a: list[int], b: list[int]) -> int | None:
  """Index of the first differing token (or the shorter length), None if equal."""
  if a == b:
    return None
  return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def describe(tok, ours: list[int], theirs: list[int], at: int) -> str:
  lo = max(0, at - 3)
  return (f"first difference at token {at} of {len(ours)} vs {len(theirs)}: jaxalign "
          f"{ours[lo:at + 3]} {tok.decode(ours[lo:at + 3])!r}, transformers "
          f"{theirs[lo:at + 3]} {tok.decode(theirs[lo:at + 3])!r}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default=_DEFAULT_DATA)
  p.add_argument("--hf_dir", default="", help="checkpoint directory (default: SmolLM2)")
  p.add_argument("--limit", type=int, default=0, help="first N records only (0: all)")
  p.add_argument("--show", type=int, default=3, help="mismatches to print")
  args = p.parse_args()
  import transformers  # pylint: disable=g-import-not-at-top
  from jaxalign.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  if args.hf_dir:
    path = args.hf_dir
  else:
    from jaxalign.models import packaged  # pylint: disable=g-import-not-at-top
    path = packaged.smollm2_135m_instruct()
  tok = tok_lib.from_pretrained(path)
  ref = transformers.AutoTokenizer.from_pretrained(path)
  with gzip.open(args.data, "rt", encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  if args.limit:
    records = records[:args.limit]

  def ref_ids(messages, **kw):
    out = ref.apply_chat_template(messages, tokenize=True, **kw)
    return [int(i) for i in (out["input_ids"] if hasattr(out, "keys") else out)]

  counts = dict(whole=0, prompt=0, prompts=0, split=0, pairs=0, merged=0, errors=0)
  shown = 0
  t0 = time.perf_counter()
  for lineno, record in enumerate(records, start=1):
    convs = {side: tok_lib.parse_hh_messages(record[side]) for side in ("chosen", "rejected")}
    wholes = {}
    for side, messages in convs.items():
      ours = tok.encode_chat(messages)[0].tolist()
      wholes[side] = ours
      at = first_difference(ours, ref_ids(messages))
      counts["whole"] += at is None
      if at is not None and shown < args.show:
        shown += 1
        print(f"line {lineno} {side}: {describe(tok, ours, ref_ids(messages), at)}")
    head = convs["chosen"][:-1]
    if head != convs["rejected"][:-1] or convs["chosen"][-1]["role"] != "assistant":
      continue  # not a pair that shares its prompt (none in the HH test split)
    counts["prompts"] += 1
    text = tok.apply_chat_template(head, add_generation_prompt=True)
    generation_prompt = tok.encode(text).tolist()
    counts["prompt"] += generation_prompt == ref_ids(head, add_generation_prompt=True)
    counts["pairs"] += 1
    try:
      prompt, comps = tok.encode_chat_split(head, [convs["chosen"][-1:],
                                                   convs["rejected"][-1:]])
    except ValueError as e:
      counts["errors"] += 1
      if shown < args.show:
        shown += 1
        print(f"line {lineno}: encode_chat_split: {e}")
      continue
    prompt = prompt.tolist()
    exact = all(prompt + c.tolist() == wholes[s] for s, c in zip(("chosen", "rejected"), comps))
    ends_eos = all(any(int(i) in tok.eos_ids for i in c) for c in comps)
    counts["split"] += exact and ends_eos
    counts["merged"] += len(prompt) < len(generation_prompt)
  n = 2 * len(records)
  print(f"{path}")
  print(f"  whole:  {counts['whole']} / {n} conversations ({len(records)} records x chosen, "
        "rejected) tokenise identically to transformers")
  print(f"  prompt: {counts['prompt']} / {counts['prompts']} generation prompts identical")
  print(f"  split:  {counts['split']} / {counts['pairs']} pairs: prompt + completion == whole "
        f"and the eos is scored ({counts['merged']} prompts shortened by a BPE merge at "
        f"the boundary, {counts['errors']} errors)")
  print(f"  {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
  main()
