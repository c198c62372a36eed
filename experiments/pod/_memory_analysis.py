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


if __name__ == "__main__":
  main(sys.argv)
