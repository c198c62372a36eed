"""The HLO dot reader behind `experiments/bench/model_flops.py --floor`.

Oracle: the FLOPs of the dots it finds in a compiled program equal the analytic count
of the matmuls the program was written with (plain, batched, inside a loop of known
trip count, and inside a fusion).
"""

import jax
import jax.numpy as jnp

from experiments.bench import _matmul_floor


def test_dots_and_flops_of_a_compiled_program():
  def f(a, b, q, k, w):
    x = a @ b                                         # 2 * 64 * 32 * 48
    s = jnp.einsum("bik,bjk->bij", q, k)              # 2 * 3 * 16 * 8 * 16, batched
    y = jax.lax.fori_loop(0, 5, lambda i, y: jnp.tanh(y @ w), x)  # 5 x 2 * 64 * 48 * 48
    return jnp.sum(y) + jnp.sum(jnp.exp(s))

  args = (jnp.ones((64, 32)), jnp.ones((32, 48)), jnp.ones((3, 16, 8)),
          jnp.ones((3, 16, 8)), jnp.ones((48, 48)))
  hlo = jax.jit(f).lower(*args).compile().as_text()
  dots = _matmul_floor.compiled_dots(hlo)
  want = 2 * 64 * 32 * 48 + 2 * 3 * 16 * 8 * 16 + 5 * 2 * 64 * 48 * 48
  assert sum(d.flops * n for d, n in dots.items()) == want
  assert sum(dots.values()) == 7
  loop_dot = [d for d, n in dots.items() if n == 5]
  assert len(loop_dot) == 1 and loop_dot[0].rhs == (48, 48)

  timed = _matmul_floor.time_dots(dots, repeats=1)
  assert {d for d, _, _ in timed} == set(dots)
  assert all(sec > 0 for _, _, sec in timed)
