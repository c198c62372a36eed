"""XLA's compiled memory analysis and collectives of a pod config's DPO train step.

Compiles (never runs) the train step that ``jaxalign.train.loop.run`` would build for
``experiments/pod/NAME.py`` on fake CPU devices, from abstract inputs only, and prints
``compile().memory_analysis()`` per device plus the largest collectives in the HLO.
The layer count can be cut (``layers=2``) to keep the compile short: the layers are
one ``scan``, so per-layer costs show as the difference between two layer counts.

  python experiments/pod/_memory_analysis.py llama3_8b_dpo_8xh100 layers=2
  python experiments/pod/_memory_analysis.py llama3_8b_dpo_8xh100 layers=2 data=8

Overrides: layers=, batch= (pairs per step), remat=, chunk= (attention_chunk, 0 =
none), data= (mesh.data; fsdp takes the rest), pin= (1, the default: activations
pinned to batch sharding with ``transformer.ActivationSharding(mesh, mesh.rules)``;
0: unconstrained, what ``loop.run`` builds until it passes the sharding), lora= (rank
of LoRA adapters on every projection, 0 = full fine-tune: the state then trains only
the adapters and the step takes the frozen base, which is also the reference) and
base_dtype= (the LoRA base's storage dtype, float32 or bfloat16). XLA:CPU's
buffer assignment differs from the GPU / TPU backends; the collectives come from the
SPMD partitioner, which they share. Results: docs/scale_out.md, section 8, item 4.
"""

import collections
import importlib.util
import os
import re
import sys
import time


def main(argv):
  name, overrides = argv[1], dict(a.split("=", 1) for a in argv[2:])
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.path.insert(0, root)  # the configs import experiments._common
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(root, "experiments", "pod", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", module.NUM_DEVICES)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxalign import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxalign.data import batching  # pylint: disable=g-import-not-at-top
  from jaxalign.data.examples import PairExample  # pylint: disable=g-import-not-at-top
  from jaxalign.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from jaxalign.train import build, loop, stream  # pylint: disable=g-import-not-at-top
  from jaxalign.train import objectives as obj_lib  # pylint: disable=g-import-not-at-top
  from jaxalign.train import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from jaxalign.models import transformer  # pylint: disable=g-import-not-at-top

  c = module.get_config("hf_path=")  # random init of the config's architecture
  if "layers" in overrides:
    c.model.n_layers = int(overrides["layers"])
  if "remat" in overrides:
    c.model.remat = overrides["remat"]
  if "chunk" in overrides:
    c.model.attention_chunk = int(overrides["chunk"]) or None
  if "batch" in overrides:
    c.data.batch_size = int(overrides["batch"])
  if "data" in overrides:
    c.mesh.data = int(overrides["data"])
    c.mesh.fsdp = -1
  c.model.lora.rank = int(overrides.get("lora", 0))
  c.model.lora.alpha = float(2 * max(c.model.lora.rank, 1))
  c.model.lora.base_dtype = overrides.get("base_dtype", "float32")
  cfg = config_lib.validate(c, jax.device_count())
  mesh = mesh_lib.make_mesh(cfg.mesh)
  model = build.build_model(cfg.model, cfg.model.arch.vocab_size)
  optimizer = build.make_optimizer(cfg.optimizer, cfg.num_steps)
  pin = overrides.get("pin", "1") == "1"
  act = transformer.ActivationSharding(mesh, cfg.mesh.rules) if pin else None
  objective = obj_lib.make_objective(
      "pairwise", loss_fn=loop.loss_fn(cfg),
      forward_fn=obj_lib.model_forward_fn(
          model.graphdef, act, lora_config=model.lora if model.uses_lora else None),
      needs_reference=True, chunk_size=128, activation_sharding=act)
  abstract, shardings = build.state_shardings(model, optimizer, mesh, cfg.mesh.rules)
  if model.uses_lora:  # the step's second argument: the frozen base (the reference)
    objective = obj_lib.make_lora_objective(objective, live_reference=True)
    dtype = np.dtype(jax.numpy.dtype(cfg.model.lora.base_dtype))
    frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype),
                          jax.eval_shape(model.init_params, jax.random.key(0)))
    ref_shardings = mesh_lib.param_shardings(model.logical_axes, mesh, cfg.mesh.rules,
                                             frozen)
  else:
    frozen = abstract.params
    ref_shardings = mesh_lib.reference_shardings(model.logical_axes, mesh, cfg.mesh,
                                                 frozen)
  # A full batch at the largest bucket: every pair fills its row.
  length = cfg.data.buckets[-1]
  rng = np.random.default_rng(0)
  tokens = lambda k: rng.integers(4, 1000, k).astype(np.int32)  # noqa: E731
  pairs = [PairExample(tokens(length // 2), tokens(length // 2), tokens(length // 2))
           for _ in range(cfg.data.batch_size)]
  batch = batching.make_batch(pairs, stream.layout_config(cfg, cfg.data.batch_size))
  step = steps_lib.make_train_step(
      objective=objective, optimizer=optimizer, mesh=mesh, state_shardings=shardings,
      ref_shardings=ref_shardings, batch_ndims=steps_lib.batch_signature(batch))
  put = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
  batch_sh = mesh_lib.batch_shardings(mesh, batch)
  args = (jax.tree.map(put, abstract, shardings),
          jax.tree.map(put, frozen, ref_shardings),
          {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=batch_sh[k])
           for k, v in batch.items()})
  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  print(f"{name} {overrides}: mesh {dict(mesh.shape)}, batch rows "
        f"{batch['tokens'].shape}, compiled in {time.perf_counter() - t0:.0f} s")
  ma = compiled.memory_analysis()
  for key in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes"):
    print(f"  {key:24s} {getattr(ma, key) / 1e9:8.2f} GB per device")
  counts = collections.Counter()
  pattern = re.compile(r"= (\w+\[[\d,]*\])\S* (all-gather|all-reduce|reduce-scatter|"
                       r"all-to-all|collective-permute)(?:-start)?\(")
  for line in compiled.as_text().splitlines():
    m = pattern.search(line)
    if m:
      counts[(m.group(2), m.group(1))] += 1
  size = lambda s: int(np.prod([int(x) for x in re.findall(r"\d+", s)] or [1]))  # noqa: E731
  print("  largest collectives (op, result shape, count):")
  for (op, shape), n in sorted(counts.items(), key=lambda kv: -size(kv[0][1]))[:8]:
    print(f"    {op:18s} {shape:24s} x{n}")


# ----------------------------------------------------------------------------- attention


def _temp_gb(fn, *args) -> float:
  """Temporaries (GB per device) of `fn` compiled for abstract `args`: nothing allocated."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes / 1e9


def _fused_attention_bytes(t: int, h: int, g: int, k: int, itemsize: int) -> dict:
  """Analytic HBM bytes a fused kernel's fwd + bwd keeps beyond its inputs / outputs.

  Forward residuals: the output [T, H, K] (compute dtype) and the log-sum-exp [H, T]
  (f32); backward: di = rowsum(dO * O) [H, T] f32 and f32 dq / dk / dv accumulators
  (the upper bound: kernels that accumulate in SRAM / VMEM need less). Scores and
  probabilities live in on-chip blocks only. Masks: cuDNN's explicit mask becomes a
  [1, 1, T, T] additive bias in the compute dtype (packed / prefix-shared / windowed
  rows; plain causal has none); splash's dynamic mask (prefix-shared rows) is a
  [H / G, T, T] bool block table; its static masks are O((T / block)^2) bytes.
  """
  base = t * h * k * itemsize + 2 * h * t * 4 + (t * h * k + 2 * t * g * k) * 4
  return {"causal": base, "cudnn_mask": base + t * t * (itemsize + 1),
          "splash_dynamic": base + (h // g) * t * t}


def attention_report(overrides: dict) -> None:
  """One Llama-3-8B layer at `tokens` tokens (one row): attention fwd + bwd and the
  whole layer, XLA's compiled temporaries vs the fused kernels' analytic count."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 8)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxalign.models import transformer as tfm  # pylint: disable=g-import-not-at-top
  from jaxalign.ops import context_parallel  # pylint: disable=g-import-not-at-top
  from jaxalign.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  t = int(overrides.get("tokens", 8192))
  d, h, g, k, f = 4096, 32, 8, 128, 14336  # Llama-3-8B
  dt = jnp.bfloat16
  sds = jax.ShapeDtypeStruct
  q, kv = sds((1, t, h, k), dt), sds((1, t, g, k), dt)
  mask = sds((1, t, t), jnp.bool_)  # an argument: a constant mask would be folded
  rows = []
  for chunk in (None, 1024, 256):
    def attn(q, k_, v, mask, chunk=chunk):
      fn = lambda q, k_, v: jnp.sum(tfm.attend(
          tfm.TransformerConfig.tiny(attention_chunk=chunk), q, k_, v, mask).astype(
              jnp.float32))
      return jax.grad(fn, argnums=(0, 1, 2))(q, k_, v)
    rows.append((f"xla, attention_chunk={chunk}", _temp_gb(attn, q, kv, kv, mask),
                 "compiled"))
  fused = _fused_attention_bytes(t, h, g, k, 2)
  rows.append(("cudnn / splash, causal or splash packed", fused["causal"] / 1e9, "analytic"))
  rows.append(("cudnn, packed / prefix-shared / window", fused["cudnn_mask"] / 1e9,
               "analytic"))
  rows.append(("splash, prefix-shared (dynamic mask)", fused["splash_dynamic"] / 1e9,
               "analytic"))
  mesh = mesh_lib.make_context_mesh(mesh_lib.MeshConfig(data=1, fsdp=1), 8)

  def cp(q, k_, v):
    fn = lambda q, k_, v: jnp.sum(context_parallel.context_parallel_attention(
        q, k_, v, mesh, scale=k ** -0.5).astype(jnp.float32))
    return jax.grad(fn, argnums=(0, 1, 2))(q, k_, v)
  rows.append(("xla, context-parallel over 8 devices (per device)", _temp_gb(cp, q, kv, kv),
               "compiled"))
  print(f"Llama-3-8B attention, 1 row x {t} tokens, bf16, fwd + bwd temporaries:")
  for name, gb, how in rows:
    print(f"  {name:52s} {gb:8.3f} GB  ({how})")
  _layer_report(t, d, h, g, k, f)


def _layer_report(t, d, h, g, k, f) -> None:
  """The whole decoder layer (xla attention), for scale: what the kernels save of it."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxalign.models import transformer as tfm  # pylint: disable=g-import-not-at-top
  cfg = tfm.TransformerConfig(vocab_size=128256, d_model=d, n_layers=1, n_heads=h,
                              n_kv_heads=g, head_dim=k, mlp_dim=f, dtype="bfloat16")
  params = jax.eval_shape(lambda key: tfm.init(cfg, key)[1], jax.random.key(0))
  p = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                   params["layers"])
  x = jax.ShapeDtypeStruct((1, t, d), jnp.bfloat16)
  pos = jax.ShapeDtypeStruct((1, t), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, t, t), jnp.bool_)

  def layer(p, x, pos, mask):
    rope = tfm.rope_tables(pos, tfm.rope_inv_freq(cfg))
    fn = lambda p, x: jnp.sum(tfm.decoder_layer(cfg, p, x, rope, mask).astype(jnp.float32))
    return jax.grad(fn, argnums=(0, 1))(p, x)
  print(f"  whole decoder layer (xla attention, unchunked)      "
        f"{_temp_gb(layer, p, x, pos, mask):8.3f} GB  (compiled)")


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "attention":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    attention_report(dict(a.split("=", 1) for a in sys.argv[2:]))
  else:
    main(sys.argv)
