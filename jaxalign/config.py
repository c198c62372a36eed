"""Experiment config: an ml_collections ConfigDict validated ONCE into frozen dataclasses.

This is the only module that reads config keys. `validate(config, num_devices)` turns
the ConfigDict of an ``experiments/*.py`` file into a `Config`; every other module
takes the typed dataclasses. Everything that can be known before compiling is checked
here and reported as a ``ValueError`` naming the key:

- an unknown key anywhere (a typo must not silently fall back to a default);
- a value of the wrong type or outside its allowed set;
- a mesh that does not fit the devices;
- a batch size not divisible by the data-parallel size;
- a loss that needs a reference model when ``reference.kind = "none"``.

The expected layout of the ConfigDict (see ``experiments/demo.py`` for a full one)::

  seed, num_steps, max_nonfinite_in_a_row
  model:      hf_path, head ("lm" | "scalar"), logprob_chunk and the TransformerConfig
              fields
  loss:       a loss name, "name:weight,name:weight", or a list of (name, weight)
  loss_hparams: keyword arguments for the loss (beta, ...)
  reference:  kind ("initial" | "none" | "hf"), hf_path, cache_dir
  data:       source ("synthetic" | "file"), path, eval_path, format, tokenizer,
              on_error, batch_size, micro_batches, max_length, max_prompt_length,
              layout, buckets, rows_per_batch, shuffle_seed, task.* (the synthetic
              task)
  optimizer:  name, learning_rate, schedule, warmup_steps, weight_decay, b1, b2, eps,
              grad_clip_norm
  mesh:       data, fsdp, tensor, reference_placement
  checkpoint: every_steps, keep, async_save
  eval:       enabled, every_steps, num_examples, batch_size
  log:        every_steps, tensorboard, progress_bar, plots
  debug:      sigterm_at_step, sigkill_in_save_at_step, nonfinite_steps (fault
              injection for the tests)

`base_config()` builds that ConfigDict with every default; `experiment_arg` and
`apply_variant` hold what the experiment files share (variants tiny / hh, runlocal).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

_MISSING = object()


def _err(key: str, msg: str) -> ValueError:
  return ValueError(f"config.{key}: {msg}")


# ----------------------------------------------------------------------------
# Sections.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """``hf_path``: an HF checkpoint directory to start from ("" = random init with the
  architecture in ``arch``). ``head``: ``"lm"`` (token log-probs) or ``"scalar"`` (a
  reward model). ``arch`` is the model's `TransformerConfig` (ignored with hf_path,
  whose config.json defines the architecture); its ConfigDict key ``model.head_dim``
  is 0 by default, meaning ``d_model // n_heads`` of the final config.
  ``logprob_chunk``: tokens per log-prob chunk, bounding the live ``[chunk, vocab]``
  logits block."""
  hf_path: str = ""
  head: str = "lm"
  arch: Any = None
  logprob_chunk: int = 128


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """``terms``: ((name, weight), ...); ``hparams``: sorted (key, value) pairs."""
  terms: tuple[tuple[str, float], ...] = (("dpo", 1.0),)
  hparams: tuple[tuple[str, Any], ...] = ()
  input_kind: str = "pairwise"
  needs_reference: bool = True

  def hparams_dict(self) -> dict[str, Any]:
    return dict(self.hparams)


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
  """``kind``: "initial" (a frozen copy of the initial policy), "none", or "hf"
  (load ``hf_path``). ``cache_dir``: "" = a live reference forward every step;
  otherwise the reference log-probs of the run's replayed batch stream are computed
  once and cached there (`jaxalign.train.refcache`; see `jaxalign.train.loop`)."""
  kind: str = "initial"
  hf_path: str = ""
  cache_dir: str = ""


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """The built-in ground-truth task (``data.source = "synthetic"``); the fields of
  `jaxalign.data.synthetic.SyntheticTaskConfig` that matter here, plus sizes."""
  vocab_size: int = 32
  target_len: int = 8
  num_train: int = 2048
  num_candidates: int = 8  # responses per held-out candidate set (and per RRHF example)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where examples come from and how they are batched.

  ``source``: "synthetic" (the ground-truth task, ``task.*``; eval adds oracle-scored
  candidate sets) or "file" (JSONL(.gz) or Parquet records at ``path`` in ``format``,
  one of the formats of `jaxalign.data.formats` -- hh, pairwise, sft, unpaired, ranked,
  prompt -- e.g. "hh" for HH-RLHF; ``eval_path`` is held out, or, when empty, the last
  ``eval.num_examples`` examples of ``path`` are). ``tokenizer``: "auto" (the
  default: ``model.hf_path``'s own tokenizer and chat template when it is set, else
  "byte"), "byte", a checkpoint directory (``tokenizer.json`` / ``tokenizer.model``) or
  a SentencePiece model file trained by jaxalign; a tokenizer that does not belong to
  a checkpoint the run loads stops the run before compiling (``train/build.py``).
  ``batch_size``: examples (pairs) per step, global.
  ``micro_batches``: gradient accumulation; each step's ``batch_size`` examples are
  laid out as this many equally shaped micro-batches, scanned one at a time.
  ``max_length`` / ``max_prompt_length``: truncation in tokens (0 = none).
  ``layout``: "padded" | "packed" | "prefix_shared"; ``buckets``: row lengths;
  ``rows_per_batch``: rows for packed layouts (0 = one per example / sequence); the
  examples of a step that do not fit them are carried to the next step. With
  ``max_length`` set, `validate` rejects a largest bucket that a truncated example
  could outgrow (prefix_shared: ``1 + K (max_length - 1)`` for K completions; see
  `layout_need`); without it the loop checks the loaded examples before compiling.
  """
  source: str = "synthetic"
  path: str = ""
  eval_path: str = ""
  format: str = "hh"
  tokenizer: str = "auto"
  on_error: str = "raise"
  batch_size: int = 16
  micro_batches: int = 1
  max_length: int = 0
  max_prompt_length: int = 0
  layout: str = "padded"
  buckets: tuple[int, ...] = (32,)
  rows_per_batch: int = 0
  shuffle_seed: int = 0
  task: TaskConfig = TaskConfig()


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = "adamw"
  learning_rate: float = 1e-3
  schedule: str = "constant"
  warmup_steps: int = 0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip_norm: float = 1.0  # 0 disables clipping


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 100
  keep: int = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  enabled: bool = True  # False: no evaluation at all (nothing compiled for it)
  every_steps: int = 100  # 0 disables periodic eval (a final eval still runs)
  num_examples: int = 64
  batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class LogConfig:
  every_steps: int = 10
  tensorboard: bool = True
  progress_bar: bool = True
  plots: bool = True


@dataclasses.dataclass(frozen=True)
class DebugConfig:
  """Fault injection used by the tests (and to rehearse preemption)."""
  sigterm_at_step: int = -1  # the process sends itself SIGTERM after this step
  sigkill_in_save_at_step: int = -1  # SIGKILL right after this step's save starts
  nonfinite_steps: tuple[int, ...] = ()  # batches of these steps are poisoned (NaN)


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int = 0
  num_steps: int = 100
  max_nonfinite_in_a_row: int = 5
  model: ModelConfig = ModelConfig()
  loss: LossConfig = LossConfig()
  reference: ReferenceConfig = ReferenceConfig()
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  mesh: Any = None  # jaxalign.parallel.mesh.MeshConfig
  checkpoint: CheckpointConfig = CheckpointConfig()
  eval: EvalConfig = EvalConfig()
  log: LogConfig = LogConfig()
  debug: DebugConfig = DebugConfig()


_CHOICES = {
    "model.head": ("lm", "scalar"),
    "reference.kind": ("initial", "none", "hf"),
    "data.source": ("synthetic", "file"),
    "data.format": ("hh", "pairwise", "sft", "unpaired", "ranked", "prompt"),
    "data.on_error": ("raise", "skip"),
    "data.layout": ("padded", "packed", "prefix_shared"),
    "optimizer.name": ("adamw", "adam", "sgd"),
    "optimizer.schedule": ("constant", "cosine", "linear"),
}

_POSITIVE = ("num_steps", "max_nonfinite_in_a_row", "data.batch_size",
             "data.micro_batches", "model.logprob_chunk",
             "checkpoint.every_steps", "checkpoint.keep", "eval.num_examples",
             "eval.batch_size", "log.every_steps", "data.task.num_train",
             "data.task.num_candidates", "data.task.target_len", "data.task.vocab_size")


# ----------------------------------------------------------------------------
# Generic ConfigDict -> dataclass conversion.


def _to_plain(value: Any) -> Any:
  if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return {k: _to_plain(v) for k, v in value.items()}
  if isinstance(value, Mapping):
    return {k: _to_plain(v) for k, v in value.items()}
  return value


def _coerce(value: Any, typ: Any, key: str) -> Any:
  """Checks / converts a leaf value to the dataclass field's type."""
  origin = typing.get_origin(typ)
  if typ is Any:
    return value
  if typ is bool:
    if not isinstance(value, bool):
      raise _err(key, f"expected a bool, got {value!r}.")
    return value
  if typ is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise _err(key, f"expected an int, got {value!r}.")
    return value
  if typ is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise _err(key, f"expected a number, got {value!r}.")
    return float(value)
  if typ is str:
    if not isinstance(value, str):
      raise _err(key, f"expected a string, got {value!r}.")
    return value
  if origin is tuple:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
      raise _err(key, f"expected a list, got {value!r}.")
    (elem, *_), = [typing.get_args(typ)]
    return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
  return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
  """Builds dataclass ``cls`` from a dict, rejecting unknown keys."""
  if raw is None:
    return cls()
  if not isinstance(raw, Mapping):
    raise _err(prefix, f"expected a section (ConfigDict), got {raw!r}.")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for k, v in raw.items():
    key = f"{prefix}.{k}" if prefix else k
    if k not in fields:
      raise _err(key, f"unknown key; valid keys here are {sorted(fields)}. "
                 "Fix the spelling or remove it.")
    typ = hints[k]
    if dataclasses.is_dataclass(typ):
      kwargs[k] = _build(typ, v, key)
    else:
      kwargs[k] = _coerce(v, typ, key)
  return cls(**kwargs)


def _get(d: Mapping, dotted: str) -> Any:
  for part in dotted.split("."):
    d = d[part] if isinstance(d, Mapping) else getattr(d, part)
  return d


# ----------------------------------------------------------------------------
# Sections with external schemas.


def _model_section(raw: Mapping | None) -> ModelConfig:
  from jaxalign.models import transformer  # pylint: disable=g-import-not-at-top

  raw = dict(raw or {})
  hf_path = _coerce(raw.pop("hf_path", ""), str, "model.hf_path")
  head = _coerce(raw.pop("head", "lm"), str, "model.head")
  chunk = _coerce(raw.pop("logprob_chunk", 128), int, "model.logprob_chunk")
  names = {f.name: f for f in dataclasses.fields(transformer.TransformerConfig)}
  hints = typing.get_type_hints(transformer.TransformerConfig)
  for k in raw:
    if k not in names:
      raise _err(f"model.{k}", "unknown key; valid keys are hf_path, head, "
                 "logprob_chunk and the "
                 f"TransformerConfig fields {sorted(names)}.")
  kwargs = {}
  for k, v in raw.items():
    typ = hints.get(k, Any)
    kwargs[k] = _coerce(v, typ, f"model.{k}") if typ in (int, float, bool, str) else v
  if isinstance(kwargs.get("rope_scaling"), Mapping):
    kwargs["rope_scaling"] = tuple(sorted(kwargs["rope_scaling"].items()))
  kwargs["head_dim"] = _head_dim(kwargs, transformer.TransformerConfig)
  try:
    arch = transformer.TransformerConfig(**kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model: {e}") from e
  return ModelConfig(hf_path=hf_path, head=head, arch=arch, logprob_chunk=chunk)


def _head_dim(kwargs: Mapping[str, Any], arch_cls: type) -> int | None:
  """``model.head_dim``: 0 (the default) or None derives ``d_model // n_heads`` from
  the *final* d_model and n_heads (after every override); a positive value is used as
  given, even where it differs from that quotient (as in Gemma)."""
  hd = kwargs.get("head_dim", 0)
  if hd is None or hd == 0:
    d_model = kwargs.get("d_model", arch_cls.d_model)
    n_heads = kwargs.get("n_heads", arch_cls.n_heads)
    if isinstance(d_model, int) and isinstance(n_heads, int) and n_heads > 0 and (
        d_model % n_heads):
      raise _err("model.d_model", f"config.model.d_model={d_model} is not divisible by "
                 f"config.model.n_heads={n_heads}, so config.model.head_dim=0 (derive "
                 "d_model // n_heads) has no value; choose a d_model that n_heads "
                 "divides, or set config.model.head_dim explicitly.")
    return None  # TransformerConfig derives d_model // n_heads
  if isinstance(hd, bool) or not isinstance(hd, int) or hd < 0:
    raise _err("model.head_dim", f"expected an int >= 0 (0 = d_model // n_heads), "
               f"got {hd!r}.")
  return hd


def _loss_section(raw_loss: Any, raw_hparams: Mapping | None) -> LossConfig:
  from jaxalign import losses  # pylint: disable=g-import-not-at-top

  if isinstance(raw_loss, str):
    # "dpo" or "dpo:1.0,nll:0.1" (handy on the command line).
    terms = []
    for part in raw_loss.split(","):
      name, _, weight = part.strip().partition(":")
      try:
        terms.append((name.strip(), float(weight) if weight else 1.0))
      except ValueError:
        raise _err("loss", f"bad weight in {part!r}; write name:weight.") from None
  elif isinstance(raw_loss, (list, tuple)):
    terms = []
    for i, t in enumerate(raw_loss):
      if not (isinstance(t, (list, tuple)) and len(t) == 2 and isinstance(t[0], str)
              and isinstance(t[1], (int, float))):
        raise _err(f"loss[{i}]", f"expected (name, weight), got {t!r}.")
      terms.append((t[0], float(t[1])))
  else:
    raise _err("loss", f"expected a loss name or a list of (name, weight), got "
               f"{raw_loss!r}.")
  if not terms:
    raise _err("loss", "no loss given.")
  hparams = dict(raw_hparams or {})
  try:
    _, spec = losses.resolve(loss_arg(terms), hparams)
  except (KeyError, ValueError, TypeError) as e:
    raise ValueError(f"config.loss / config.loss_hparams: {e}") from e
  return LossConfig(terms=tuple(terms), hparams=tuple(sorted(hparams.items())),
                    input_kind=spec.input_kind,
                    needs_reference=bool(spec.needs_reference))


def loss_arg(terms: tuple[tuple[str, float], ...]) -> str | list[tuple[str, float]]:
  """What ``jaxalign.losses.resolve`` takes: a name, or the weighted list."""
  if len(terms) == 1 and terms[0][1] == 1.0:
    return terms[0][0]
  return list(terms)


def _mesh_section(raw: Mapping | None, num_devices: int):
  from jaxalign.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  raw = dict(raw or {})
  names = [f.name for f in dataclasses.fields(mesh_lib.MeshConfig)]
  for k in raw:
    if k not in names:
      raise _err(f"mesh.{k}", f"unknown key; valid keys are {names}.")
  if "rules" in raw:
    raw["rules"] = tuple((n, tuple(a) if isinstance(a, list) else a)
                         for n, a in raw["rules"])
  mesh_cfg = mesh_lib.MeshConfig(**raw)  # raises ValueError naming mesh.<axis>
  mesh_cfg.axis_sizes(num_devices)  # raises when it does not fit the devices
  return mesh_cfg


# ----------------------------------------------------------------------------
# Entry point.


_TOP_SPECIAL = ("model", "loss", "loss_hparams", "mesh")


def validate(config: ml_collections.ConfigDict | Mapping,
             num_devices: int) -> Config:
  """Validates a ConfigDict into a frozen `Config` (raises ValueError naming the key).

  Args:
    config: the experiment's ConfigDict (``experiments/*.py: get_config``).
    num_devices: the number of devices the mesh must fit (``jax.device_count()``).
  """
  raw = _to_plain(config)
  plain = {k: v for k, v in raw.items() if k not in _TOP_SPECIAL}
  cfg = _build(Config, plain, "")
  model = _model_section(raw.get("model"))
  loss = _loss_section(raw.get("loss", "dpo"), raw.get("loss_hparams"))
  mesh_cfg = _mesh_section(raw.get("mesh"), num_devices)
  cfg = dataclasses.replace(cfg, model=model, loss=loss, mesh=mesh_cfg)

  for key, choices in _CHOICES.items():
    if _get(cfg, key) not in choices:
      raise _err(key, f"{_get(cfg, key)!r} is not one of {choices}.")
  for key in _POSITIVE:
    if _get(cfg, key) < 1:
      raise _err(key, f"must be >= 1, got {_get(cfg, key)}.")

  if cfg.loss.needs_reference and cfg.reference.kind == "none":
    raise _err("reference.kind", f"the loss {cfg.loss.terms} needs a reference model "
               "but reference.kind='none'; set reference.kind='initial' (a frozen "
               "copy of the initial policy) or 'hf' with reference.hf_path.")
  if cfg.reference.kind == "hf" and not cfg.reference.hf_path:
    raise _err("reference.hf_path", "reference.kind='hf' needs a checkpoint "
               "directory in reference.hf_path.")
  if cfg.data.source == "file" and not cfg.data.path:
    raise _err("data.path", "data.source='file' needs the path of a JSONL(.gz) file "
               "(e.g. HH-RLHF with data.format='hh').")
  if (not cfg.data.buckets or cfg.data.buckets[0] < 1
      or list(cfg.data.buckets) != sorted(set(cfg.data.buckets))):
    raise _err("data.buckets", f"{cfg.data.buckets} must be a non-empty, strictly "
               "increasing list of positive row lengths.")
  for key in ("data.max_length", "data.max_prompt_length", "data.rows_per_batch"):
    if _get(cfg, key) < 0:
      raise _err(key, f"must be >= 0 (0 = none), got {_get(cfg, key)}.")
  if cfg.data.max_length > cfg.data.buckets[-1]:
    raise _err("data.max_length", f"{cfg.data.max_length} exceeds the largest bucket "
               f"{cfg.data.buckets[-1]} of data.buckets; add a bucket >= max_length.")
  if 0 < cfg.data.max_length <= cfg.data.max_prompt_length:
    raise _err("data.max_prompt_length", f"{cfg.data.max_prompt_length} must be "
               f"smaller than data.max_length={cfg.data.max_length}, or no completion "
               "token would fit.")
  if cfg.data.layout == "packed" and cfg.data.rows_per_batch < 1:
    raise _err("data.rows_per_batch", "data.layout='packed' needs the static number "
               "of rows to pack into (e.g. data.rows_per_batch=8).")
  _check_layout_bound(cfg)
  if (cfg.model.head == "scalar") != (cfg.loss.input_kind == "reward"):
    raise _err("model.head", f"model.head={cfg.model.head!r} does not match the loss "
               f"{cfg.loss.terms}: reward-model losses need head='scalar', every "
               "other loss head='lm'.")

  dp = mesh_cfg.axis_sizes(num_devices)[0] * mesh_cfg.axis_sizes(num_devices)[1]
  for key in ("data.batch_size", "eval.batch_size"):
    if _get(cfg, key) % dp:
      raise _err(key, f"{_get(cfg, key)} is not divisible by the data-parallel size "
                 f"mesh.data*mesh.fsdp={dp} (on {num_devices} devices); use a "
                 f"multiple of {dp} or change the mesh.")
  per_micro = cfg.data.micro_batches * dp
  if cfg.data.batch_size % per_micro:
    raise _err("data.micro_batches", f"data.batch_size={cfg.data.batch_size} is not "
               f"divisible by data.micro_batches={cfg.data.micro_batches} x the "
               f"data-parallel size {dp} = {per_micro}; every micro-batch must split "
               "evenly over the data-parallel devices. Use a batch size that is a "
               f"multiple of {per_micro} or fewer micro-batches.")
  if cfg.reference.cache_dir and not cfg.loss.needs_reference:
    raise _err("reference.cache_dir", f"the loss {cfg.loss.terms} uses no reference "
               "model, so there is nothing to cache; set reference.cache_dir=''.")
  if cfg.eval.num_examples < cfg.eval.batch_size:
    raise _err("eval.num_examples", f"{cfg.eval.num_examples} is smaller than "
               f"eval.batch_size={cfg.eval.batch_size}.")
  return cfg


# Completions an example of each loss input kind lays out: SFT its completion; pairs
# (DPO family, reward models) chosen and rejected; KTO its own completion and the
# mismatched one of its KL term (another example's completion). Ranked: K.
_COMPLETIONS = {"sft": 1, "pairwise": 2, "reward": 2, "unpaired": 2}


def layout_need(cfg: Config) -> dict[str, int] | None:
  """The worst-case row lengths the layout needs under the configured truncation.

  None when nothing bounds them before the data is read (``data.max_length = 0``,
  synthetic data, ranked records with a file-defined K); the loop then checks the
  loaded examples before compiling (`jaxalign.train.loop.ExampleBatches`).

  Truncation (`jaxalign.data.formats.truncate`) keeps every prompt + completion within
  ``M = max_length`` and every prompt within ``min(max_prompt_length, M - 1)`` (a
  longer one leaves no completion token, and the example is dropped); a prompt has
  at least 1 token. Hence, with ``k`` completions per example:

  - ``sequence``: one prompt + completion: ``M``; KTO's KL sequence pairs a prompt
    with ANOTHER example's completion (up to ``M - 1`` tokens): ``P_max + M - 1``.
  - ``unit``: what one row must hold for one example: the sequence (padded, packed);
    prefix_shared lays a prompt of ``P`` tokens and all ``k`` completions, each up to
    ``M - P`` (KTO's foreign one up to ``M - 1``), in one row: at most
    ``P + k (M - P) <= 1 + k (M - 1)``, reached by a 1-token prompt. A longer
    ``max_prompt_length`` does not lower it: a short prompt leaves each completion
    more room.
  - ``units``: packing units per example (packed: ``k`` sequences).
  """
  d = cfg.data
  if d.source != "file" or d.max_length == 0:
    return None
  kind = cfg.loss.input_kind
  k = _COMPLETIONS.get(kind)
  if kind == "ranked" and d.format in ("hh", "pairwise"):
    k = 2  # pairs become (chosen, rejected) rankings
  if k is None:
    return None
  m = d.max_length
  p_max = min(d.max_prompt_length, m - 1) if d.max_prompt_length else m - 1
  sequence = p_max + m - 1 if kind == "unpaired" else m
  if d.layout == "prefix_shared":
    return {"sequence": sequence, "unit": 1 + k * (m - 1), "units": 1, "k": k}
  return {"sequence": sequence, "unit": sequence, "units": k, "k": k}


def _round_bucket(n: int) -> int:
  return -(-n // 64) * 64


def _check_layout_bound(cfg: Config) -> None:
  """Rejects buckets / rows that a batch could outgrow mid-run (see `layout_need`)."""
  need = layout_need(cfg)
  if need is None:
    return
  d = cfg.data
  largest, m, k = d.buckets[-1], d.max_length, need["k"]
  if need["unit"] > largest:
    would_work = (tuple(b for b in d.buckets if b < need["unit"])
                  + (_round_bucket(need["unit"]),))
    fix = f"add a bucket >= {need['unit']} (e.g. data.buckets={would_work})"
    if d.layout == "prefix_shared":
      why = (f"data.layout='prefix_shared' lays an example's prompt and all {k} of its "
             f"completions in one row, and under data.max_length={m} a 1-token prompt "
             f"with {k} completions of {m - 1} tokens takes 1 + {k} x ({m} - 1) = "
             f"{need['unit']} tokens (data.max_prompt_length does not lower this: a "
             "shorter prompt leaves each completion more room)")
      fix += (f", lower data.max_length to {(largest - 1) // k + 1}, or use "
              "data.layout='padded'")
    else:
      why = (f"data.layout={d.layout!r} lays each sequence in a row, and the KTO "
             "mismatched (KL) sequence pairs an example's prompt (up to "
             f"{need['sequence'] - m + 1} tokens: data.max_prompt_length, or "
             f"data.max_length - 1) with another example's completion (up to "
             f"data.max_length - 1 = {m - 1} tokens): {need['sequence']} tokens")
      fix += " or lower data.max_prompt_length"
    raise _err("data.buckets", f"the largest bucket {largest} of data.buckets="
               f"{d.buckets} cannot hold the worst case of the layout: {why}. A batch "
               f"holding such an example would stop the run mid-training; {fix}.")
  if d.layout == "packed":
    rows = d.rows_per_batch
    per_row = largest // need["sequence"]
    if rows * per_row < need["units"]:
      min_rows = -(-need["units"] // per_row)
      min_bucket = -(-need["units"] // rows) * need["sequence"]
      raise _err("data.rows_per_batch", f"data.rows_per_batch={rows} rows of the "
                 f"largest bucket {largest} hold {rows * per_row} sequences of up to "
                 f"{need['sequence']} tokens (data.max_length={m}), but one example "
                 f"has {need['units']} sequences that must share a batch; raise "
                 f"data.rows_per_batch to {min_rows} or add a bucket >= {min_bucket}.")


# ----------------------------------------------------------------------------
# Helpers for experiments/*.py.


def base_config() -> ml_collections.ConfigDict:
  """A ConfigDict holding every key with its default (experiment files start here).

  Every key exists, so ``--config.a.b=value`` overrides work on the locked config.
  """
  from jaxalign.models import transformer  # pylint: disable=g-import-not-at-top
  from jaxalign.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  def section(obj) -> ml_collections.ConfigDict:
    out = {}
    for f in dataclasses.fields(obj):
      v = getattr(obj, f.name)
      out[f.name] = section(v) if dataclasses.is_dataclass(v) else v
    return ml_collections.ConfigDict(out)

  defaults = Config()
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(Config):
    if f.name in ("model", "loss", "mesh"):
      continue
    v = getattr(defaults, f.name)
    c[f.name] = section(v) if dataclasses.is_dataclass(v) else v
  # The architecture's *declared* defaults, not a resolved instance's values: a
  # resolved TransformerConfig() holds head_dim = 64 // 4 = 16, and copying that would
  # pin every config that changes d_model or n_heads to 16-wide heads. head_dim 0 means
  # "d_model // n_heads of the final config" (see `_head_dim`); the None-defaulted
  # optional ints are typed references so that ``--config.model.sliding_window=N``
  # parses (ml_collections cannot override a plain None field).
  model = {"hf_path": "", "head": "lm", "logprob_chunk": ModelConfig().logprob_chunk}
  hints = typing.get_type_hints(transformer.TransformerConfig)
  for f in dataclasses.fields(transformer.TransformerConfig):
    v = f.default
    if f.name == "head_dim":
      model[f.name] = 0
    elif v is None and hints[f.name] in (int | None, float | None):
      model[f.name] = ml_collections.FieldReference(
          None, field_type=int if hints[f.name] == (int | None) else float)
    elif v is not dataclasses.MISSING and not dataclasses.is_dataclass(v):
      model[f.name] = v
  c.model = ml_collections.ConfigDict(model)
  # A name, "name:weight,..." or a list of (name, weight): any type is accepted.
  c.loss = ml_collections.FieldReference("dpo", field_type=object)
  c.loss_hparams = ml_collections.ConfigDict()
  mesh = mesh_lib.MeshConfig()
  c.mesh = ml_collections.ConfigDict(
      {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor,
       "reference_placement": mesh.reference_placement})
  return c


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """big_vision-style ``get_config`` argument: ``"variant,key=value,flag"``.

  The first bare word may name the variant; ``key=value`` pairs override defaults
  (converted to the default's type); a bare word that is a bool default sets it true.
  Unknown words are an error naming the argument.
  """
  out = dict(defaults)
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      k, v = part.split("=", 1)
      if k not in out:
        raise ValueError(f"config argument {part!r}: unknown key {k!r}; known keys "
                         f"are {sorted(out)}.")
      d = out[k]
      out[k] = (v.lower() in ("1", "true", "yes") if isinstance(d, bool)
                else type(d)(v) if d is not None else v)
    elif isinstance(out.get(part), bool):
      out[part] = True
    elif "variant" in out and out["variant"] == defaults.get("variant"):
      out["variant"] = part
    else:
      raise ValueError(f"config argument {part!r}: not a key=value pair, a flag, or "
                       f"a variant; known keys are {sorted(out)}.")
  return ml_collections.ConfigDict(out)


TINY_MODEL = dict(vocab_size=32, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  mlp_dim=128, tie_embeddings=True)
HH_MODEL = dict(vocab_size=320, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4,
                mlp_dim=768, tie_embeddings=True)
# Meta-Llama-3-8B (config.json of the HF release; 8.03B parameters), for the pod configs.
LLAMA3_8B_MODEL = dict(
    vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
    head_dim=128, mlp_dim=14336, rope_theta=500000.0, norm_eps=1e-5,
    tie_embeddings=False,
)


def experiment_arg(arg: str | None) -> ml_collections.ConfigDict:
  """Parses the shared experiment argument: ``tiny`` (default) or ``hh``, plus
  ``path=`` (HH data file), ``eval_path=``, ``hf_path=`` (start from an HF
  checkpoint directory), ``steps=`` and the ``runlocal`` switch (shrinks everything
  to a CPU smoke run)."""
  a = parse_arg(arg, variant="tiny", path="", eval_path="", hf_path="", steps=0,
                runlocal=False)
  if a.variant not in ("tiny", "hh"):
    raise ValueError(f"config argument variant {a.variant!r}: expected 'tiny' or 'hh'.")
  if a.variant == "hh" and not a.path:
    raise ValueError("the 'hh' variant needs path=<HH-RLHF .jsonl(.gz)>, e.g. "
                     "--config experiments/dpo.py:hh,path=/data/hh.jsonl.gz")
  return a


def apply_variant(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict,
                  *, num_steps: int) -> ml_collections.ConfigDict:
  """Fills data / model / schedule for variant ``a.variant`` (see `experiment_arg`)."""
  c.num_steps = num_steps
  if a.variant == "tiny":
    c.model.update(TINY_MODEL)
    c.data.source = "synthetic"
    c.data.batch_size = 16
    c.data.buckets = (32,)
    c.eval.num_examples = 128
    c.eval.batch_size = 32
  else:
    c.model.update(HH_MODEL)
    c.data.source = "file"
    c.data.format = "hh"
    c.data.path = a.path
    c.data.eval_path = a.eval_path
    c.data.tokenizer = "auto"  # bytes, or hf_path's own tokenizer
    c.data.on_error = "skip"  # real data has bad records: skip, count by reason, log
    c.data.max_length = 256
    c.data.max_prompt_length = 192
    c.data.buckets = (128, 256)
    c.data.batch_size = 8
    c.eval.num_examples = 64
    c.eval.batch_size = 8
  c.model.hf_path = a.hf_path
  # The step count first (steps= wins over runlocal's 10), then everything scheduled
  # on it, so warmup / eval / checkpoint / log intervals follow the steps actually run.
  # (An override of config.num_steps after get_config does not move them: set those
  # keys too.)
  n = a.steps or (10 if a.runlocal else num_steps)
  c.num_steps = n
  c.optimizer.warmup_steps = min(10, n // 10)
  c.eval.every_steps = max(n // 5, 1)
  c.checkpoint.every_steps = max(n // 4, 1)
  c.log.every_steps = max(min(10, n // 10), 1)
  if a.runlocal:
    c.eval.every_steps = max(n // 2, 1)
    c.checkpoint.every_steps = max(n // 2, 1)
    c.log.every_steps = 1
    c.data.batch_size = 8
    c.eval.num_examples = 16
    c.eval.batch_size = 8
    c.data.task.num_train = 256
    c.log.progress_bar = False
  return c
