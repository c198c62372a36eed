"""Policy forward+backward model FLOP/s as a fraction of the measured matmul peak.

One run measures both numbers on the same machine, so their ratio is meaningful
even when absolute speed is not (shared CPUs are noisy):

  1. matmul peak: best time of `jnp.dot` on a few large shapes (after warm-up),
     in the benchmark's dtype, by wall time and by process CPU time;
  2. the step: `jit(value_and_grad(loss))` with loss = -mean of chunked token
     log-probs (`jaxalign.ops.token_logprobs`) of the next token, for the
     Llama-shaped `TransformerConfig.small_30m` (d 512, 6 layers, vocab 32000),
     once with the layers in a scan (the default, `scan_unroll=1`) and once
     unrolled (`scan_unroll=n_layers`).
     1 and 2 are timed in interleaved rounds (each round: every peak shape once,
     then every step once; `--rounds`), and each figure is the best over the
     rounds, so a change in the machine's speed during the run (other tenants
     of a shared VM) reaches the peak and the steps alike;
  3. with --floor: the matmul floor of the unrolled step, i.e. every dot of its
     compiled HLO timed alone (`_matmul_floor.py`): the step's FLOP rate if all
     non-matmul work were free, so the ceiling for the ratio on this machine;
  4. with --profile: the same FLOP accounting for the parts of the step (model
     forward only, transformer body without the log-prob head, the log-prob
     head alone, the attention core alone, one SwiGLU MLP), so one can see
     where the time goes.

Model FLOPs per step (what is reported; rematerialisation is not counted):
  6 * P_nonembed * tokens                       dense matmuls, fwd (2) + bwd (4)
  + 12 * n_layers * B * T^2 * n_heads * head_dim   attention QK^T and PV, fwd + bwd
                                                   (full T x T, as computed)
  + 6 * tokens * d_model * vocab                 unembedding, fwd + bwd
where P_nonembed counts the matmul weights of the layers (norm scales are
counted too; they are 0.02% of it) and tokens = B * T. With one log-prob chunk
(the default here), XLA merges the head's logits recompute with the forward
matmul, so the executed dot FLOPs equal the model FLOPs (--floor prints both).

Memory allocator: XLA:CPU allocates each step's temporaries (one ~1 GB buffer
for this step, with the 262 MB logits) from a worker thread, so glibc's malloc
serves them with a fresh mmap and returns them with munmap: every step the
kernel faults in and zeroes ~1.3 GB of new pages (~320k 4 KiB faults; with
huge pages, 2 MiB zeroing under the first matmul that writes them). By default
the script re-executes itself with GLIBC_TUNABLES set to
  glibc.malloc.hugetlb=1        transparent huge pages for malloc's memory
  glibc.malloc.arena_max=1      one arena, so worker threads' big blocks come
                                from the main heap (a thread arena falls back
                                to mmap for blocks above its 64 MiB heap size)
  glibc.malloc.mmap_max=0       no mmap'd blocks: freed blocks return to the heap
  glibc.malloc.trim_threshold=  and the heap is not trimmed, so the next step
                                reuses pages that are already mapped
(glibc >= 2.35). The cost is resident memory: the process keeps its peak heap
(3.9 GB instead of 1.9 GB max RSS for this step). `--malloc hugepages` sets
only the first line, `--malloc system` none. The matmul peak is measured in
the same process, under the same setting.

Usage:
  .venv/bin/python experiments/bench/model_flops.py --batch 8 --seq 256 --rounds 8
  .venv/bin/python experiments/bench/model_flops.py --floor
  .venv/bin/python experiments/bench/model_flops.py --profile
  .venv/bin/python experiments/bench/model_flops.py --malloc system
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import sys

# A sibling module (stdlib imports only); the script runs as a file, so its folder
# is sys.path[0].
import _matmul_floor  # pylint: disable=g-bad-import-order

# XLA:CPU flags, set before jax starts (benchmark only; the library reads no
# environment). Extend with --xla-flags.
_DEFAULT_XLA_FLAGS = ""


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=8,
                      help="interleaved rounds of peak and step timings")
  parser.add_argument("--steps", type=int, default=5,
                      help="timed calls per part for --floor and --profile")
  parser.add_argument("--dtype", default="float32",
                      choices=["float32", "bfloat16"],
                      help="param and compute dtype of the model")
  parser.add_argument("--chunk-size", type=int, default=2048,
                      help="tokens per log-prob chunk")
  parser.add_argument("--remat", default="none",
                      help="TransformerConfig.remat policy")
  parser.add_argument("--profile", action="store_true",
                      help="also time the parts of the step")
  parser.add_argument("--floor", action="store_true",
                      help="also time every dot of the unrolled step alone")
  parser.add_argument("--malloc", default="retain", choices=sorted(_MALLOC),
                      help="glibc malloc tunables to re-execute with (see the "
                      "module docstring)")
  parser.add_argument("--xla-flags", default=_DEFAULT_XLA_FLAGS,
                      help="appended to XLA_FLAGS before jax starts")
  return parser.parse_args()


def _timeit(fn, *args, steps: int) -> tuple[float, float]:
  """(best wall seconds, best process-CPU seconds) over `steps` calls.

  One warm-up (compile) call first. Process CPU time sums the time of all the
  process's threads: on a machine shared with other jobs it grows only while
  this process runs, so FLOP per CPU-second is far less sensitive to the other
  jobs than FLOP per wall-second (while still charging idle-spinning or
  poorly parallelised threads to the program that owns them).
  """
  return _matmul_floor.best_time(functools.partial(fn, *args), steps)


_MALLOC = {
    "system": "",
    "hugepages": "glibc.malloc.hugetlb=1",
    "retain": ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:"
               "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"),
}


def _reexec_with_malloc(choice: str) -> None:
  """Restart this script with `_MALLOC[choice]` appended to GLIBC_TUNABLES.

  The tunables are read once, when the process starts, so they cannot be set
  from Python; `JAXALIGN_BENCH_MALLOC` marks the restarted process.
  """
  if os.environ.get("JAXALIGN_BENCH_MALLOC") == choice or not _MALLOC[choice]:
    return
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  env = dict(os.environ, JAXALIGN_BENCH_MALLOC=choice,
             GLIBC_TUNABLES=":".join(filter(None, [tunables, _MALLOC[choice]])))
  os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
  args = _parse_args()
  _reexec_with_malloc(args.malloc)
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                               args.xla_flags).strip()

  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxalign.models import transformer
  from jaxalign.ops import naive_token_logprobs
  from jaxalign.ops import token_logprobs
  # pylint: enable=g-import-not-at-top

  dtype = jnp.dtype(args.dtype)
  b, t = args.batch, args.seq
  tokens_n = b * t

  # ---------------------------------------------------------------- matmul peak
  peak_shapes = [(2048, 2048, 2048), (4096, 4096, 4096), (tokens_n, 512, 1536),
                 (tokens_n, 1536, 512), (tokens_n, 512, 32000)]
  print(f"devices: {jax.devices()}  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
  key = jax.random.key(0)
  dot = jax.jit(jnp.dot)
  operands = [(jax.random.normal(key, (m, k), dtype), jax.random.normal(key, (k, n), dtype))
              for m, k, n in peak_shapes]

  # ---------------------------------------------------------------- the model
  cfg = transformer.TransformerConfig.small_30m(
      param_dtype=args.dtype, dtype=args.dtype, remat=args.remat)
  _, params = transformer.init(cfg, jax.random.key(1))
  n_total = transformer.param_count(params)
  n_embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  n_nonembed = n_total - n_embed
  h, kd, l, d, v = cfg.n_heads, cfg.head_dim, cfg.n_layers, cfg.d_model, cfg.vocab_size
  dense_flops = 6.0 * n_nonembed * tokens_n
  attn_flops = 12.0 * l * b * t * t * h * kd
  unembed_flops = 6.0 * tokens_n * d * v
  model_flops = dense_flops + attn_flops + unembed_flops
  print(f"\nmodel: d {d}, {l} layers, {h} heads / {cfg.n_kv_heads} kv, mlp "
        f"{cfg.mlp_dim}, vocab {v}, tied={cfg.tie_embeddings}")
  print(f"  params: {n_total / 1e6:.2f}M total, {n_nonembed / 1e6:.2f}M "
        f"non-embedding, {n_embed / 1e6:.2f}M embedding")
  print(f"  batch {b} x seq {t} = {tokens_n} tokens; model GFLOP/step = "
        f"{dense_flops / 1e9:.1f} dense + {attn_flops / 1e9:.1f} attention + "
        f"{unembed_flops / 1e9:.1f} unembedding = {model_flops / 1e9:.1f}")

  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, v, size=(b, t + 1)), jnp.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

  def make_step(unroll):
    # Only the graph differs between the two steps; the params above serve both.
    gd, _ = jax.eval_shape(
        lambda k: transformer.init(cfg.replace(scan_unroll=unroll), k), jax.random.key(1))

    def loss_fn(params, inputs, targets):
      hidden, unembed = transformer.forward(gd, params, inputs, positions)
      logp = token_logprobs(hidden, unembed, targets, chunk_size=args.chunk_size)
      return -jnp.mean(logp)
    return gd, loss_fn, jax.jit(jax.value_and_grad(loss_fn))

  steps = {}
  for unroll, label in ((1, "layers in a scan (scan_unroll=1, default)"),
                        (l, f"layers unrolled (scan_unroll={l})")):
    graphdef, loss_fn, step = make_step(unroll)
    steps[label] = step
  # From here on: the unrolled step (the loop's last), its loss and its graph.

  # Interleaved rounds: every round times each peak shape once and each step once,
  # so a machine that speeds up or slows down during the run (other tenants) moves
  # the peak and the steps together; each figure is the best over the rounds.
  peak_calls = [((m, k, n), functools.partial(dot, x, y))
                for (m, k, n), (x, y) in zip(peak_shapes, operands)]
  step_calls = {label: functools.partial(step, params, inputs, targets)
                for label, step in steps.items()}
  for call in [c for _, c in peak_calls] + list(step_calls.values()):
    jax.block_until_ready(call())  # compile + warm-up
    jax.block_until_ready(call())  # first reuse of the allocator's memory
  peak_times = {shape: [] for shape, _ in peak_calls}
  step_times = {label: [] for label in step_calls}
  print(f"\ndtype {args.dtype}; {args.rounds} interleaved rounds "
        "(each: every peak shape once, every step once); best of the rounds")
  for _ in range(args.rounds):
    for shape, call in peak_calls:
      peak_times[shape].append(_matmul_floor.time_once(call))
    for label, call in step_calls.items():
      step_times[label].append(_matmul_floor.time_once(call))
  peak_wall = peak_cpu = 0.0
  print("matmul peak:")
  for (m, k, n), times in peak_times.items():
    flops = 2.0 * m * k * n
    wall, cpu = min(w for w, _ in times), min(c for _, c in times)
    peak_wall = max(peak_wall, flops / wall)
    # process_time ticks too coarsely for a call of a few ms (tiny --batch/--seq).
    if wall >= 0.02:
      peak_cpu = max(peak_cpu, flops / cpu)
    print(f"  [{m}x{k}] @ [{k}x{n}]: {flops / wall / 1e9:7.1f} GFLOP/s wall, "
          f"{flops / cpu / 1e9:7.1f} GFLOP per CPU-second")
  print(f"  peak = {peak_wall / 1e9:.1f} GFLOP/s wall, {peak_cpu / 1e9:.1f} "
        "GFLOP per CPU-second (best shape; CPU time over calls of >= 20 ms)")
  print(f"step = jit(value_and_grad(-mean token_logprobs)), chunk {args.chunk_size}:")
  for label, times in step_times.items():
    wall, cpu = min(w for w, _ in times), min(c for _, c in times)
    faults = _minor_faults()
    jax.block_until_ready(step_calls[label]())
    faults = _minor_faults() - faults
    median = sorted(w for w, _ in times)[len(times) // 2]
    print(f"  {label}: best {wall * 1e3:.0f} ms wall (median {median * 1e3:.0f}), "
          f"{cpu * 1e3:.0f} ms CPU; {model_flops / wall / 1e9:.1f} GFLOP/s wall, "
          f"{model_flops / cpu / 1e9:.1f} GFLOP per CPU-second; {faults} minor page "
          "faults per step")
    print(f"  RATIO to matmul peak, {label}: {model_flops / wall / peak_wall:.1%} "
          f"(wall), {model_flops / cpu / peak_cpu:.1%} (CPU time)")

  if args.floor:
    hlo = step.lower(params, inputs, targets).compile().as_text()
    dots = _matmul_floor.compiled_dots(hlo)
    timed = _matmul_floor.time_dots(dots)
    floor = sum(count * sec for _, count, sec in timed)
    executed = sum(dot.flops * count for dot, count, _ in timed)
    wall, _ = _timeit(step, params, inputs, targets, steps=args.steps)
    print(f"\nmatmul floor of the unrolled step: {sum(dots.values())} dots, "
          f"{len(dots)} distinct, {executed / 1e9:.1f} GFLOP executed "
          f"(model FLOPs {model_flops / 1e9:.1f}); each timed alone, best of 5:")
    by_flops = sorted(timed, key=lambda x: -x[0].flops * x[1])
    for dot, count, sec in by_flops[:8]:
      print(f"  {count:3d} x {dot.lhs} . {dot.rhs} contract {dot.lhs_contract}/"
            f"{dot.rhs_contract} batch {dot.lhs_batch}: {sec * 1e3:7.2f} ms, "
            f"{dot.flops / sec / peak_wall:6.1%} of peak")
    print(f"  sum = {floor * 1e3:.0f} ms: {model_flops / floor / 1e9:.1f} GFLOP/s "
          f"= {model_flops / floor / peak_wall:.1%} of the matmul peak (the ceiling);"
          f" the step ({wall * 1e3:.0f} ms, timed again now) spends "
          f"{1 - floor / wall:.0%} of its time outside matmuls")

  if not args.profile:
    return

  # ---------------------------------------------------------------- profile
  print("\nprofile: best wall ms, GFLOP, then the ratio to the matmul peak "
        "by wall time and by CPU time")

  def report(name, flops, fn, *fargs):
    wall, cpu = _timeit(fn, *fargs, steps=args.steps)
    print(f"  {name:<46s} {wall * 1e3:8.1f} ms {flops / 1e9:6.1f} GFLOP "
          f"{flops / wall / peak_wall:6.1%} {flops / cpu / peak_cpu:6.1%}")

  report("full step (fwd+bwd), unrolled", model_flops, step, params, inputs,
         targets)
  report("forward only (loss)", model_flops / 3, jax.jit(loss_fn), params,
         inputs, targets)

  def body_loss(params, inputs, cot):
    hidden, _ = transformer.forward(graphdef, params, inputs, positions)
    return jnp.sum(hidden.astype(jnp.float32) * cot)

  cot = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  report("transformer body fwd+bwd (no unembedding)", dense_flops + attn_flops,
         jax.jit(jax.grad(body_loss)), params, inputs, cot)
  report("transformer body fwd only", (dense_flops + attn_flops) / 3,
         jax.jit(body_loss), params, inputs, cot)

  hidden = jnp.asarray(rng.normal(size=(b, t, d)), dtype)
  unembed = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype)

  def head_loss(hidden, unembed, chunk):
    return -jnp.mean(token_logprobs(hidden, unembed, targets, chunk_size=chunk))

  for chunk in sorted({args.chunk_size, 512, tokens_n}):
    report(f"log-prob head fwd+bwd (chunk {chunk}; model FLOPs)",
           unembed_flops,
           jax.jit(jax.value_and_grad(lambda h, u, c=chunk: head_loss(h, u, c),
                                      argnums=(0, 1))), hidden, unembed)
  report("naive full-softmax head fwd+bwd (autodiff)", unembed_flops,
         jax.jit(jax.value_and_grad(
             lambda h, u: -jnp.mean(naive_token_logprobs(h, u, targets)),
             argnums=(0, 1))), hidden, unembed)
  report("log-prob head fwd only", unembed_flops / 3,
         jax.jit(lambda h, u: head_loss(h, u, args.chunk_size)), hidden, unembed)

  f = cfg.mlp_dim
  w_gate = jnp.asarray(rng.normal(size=(d, f)) * 0.02, dtype)
  w_up = jnp.asarray(rng.normal(size=(d, f)) * 0.02, dtype)
  w_down = jnp.asarray(rng.normal(size=(f, d)) * 0.02, dtype)

  def mlp_loss(x, w_gate, w_up, w_down):
    # As in transformer.attention_output_and_mlp: 2-D matmuls over flat tokens.
    x = x.reshape(tokens_n, d)
    gate, up = x @ w_gate, x @ w_up
    act = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32))
    out = (act.astype(dtype) @ w_down).reshape(b, t, d)
    return jnp.sum(out.astype(jnp.float32) * cot)

  report("SwiGLU MLP fwd+bwd, 1 layer (dense part)",
         6.0 * 3 * d * f * tokens_n,
         jax.jit(jax.grad(mlp_loss, argnums=(0, 1, 2, 3))), hidden, w_gate,
         w_up, w_down)

  g = cfg.n_kv_heads
  q = jnp.asarray(rng.normal(size=(b, t, h, kd)), dtype)
  kv = jnp.asarray(rng.normal(size=(b, t, g, kd)), dtype)
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))

  def attn_loss(q, k, v):
    return jnp.sum(transformer.attention_core(q, k, v, mask).astype(jnp.float32))

  report("attention core fwd+bwd, 1 layer", attn_flops / l,
         jax.jit(jax.grad(attn_loss, argnums=(0, 1, 2))), q, kv, kv)
  report("attention core fwd, 1 layer", attn_flops / l / 3, jax.jit(attn_loss),
         q, kv, kv)


if __name__ == "__main__":
  main()
