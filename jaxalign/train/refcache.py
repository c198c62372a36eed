"""Reference log-probs computed once, cached on disk, never used stale.

The frozen reference model's per-sequence log-prob sums depend only on (reference
weights, tokenizer, data + parsing options, batch layout). They are computed in one
pass and stored under ``<cache_dir>/<key>/`` as ``.npz`` shards; ``key`` is a hash
of fingerprints of all four, so changing any of them selects a different directory
and the old entries are never read. With a valid cache the reference weights are
not loaded at all: the API takes a *loader* callable and calls it only on a miss.

Each cached batch is also stored under a digest of its arrays, and a batch is looked
up by that digest. A batch whose digest is not in the cache (a fingerprint that
missed some option, a reshuffled stream) is a loud ``KeyError``, not a silent wrong
reference. Cache the batches of one deterministic pass and replay them.

Usage::

  key = refcache.cache_key(reference=refcache.fingerprint_files([ckpt_dir]),
                           tokenizer=refcache.fingerprint_tokenizer(tok),
                           data=refcache.fingerprint_files([data_path]) + opts,
                           layout=layout_cfg)
  cache, computed = refcache.build_or_load(cache_dir, key, lambda: batches,
                                           load_reference, logprob_fn)
  batch = cache.attach(batch)  # adds batch["ref_logps"]; pass ref_params=None
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from jaxalign.train.objectives import REF_LOGPS_KEY

_META = "meta.json"
_FORMAT_VERSION = 1


# --- fingerprints ----------------------------------------------------------------


def _sha() -> Any:
  return hashlib.sha256()


def fingerprint_params(params: Any) -> str:
  """Hash of every leaf's path, dtype, shape and bytes (for in-memory params)."""
  h = _sha()
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in leaves:
    arr = np.asarray(jax.device_get(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{arr.dtype}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


def fingerprint_files(paths: Sequence[str | os.PathLike]) -> str:
  """Hash of the bytes of files (directories walked in sorted order), e.g. a
  reference checkpoint directory or the data files, without parsing them."""
  h = _sha()
  for p in paths:
    p = pathlib.Path(p)
    if not p.exists():
      raise ValueError(f"fingerprint_files: {p} does not exist; pass existing "
                       "reference checkpoint / data paths.")
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
      h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
      with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
          h.update(block)
  return h.hexdigest()


def fingerprint_tokenizer(tokenizer: Any) -> str:
  """Hash of what decides a tokenizer's ids: a checkpoint's files (tokenizer.json /
  tokenizer.model and its configs) plus the chat template and special ids it resolved
  from them (so two checkpoints sharing a vocabulary but not a template or an eos
  differ), jaxalign's SentencePiece model bytes, or else the type and vocab size."""
  h = _sha()
  h.update(type(tokenizer).__name__.encode())
  files = getattr(tokenizer, "files", None)
  if files:  # A checkpoint's tokenizer.
    for path in files:
      h.update(os.path.basename(path).encode())
      with open(path, "rb") as f:
        h.update(f.read())
    resolved = {k: getattr(tokenizer, k, None) for k in (
        "chat_template", "bos_id", "eos_ids", "pad_id", "unk_id", "add_bos", "add_eos",
        "vocab_size")}
    h.update(json.dumps(resolved, sort_keys=True, default=str).encode())
    return h.hexdigest()
  proto = getattr(tokenizer, "model_proto", None)
  if callable(proto):
    proto = proto()
  if proto is not None:
    h.update(bytes(proto))
  else:
    h.update(str(getattr(tokenizer, "vocab_size", "")).encode())
  return h.hexdigest()


def _canonical(value: Any) -> Any:
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {"__type__": type(value).__name__,
            **{k: _canonical(v) for k, v in dataclasses.asdict(value).items()}}
  if isinstance(value, dict):
    return {str(k): _canonical(v) for k, v in sorted(value.items())}
  if isinstance(value, (list, tuple)):
    return [_canonical(v) for v in value]
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  return repr(value)


def cache_key(**parts: Any) -> str:
  """Key from named fingerprints / options (strings, dataclasses, dicts, numbers).

  Pass at least ``reference``, ``tokenizer``, ``data`` and ``layout``.
  """
  for required in ("reference", "tokenizer", "data", "layout"):
    if required not in parts:
      raise ValueError(f"cache_key: missing part {required!r}; a key must cover the "
                       "reference weights, tokenizer, data and layout.")
  blob = json.dumps({"v": _FORMAT_VERSION, **_canonical(parts)}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:32]


def batch_digest(batch: dict) -> str:
  """Hash of a batch's arrays (the cached reference itself excluded)."""
  h = _sha()
  for k in sorted(batch):
    if k == REF_LOGPS_KEY:
      continue
    arr = np.ascontiguousarray(np.asarray(batch[k]))
    h.update(f"{k}{arr.dtype}{arr.shape}".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


# --- the cache ---------------------------------------------------------------------


class ReferenceCache:
  """Read side: maps a batch (by digest) to its cached reference sums ``[S]``."""

  def __init__(self, table: dict[str, np.ndarray], key: str):
    self._table = table
    self.key = key

  def __len__(self) -> int:
    return len(self._table)

  def lookup(self, batch: dict) -> np.ndarray:
    digest = batch_digest(batch)
    if digest not in self._table:
      raise KeyError(
          f"reference cache {self.key}: no entry for this batch (digest "
          f"{digest[:12]}); the batches differ from the cached pass (order, "
          "shuffling, an option missing from the cache key). Rebuild the cache or "
          "use a live reference.")
    return self._table[digest]

  def attach(self, batch: dict) -> dict:
    """A copy of ``batch`` with ``ref_logps [S]`` added."""
    return {**batch, REF_LOGPS_KEY: self.lookup(batch)}


def _read(path: pathlib.Path, key: str) -> ReferenceCache | None:
  meta_path = path / _META
  if not meta_path.exists():  # absent, or a computation that never finished
    return None
  meta = json.loads(meta_path.read_text())
  if meta.get("key") != key or meta.get("version") != _FORMAT_VERSION:
    return None
  table = {}
  for shard in meta["shards"]:
    f = path / shard
    if not f.exists():
      return None
    with np.load(f) as z:
      for digest, row in zip(z["digests"], z["ref_logps"]):
        table[str(digest)] = row
  if len(table) != meta["num_batches"]:
    return None
  return ReferenceCache(table, key)


def build_or_load(cache_dir: str | os.PathLike, key: str,
                  batches: Callable[[], Iterable[dict]],
                  load_reference: Callable[[], Any],
                  logprob_fn: Callable[[Any, dict], Any],
                  shard_size: int = 512) -> tuple[ReferenceCache, bool]:
  """Loads the cache for ``key``, or computes and writes it.

  Args:
    cache_dir: root directory; entries live in ``cache_dir/key``.
    key: from :func:`cache_key`.
    batches: returns the batches of the pass to cache (host numpy dicts).
    load_reference: returns the reference params; called only on a miss.
    logprob_fn: ``(ref_params, batch) -> sums [S]`` or ``(sums, counts)``, e.g. a
      jitted ``steps.logprob_step``.
    shard_size: batches per ``.npz`` shard.

  Returns:
    ``(cache, computed)``; ``computed`` is False when it came from disk.
  """
  path = pathlib.Path(cache_dir) / key
  cache = _read(path, key)
  if cache is not None:
    return cache, False
  if path.exists():
    shutil.rmtree(path)  # an unfinished or foreign write: never reuse its pieces
  tmp = path.with_name(path.name + ".tmp")
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  params = load_reference()
  table: dict[str, np.ndarray] = {}
  shards: list[str] = []
  digests: list[str] = []
  rows: list[np.ndarray] = []

  def flush():
    name = f"shard_{len(shards):05d}.npz"
    np.savez(tmp / name, digests=np.asarray(digests), ref_logps=np.stack(rows))
    shards.append(name)
    digests.clear()
    rows.clear()

  for batch in batches():
    out = logprob_fn(params, batch)
    sums = out[0] if isinstance(out, tuple) else out
    sums = np.asarray(jax.device_get(sums), np.float32)
    digest = batch_digest(batch)
    table[digest] = sums
    digests.append(digest)
    rows.append(sums)
    if len(rows) == shard_size:
      flush()
  if rows:
    flush()
  # meta.json is written last: its presence marks a complete cache.
  (tmp / _META).write_text(json.dumps(
      {"key": key, "version": _FORMAT_VERSION, "shards": shards,
       "num_batches": len(table)}))
  tmp.rename(path)
  return ReferenceCache(table, key), True


# ----------------------------------------------------------------------------
# The training loop's cache (``reference.cache_dir``).


def reference_fingerprint(cfg: Any) -> dict:
  """What determines the reference weights, without loading them."""
  if cfg.reference.kind == "hf":
    return {"hf": fingerprint_files([cfg.reference.hf_path])}
  lora = getattr(cfg.model, "lora", None)
  # A LoRA run's reference is its frozen base, stored in lora.base_dtype.
  extra = {"lora_base_dtype": lora.base_dtype} if lora is not None and lora.enabled else {}
  if getattr(cfg.model, "init_from", ""):
    return {"initial_from_run": init_from_fingerprint(cfg.model.init_from),
            "head": cfg.model.head, **extra}
  if cfg.model.hf_path:
    return {"initial_from_hf": fingerprint_files([cfg.model.hf_path]),
            "head": cfg.model.head, **extra}
  # The initial policy is a pure function of the architecture and the seed
  # (`build.reference_params` recomputes it bit-identically from them).
  return {"initial": {"arch": cfg.model.arch, "seed": cfg.seed,
                      "head": cfg.model.head}, **extra}


def init_from_fingerprint(spec: str) -> str:
  """What identifies the checkpoint ``model.init_from`` (``/abs/workdir:step``) names:
  its path and its files' names and sizes (a complete Orbax checkpoint is never
  rewritten; hashing its bytes, optimizer state included, would read the whole
  model at every start)."""
  workdir, _, step = spec.rpartition(":")
  root = pathlib.Path(workdir, "checkpoints", step)
  if not root.is_dir():
    raise ValueError(f"config.model.init_from={spec!r}: {root} is gone; the run it "
                     "started from must keep that checkpoint.")
  h = _sha()
  h.update(spec.encode())
  for f in sorted(p for p in root.rglob("*") if p.is_file()):
    h.update(f"{f.relative_to(root)}:{f.stat().st_size};".encode())
  return h.hexdigest()


def data_fingerprint(cfg: Any) -> dict:
  d = cfg.data
  files = {}
  if d.source == "file":
    files["path"] = fingerprint_files([d.path])
  else:
    files["synthetic_seed"] = cfg.seed
  # The cached pass is the first num_steps batches of the seeded stream.
  return {"files": files, "data": d, "num_steps": cfg.num_steps,
          "input_kind": cfg.loss.input_kind}


def tokenizer_fingerprint(cfg: Any) -> str:
  if cfg.data.source == "synthetic":
    return f"synthetic-vocab-{cfg.data.task.vocab_size}"
  from jaxalign.train import build  # pylint: disable=g-import-not-at-top
  return fingerprint_tokenizer(build.build_tokenizer(cfg))


class CachedReference:
  """Reference log-probs for the train batches from ``reference.cache_dir``.

  The cache covers one deterministic pass: the first ``num_steps`` batches of the
  seeded train stream, in order (a resumed run replays the same batches, so it hits).
  Its key covers the reference weights' fingerprint, the tokenizer, the data (file
  bytes and every ``data.*`` option, the step count) and the layout, and each batch
  is looked up by a digest of its arrays, so a stale entry is never used. A batch
  that is not in the cache (it should not happen) is computed live with the
  reference loaded then, and counted in ``misses`` (logged as
  ``ref_cache_misses``) with a warning.

  Args:
    cfg: the run's `jaxalign.config.Config`.
    load_reference: ``() -> params``, called only when something must be computed.
    logprob: ``(params, host batch) -> sums [S]`` (``[M, S]`` for micro-batches).
    fresh_batches: ``() -> iterator`` of the train stream from its start.
    layout: the train `batching.LayoutConfig` (buckets resolved).
    say: the run's logger.
  """

  def __init__(self, cfg: Any, load_reference: Callable[[], Any],
               logprob: Callable[[Any, dict], np.ndarray],
               fresh_batches: Callable[[], Any], layout: Any,
               say: Callable[[str], None]):
    self._say = say
    self._params = None
    self._logprob = logprob
    self.misses = 0
    self.loaded_reference = False

    def load():
      self.loaded_reference = True
      self._params = load_reference()
      return self._params

    self._load = load

    def batches():
      it = fresh_batches()
      for _ in range(cfg.num_steps):
        yield next(it)

    key = cache_key(
        reference=reference_fingerprint(cfg), tokenizer=tokenizer_fingerprint(cfg),
        data=data_fingerprint(cfg),
        layout={"micro_batches": cfg.data.micro_batches,
                "logprob_chunk": cfg.model.logprob_chunk, "layout": layout.kind,
                "buckets": tuple(layout.buckets),
                "rows_per_batch": cfg.data.rows_per_batch, "mesh": repr(cfg.mesh),
                # Compacted score arrays change every batch's digest (issue 22).
                "compact_scores": getattr(layout, "compact_scores", False)})
    self.cache, self.computed = build_or_load(
        cfg.reference.cache_dir, key, batches, load, logprob)
    say(f"reference cache {key} in {cfg.reference.cache_dir}: "
        f"{'computed' if self.computed else 'loaded'} ({len(self.cache)} batches)")

  def attach(self, batch: dict) -> dict:
    try:
      return self.cache.attach(batch)
    except KeyError as e:
      self.misses += 1
      if self.misses == 1:
        self._say(f"WARNING: {e.args[0]} Computing the reference live for such "
                  "batches (counted as ref_cache_misses).")
      params = self._params if self._params is not None else self._load()
      return {**batch, REF_LOGPS_KEY: self._logprob(params, batch)}
