"""The training state and its sharded initialisation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign import checkpoint as ckpt_lib
from jaxalign.parallel import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  """Everything a step updates. ``params`` are the f32 master weights.

  ``loss_state``: what a loss carries from step to step (a dict of replicated
  scalars, e.g. ``bco_pair``'s running reward mean; `objectives.initial_loss_state`),
  or None for the many losses that carry nothing. It is checkpointed with the rest.
  """
  step: jax.Array  # int32 scalar
  params: Any
  opt_state: Any
  rng: jax.Array  # a PRNG key; folded with ``step`` inside the step
  loss_state: Any = None


def _make_state(init_params_fn: Callable[[jax.Array], Any],
                optimizer: optax.GradientTransformation,
                key: jax.Array) -> TrainState:
  params_key, rng = jax.random.split(key)
  params = init_params_fn(params_key)
  params = jax.tree.map(lambda p: p.astype(jnp.float32)
                        if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=rng)


def state_shardings(init_params_fn: Callable[[jax.Array], Any],
                    optimizer: optax.GradientTransformation,
                    logical_axes_tree: Any,
                    mesh: Mesh,
                    rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES
                    ) -> tuple[TrainState, TrainState]:
  """Returns ``(abstract_state, shardings)``, computed without allocating.

  Optimizer-state leaves that mirror a parameter (Adam moments) get that
  parameter's sharding: they are matched by shape and position in the tree via
  ``optax.tree_map_params``; scalars (counts) are replicated.
  """
  abstract = jax.eval_shape(
      lambda k: _make_state(init_params_fn, optimizer, k), jax.random.key(0))
  param_sh = mesh_lib.param_shardings(logical_axes_tree, mesh, rules,
                                      abstract.params)
  repl = NamedSharding(mesh, PartitionSpec())
  opt_sh = optax.tree_map_params(
      optimizer, lambda _, sh: sh, abstract.opt_state, param_sh,
      transform_non_params=lambda _: repl)
  shardings = TrainState(step=repl, params=param_sh, opt_state=opt_sh, rng=repl)
  return abstract, shardings


def init_train_state(init_params_fn: Callable[[jax.Array], Any],
                     optimizer: optax.GradientTransformation,
                     logical_axes_tree: Any,
                     mesh: Mesh,
                     key: jax.Array,
                     rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES
                     ) -> tuple[TrainState, TrainState]:
  """Initialises the state directly into its shardings.

  Args:
    init_params_fn: ``key -> params`` (e.g. ``lambda k: transformer.init(cfg, k)[1]``).
    optimizer: the optax transformation.
    logical_axes_tree: logical axis names per parameter (``logical_axes(cfg)``).
    mesh: the device mesh.
    key: PRNG key for the params and the state's rng.
    rules: logical -> mesh axis rules.

  Returns:
    ``(state, shardings)``; every leaf of ``state`` is already placed as
    ``shardings`` says (each device only ever allocates its shard).
  """
  _, shardings = state_shardings(init_params_fn, optimizer, logical_axes_tree,
                                 mesh, rules)
  init = jax.jit(lambda k: _make_state(init_params_fn, optimizer, k),
                 out_shardings=shardings)
  return init(key), shardings


def with_loss_state(state: TrainState, shardings: TrainState, loss_state: Any
                    ) -> tuple[TrainState, TrainState]:
  """``(state, shardings)`` carrying ``loss_state`` (a dict of scalars, replicated);
  unchanged when it is None. ``state`` may be abstract (``jax.ShapeDtypeStruct``
  leaves, the restore target), then so is its loss state."""
  if loss_state is None:
    return state, shardings
  repl = NamedSharding(shardings.step.mesh, PartitionSpec())
  loss_sh = jax.tree.map(lambda _: repl, loss_state)
  if isinstance(state.step, jax.ShapeDtypeStruct):
    placed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), loss_state)
  else:
    placed = jax.device_put(loss_state, loss_sh)
  return (state.replace(loss_state=placed), shardings.replace(loss_state=loss_sh))


# The checkpoint layout of a TrainState: PRNG keys are stored as their raw key data
# (typed key arrays cannot be serialised), every other leaf as is. A loss state is
# stored under "loss_state" only when there is one, so runs without one keep the
# layout (and the checkpoints) they had.


def to_tree(state: TrainState) -> dict:
  tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "rng": ckpt_lib.key_to_data(state.rng)}
  if state.loss_state is not None:
    tree["loss_state"] = state.loss_state
  return tree


def from_tree(tree: dict) -> TrainState:
  return TrainState(step=tree["step"], params=tree["params"],
                    opt_state=tree["opt_state"], rng=ckpt_lib.data_to_key(tree["rng"]),
                    loss_state=tree.get("loss_state"))


def abstract_tree(abstract_state: TrainState, shardings: TrainState) -> dict:
  """The checkpoint target of `to_tree`: shapes, dtypes and shardings, nothing
  allocated (a restore reads straight into the target shardings)."""
  placed = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, shardings)
  rng = jax.eval_shape(ckpt_lib.key_to_data, abstract_state.rng)
  tree = {"step": placed.step, "params": placed.params, "opt_state": placed.opt_state,
          "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=shardings.rng)}
  if abstract_state.loss_state is not None:
    tree["loss_state"] = placed.loss_state
  return tree
