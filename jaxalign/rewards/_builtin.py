"""The built-in reward functions (registered in ``jaxalign.rewards``).

Each takes ``(prompts, completions, **fields)`` over a batch of decoded text and
returns one float per completion; settings are keyword-only with defaults.

* ``accuracy``: 1 when the completion's final answer equals the record's ``answer``
  mathematically (``math-verify``: numbers, fractions, LaTeX, sets; ``"19"``,
  ``"The answer is 19."`` and ``"\\boxed{19}"`` all match ``19``), else 0. When the
  answer is a number, the completion's final answer must *state* a number (an integer,
  decimal or fraction), not an expression that evaluates to it: math-verify would
  credit ``"16 + 13 = "`` for ``29`` (it extracts and evaluates ``16 + 13``), paying a
  policy that restates the question.
* ``exact_match``: 1 when the completion, stripped, equals ``answer`` (stripped).
* ``format``: 1 when the completion (stripped) matches the regular expression
  ``pattern`` in full, else 0.
* ``overlong``: DAPO's soft overlong punishment (Yu et al. 2025, "DAPO: an
  open-source LLM reinforcement learning system at scale", eq. 13) of a completion
  of ``|y|`` tokens, with ``L_max = max_len`` and ``L_cache = cache``::

      R(y) = 0                                   |y| <= L_max - L_cache
             ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
             -1                                  L_max < |y|

* ``length``: ``|y| / max_len`` (in [0, 1] for sampled completions); a negative
  weight makes it a brevity penalty.

Token lengths come from the ``completion_length`` field (tokens the sampler
generated, EOS included), which the RL scorer adds to every call.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np


# The last number in a text: optional sign, digits with thousands separators,
# decimals, or a fraction a/b. Used when math-verify finds nothing to parse.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")


_PLAIN = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")

# A stated value, as math-verify extracts it (spaces removed): a signed integer or
# decimal, a fraction a/b or \frac{a}{b}. "16+13" or "2^{3}" is an expression, not one.
_VALUE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?|[-+]?\\d?frac\{\d+\}\{\d+\}")


def _need(fields: dict, name: str, fn: str, n: int) -> list[Any]:
  if name not in fields:
    raise KeyError(f"{fn} needs the prompt records' {name!r} field (fields present: "
                   f"{sorted(fields) or 'none'})")
  values = list(fields[name])
  if len(values) != n:
    raise ValueError(f"{fn}: field {name!r} has {len(values)} values for {n} "
                     "completions")
  return values


def last_number(text: str) -> float | None:
  """The value of the last number written in ``text`` (None if there is none)."""
  found = _NUMBER.findall(text)
  if not found:
    return None
  s = found[-1].replace(",", "")
  if "/" in s:
    num, den = s.split("/")
    return float(num) / float(den) if float(den) else None
  return float(s)


def _numeric_equal(gold: str, text: str) -> bool:
  want, got = last_number(gold), last_number(text)
  if want is None or got is None:
    return gold.strip() == text.strip() and bool(gold.strip())
  return abs(want - got) <= 1e-9 * max(1.0, abs(want))


def answers_equal(gold: Any, text: str) -> bool:
  """Whether ``text``'s final answer equals ``gold`` (math-verify, else numbers)."""
  gold = str(gold)
  g, t = gold.strip(), text.strip()  # (str.strip also drops \x1c-\x1f; float() not)
  if _PLAIN.fullmatch(g) and _PLAIN.fullmatch(t):
    # Two plain decimals: math-verify's answer too, without its ~3 ms parse (an RL
    # iteration scores hundreds of completions).
    return float(g) == float(t)
  try:  # Imported here: it loads sympy, which config validation need not pay for.
    import math_verify  # pylint: disable=g-import-not-at-top
  except ImportError:  # an install without it (setup.py lists it): plain numbers
    return _numeric_equal(gold, text)
  # math-verify's timeouts use SIGALRM, which only the main thread may set.
  main = threading.current_thread() is threading.main_thread()
  timeout = 5 if main else None
  target = math_verify.parse(text, parsing_timeout=timeout)
  if not target:
    return False
  if _NUMBER.fullmatch(g) and not _VALUE.fullmatch(re.sub(r"\s", "", target[-1])):
    return False  # a numeric answer must be stated, not left as an expression (doc)
  return bool(math_verify.verify(math_verify.parse(gold, parsing_timeout=timeout),
                                 target, timeout_seconds=timeout))


def accuracy(prompts: Sequence[str], completions: Sequence[str], **fields) -> list[float]:
  """1.0 where the completion's answer equals the ``answer`` field, else 0.0."""
  del prompts
  gold = _need(fields, "answer", "accuracy", len(completions))
  return [float(answers_equal(g, c)) for g, c in zip(gold, completions)]


def exact_match(prompts: Sequence[str], completions: Sequence[str], **fields
                ) -> list[float]:
  """1.0 where ``completion.strip() == str(answer).strip()``, else 0.0."""
  del prompts
  gold = _need(fields, "answer", "exact_match", len(completions))
  return [float(c.strip() == str(g).strip()) for g, c in zip(gold, completions)]


def format_match(prompts: Sequence[str], completions: Sequence[str], *,
                 pattern: str = "", **fields) -> list[float]:
  """1.0 where the stripped completion matches ``pattern`` in full (re.DOTALL)."""
  del prompts, fields
  if not pattern:
    raise ValueError("format needs a regular expression: set rl.format_pattern")
  regex = re.compile(pattern, re.DOTALL)
  return [float(regex.fullmatch(c.strip()) is not None) for c in completions]


def _lengths(fields: dict, fn: str, n: int) -> np.ndarray:
  return np.asarray(_need(fields, "completion_length", fn, n), np.float64)


def overlong(prompts: Sequence[str], completions: Sequence[str], *, max_len: int = 0,
             cache: int = 0, **fields) -> np.ndarray:
  """DAPO's soft overlong punishment (module doc) of each completion's token length."""
  del prompts
  if not 0 < cache <= max_len:
    raise ValueError(f"overlong needs 0 < cache <= max_len, got cache={cache}, "
                     f"max_len={max_len} (rl.overlong_cache, rl.max_new_tokens)")
  n = _lengths(fields, "overlong", len(completions))
  free = max_len - cache
  return np.where(n <= free, 0.0, np.where(n <= max_len, (free - n) / cache, -1.0))


def length(prompts: Sequence[str], completions: Sequence[str], *, max_len: int = 0,
           **fields) -> np.ndarray:
  """Each completion's token length over ``max_len``."""
  del prompts
  if max_len < 1:
    raise ValueError(f"length needs max_len >= 1, got {max_len} (rl.max_new_tokens)")
  return _lengths(fields, "length", len(completions)) / max_len


BUILTIN = {"accuracy": accuracy, "exact_match": exact_match, "format": format_match,
           "overlong": overlong, "length": length}
