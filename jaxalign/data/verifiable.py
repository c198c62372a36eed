"""A built-in verifiable task: small arithmetic questions in text, answers checked by
a function (``jaxalign.rewards.accuracy``), with a held-out split.

A question is ``"{a}{op}{b}="`` with operands ``0 <= a, b <= max_operand`` and
``op`` from ``operations`` (``+``, ``-``; a subtraction keeps ``a >= b`` so that
answers are never negative); its answer is the decimal result, e.g. ``"23+19="`` ->
``"42"``. Every distinct question is enumerated once, shuffled by ``seed``; the first
``num_heldout`` form the held-out split and the next (at most ``num_train``) the
train split, so the splits are disjoint and fixed by the seed alone.

Records are JSON-like dicts in the project's ``prompt`` format (``{"prompt",
"answer"}``, the ``answer`` kept as a field for the reward functions) and ``sft``
format (``{"prompt", "completion"}``, for a warm-up): they are tokenized by
`jaxalign.data.formats` with the run's tokenizer, like a record file would be. A
tokenizer with a chat template (a real instruct checkpoint's) gets the question as a
user message instead, ``CHAT_QUESTION`` ("What is 23+19? Answer with the number
only."), rendered by its template with the generation prompt: an instruct model
answers chat turns, not bare ``"23+19="`` text. Byte / SentencePiece tokenizers keep
the plain text.

Config (``data.source = "arithmetic"``, online RL only): ``data.task.max_operand``,
``data.task.operations``, ``data.task.num_train`` (train split, at most),
``eval.num_examples`` (held-out split), ``data.shuffle_seed`` (the split).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxalign.data import formats
from jaxalign.data.examples import PromptExample, SFTExample

OPERATIONS = "+-"
TEMPLATE = "{a}{op}{b}="
CHAT_QUESTION = "What is {q}? Answer with the number only."


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
  """The task's constants (module doc)."""
  max_operand: int = 9
  operations: str = "+-"
  num_train: int = 2048
  num_heldout: int = 32
  seed: int = 0

  def __post_init__(self):
    if self.max_operand < 1:
      raise ValueError(f"data.task.max_operand={self.max_operand} must be >= 1.")
    if not self.operations or set(self.operations) - set(OPERATIONS) or \
        len(set(self.operations)) != len(self.operations):
      raise ValueError(f"data.task.operations={self.operations!r} must be a non-empty "
                       f"string of distinct characters from {OPERATIONS!r}.")
    total = num_questions(self)
    if not 1 <= self.num_heldout < total:
      raise ValueError(f"eval.num_examples={self.num_heldout} held-out questions: the "
                       f"task has {total} distinct questions (max_operand="
                       f"{self.max_operand}, operations={self.operations!r}); use 1 to "
                       f"{total - 1}, or raise data.task.max_operand.")
    if self.num_train < 1:
      raise ValueError(f"data.task.num_train={self.num_train} must be >= 1.")


def _questions(task: ArithmeticTask) -> list[tuple[int, str, int]]:
  n = task.max_operand + 1
  out = []
  for op in task.operations:
    out += [(a, op, b) for a in range(n) for b in range(n) if op == "+" or a >= b]
  return out


def num_questions(task: ArithmeticTask) -> int:
  return len(_questions(task))


def answer(a: int, op: str, b: int) -> int:
  return a + b if op == "+" else a - b


def records(task: ArithmeticTask) -> tuple[list[dict], list[dict]]:
  """(train, held-out) ``{"prompt", "answer"}`` records (module doc)."""
  qs = _questions(task)
  order = np.random.default_rng(task.seed).permutation(len(qs))
  rec = [{"prompt": TEMPLATE.format(a=a, op=op, b=b), "answer": str(answer(a, op, b))}
         for a, op, b in (qs[i] for i in order)]
  held = rec[:task.num_heldout]
  return rec[task.num_heldout:task.num_heldout + task.num_train], held


def _prompt(record: dict, tokenizer) -> str | list[dict]:
  """The record's prompt as the tokenizer takes it: a user message for a tokenizer
  with a chat template (module doc), else the plain ``"23+19="`` text."""
  if not getattr(tokenizer, "chat_template", None):
    return record["prompt"]
  question = CHAT_QUESTION.format(q=record["prompt"].removesuffix("="))
  return [{"role": "user", "content": question}]


def prompt_examples(recs: list[dict], tokenizer) -> list[PromptExample]:
  """The records as ``prompt``-format examples (the answer stays a field)."""
  return [formats.tokenize_record(formats.parse_object(
      {"prompt": _prompt(r, tokenizer), "answer": r["answer"]}, "prompt"), tokenizer)
          for r in recs]


def sft_examples(recs: list[dict], tokenizer) -> list[SFTExample]:
  """The records as ``sft``-format examples: the answer is the completion (+ EOS; with
  a chat template, the assistant turn)."""
  return [formats.tokenize_record(formats.parse_object(
      {"prompt": _prompt(r, tokenizer), "completion": r["answer"]}, "sft"), tokenizer)
          for r in recs]


def task_from_config(cfg) -> ArithmeticTask:
  """The task of a validated config (``data.task.*``, ``eval.num_examples``,
  ``data.shuffle_seed``; module doc)."""
  t = cfg.data.task
  return ArithmeticTask(max_operand=t.max_operand, operations=t.operations,
                        num_train=t.num_train, num_heldout=cfg.eval.num_examples,
                        seed=cfg.data.shuffle_seed)
