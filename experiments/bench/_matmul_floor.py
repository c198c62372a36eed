"""The matmul floor of a compiled program: its dots, each timed alone.

`compiled_dots` reads the optimised HLO of a compiled executable (what XLA really
runs: after CSE, fusion and layout assignment) and lists every dot with its operand
shapes, dimension numbers and how many times it runs (fused computations count once
per call site, while-loop bodies once per known trip count). `time_dots` times each
distinct dot alone with `jax.lax.dot_general` on random operands (best of a few calls,
after a warm-up) and returns the summed time: how long the program would take if all
the work other than its matmuls were free and each matmul ran as fast as it runs in
isolation. Its ratio to the measured step time is the share of the step spent outside
matmuls; its FLOP rate is the ceiling for the step's FLOP rate on this machine.

`time_once` / `best_time` are the benchmarks' one timing loop (also used by
model_flops.py and dpo_layouts.py, which import this module as a sibling).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time

_COMP_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w[\w\-]*)\((.*)$")
_CALLS = re.compile(r"(?:calls|body|to_apply|condition)=%([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_DIMS = re.compile(r"(lhs_batch_dims|lhs_contracting_dims|rhs_batch_dims|"
                   r"rhs_contracting_dims)=\{([\d,]*)\}")


@dataclasses.dataclass(frozen=True)
class Dot:
  """One dot of the program: operand shapes, dimension numbers, dtype."""
  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  lhs_contract: tuple[int, ...]
  rhs_contract: tuple[int, ...]
  lhs_batch: tuple[int, ...]
  rhs_batch: tuple[int, ...]
  dtype: str

  @property
  def flops(self) -> float:
    """2 x (product of lhs dims) x (rhs dims that are neither batch nor contracting)."""
    free_rhs = [d for i, d in enumerate(self.rhs)
                if i not in self.rhs_contract and i not in self.rhs_batch]
    n = 1
    for d in list(self.lhs) + free_rhs:
      n *= d
    return 2.0 * n


def _dims(text: str) -> tuple[int, ...]:
  return tuple(int(d) for d in text.split(",") if d)


def compiled_dots(hlo_text: str) -> collections.Counter:
  """Counter of `Dot` -> number of executions per call of the program."""
  comps: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    m = _COMP_HEADER.match(line)
    if m:
      current = m.group(1)
      comps[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None and line.strip() not in ("", "}"):
      comps[current].append(line)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")

  # How many times each computation runs per program call (call graph walk).
  runs: collections.Counter = collections.Counter()

  def visit(name: str, times: int) -> None:
    runs[name] += times
    for line in comps.get(name, []):
      trip = _TRIP.search(line)
      for callee in _CALLS.findall(line):
        is_body = f"body=%{callee}" in line
        visit(callee, times * (int(trip.group(1)) if trip and is_body else 1))

  visit(entry, 1)
  dots: collections.Counter = collections.Counter()
  for name, times in runs.items():
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    for line in comps.get(name, []):
      m = _INSTR.match(line)
      if not m:
        continue
      out, dtype, dims, op, rest = m.groups()
      shapes[out] = (dtype, _dims(dims))
      if op != "dot":
        continue
      lhs_name, rhs_name = re.findall(r"%([\w.\-]+)", rest.split(")")[0])[:2]
      nums = {k: _dims(v) for k, v in _DIMS.findall(rest)}
      dots[Dot(lhs=shapes[lhs_name][1], rhs=shapes[rhs_name][1],
               lhs_contract=nums.get("lhs_contracting_dims", ()),
               rhs_contract=nums.get("rhs_contracting_dims", ()),
               lhs_batch=nums.get("lhs_batch_dims", ()),
               rhs_batch=nums.get("rhs_batch_dims", ()),
               dtype=shapes[lhs_name][0])] += times
  return dots


def time_once(call) -> tuple[float, float]:
  """(wall seconds, process-CPU seconds) of one call of `call()`, waited for."""
  import jax  # pylint: disable=g-import-not-at-top
  w0, c0 = time.perf_counter(), time.process_time()
  jax.block_until_ready(call())
  return time.perf_counter() - w0, time.process_time() - c0


def best_time(call, repeats: int) -> tuple[float, float]:
  """(best wall, best process-CPU seconds) over `repeats` calls after one warm-up call."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(call())
  times = [time_once(call) for _ in range(repeats)]
  return min(w for w, _ in times), min(c for _, c in times)


_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}


def time_dots(dots: collections.Counter, repeats: int = 5) -> list[tuple[Dot, int, float]]:
  """[(dot, count, best seconds of one call)], each dot jitted and timed alone."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  # pylint: enable=g-import-not-at-top
  out = []
  key = jax.random.key(0)
  for dot, count in dots.items():
    dtype = jnp.dtype(_DTYPES.get(dot.dtype, dot.dtype))
    lhs = jax.random.normal(key, dot.lhs, dtype)
    rhs = jax.random.normal(key, dot.rhs, dtype)
    dn = ((dot.lhs_contract, dot.rhs_contract), (dot.lhs_batch, dot.rhs_batch))
    fn = jax.jit(lambda a, b, dn=dn: jax.lax.dot_general(a, b, dn))
    best, _ = best_time(lambda: fn(lhs, rhs), repeats)
    out.append((dot, count, best))
  return out
