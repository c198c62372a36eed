"""Checkpoints: every Orbax call in jaxalign lives in this file.

Orbax's API churns between releases; keeping it behind this small surface means a
version bump touches one file. A checkpoint at step ``s`` holds three items:

- ``state``: a pytree of arrays (params, optimizer state, step, PRNG key data, ...),
  saved with ``StandardSave`` and restored straight into the target shardings;
- ``data``: the data-iterator state (JSON), so a restart sees the same next batch;
- ``meta``: small JSON facts: the step, and what the training driver adds (the
  optimizer step, the digest of the run's record, the divergence guard's window);
  `read_meta` reads it alone.

A restore first compares the saved arrays' shapes with the target's and names the
leaves that differ in one short ValueError (a checkpoint of another model size),
instead of Orbax's long error. The run's config itself is checked before anything is
restored, against the run directory's record (``run.json``, `jaxalign.train.rundir`),
where every differing key can be named.

Saves are asynchronous (the device-to-host copy happens before ``save`` returns,
the file writes in a background thread) and atomic: Orbax writes into a temporary
directory and renames it when complete, so a process killed mid-save leaves only a
temporary directory that ``latest_step`` never reports. ``restore`` therefore always
reads the latest *complete* checkpoint.
"""

from __future__ import annotations

import base64
import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


def key_to_data(key: jax.Array) -> jax.Array:
  """A PRNG key as a plain uint32 array (typed keys do not serialise portably)."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return key


def data_to_key(data: jax.Array, typed: bool = True) -> jax.Array:
  """The inverse of `key_to_data` (default PRNG implementation)."""
  return jax.random.wrap_key_data(data) if typed else data


def _encode_json(value: Any) -> Any:
  """Makes an iterator state JSON-safe: bytes become tagged base64 strings."""
  if isinstance(value, bytes):
    return {"__bytes__": base64.b64encode(value).decode("ascii")}
  if isinstance(value, dict):
    return {str(k): _encode_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_encode_json(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _decode_json(value: Any) -> Any:
  if isinstance(value, dict):
    if set(value) == {"__bytes__"}:
      return base64.b64decode(value["__bytes__"])
    return {k: _decode_json(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_decode_json(v) for v in value]
  return value


def complete_steps(directory: str | os.PathLike) -> list[int]:
  """The steps of the complete checkpoints in ``directory`` (none if it is missing),
  without opening a manager."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(s) for s in ocp.utils.checkpoint_steps(directory))


@dataclasses.dataclass(frozen=True)
class Restored:
  step: int
  state: PyTree
  data_state: Any
  meta: dict


class Checkpointer:
  """Periodic, asynchronous, keep-N checkpoints of a training state.

  Args:
    directory: where the step directories go (created if missing).
    save_every: save when ``step % save_every == 0`` (``force=True`` overrides).
    keep: how many of the most recent checkpoints to keep.
    async_save: write files in a background thread.
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int,
               async_save: bool = True):
    if save_every < 1:
      raise ValueError(f"checkpoint.every_steps must be >= 1, got {save_every}.")
    if keep < 1:
      raise ValueError(f"checkpoint.keep must be >= 1, got {keep}.")
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every,
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        # Temporary directories left by a process killed mid-save are removed.
        cleanup_tmp_directories=True,
        create=True,
    )
    # Handlers named up front (not only once a save registers them), so that reading
    # a restarted run's metadata works without warnings.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """The step of the latest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether ``step`` is a periodic save step (our rule, not Orbax's heuristics)."""
    return step % self.save_every == 0

  def save(self, step: int, state: PyTree, data_state: Any = None,
           meta: dict | None = None, *, force: bool = False) -> bool:
    """Starts saving ``state`` at ``step`` if due (or forced); returns whether it did."""
    if not (force or self.should_save(step)):
      return False
    if step in self._manager.all_steps():
      return False
    meta = dict(meta or {})
    meta["step"] = int(step)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"state": _encode_json(data_state)}),
        meta=ocp.args.JsonSave(_encode_json(meta)),
    )
    return self._manager.save(int(step), args=args, force=True)

  def restore(self, abstract_state: PyTree, step: int | None = None) -> Restored:
    """Restores a checkpoint (default: the latest complete one).

    Args:
      abstract_state: the target pytree; leaves are ``jax.ShapeDtypeStruct`` with a
        ``sharding`` (or arrays), so each array lands directly in its sharding.
      step: which step; None means the latest complete checkpoint.
    """
    if step is None:
      step = self.latest_step()
    if step is None:
      raise ValueError(f"No complete checkpoint in {self.directory} to restore.")
    abstract_state = jax.tree.map(_as_abstract, abstract_state)
    self._check_shapes(abstract_state, int(step))
    out = self._manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
    ))
    return Restored(step=int(step), state=out["state"],
                    data_state=_decode_json(out["data"]["state"]),
                    meta=dict(out["meta"]))

  def read_meta(self, step: int) -> dict:
    """The ``meta`` item of checkpoint ``step`` alone (no array is read)."""
    out = self._manager.restore(int(step), args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def _check_shapes(self, abstract_state: PyTree, step: int) -> None:
    """ValueError naming the leaves whose saved shape differs from the target's."""
    try:
      saved = self._manager.item_metadata(step)["state"]
      saved = getattr(saved, "tree", saved)
    except Exception:  # pylint: disable=broad-except
      return  # no metadata to compare: Orbax decides
    have = {_path_str(p): getattr(m, "shape", None) for p, m in
            jax.tree_util.tree_flatten_with_path(saved)[0]}
    wrong = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
      got = have.get(_path_str(path))
      if got is not None and tuple(got) != tuple(getattr(leaf, "shape", got)):
        wrong.append(f"{_path_str(path)}: saved {tuple(got)}, "
                     f"expected {tuple(leaf.shape)}")
    if wrong:
      wrong.sort(key=lambda w: not w.startswith("params"))
      raise ValueError(
          f"checkpoint step {step} in {self.directory} holds arrays of other shapes "
          f"than this run's model ({len(wrong)} differ, e.g. " + "; ".join(wrong[:3])
          + "). It was trained with another model size or architecture: use another "
          "--workdir, or the config it was trained with.")

  def restore_arrays(self, step: int | None = None) -> Restored:
    """Restores without a target: arrays as saved (for inspection and tests)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"No complete checkpoint in {self.directory} to restore.")
    out = self._manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
    ))
    return Restored(step=int(step), state=out["state"],
                    data_state=_decode_json(out["data"]["state"]),
                    meta=dict(out["meta"]))

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _path_str(path: tuple) -> str:
  """A tree path as ``a.b.0`` (dict keys, sequence indices and attribute names
  alike, so a namedtuple field and its saved dict key compare equal)."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return ".".join(parts)


def _as_abstract(x: Any) -> Any:
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x
