"""Checkpoints: every Orbax call in jaxalign lives in this file.

Orbax's API churns between releases; keeping it behind this small surface means a
version bump touches one file. A checkpoint at step ``s`` holds three items:

- ``state``: a pytree of arrays (params, optimizer state, step, PRNG key data, ...),
  saved with ``StandardSave`` and restored straight into the target shardings;
- ``data``: the data-iterator state (JSON), so a restart sees the same next batch;
- ``meta``: small JSON facts (the step, a config fingerprint) checked on restore.

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
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "meta"))

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
    out = self._manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
    ))
    return Restored(step=int(step), state=out["state"],
                    data_state=_decode_json(out["data"]["state"]),
                    meta=dict(out["meta"]))

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


def _as_abstract(x: Any) -> Any:
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x
