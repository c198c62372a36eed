"""One process of the 2-process CPU run in test_multihost.py (also imported by it).

Usage: python _multihost_worker.py PORT PROCESS_ID NUM_PROCESSES OUT.npz
"""

import functools
import sys

import numpy as np

NUM_STEPS = 3


def dpo_batch():
  """The global batch: 4 pairs, padded (8 rows), built identically by every process."""
  from jaxalign.data import batching
  from jaxalign.data.examples import PairExample
  rng = np.random.default_rng(0)
  tok = lambda k: rng.integers(1, 128, k).astype(np.int32)
  examples = [PairExample(tok(3), tok(4), tok(5)) for _ in range(4)]
  return batching.make_batch(examples, batching.LayoutConfig(
      kind="padded", buckets=(16,), examples_per_batch=4))


def run_dpo(num_steps=NUM_STEPS):
  """DPO steps on a (data=2, fsdp=2, tensor=2) mesh over all global devices.

  Returns (losses, params gathered to host numpy on every process).
  """
  import jax
  import optax
  from jax.experimental import multihost_utils
  from jaxalign.losses import dpo
  from jaxalign.models import transformer as tr
  from jaxalign.parallel import mesh as ml
  from jaxalign.train import objectives as ob
  from jaxalign.train import state as st
  from jaxalign.train import steps

  cfg = tr.TransformerConfig.tiny(vocab_size=128, d_model=32, n_layers=1,
                                  n_heads=4, n_kv_heads=2, mlp_dim=64)
  init_fn = lambda k: tr.init(cfg, k)[1]
  graphdefs = []
  # Trace the init abstractly just to capture the graphdef (nothing is allocated).
  jax.eval_shape(lambda k: graphdefs.append(tr.init(cfg, k)[0]), jax.random.key(0))
  graphdef = graphdefs[0]
  mesh = ml.make_mesh(ml.MeshConfig(data=2, fsdp=2, tensor=2))
  opt = optax.sgd(1e-2, momentum=0.9)
  state, shs = st.init_train_state(init_fn, opt, tr.logical_axes(cfg), mesh,
                                   jax.random.key(1))
  # The reference: a differently seeded init, placed like the policy.
  ref = jax.jit(init_fn, out_shardings=shs.params)(jax.random.key(7))
  objective = ob.make_objective(
      "pairwise", loss_fn=functools.partial(dpo, beta=0.1),
      forward_fn=ob.model_forward_fn(graphdef), needs_reference=True, chunk_size=16)
  full = dpo_batch()
  rows = ml.local_row_slice(mesh, full["tokens"].shape[0])
  local = {k: (v[rows] if k in ml.ROW_KEYS else v) for k, v in full.items()}
  batch = ml.make_global_batch(local, mesh)
  step = steps.make_train_step(objective=objective, optimizer=opt, mesh=mesh,
                               state_shardings=shs, ref_shardings=shs.params,
                               batch_ndims=steps.batch_signature(full))
  losses = []
  for _ in range(num_steps):
    state, metrics = step(state, ref, batch)
    losses.append(float(metrics["loss"]))
  params = multihost_utils.process_allgather(state.params, tiled=True)
  return np.asarray(losses), jax.tree.map(np.asarray, params)


def main(argv):
  port, pid, nproc, out = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
  import jax
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_num_cpu_devices", 4)
  jax.distributed.initialize(f"localhost:{port}", num_processes=nproc,
                             process_id=pid, initialization_timeout=120)
  assert jax.device_count() == 4 * nproc and jax.local_device_count() == 4
  losses, params = run_dpo()
  if pid == 0:
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    np.savez(out, losses=losses,
             **{jax.tree_util.keystr(p): v for p, v in flat})
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
