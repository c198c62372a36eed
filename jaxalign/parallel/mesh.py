"""Device meshes, logical-axis rules and NamedShardings for every model role.

The model names every parameter dimension with a logical axis (``vocab``, ``embed``,
``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``layers``); the config maps logical
axes to mesh axes (``data``, ``fsdp``, ``tensor``). Shardings are derived from the
logical-axis tree and the parameter *shapes* (from ``jax.eval_shape``), so nothing is
allocated before its placement is known.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# Batch rows are split over both data-parallel axes: fsdp is data parallelism whose
# parameters are sharded too.
BATCH_AXES = ("data", "fsdp")

MeshAxes = Union[str, tuple[str, ...], None]
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
)

REFERENCE_PLACEMENTS = ("policy", "replicated", "tensor")

# Context parallelism (ops/context_parallel.py): a fourth mesh axis splitting each
# sequence, present only in meshes from `make_context_mesh`. CONTEXT_RULES add it to the
# residual stream's "length" axis; axes a mesh lacks are skipped by `logical_to_spec`.
CONTEXT_AXIS = "context"
CONTEXT_RULES: Rules = (("length", CONTEXT_AXIS),) + DEFAULT_RULES


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes and logical-axis rules.

  Attributes:
    data: size of the pure data-parallel axis (-1 = all remaining devices).
    fsdp: size of the data-parallel axis whose parameters are sharded (-1 = rest).
    tensor: size of the tensor-parallel axis (-1 = rest). At most one axis is -1.
    rules: ``(logical_name, mesh_axis | tuple of mesh axes | None)`` pairs.
    reference_placement: where the frozen reference model lives: ``"policy"`` (same
      shardings as the policy), ``"replicated"`` (a full copy on every device: no
      gathers in its forward, most memory) or ``"tensor"`` (only the tensor-parallel
      part of the rules; replicated over data and fsdp).
  """
  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  rules: Rules = DEFAULT_RULES
  reference_placement: str = "policy"

  def __post_init__(self):
    for name in MESH_AXES:
      size = getattr(self, name)
      if not isinstance(size, int) or (size < 1 and size != -1):
        raise ValueError(
            f"mesh.{name}={size!r}: an axis size must be a positive int or -1 "
            "(= all remaining devices).")
    if sum(getattr(self, n) == -1 for n in MESH_AXES) > 1:
      raise ValueError(
          f"mesh: at most one of {MESH_AXES} may be -1, got data={self.data}, "
          f"fsdp={self.fsdp}, tensor={self.tensor}; give explicit sizes.")
    if self.reference_placement not in REFERENCE_PLACEMENTS:
      raise ValueError(
          f"mesh.reference_placement={self.reference_placement!r}: expected one of "
          f"{REFERENCE_PLACEMENTS}.")
    for entry in self.rules:
      if not (isinstance(entry, tuple) and len(entry) == 2):
        raise ValueError(f"mesh.rules entry {entry!r}: expected (logical_name, "
                         "mesh_axis or tuple of mesh axes or None).")
      for axis in _as_tuple(entry[1]):
        if axis not in MESH_AXES + (CONTEXT_AXIS,):
          raise ValueError(
              f"mesh.rules maps logical axis {entry[0]!r} to unknown mesh axis "
              f"{axis!r}; mesh axes are {MESH_AXES}.")

  def axis_sizes(self, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 against ``num_devices``; raises ValueError when it cannot fit."""
    sizes = {n: getattr(self, n) for n in MESH_AXES}
    known = math.prod(s for s in sizes.values() if s != -1)
    free = [n for n, s in sizes.items() if s == -1]
    if free:
      if num_devices % known:
        raise ValueError(
            f"mesh: the fixed axes ({_fmt(sizes)}) use {known} devices, which does "
            f"not divide the {num_devices} available; set mesh.{free[0]} explicitly "
            f"or make the fixed sizes divide {num_devices}.")
      sizes[free[0]] = num_devices // known
    total = math.prod(sizes.values())
    if total != num_devices:
      raise ValueError(
          f"mesh: data*fsdp*tensor = {_fmt(sizes)} = {total} devices, but "
          f"{num_devices} are available; set one of mesh.data / mesh.fsdp / "
          "mesh.tensor to -1, or choose sizes whose product is "
          f"{num_devices}.")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def _fmt(sizes: dict[str, int]) -> str:
  return " x ".join(f"{n}={s}" for n, s in sizes.items())


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(axes)


def make_mesh(mesh_cfg: MeshConfig,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all)."""
  if devices is None:
    devices = jax.devices()
  devices = list(devices)
  shape = mesh_cfg.axis_sizes(len(devices))
  # tensor is the fastest-varying axis so tensor-parallel groups sit on neighbouring
  # devices (same host / same NVLink island).
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def make_context_mesh(mesh_cfg: MeshConfig, context: int,
                      devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(data, fsdp, context, tensor)`` mesh: ``context`` devices share each sequence
  (ops/context_parallel.py); data / fsdp / tensor resolve against the rest."""
  devices = list(jax.devices() if devices is None else devices)
  if context < 1 or len(devices) % context:
    raise ValueError(f"mesh: context={context} must be >= 1 and divide the "
                     f"{len(devices)} devices.")
  data, fsdp, tensor = mesh_cfg.axis_sizes(len(devices) // context)
  return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp, context, tensor),
              ("data", "fsdp", CONTEXT_AXIS, "tensor"))


def logical_to_spec(logical: Sequence[str | None],
                    rules: Rules = DEFAULT_RULES,
                    shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
  """Maps one parameter's logical axis names to a PartitionSpec.

  A mesh axis is used at most once per array (first dimension wins). When ``shape``
  and ``mesh`` are given, a dimension that the mesh axes do not divide evenly is left
  replicated instead of failing at placement time.
  """
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(logical):
    axes = tuple(a for a in _as_tuple(table.get(name)) if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
      if shape is not None and axes:
        if shape[i] % math.prod(mesh.shape[a] for a in axes):
          axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


def _is_axes_leaf(x: Any) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def param_specs(logical_axes_tree: Any, rules: Rules = DEFAULT_RULES,
                shapes_tree: Any = None, mesh: Mesh | None = None) -> Any:
  """PartitionSpec per leaf of ``logical_axes_tree`` (leaves: tuples of names)."""
  if shapes_tree is None:
    return jax.tree.map(lambda ax: logical_to_spec(ax, rules, None, mesh),
                        logical_axes_tree, is_leaf=_is_axes_leaf)
  axes_leaves, treedef = jax.tree.flatten(logical_axes_tree, is_leaf=_is_axes_leaf)
  shape_leaves = treedef.flatten_up_to(shapes_tree)
  specs = []
  for ax, sds in zip(axes_leaves, shape_leaves):
    if len(ax) != len(sds.shape):
      raise ValueError(
          f"logical axes {ax} have {len(ax)} names but the parameter has shape "
          f"{tuple(sds.shape)}; fix the model's logical_axes.")
    specs.append(logical_to_spec(ax, rules, sds.shape, mesh))
  return treedef.unflatten(specs)


def param_shardings(logical_axes_tree: Any, mesh: Mesh,
                    rules: Rules = DEFAULT_RULES, shapes_tree: Any = None) -> Any:
  """NamedSharding per parameter, from logical axes and rules.

  Args:
    logical_axes_tree: the model's ``logical_axes(cfg)``: same structure as the
      params, each leaf a tuple of logical names (or None).
    mesh: the device mesh.
    rules: logical -> mesh axis rules.
    shapes_tree: optional ``jax.eval_shape`` output of the init (same structure);
      when given, dimensions the mesh does not divide stay replicated.
  """
  specs = param_specs(logical_axes_tree, rules, shapes_tree, mesh)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def reference_rules(rules: Rules, placement: str) -> Rules:
  """Rules for the frozen reference model under ``placement``."""
  if placement == "policy":
    return rules
  if placement == "replicated":
    return tuple((name, None) for name, _ in rules)
  if placement == "tensor":
    return tuple((name, tuple(a for a in _as_tuple(axes) if a == "tensor") or None)
                 for name, axes in rules)
  raise ValueError(f"mesh.reference_placement={placement!r}: expected one of "
                   f"{REFERENCE_PLACEMENTS}.")


def reference_shardings(logical_axes_tree: Any, mesh: Mesh, mesh_cfg: MeshConfig,
                        shapes_tree: Any = None) -> Any:
  """NamedShardings for the reference model per ``mesh_cfg.reference_placement``."""
  rules = reference_rules(mesh_cfg.rules, mesh_cfg.reference_placement)
  return param_shardings(logical_axes_tree, mesh, rules, shapes_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of ``[R, L]`` batch arrays: rows over (data, fsdp)."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_shardings(mesh: Mesh, batch: dict[str, Any],
                    microbatched: bool = False) -> dict[str, NamedSharding]:
  """Per-key shardings for a batch dict (docs/architecture.md section 2).

  Row arrays (``[R, L]``, or ``[M, R, L]`` when ``microbatched``) are split by rows
  over (data, fsdp); per-sequence and per-example arrays (``seq_last``,
  ``example_valid``, labels, scores) are small and carry global indices, so they are
  replicated.
  """
  rows = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES) if microbatched
                       else PartitionSpec(BATCH_AXES))
  ndim_rows = 3 if microbatched else 2
  out = {}
  for key, value in batch.items():
    if key in ROW_KEYS and np.ndim(value) == ndim_rows:
      out[key] = rows
    else:
      out[key] = replicated(mesh)
  return out


ROW_KEYS = ("tokens", "positions", "segment_ids", "branch_ids", "logit_pos",
            "targets", "seq_ids")


def check_batch_divisible(batch: dict[str, Any], mesh: Mesh,
                          microbatched: bool = False) -> None:
  """Raises ValueError when the rows cannot be split over the data-parallel axes."""
  dp = data_parallel_size(mesh)
  rows = np.shape(batch["tokens"])[1 if microbatched else 0]
  if rows % dp:
    raise ValueError(
        f"batch has {rows} rows, not divisible by the data-parallel size "
        f"data*fsdp={dp}; change the batch size (or rows per micro-batch) or the "
        "mesh.data / mesh.fsdp sizes.")


def local_row_slice(mesh: Mesh, num_rows: int, microbatched: bool = False) -> slice:
  """The contiguous rows of a ``num_rows`` global batch this process feeds.

  Each host loads only these rows and hands them to :func:`make_global_batch`.
  """
  shape = (1, num_rows, 1) if microbatched else (num_rows, 1)
  sharding = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES) if microbatched
                           else PartitionSpec(BATCH_AXES))
  dim = 1 if microbatched else 0
  starts, stops = [], []
  for index in sharding.addressable_devices_indices_map(shape).values():
    s = index[dim]
    starts.append(s.start or 0)
    stops.append(num_rows if s.stop is None else s.stop)
  lo, hi = min(starts), max(stops)
  covered = sum(b - a for a, b in sorted(set(zip(starts, stops))))
  if covered != hi - lo:
    raise ValueError(
        f"this process's devices hold non-contiguous rows of the batch on mesh "
        f"{dict(mesh.shape)}; order the mesh devices by process (make_mesh does).")
  return slice(lo, hi)


def make_global_batch(local_batch: dict[str, Any], mesh: Mesh,
                      microbatched: bool = False) -> dict[str, jax.Array]:
  """Builds the global batch from each process's rows (``local_row_slice``).

  Row arrays hold this process's rows; per-sequence / per-example arrays
  (replicated) hold the full global values on every process.
  """
  shardings = batch_shardings(mesh, local_batch, microbatched)
  nproc_rows = None
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    sharding = shardings[key]
    if sharding.spec == PartitionSpec():
      out[key] = jax.make_array_from_process_local_data(sharding, value, value.shape)
      continue
    dim = 1 if microbatched else 0
    if nproc_rows is None:
      dp = data_parallel_size(mesh)
      local_dp = len({tuple(i[dim].indices(dp)) for i in sharding
                      .addressable_devices_indices_map(
                          (1, dp, 1) if microbatched else (dp, 1)).values()})
      nproc_rows = dp // local_dp
    global_shape = list(value.shape)
    global_shape[dim] *= nproc_rows
    out[key] = jax.make_array_from_process_local_data(sharding, value,
                                                      tuple(global_shape))
  return out


def global_batch(host_batch: dict[str, Any], mesh: Mesh,
                 microbatched: bool = False) -> dict[str, jax.Array]:
  """This process's rows of a whole host batch, assembled into global device arrays.

  Every process draws the same global batch (its per-sequence arrays carry global
  indices, so each process needs them whole) and feeds only its own rows
  (`local_row_slice`) to its devices.
  """
  row_dim = 1 if microbatched else 0
  rows = local_row_slice(mesh, np.shape(host_batch["tokens"])[row_dim], microbatched)
  index = (slice(None), rows) if microbatched else rows
  local = {k: (np.asarray(v)[index] if k in ROW_KEYS and np.ndim(v) == 2 + row_dim
               else v)
           for k, v in host_batch.items()}
  return make_global_batch(local, mesh, microbatched)


def to_host(x: Any) -> np.ndarray:
  """``x``'s whole value on this host. An array whose shards span processes is
  gathered (``process_allgather``: a collective, so every process must call this in
  the same order); anything else is read locally."""
  if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def put(tree: Any, sharding: Any) -> Any:
  """``jax.device_put(tree, sharding)`` that also places PRNG keys under
  jax.distributed (device_put refuses a key onto other processes' devices; a jitted
  identity places it). Host values must be the same on every process: device_put
  checks that (a collective: every process calls this in the same order)."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  def one(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return _constrain(x, sharding)
    return jax.device_put(x, sharding)
  return jax.tree.map(one, tree)


@jax.jit(static_argnums=(1,))
def _constrain(tree: Any, sharding: Any) -> Any:
  return jax.lax.with_sharding_constraint(tree, sharding)


def host_readable(tree: Any, sharding: NamedSharding | None) -> Any:
  """``tree``'s arrays replicated on ``sharding`` (a replicated sharding) when they
  span processes, so that every host reads them whole (``np.asarray``); unchanged
  on one process. A collective under jax.distributed."""
  if sharding is None or jax.process_count() == 1:
    return tree
  return _constrain(tree, sharding)
