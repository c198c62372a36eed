"""Composable pure train steps and the builders that jit them with shardings.

Module-level pure functions:

* :func:`logprob_step` — per-sequence log-prob sums and counts (reference caching,
  evaluation).
* :func:`grad_step` — loss, metrics and f32 gradients, optionally accumulated over
  micro-batches with ``lax.scan``.
* :func:`apply_step` — optax update; a non-finite loss or gradient leaves the state
  unchanged and raises the ``skipped`` flag.
* :func:`train_step` — ``grad_step`` then ``apply_step``.

Micro-batching is at the *example* level: a micro-batched batch is ``M`` complete,
independently numbered batch dicts of equal shapes stacked on a leading axis
(:func:`stack_microbatches`), e.g. the batcher called ``M`` times with ``N / M``
examples each. Splitting one batch by rows would cut packed pairs apart and break the
per-sequence indices (``seq_ids``, ``seq_last``), so it is not offered. Each
micro-batch's masked loss is divided by the valid-example count of the whole batch,
so the accumulated loss and gradients equal the full-batch ones; token-weighted NLL
terms get the whole batch's token count the same way
(``objectives.whole_batch_stats``).

Compiled programs: one per distinct batch shape signature (row count, bucketed row
length, ``S``, ``M``). With bucketed lengths the count is the number of buckets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import objectives as obj_lib
from jaxalign.train.state import TrainState


def stack_microbatches(batches: Sequence[dict]) -> dict:
  """Stacks ``M`` equally shaped batch dicts on a new leading axis."""
  if not batches:
    raise ValueError("stack_microbatches: got no batches.")
  keys = set(batches[0])
  if "seq_ids" in keys:  # compacted score arrays may differ in width: pad to the widest
    from jaxalign.data import batching  # pylint: disable=g-import-not-at-top
    width = max(np.shape(b.get("seq_ids", ()))[-1] for b in batches)
    batches = [batching.widen_scores(b, width) if "seq_ids" in b else b for b in batches]
  for i, b in enumerate(batches):
    if set(b) != keys:
      raise ValueError(f"micro-batch {i} has keys {sorted(b)}, micro-batch 0 has "
                       f"{sorted(keys)}; build all micro-batches with one layout.")
    for k in keys:
      if np.shape(b[k]) != np.shape(batches[0][k]):
        raise ValueError(
            f"micro-batch {i} field {k!r} has shape {np.shape(b[k])}, micro-batch 0 "
            f"has {np.shape(batches[0][k])}; pad every micro-batch to the same "
            "bucket (rows, row length, sequences).")
  return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}


def logprob_step(params: Any, batch: dict, *, forward_fn: obj_lib.ForwardFn,
                 chunk_size: int, compute_dtype: Any = None,
                 logit_softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
  """Per-sequence sums ``[S]`` and counts ``[S]`` for ``params`` on ``batch``."""
  params = obj_lib.cast_floating(params, compute_dtype)
  return obj_lib.sequence_stats(forward_fn, params, batch, chunk_size=chunk_size,
                                logit_softcap=logit_softcap)


def _valid_count(batch: dict) -> jax.Array:
  """Valid examples over all micro-batches (at least 1, so an empty batch is 0)."""
  return jnp.maximum(batch[obj_lib.VALID_KEY].astype(jnp.float32).sum(), 1.0)


def grad_step(params: Any, ref_params: Any, batch: dict, *,
              objective: obj_lib.Objective, microbatched: bool = False,
              rng: jax.Array | None = None,
              loss_state: Any = None) -> tuple[jax.Array, dict, Any]:
  """Returns ``(loss, metrics, grads)``; grads are f32 like the master params.

  With ``microbatched``, every batch array has a leading micro-batch axis ``[M, ...]``
  and gradients are summed over a ``lax.scan``, so only one micro-batch's activations
  are live at a time. ``rng`` (None: a deterministic objective) is passed to the
  objective as ``rng=``, folded with the micro-batch index. ``loss_state`` (None:
  the loss carries none) is passed as ``loss_state=``.
  """
  grad_fn = jax.value_and_grad(objective, has_aux=True)
  extra = {} if loss_state is None else {"loss_state": loss_state}
  if not microbatched:
    kw = {} if rng is None else {"rng": rng}
    (loss, metrics), grads = grad_fn(params, ref_params, batch, **kw, **extra)
    return loss, metrics, grads

  if obj_lib.VALID_KEY not in batch:
    raise ValueError(
        f"micro-batched grad_step needs {obj_lib.VALID_KEY!r} in the batch to "
        "normalise across micro-batches; have the batcher emit it.")
  normalizer = _valid_count(batch)
  whole = obj_lib.whole_batch_stats(batch)
  # Micro-batch indices are scanned only to fold the key (None: nothing to scan).
  index = None if rng is None else jnp.arange(jax.tree.leaves(batch)[0].shape[0])

  def body(carry, xs):
    loss_acc, metrics_acc, grads_acc = carry
    micro, i = xs
    kw = {} if rng is None else {"rng": jax.random.fold_in(rng, i)}
    (loss, metrics), grads = grad_fn(params, ref_params, micro, normalizer=normalizer,
                                     whole_batch=whole, **kw, **extra)
    return (loss_acc + loss, jax.tree.map(jnp.add, metrics_acc, metrics),
            jax.tree.map(jnp.add, grads_acc, grads)), None

  first = jax.tree.map(lambda x: x[0], batch)
  _, metrics_shape = jax.eval_shape(
      lambda p, r, b: objective(p, r, b, normalizer=normalizer, whole_batch=whole,
                                **extra), params, ref_params, first)
  init = (jnp.zeros((), jnp.float32),
          jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape),
          jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
  (loss, metrics, grads), _ = jax.lax.scan(body, init, (batch, index))
  return loss, metrics, grads


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def apply_step(state: TrainState, grads: Any, loss: jax.Array, *,
               optimizer: optax.GradientTransformation
               ) -> tuple[TrainState, jax.Array]:
  """Applies ``grads``; returns ``(new_state, skipped)``.

  When the loss or any gradient is non-finite the returned state is the input state
  (step, params, optimizer state all unchanged) and ``skipped`` is True.
  """
  ok = jnp.isfinite(loss) & _all_finite(grads)
  # Zeroed grads keep the (discarded) update branch finite; select afterwards.
  safe_grads = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
  updates, new_opt_state = optimizer.update(safe_grads, state.opt_state,
                                            state.params)
  new_params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=new_params,
                            opt_state=new_opt_state)
  chosen = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
  return chosen, jnp.logical_not(ok)


def train_step(state: TrainState, ref_params: Any, batch: dict, *,
               objective: obj_lib.Objective,
               optimizer: optax.GradientTransformation,
               microbatched: bool = False,
               stochastic: bool = False) -> tuple[TrainState, dict]:
  """One optimisation step. Metrics: ``loss``, ``grad_norm``, ``skipped``,
  ``update_norm``, ``param_norm`` and the objective's metrics (masked means over
  valid examples).

  ``ref_params``: the frozen params the objective reads (the reference model, or a
  LoRA run's base). ``stochastic``: the objective takes ``rng=`` (LoRA dropout),
  ``state.rng`` folded with ``state.step``. A loss state (``state.loss_state``,
  e.g. bco_pair's running reward mean) goes to the objective and is updated from
  this step's metrics (`objectives.update_loss_state`), unless the step is skipped."""
  rng = jax.random.fold_in(state.rng, state.step) if stochastic else None
  loss, metrics, grads = grad_step(state.params, ref_params, batch,
                                   objective=objective, microbatched=microbatched,
                                   rng=rng, loss_state=state.loss_state)
  new_state, skipped = apply_step(state, grads, loss, optimizer=optimizer)
  if state.loss_state is not None:
    updated = obj_lib.update_loss_state(
        state.loss_state, metrics, obj_lib.valid_examples(batch, "pairwise"))
    new_state = new_state.replace(loss_state=jax.tree.map(
        lambda new, old: jnp.where(skipped, old, new), updated, state.loss_state))
  # For the divergence guard (hooks.DivergenceGuard): the size of the applied change
  # of the params (0 when skipped) against theirs before it.
  update = jax.tree.map(jnp.subtract, new_state.params, state.params)
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                 skipped=skipped, update_norm=optax.global_norm(update),
                 param_norm=optax.global_norm(state.params))
  return new_state, metrics


# --- builders ------------------------------------------------------------------


def _batch_in_shardings(mesh: Mesh, batch_keys_ndims: dict[str, int],
                        microbatched: bool) -> dict[str, NamedSharding]:
  dummy = {k: np.zeros((1,) * nd) for k, nd in batch_keys_ndims.items()}
  return mesh_lib.batch_shardings(mesh, dummy, microbatched=microbatched)


def batch_signature(batch: dict) -> dict[str, int]:
  """The key -> ndim map the builders need to lay out a batch."""
  return {k: int(np.ndim(v)) for k, v in batch.items()}


def make_train_step(*, objective: obj_lib.Objective,
                    optimizer: optax.GradientTransformation, mesh: Mesh,
                    state_shardings: TrainState, ref_shardings: Any,
                    batch_ndims: dict[str, int], microbatched: bool = False,
                    donate: bool = True, stochastic: bool = False) -> Callable:
  """Jits ``train_step`` with explicit shardings and donation of the state.

  Returns ``step(state, ref_params, batch) -> (state, metrics)``. ``ref_shardings`` is
  None when the reference is cached in the batch (then pass ``ref_params=None``); with
  LoRA ``ref_params`` is the frozen base (never donated). Batch arrays must be placed
  as ``mesh_lib.batch_shardings`` says (or be host numpy arrays on a single process).
  """
  fn = functools.partial(train_step, objective=objective, optimizer=optimizer,
                         microbatched=microbatched, stochastic=stochastic)
  repl = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
      fn,
      in_shardings=(state_shardings, ref_shardings,
                    _batch_in_shardings(mesh, batch_ndims, microbatched)),
      out_shardings=(state_shardings, repl),
      donate_argnums=(0,) if donate else ())


def make_grad_step(*, objective: obj_lib.Objective, mesh: Mesh,
                   param_shardings: Any, ref_shardings: Any,
                   batch_ndims: dict[str, int],
                   microbatched: bool = False) -> Callable:
  """Jits ``grad_step``: ``(params, ref_params, batch) -> (loss, metrics, grads)``."""
  fn = functools.partial(grad_step, objective=objective, microbatched=microbatched)
  repl = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
      fn,
      in_shardings=(param_shardings, ref_shardings,
                    _batch_in_shardings(mesh, batch_ndims, microbatched)),
      out_shardings=(repl, repl, param_shardings))


def make_logprob_step(*, forward_fn: obj_lib.ForwardFn, mesh: Mesh,
                      param_shardings: Any, batch_ndims: dict[str, int],
                      chunk_size: int, compute_dtype: Any = None,
                      logit_softcap: float | None = None) -> Callable:
  """Jits ``logprob_step``: ``(params, batch) -> (sums [S], counts [S])``."""
  fn = functools.partial(logprob_step, forward_fn=forward_fn, chunk_size=chunk_size,
                         compute_dtype=compute_dtype, logit_softcap=logit_softcap)
  repl = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
      fn,
      in_shardings=(param_shardings,
                    _batch_in_shardings(mesh, batch_ndims, False)),
      out_shardings=(repl, repl))
