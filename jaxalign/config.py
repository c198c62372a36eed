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
  model:      hf_path, init_from, head ("lm" | "scalar"), logprob_chunk, the TransformerConfig
              fields, and lora.* (rank, alpha, dropout, targets, base_dtype; rank 0 =
              full fine-tuning)
  loss:       a loss name, "name:weight,name:weight", or a list of (name, weight)
  loss_hparams: keyword arguments for the loss (beta, ...)
  reference:  kind ("initial" | "none" | "hf"), hf_path, cache_dir
  data:       source ("synthetic" | "file"), path, eval_path, format, tokenizer,
              on_error, batch_size, micro_batches, max_length, max_prompt_length,
              layout, buckets, rows_per_batch, shuffle_seed, margin_field, task.*
              (the synthetic task)
  optimizer:  name, learning_rate, schedule, warmup_steps, weight_decay, b1, b2, eps,
              grad_clip_norm
  mesh:       data, fsdp, tensor, reference_placement
  checkpoint: every_steps, keep, async_save, restore_step (-1 = the latest kept
              checkpoint; N = roll back to step N, see `jaxalign.train.rundir`)
  divergence: factor, max_update_ratio, loss_factor, grad_factor, window,
              max_in_a_row (`DivergenceConfig`: the guard against exploding updates)
  eval:       enabled, every_steps, num_examples, batch_size, generate_prompts,
              max_new_tokens, temperature, reward_model, judge (`EvalConfig`)
  log:        every_steps, tensorboard, progress_bar, plots
  debug:      sigterm_at_step, sigkill_in_save_at_step, nonfinite_steps (fault
              injection for the tests)

`base_config()` builds that ConfigDict with every default. Presets (model sizes,
the tiny / hh variants, runlocal) live with the experiments, in
``experiments/_common.py``. The online-RL section is `RLConfig` (`validate_rl`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

if typing.TYPE_CHECKING:
  from jaxalign.models import lora as lora_lib

_MISSING = object()


def _err(key: str, msg: str) -> ValueError:
  return ValueError(f"config.{key}: {msg}")


# ----------------------------------------------------------------------------
# Sections.


def _lora_off() -> Any:
  from jaxalign.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  return lora_lib.LoraConfig()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """``hf_path``: an HF checkpoint directory to start from ("" = random init with the
  architecture in ``arch``). ``head``: ``"lm"`` (token log-probs) or ``"scalar"`` (a
  reward model). ``arch`` is the model's `TransformerConfig` (ignored with hf_path,
  whose config.json defines the architecture); its ConfigDict key ``model.head_dim``
  is 0 by default, meaning ``d_model // n_heads`` of the final config.
  ``logprob_chunk``: tokens per log-prob chunk, bounding the live ``[chunk, vocab]``
  logits block. ``lora``: a `jaxalign.models.lora.LoraConfig` (``model.lora.rank=16``
  trains low-rank adapters on a frozen base, whose adapters-off forward is then the
  reference; rank 0, the default, trains every weight). ``init_from``: the workdir of
  another jaxalign run, ``WORKDIR[:STEP]``, whose checkpoint (the latest, or STEP)
  is the initial policy (and so the default reference); resolved here to
  ``/abs/WORKDIR:STEP``, and checked against the source's architecture and tokenizer
  before anything is built (`jaxalign.train.rundir`, "Chaining runs")."""
  hf_path: str = ""
  init_from: str = ""
  head: str = "lm"
  arch: Any = None
  logprob_chunk: int = 128
  lora: lora_lib.LoraConfig = dataclasses.field(default_factory=_lora_off)


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
  `jaxalign.data.synthetic.SyntheticTaskConfig` that matter here, plus sizes.
  ``max_operand`` / ``operations``: the built-in verifiable task's questions
  (``data.source = "arithmetic"``, `jaxalign.data.verifiable`; online RL), whose
  train split holds at most ``num_train`` questions."""
  vocab_size: int = 32
  target_len: int = 8
  num_train: int = 2048
  num_candidates: int = 8  # responses per held-out candidate set (and per RRHF example)
  max_operand: int = 9
  operations: str = "+-"


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
  ``layout``: "auto" (the default: "prefix_shared" for losses that lay out several
  completions per prompt -- pairs, KTO, rankings, reward models -- the fastest exact
  layout on HH, docs/benchmarks.md; "padded" for SFT) | "padded" | "packed" |
  "prefix_shared"; every layout gives the same per-sequence sums. ``buckets``: row
  lengths; ``()`` (the default) derives them (`derive_buckets`) from the longest row
  the layout can need: from ``max_length`` when it is set (`layout_need`), else from
  the loaded examples. ``rows_per_batch``: rows for packed layouts (0 = one per
  example / sequence); the examples of a step that do not fit them are carried to
  the next step. With ``layout="auto"`` resolved to prefix_shared, ``buckets=()``
  and ``max_length`` set, ``rows_per_batch=0`` means half a micro-batch's examples
  when that divides over the data-parallel devices, with buckets up to two units, so
  that two units share a row and nothing is ever carried (`_auto_rows`, issue 22).
  With ``max_length`` set, `validate` rejects a largest bucket that a truncated
  example could outgrow (prefix_shared: ``1 + K (max_length - 1)`` for K
  completions; see `layout_need`); without it the loop checks the loaded examples
  before compiling. ``margin_field``: a reward model's pairs (``format`` pairwise /
  hh, ``model.head = "scalar"``) read a numeric margin from this record field, which
  every record must have (Llama 2: -log sigmoid(r_c - r_r - m), ``bradley_terry``'s
  ``margin_scale`` s scales it); "" = no margin.
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
  layout: str = "auto"
  buckets: tuple[int, ...] = ()
  rows_per_batch: int = 0
  shuffle_seed: int = 0
  margin_field: str = ""
  task: TaskConfig = TaskConfig()


# Marks a dataclass field that `validate` sets and no config key names: `_build`
# refuses it as a key, `base_config` and the run record leave it out.
_DERIVED = {"derived": True}

# optimizer.learning_rate = AUTO_LR: the peak rate for where the run starts.
AUTO_LR = 0.0
SCRATCH_LR = 1e-3
# Per objective family: (full fine-tuning, LoRA, the literature's full range);
# OptimizerConfig's docstring gives the sources.
TRAINED_START_LR = {
    "preference": (1e-6, 1e-5, "5e-7..1e-6"),
    "kto": (5e-7, 5e-6, "5e-7..5e-6"),
    "sft": (2e-5, 2e-4, "1e-5..2e-5"),
    "reward": (1e-5, 1e-4, "9e-6..1e-5"),
    "rl": (1e-6, 1e-5, "1e-6..1e-5"),
}
# An explicit rate at or above this, fine-tuning every weight of a trained model, is
# an order of magnitude past every family above: warned about at startup.
TRAINED_START_WARN_LR = 1e-4
# A loss's input kind -> its family (rankings: the preference family's rate, the
# smaller one of the two candidates: RRHF's loss is a ranking plus an SFT term).
_LR_FAMILY = {"pairwise": "preference", "ranked": "preference", "unpaired": "kto",
              "sft": "sft", "reward": "reward"}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """``learning_rate``: the peak rate; 0 (the default) = "auto", resolved by
  `validate` for where the run starts; the validated config and the run's record
  hold the number, and a trained start prints it at startup
  (``optimizer.learning_rate: auto -> 1e-06 (trained start (model.hf_path),
  preference, full fine-tuning)``).

  - From random init: 1e-3 (``SCRATCH_LR``, the rate the built-in tasks are tuned at).
  - From a trained model (``model.hf_path`` or ``model.init_from``), per objective
    (``TRAINED_START_LR``; full fine-tuning / LoRA):

    - preference losses (DPO and its family; rankings): 1e-6 / 1e-5. DPO (Rafailov et
      al. 2023, App. B: 1e-6 after 150 warmup steps); Zephyr's DPO (Tunstall et al.
      2023): 5e-7; TRL's ``DPOConfig`` default: 1e-6.
    - KTO: 5e-7 / 5e-6. KTO (Ethayarajh et al. 2024) runs at DPO-like rates; TRL's
      KTO example fine-tunes at 5e-7 ("similar to that of DPO").
    - SFT: 2e-5 / 2e-4. Alpaca (Taori et al. 2023) and Zephyr's SFT: 2e-5; QLoRA
      (Dettmers et al. 2023): 2e-4 for 7B-13B adapters.
    - reward models: 1e-5 / 1e-4. InstructGPT's (Ouyang et al. 2022): 9e-6.
    - online RL (PPO, GRPO, RLOO, RRHF; `validate_rl`): 1e-6 / 1e-5. DeepSeekMath's
      GRPO (Shao et al. 2024): 1e-6; TRL's ``GRPOConfig`` default: 1e-6.

    LoRA (``model.lora.rank > 0``) takes 10x the full rate: its update lives in a
    rank-r subspace scaled by alpha / r, and the usual practice is 10-100x (QLoRA's
    2e-4 against 2e-5 for full SFT).

  An explicit rate >= 1e-4 (``TRAINED_START_WARN_LR``) that fine-tunes every weight
  of a trained model is kept but warned about at startup, naming the key and the
  family's range: DPO from an SFT model at 1e-3 took greedy correctness from 39% to
  9% (issue 18; docs/real_checkpoints.md, "Learning rates for a trained start")."""
  name: str = "adamw"
  learning_rate: float = AUTO_LR
  schedule: str = "constant"
  warmup_steps: int = 0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip_norm: float = 1.0  # 0 disables clipping
  # Set by `validate`: learning_rate was "auto"; the startup line about the rate.
  learning_rate_auto: bool = dataclasses.field(default=False, compare=False,
                                               metadata=_DERIVED)
  learning_rate_note: str = dataclasses.field(default="", compare=False,
                                              metadata=_DERIVED)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """``restore_step``: -1 (default) resumes from the latest kept checkpoint; ``N``
  restarts from kept step N: newer checkpoints are moved aside (``rolled_back/``) and
  optimizer and guard settings may change (`jaxalign.train.rundir`)."""
  every_steps: int = 100
  keep: int = 3
  async_save: bool = True
  restore_step: int = -1


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out evaluation (`jaxalign.eval`), and evaluation by generation
  (`jaxalign.train.gen_eval`): at each eval the policy answers ``generate_prompts``
  held-out prompts (``temperature`` 0 = greedy) with up to ``max_new_tokens`` tokens
  (0 = the longest held-out response), scored by the built-in task's oracle or by
  ``reward_model`` (a reward-model run, ``WORKDIR[:STEP]``), with response lengths;
  ``judge`` ("oracle" | "reward_model" | "" = none) adds the win rate against the
  reference policy's responses to the same prompts. ``generate_prompts = -1`` and
  ``judge = "auto"`` are resolved here: generation is on (every held-out prompt) for
  the built-in task or when a reward model is given, off otherwise; the judge is the
  oracle on the built-in task, else the reward model when given."""
  enabled: bool = True  # False: no evaluation at all (nothing compiled for it)
  every_steps: int = 100  # 0 disables periodic eval (a final eval still runs)
  num_examples: int = 64
  batch_size: int = 16
  generate_prompts: int = -1  # -1 = auto (above); 0 = off
  max_new_tokens: int = 0
  temperature: float = 0.0
  reward_model: str = ""
  judge: str = "auto"


@dataclasses.dataclass(frozen=True)
class LogConfig:
  every_steps: int = 10
  tensorboard: bool = True
  progress_bar: bool = True
  plots: bool = True


@dataclasses.dataclass(frozen=True)
class DivergenceConfig:
  """The divergence guard (`jaxalign.train.hooks.DivergenceGuard`): a step whose update
  is out of scale is not saved; ``max_in_a_row`` such steps in a row stop the run
  (exit code 3), naming the checkpoint to resume from.

  A step is divergent when (a factor of 0 turns its test off):

  - its relative update ``r = ||params_new - params|| / ||params||`` exceeds
    ``max_update_ratio`` (an update larger than the weights themselves; works from
    the first step, with no history), or exceeds ``factor`` x the median ``r`` of the
    last ``window`` accepted steps. Adam bounds every coordinate's update by about
    ``3.2 x lr``, so a healthy run's ``r`` moves by a few x at most (warmup from 0
    only grows it linearly); the defaults (1.0 and 100) fire only on an update that
    wrecks the weights, e.g. a learning rate off by orders of magnitude;
  - (opt-in) its loss exceeds ``loss_factor`` x the median ``|loss|`` of the window,
    or its pre-clip gradient norm exceeds ``grad_factor`` x the window's median. Off
    by default: losses near 0 (a converged DPO run) and clipped gradient spikes jump
    by large factors in healthy runs.

  Updates that carry no signal set no scale: they are judged, but they do not enter
  the window of updates (nor of gradient norms). Such updates are common in online
  RL: an iteration whose groups all score alike has zero advantages and a gradient
  of rounding noise (~1e-8), and Adam, which normalises each coordinate by
  ``sqrt(v) + eps``, turns it into an update ~1/100 of a real one; a window of those
  made the next real update look 100x out of scale (a GRPO run stopped at its second
  iteration). An update carries no signal when it is at least 1/100 of the largest
  update Adam(W) can make of its gradient, ``(lr / eps) ||g||`` (reached when the
  gradient's coordinates are below ``eps``: Adam then passes ``lr g / eps``), i.e. the
  gradient is below the optimizer's resolution and eps, momentum or weight decay made
  the step. This is a test on the step itself, not on the history, so it also holds
  when every step so far carried no signal (a run whose first rewards are all 0):
  the relative test then waits for the first real update. A signal-carrying update
  is ``~lr sqrt(n)`` (n parameters), orders of magnitude below that bound unless the
  gradient's coordinates are near ``eps`` (real GRPO iterations: 1e-5..4e-4 of it;
  a zero-advantage one: 0.9); an update misread as silent only leaves the window,
  so the guard errs towards judging less, never towards stopping a run. With
  ``optimizer.name='sgd'`` (no such bound: its update is ``lr g``) every update
  enters the window.

  The window's medians are saved in each checkpoint, so a resumed run keeps them.
  """
  factor: float = 100.0
  max_update_ratio: float = 1.0
  loss_factor: float = 0.0
  grad_factor: float = 0.0
  window: int = 20
  max_in_a_row: int = 1
  # Set by `validate`: lr / eps of an adam(w) optimizer (0 for sgd), the largest
  # factor by which it scales a gradient's norm into an update.
  adam_gain: float = dataclasses.field(default=0.0, compare=False, metadata=_DERIVED)


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
  divergence: DivergenceConfig = DivergenceConfig()


_CHOICES = {
    "model.head": ("lm", "scalar"),
    "reference.kind": ("initial", "none", "hf"),
    "data.source": ("synthetic", "file", "arithmetic"),
    "data.format": ("hh", "pairwise", "sft", "unpaired", "ranked", "prompt"),
    "data.on_error": ("raise", "skip"),
    "data.layout": ("auto", "padded", "packed", "prefix_shared"),
    "optimizer.name": ("adamw", "adam", "sgd"),
    "optimizer.schedule": ("constant", "cosine", "linear"),
}

_POSITIVE = ("num_steps", "max_nonfinite_in_a_row", "data.batch_size",
             "data.micro_batches", "model.logprob_chunk",
             "checkpoint.every_steps", "checkpoint.keep", "eval.num_examples",
             "eval.batch_size", "log.every_steps", "data.task.num_train",
             "divergence.window", "divergence.max_in_a_row",
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
  fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
  kwargs = {}
  for k, v in raw.items():
    key = f"{prefix}.{k}" if prefix else k
    if k not in fields:
      raise _err(key, f"unknown key{_did_you_mean(k, fields, prefix)}; valid keys here "
                 f"are {sorted(fields)}. Fix the spelling or remove it.")
    typ = hints[k]
    if dataclasses.is_dataclass(typ):
      kwargs[k] = _build(typ, v, key)
    else:
      kwargs[k] = _coerce(v, typ, key)
  return cls(**kwargs)


def _did_you_mean(key: str, valid: Any, prefix: str) -> str:
  import difflib  # pylint: disable=g-import-not-at-top
  close = difflib.get_close_matches(key, list(valid), n=1)
  return f" (did you mean config.{prefix + '.' if prefix else ''}{close[0]}?)" if close else ""


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
  init_from = _init_from(raw.pop("init_from", ""))
  head = _coerce(raw.pop("head", "lm"), str, "model.head")
  chunk = _coerce(raw.pop("logprob_chunk", 128), int, "model.logprob_chunk")
  lora = _lora_section(raw.pop("lora", None))
  names = {f.name: f for f in dataclasses.fields(transformer.TransformerConfig)}
  hints = typing.get_type_hints(transformer.TransformerConfig)
  for k in raw:
    if k not in names:
      raise _err(f"model.{k}", "unknown key; valid keys are hf_path, init_from, "
                 "head, logprob_chunk, lora and the "
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
  return ModelConfig(hf_path=hf_path, init_from=init_from, head=head, arch=arch,
                     logprob_chunk=chunk, lora=lora)


def _init_from(value: Any) -> str:
  """``model.init_from`` resolved to ``/abs/workdir:step`` (`rundir.resolve_init_from`)."""
  value = _coerce(value, str, "model.init_from")
  if not value:
    return ""
  from jaxalign.train import rundir  # pylint: disable=g-import-not-at-top
  return rundir.resolve_init_from(value)


def _lora_section(raw: Mapping | None) -> Any:
  """``model.lora`` into a `LoraConfig`; ``targets`` may also be a comma-separated
  string (``--config.model.lora.targets=q,v``)."""
  from jaxalign.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  raw = dict(raw or {})
  targets = raw.get("targets")
  if isinstance(targets, str):
    targets = [targets]
  if isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
    # config_flags parses "--config.model.lora.targets=q,v" into ("q,v",).
    raw["targets"] = [p.strip() for t in targets for p in t.split(",") if p.strip()]
  hints = typing.get_type_hints(lora_lib.LoraConfig)
  for k in raw:
    if k not in hints:
      raise _err(f"model.lora.{k}", f"unknown key; valid keys here are {sorted(hints)}. "
                 "Fix the spelling or remove it.")
  kwargs = {k: _coerce(v, hints[k], f"model.lora.{k}") for k, v in raw.items()}
  try:
    return lora_lib.LoraConfig(**kwargs)
  except ValueError as e:  # its messages start with the field: "lora.targets=..."
    raise ValueError(f"config.model.{e}") from None


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
  # base_config lists every registered loss's hyperparameters as None (= unset) so
  # that any of them can be set from the command line; only set ones reach the loss.
  hparams = {k: v for k, v in (raw_hparams or {}).items() if v is not None}
  if len(terms) == 1 and terms[0][0] in losses.list_losses():
    valid = losses.get_loss(terms[0][0]).defaults
    for k in sorted(set(hparams) - set(valid)):
      raise _err(f"loss_hparams.{k}", f"not a hyperparameter of the loss "
                 f"{terms[0][0]!r}; its hyperparameters: {', '.join(sorted(valid)) or 'none'}"
                 ". Fix the name, or choose a loss that takes it (config.loss).")
  if "delta" in hparams and any(name == "bco_pair" for name, _ in terms):
    # The loop passes bco_pair its running mean of the implicit rewards as delta
    # (objectives.update_loss_state); a set value would be replaced without a word.
    raise _err("loss_hparams.delta", "bco_pair's delta is the running mean of the "
               "implicit rewards that training keeps (TrainState.loss_state); it "
               "cannot be set. Remove loss_hparams.delta.")
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
             num_devices: int, *, batch_layout: bool = True,
             lr_family: str = "") -> Config:
  """Validates a ConfigDict into a frozen `Config` (raises ValueError naming the key).

  Args:
    config: the experiment's ConfigDict (``experiments/*.py: get_config``).
    num_devices: the number of devices the mesh must fit (``jax.device_count()``).
    batch_layout: resolve and check the offline batch layout (``data.layout``,
      ``data.buckets``); online RL lays out no such batches (`validate_rl`).
    lr_family: the objective family an "auto" learning rate is chosen for
      (`OptimizerConfig`); "" = the loss's (online RL passes "rl").
  """
  raw = _to_plain(config)
  plain = {k: v for k, v in raw.items() if k not in _TOP_SPECIAL}
  cfg = _build(Config, plain, "")
  model = _model_section(raw.get("model"))
  loss = _loss_section(raw.get("loss", "dpo"), raw.get("loss_hparams"))
  mesh_cfg = _mesh_section(raw.get("mesh"), num_devices)
  cfg = dataclasses.replace(cfg, model=model, loss=loss, mesh=mesh_cfg)

  _check_choices(cfg)
  _check_reference(cfg)
  _check_guards(cfg)
  _check_lora(cfg)
  cfg = resolve_learning_rate(cfg, lr_family)
  if batch_layout:
    cfg = _resolve_data(cfg, num_devices)
  _check_data(cfg, batch_layout)
  if (cfg.model.head == "scalar") != (cfg.loss.input_kind == "reward"):
    raise _err("model.head", f"model.head={cfg.model.head!r} does not match the loss "
               f"{cfg.loss.terms}: reward-model losses need head='scalar', every "
               "other loss head='lm'.")
  _check_batch_sizes(cfg, mesh_cfg, num_devices)
  return _resolve_gen_eval(cfg)


def _check_choices(cfg: Config) -> None:
  for key, choices in _CHOICES.items():
    if _get(cfg, key) not in choices:
      raise _err(key, f"{_get(cfg, key)!r} is not one of {choices}.")
  for key in _POSITIVE:
    if _get(cfg, key) < 1:
      raise _err(key, f"must be >= 1, got {_get(cfg, key)}.")


def _check_guards(cfg: Config) -> None:
  v = cfg.divergence
  for key in ("factor", "max_update_ratio", "loss_factor", "grad_factor"):
    if not getattr(v, key) >= 0:
      raise _err(f"divergence.{key}", f"must be >= 0 (0 = this test off), got "
                 f"{getattr(v, key)}.")
  if cfg.checkpoint.restore_step < -1:
    raise _err("checkpoint.restore_step", f"must be a kept checkpoint's step, or -1 "
               f"(the latest), got {cfg.checkpoint.restore_step}.")


def resolve_learning_rate(cfg: Config, family: str = "") -> Config:
  """``optimizer.learning_rate`` 0 ("auto") made concrete for where the run starts,
  with the startup line that says so, or a warning line for an explicit rate that
  would wreck a trained model (`OptimizerConfig`); ``divergence.adam_gain`` set from
  the result (`DivergenceConfig`). ``family``: a ``TRAINED_START_LR`` key; "" = the
  loss's."""
  opt = cfg.optimizer
  if not opt.learning_rate >= 0:
    raise _err("optimizer.learning_rate", f"must be > 0, or 0 for auto (the rate for "
               f"where the run starts), got {opt.learning_rate}.")
  family = family or _LR_FAMILY.get(cfg.loss.input_kind, "preference")
  start = ("model.init_from" if cfg.model.init_from else
           "model.hf_path" if cfg.model.hf_path else "")
  lora = cfg.model.lora.enabled
  full, with_lora, span = TRAINED_START_LR[family]
  tuning = f"LoRA rank {cfg.model.lora.rank}" if lora else "full fine-tuning"
  if opt.learning_rate == AUTO_LR:
    # From random init, auto is the rate every run had before it existed: no note.
    lr = (with_lora if lora else full) if start else SCRATCH_LR
    note = (f"optimizer.learning_rate: auto -> {lr:g} (trained start ({start}), "
            f"{family}, {tuning})" if start else "")
    opt = dataclasses.replace(opt, learning_rate=lr, learning_rate_auto=True,
                              learning_rate_note=note)
  elif start and not lora and opt.learning_rate >= TRAINED_START_WARN_LR:
    opt = dataclasses.replace(opt, learning_rate_note=(
        f"WARNING: config.optimizer.learning_rate={opt.learning_rate:g} fine-tunes "
        f"every weight of a trained model ({start}); the literature's rates for "
        f"{family} are {span} (jaxalign.config.OptimizerConfig). A rate this high can "
        f"destroy what the model knows; set optimizer.learning_rate=0 (auto -> "
        f"{full:g}) unless you mean it."))
  adam = opt.name in ("adam", "adamw") and opt.eps > 0
  gain = opt.learning_rate / opt.eps if adam else 0.0
  return dataclasses.replace(cfg, optimizer=opt, divergence=dataclasses.replace(
      cfg.divergence, adam_gain=gain))


def _check_reference(cfg: Config) -> None:
  if cfg.loss.needs_reference and cfg.reference.kind == "none":
    raise _err("reference.kind", f"the loss {cfg.loss.terms} needs a reference model "
               "but reference.kind='none'; set reference.kind='initial' (a frozen "
               "copy of the initial policy) or 'hf' with reference.hf_path.")
  if cfg.reference.kind == "hf" and not cfg.reference.hf_path:
    raise _err("reference.hf_path", "reference.kind='hf' needs a checkpoint "
               "directory in reference.hf_path.")
  if cfg.reference.cache_dir and not cfg.loss.needs_reference:
    raise _err("reference.cache_dir", f"the loss {cfg.loss.terms} uses no reference "
               "model, so there is nothing to cache; set reference.cache_dir=''.")


_JUDGES = ("auto", "", "oracle", "reward_model")


def _resolve_gen_eval(cfg: Config) -> Config:
  """``eval.generate_prompts`` / ``eval.judge`` "auto" made concrete, and the
  generation keys checked (`EvalConfig`)."""
  e = cfg.eval
  if e.judge not in _JUDGES:
    raise _err("eval.judge", f"{e.judge!r} is not one of {_JUDGES}.")
  for key, zero in (("max_new_tokens", "the longest held-out response"),
                    ("temperature", "greedy")):
    if getattr(e, key) < 0:
      raise _err(f"eval.{key}", f"must be >= 0 (0 = {zero}), got {getattr(e, key)}.")
  if e.generate_prompts < -1:
    raise _err("eval.generate_prompts", f"must be -1 (auto), 0 (off) or a number of "
               f"held-out prompts, got {e.generate_prompts}.")
  builtin = cfg.data.source == "synthetic"
  scalar = cfg.model.head == "scalar"
  reward_model = _eval_reward_model(e.reward_model, scalar)
  prompts = e.generate_prompts
  if prompts == -1:
    prompts = (e.num_examples if e.enabled and not scalar
               and (builtin or reward_model or e.judge not in ("auto", "")) else 0)
  if prompts > 0 and scalar:
    raise _err("eval.generate_prompts", "a reward model (model.head='scalar') does not "
               "generate; set eval.generate_prompts=0.")
  if prompts > e.num_examples:
    raise _err("eval.generate_prompts", f"{prompts} is more than the "
               f"eval.num_examples={e.num_examples} held-out examples; lower it.")
  judge = e.judge
  if judge == "auto":
    no_reference = cfg.reference.kind == "none" and not cfg.model.lora.enabled
    judge = "" if not prompts or no_reference else "oracle" if builtin else (
        "reward_model" if reward_model else "")
  _check_judge(cfg, judge, prompts, reward_model)
  return dataclasses.replace(cfg, eval=dataclasses.replace(
      e, generate_prompts=prompts, judge=judge, reward_model=reward_model))


def _eval_reward_model(spec: str, scalar: bool) -> str:
  """``eval.reward_model`` resolved to ``/abs/workdir:step`` (a reward-model run)."""
  if not spec:
    return ""
  if scalar:
    raise _err("eval.reward_model", "this run trains a reward model; it does not "
               "generate responses to score. Remove eval.reward_model.")
  from jaxalign.train import gen_eval  # pylint: disable=g-import-not-at-top
  return gen_eval.resolve_reward_model(spec)


def _check_judge(cfg: Config, judge: str, prompts: int, reward_model: str) -> None:
  if not judge:
    return
  if not prompts:
    raise _err("eval.judge", f"{judge!r} judges generated responses, but "
               "eval.generate_prompts=0; set generate_prompts > 0 or eval.judge=''.")
  if judge == "oracle" and cfg.data.source != "synthetic":
    raise _err("eval.judge", "'oracle' needs the built-in task's oracle "
               "(data.source='synthetic'); with file data use eval.judge="
               "'reward_model' and eval.reward_model=WORKDIR, or ''.")
  if judge == "reward_model" and not reward_model:
    raise _err("eval.judge", "'reward_model' needs eval.reward_model=WORKDIR[:STEP] "
               "(a reward-model run).")
  if cfg.reference.kind == "none" and not cfg.model.lora.enabled:
    raise _err("eval.judge", f"{judge!r} compares the policy's responses with the "
               "reference policy's, and reference.kind='none'; set "
               "reference.kind='initial' or eval.judge=''.")


def _check_lora(cfg: Config) -> None:
  """With LoRA the reference is the frozen base with its adapters off (no second copy
  of the weights), so it cannot be another checkpoint nor placed apart from it."""
  if not cfg.model.lora.enabled:
    return
  if cfg.reference.kind == "hf":
    raise _err("reference.kind", f"model.lora.rank={cfg.model.lora.rank}: a LoRA run's "
               "reference is its own frozen base with the adapters off; "
               "reference.kind='hf' would load a second model. Use reference.kind="
               "'initial' (the base), or model.lora.rank=0 to fine-tune every weight.")
  if cfg.mesh.reference_placement != "policy":
    raise _err("mesh.reference_placement", f"{cfg.mesh.reference_placement!r} with "
               f"model.lora.rank={cfg.model.lora.rank}: the reference is the policy's own "
               "frozen base (one copy of the weights), placed as the policy's; set "
               "mesh.reference_placement='policy'.")


# Input kinds whose examples lay out several completions of one prompt: sharing the
# prompt (prefix_shared) saves its tokens once per extra completion.
_MULTI_COMPLETION_KINDS = ("pairwise", "reward", "unpaired", "ranked")


def auto_layout(input_kind: str) -> str:
  """The layout ``data.layout="auto"`` means for a loss's input kind."""
  return "prefix_shared" if input_kind in _MULTI_COMPLETION_KINDS else "padded"


def derive_buckets(need: int) -> tuple[int, ...]:
  """Row-length buckets for rows of up to ``need`` tokens: ``need`` rounded up (to
  16 below 256 tokens, else to 64) and, above 128 tokens, its quarters, halves and
  three quarters too, so that short batches do not pay for the longest row while at
  most four programs are compiled (below that, one program costs more than the
  padding it would save)."""
  grain = 16 if need < 256 else 64
  up = lambda n: max(-(-int(n) // grain) * grain, grain)
  top = up(need)
  if top <= 128:
    return (top,)
  return tuple(sorted({up(top * f / 4) for f in (1, 2, 3, 4)}))


def _resolve_data(cfg: Config, num_devices: int = 1) -> Config:
  """``data.layout="auto"`` and ``data.buckets=()`` made concrete where the config
  alone decides them (buckets from ``max_length``; else the data stream derives them
  from the loaded examples). "auto" resolved to prefix_shared with ``buckets=()`` and
  ``rows_per_batch=0`` also packs the units two per row (`_auto_rows`)."""
  d = cfg.data
  auto = d.layout == "auto"
  if auto:
    d = dataclasses.replace(d, layout=auto_layout(cfg.loss.input_kind))
  cfg = dataclasses.replace(cfg, data=d)
  if not d.buckets:
    need = layout_need(cfg)
    if need is not None:
      buckets = derive_buckets(need["unit"])
      rows = (_auto_rows(cfg, num_devices)
              if auto and d.layout == "prefix_shared" and not d.rows_per_batch else 0)
      if rows:
        buckets = tuple(sorted(set(buckets) | set(derive_buckets(2 * need["unit"]))))
      cfg = dataclasses.replace(cfg, data=dataclasses.replace(
          d, buckets=buckets, rows_per_batch=rows or d.rows_per_batch))
  return cfg


def _auto_rows(cfg: Config, num_devices: int) -> int:
  """Rows for the default prefix-shared layout: half the examples of a micro-batch,
  when that splits over the data-parallel devices (else 0: one row per example).

  Exact by construction: with the largest bucket >= 2 units, first-fit-decreasing
  always finds a row with at most one unit, hence room for the next, so every
  example of the step is laid out (nothing is carried; the steps hold the same
  examples as with one row per example) while the rows hold about half the slots
  (issue 22, docs/benchmarks.md)."""
  n = cfg.data.batch_size // max(cfg.data.micro_batches, 1)
  try:
    sizes = cfg.mesh.axis_sizes(num_devices)
  except ValueError:  # reported by the batch-size checks
    return 0
  dp = sizes[0] * sizes[1]
  if n < 2 or n % 2 or (n // 2) % dp:
    return 0
  return n // 2


def _check_data(cfg: Config, batch_layout: bool = True) -> None:
  d = cfg.data
  if d.source == "file" and not d.path:
    raise _err("data.path", "data.source='file' needs the path of a JSONL(.gz) file "
               "(e.g. HH-RLHF with data.format='hh').")
  if d.buckets and (d.buckets[0] < 1 or list(d.buckets) != sorted(set(d.buckets))):
    raise _err("data.buckets", f"{d.buckets} must be a strictly increasing list of "
               "positive row lengths, or () to derive them from data.max_length or "
               "the data.")
  for key in ("data.max_length", "data.max_prompt_length", "data.rows_per_batch"):
    if _get(cfg, key) < 0:
      raise _err(key, f"must be >= 0 (0 = none), got {_get(cfg, key)}.")
  if d.buckets and d.max_length > d.buckets[-1]:
    raise _err("data.max_length", f"{d.max_length} exceeds the largest bucket "
               f"{d.buckets[-1]} of data.buckets; add a bucket >= max_length, or set "
               "data.buckets=() to derive them.")
  if 0 < d.max_length <= d.max_prompt_length:
    raise _err("data.max_prompt_length", f"{d.max_prompt_length} must be "
               f"smaller than data.max_length={d.max_length}, or no completion "
               "token would fit.")
  if d.margin_field and not (d.source == "file" and d.format in ("pairwise", "hh")
                             and cfg.model.head == "scalar"):
    raise _err("data.margin_field", f"{d.margin_field!r}: a margin is read from "
               "preference pairs (data.source='file', data.format 'pairwise' or 'hh') "
               "by a reward model's loss (model.head='scalar'); this run has source "
               f"{d.source!r}, format {d.format!r}, head {cfg.model.head!r}. Set "
               "data.margin_field='' or train a reward model on pairs.")
  if d.layout == "packed" and d.rows_per_batch < 1:
    raise _err("data.rows_per_batch", "data.layout='packed' needs the static number "
               "of rows to pack into (e.g. data.rows_per_batch=8).")
  if batch_layout:
    _check_layout_bound(cfg)


def _check_batch_sizes(cfg: Config, mesh_cfg: Any, num_devices: int) -> None:
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
  if cfg.eval.num_examples < cfg.eval.batch_size:
    raise _err("eval.num_examples", f"{cfg.eval.num_examples} is smaller than "
               f"eval.batch_size={cfg.eval.batch_size}.")


# Completions an example of each loss input kind lays out: SFT its completion; pairs
# (DPO family, reward models) chosen and rejected; KTO its own completion and the
# mismatched one of its KL term (another example's completion). Ranked: K.
_COMPLETIONS = {"sft": 1, "pairwise": 2, "reward": 2, "unpaired": 2}


def layout_need(cfg: Config) -> dict[str, int] | None:
  """The worst-case row lengths the layout needs under the configured truncation.

  None when nothing bounds them before the data is read (``data.max_length = 0``,
  synthetic data, ranked records with a file-defined K); the loop then checks the
  loaded examples before compiling (`jaxalign.train.stream.ExampleBatches`).

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
  if need is None or not cfg.data.buckets:
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
# The online-RL section (``rl``).


RL_ALGORITHMS = ("ppo", "grpo", "rloo", "rrhf", "online_dpo", "gkd")
# Algorithms that compare several completions of one prompt (group baselines, ranks).
RL_GROUP_ALGORITHMS = ("grpo", "rloo", "rrhf", "online_dpo")
RL_REWARDS = ("oracle", "checkpoint", "functions")
RL_VALUE_INITS = ("policy", "reward")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The ``rl`` section of an online-RL experiment (`jaxalign.train.rl`).

  Rollouts: ``data.batch_size`` prompts per iteration, ``group_size`` completions each
  (rows B = batch_size * group_size), prompts left-padded to ``prompt_len``, up to
  ``max_new_tokens`` new tokens drawn with ``temperature`` / ``top_k`` / ``top_p``.
  Updates: ``ppo_epochs`` passes of ``num_minibatches`` shuffled minibatches.
  Reward: ``"oracle"`` (the synthetic task, ``data.task.*``) or ``"checkpoint"`` (a
  scalar-head reward model trained by ``experiments/reward.py``: its workdir in
  ``reward_path``; same model architecture and optimizer name as this config) or
  ``"functions"`` (reward functions over decoded text, `jaxalign.rewards`:
  ``reward_functions = "accuracy:1.0,format:0.2"``, each logged as
  ``reward/<name>``; ``format_pattern`` for ``format``, ``overlong_cache`` for
  ``overlong``; ``reward_errors`` "raise" stops the run at a function that raises,
  returns NaN or the wrong count, "zero" scores those 0 and counts them). The
  function ``reward_model`` scores the text with ``reward_model`` (``WORKDIR[:STEP]``
  of a reward-model run, or an HF ``*ForSequenceClassification`` directory), which
  re-tokenises it with its own tokenizer (`jaxalign.rewards.model`).
  ``sft_warmup_steps``: supervised steps on the prompt source's answers before the
  first iteration (``data.source = "arithmetic"``; `jaxalign.train.rl_rewards`), at
  ``sft_warmup_lr`` (0 = ``optimizer.learning_rate``).

  The GRPO family (`jaxalign.losses._grpo`; docs/losses.md, "Online RL options"):
  ``loss_agg`` (bnpo = the minibatch token mean, the reduction used before it
  existed; grpo, dapo, dr_grpo); ``epsilon_low`` / ``epsilon_high`` (0 = ``clip_eps``);
  ``dual_clip_c`` (0 = off, else > 1); ``importance_level`` token / sequence (GSPO);
  ``policy_loss`` ppo_clip / cispo; ``scale_rewards`` group / batch / none (GRPO; ""
  = from ``grpo_scale_by_std``: True -> group, False -> none); ``kl_placement``
  reward / loss ("" = the algorithm's: loss for grpo, reward otherwise) with
  ``kl_estimator`` ("" = k3 in the loss, k1 in the rewards); ``entropy_coef``
  (bonus); ``mask_truncated`` (no loss on completions without a stop token);
  ``tis_cap`` (truncated importance weight sampler -> learner, 0 = off).
  ``kl_coef = 0`` builds no reference model (the KL is then not measured: 0).
  ``dynamic_sampling`` (DAPO; grpo / rloo with a host reward): only groups whose
  scores differ reach the update; up to ``max_sampling_rounds`` generation rounds
  (the first included) fill the batch, then masked groups pad it
  (`jaxalign.train.rl_dynamic`).
  ``online_dpo`` (OAIF): DPO on the best- and worst-scored of the ``group_size``
  (>= 2) sampled completions of each prompt, ties masked; its beta is ``kl_coef``. ``gkd``: the generalised JSD(``gkd_beta``) to the frozen ``teacher``
  (``WORKDIR[:STEP]`` of a jaxalign run or an HF checkpoint dir, same vocabulary) on
  the student's samples; ``kl_coef = 0`` (`jaxalign.train.rl_distill`).
  Rollout engine: ``engine`` "static" (`jaxalign.models.sampling.Sampler`: all rows
  decode in lock step) or "continuous" (`jaxalign.models.engine.Engine`: each group's
  prompt prefilled once, ``engine_slots`` decode slots (0 = all rows) refilled as
  completions finish); ``kv_cache_dtype`` "" (the compute dtype), "float32" or
  "bfloat16".
  """
  algorithm: str = "ppo"
  group_size: int = 1
  prompt_len: int = 8
  max_new_tokens: int = 12
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  ppo_epochs: int = 2
  num_minibatches: int = 2
  clip_eps: float = 0.2
  clip_value: float = 0.2
  vf_coef: float = 0.5
  gamma: float = 1.0
  lam: float = 0.95
  whiten_advantages: bool = True
  kl_coef: float = 0.05
  kl_estimator: str = ""
  kl_placement: str = ""
  adaptive_kl: bool = False
  kl_target: float = 6.0
  kl_horizon: float = 10000.0
  grpo_scale_by_std: bool = True
  scale_rewards: str = ""
  loss_agg: str = "bnpo"
  epsilon_low: float = 0.0
  epsilon_high: float = 0.0
  dual_clip_c: float = 0.0
  importance_level: str = "token"
  policy_loss: str = "ppo_clip"
  entropy_coef: float = 0.0
  mask_truncated: bool = False
  tis_cap: float = 0.0
  rrhf_rank_weight: float = 1.0
  rrhf_sft_weight: float = 1.0
  rrhf_length_penalty: float = 1.0
  reward: str = "oracle"
  reward_path: str = ""
  reward_functions: str = ""
  reward_model: str = ""
  reward_errors: str = "raise"
  format_pattern: str = ""
  overlong_cache: int = 0
  sft_warmup_steps: int = 0
  sft_warmup_lr: float = 0.0
  value_init: str = "policy"
  logprob_chunk_size: int = 1024
  dynamic_sampling: bool = False
  max_sampling_rounds: int = 4
  teacher: str = ""
  gkd_beta: float = 0.5
  engine: str = "static"
  engine_slots: int = 0
  kv_cache_dtype: str = ""

  @property
  def uses_value(self) -> bool:
    return self.algorithm == "ppo"


def validate_rl(config: ml_collections.ConfigDict | Mapping, num_devices: int
                ) -> tuple[Config, RLConfig]:
  """Validates an RL experiment ConfigDict: the ``rl`` section into `RLConfig`, the
  rest through `validate`. Unknown keys / impossible values raise a ValueError
  naming the key."""
  raw = _to_plain(config)
  if "rl" not in raw:
    raise ValueError("config.rl: an RL experiment needs an 'rl' section (see "
                     "jaxalign.config.RLConfig).")
  rl = _build(RLConfig, raw.pop("rl"), "rl")
  cfg = validate(ml_collections.ConfigDict(raw), num_devices, batch_layout=False,
                 lr_family="rl")
  _check_rl_values(rl)
  _check_rl_rewards(rl)
  rl = _resolve_reward_model(rl)
  _check_rl_sampling(rl)
  _check_rl_online(rl)
  _check_rl_engine(rl, cfg.data.batch_size * rl.group_size)
  _check_rl_against(cfg, rl, num_devices)
  return cfg, rl


def _check_rl_engine(rl: RLConfig, rows: int) -> None:
  """``engine``, ``engine_slots`` and ``kv_cache_dtype`` (RLConfig doc)."""
  if rl.engine not in ("static", "continuous"):
    raise _err("rl.engine", f"{rl.engine!r} is not one of ('static', 'continuous').")
  if rl.engine_slots and rl.engine != "continuous":
    raise _err("rl.engine_slots", "is read only with rl.engine='continuous'; set that, "
               "or remove engine_slots.")
  if not 0 <= rl.engine_slots <= rows:
    raise _err("rl.engine_slots", f"must be in [0, rows={rows}] (data.batch_size x "
               f"group_size; 0 = all rows), got {rl.engine_slots}.")
  if rl.kv_cache_dtype not in ("", "float32", "bfloat16"):
    raise _err("rl.kv_cache_dtype", f"{rl.kv_cache_dtype!r} is not one of ('', "
               "'float32', 'bfloat16') ('' = the model's compute dtype).")


def _check_rl_values(rl: RLConfig) -> None:
  from jaxalign import losses  # pylint: disable=g-import-not-at-top
  for key, choices in (("algorithm", RL_ALGORITHMS), ("reward", RL_REWARDS),
                       ("value_init", RL_VALUE_INITS),
                       ("kl_estimator", ("",) + tuple(losses.KL_ESTIMATORS)),
                       ("kl_placement", ("", "reward", "loss")),
                       ("scale_rewards", ("",) + losses.REWARD_SCALINGS),
                       ("loss_agg", losses.LOSS_AGGREGATIONS),
                       ("importance_level", losses.IMPORTANCE_LEVELS),
                       ("policy_loss", losses.POLICY_LOSSES)):
    if getattr(rl, key) not in choices:
      raise _err(f"rl.{key}", f"{getattr(rl, key)!r} is not one of {choices}.")
  _check_rl_policy_loss(rl)
  for key in ("prompt_len", "max_new_tokens", "ppo_epochs", "num_minibatches",
              "group_size", "logprob_chunk_size"):
    if getattr(rl, key) < 1:
      raise _err(f"rl.{key}", f"must be >= 1, got {getattr(rl, key)}.")
  if not rl.temperature > 0:
    raise _err("rl.temperature", f"must be > 0, got {rl.temperature}.")
  if not 0 < rl.top_p <= 1:
    raise _err("rl.top_p", f"must be in (0, 1], got {rl.top_p}.")
  for key in ("clip_eps", "clip_value", "kl_target", "kl_horizon"):
    if not getattr(rl, key) > 0:
      raise _err(f"rl.{key}", f"must be > 0, got {getattr(rl, key)}.")
  for key in ("kl_coef", "vf_coef", "top_k"):
    if getattr(rl, key) < 0:
      raise _err(f"rl.{key}", f"must be >= 0, got {getattr(rl, key)}.")
  if not (0 <= rl.gamma <= 1 and 0 <= rl.lam <= 1):
    raise _err("rl.gamma", f"gamma={rl.gamma} and lam={rl.lam} must be in [0, 1].")
  if rl.algorithm in RL_GROUP_ALGORITHMS and rl.group_size < 2:
    raise _err("rl.group_size", f"{rl.algorithm} compares completions of one prompt: "
               f"needs group_size >= 2, got {rl.group_size}.")
  if rl.reward == "checkpoint" and not rl.reward_path:
    raise _err("rl.reward_path", "rl.reward='checkpoint' needs the workdir of a "
               "reward-model run (experiments/reward.py).")
  if rl.uses_value and rl.value_init == "reward" and rl.reward != "checkpoint":
    raise _err("rl.value_init", "value_init='reward' needs a reward model "
               "(rl.reward='checkpoint'); use value_init='policy' with the oracle.")


def _check_rl_rewards(rl: RLConfig) -> None:
  """``rl.reward = "functions"`` and its settings (RLConfig doc)."""
  import re  # pylint: disable=g-import-not-at-top
  from jaxalign import rewards  # pylint: disable=g-import-not-at-top
  if rl.reward_errors not in rewards.ON_ERROR:
    raise _err("rl.reward_errors", f"{rl.reward_errors!r} is not one of "
               f"{rewards.ON_ERROR}.")
  if rl.sft_warmup_steps < 0:
    raise _err("rl.sft_warmup_steps", f"must be >= 0, got {rl.sft_warmup_steps}.")
  if rl.sft_warmup_lr < 0:
    raise _err("rl.sft_warmup_lr", f"must be >= 0 (0 = optimizer.learning_rate), got "
               f"{rl.sft_warmup_lr}.")
  if rl.reward_model and (rl.reward != "functions"
                          or "reward_model" not in rl.reward_functions):
    raise _err("rl.reward_model", "is read only by the 'reward_model' reward function: "
               "set rl.reward='functions' and list it in rl.reward_functions (e.g. "
               "'reward_model:1.0'), or remove rl.reward_model.")
  if rl.reward != "functions":
    if rl.reward_functions:
      raise _err("rl.reward_functions", f"is read only with rl.reward='functions' "
                 f"(got rl.reward={rl.reward!r}); set it, or remove reward_functions.")
    return
  try:
    names = [n for n, _ in rewards.parse_weights(rl.reward_functions)]
  except ValueError as e:
    raise ValueError(str(e)) from None
  if "format" in names:
    try:
      re.compile(rl.format_pattern or "(")
    except re.error as e:
      raise _err("rl.format_pattern", f"{rl.format_pattern!r} is not a regular "
                 f"expression the 'format' reward can use ({e}); e.g. '-?[0-9]+'.")
  if "reward_model" in names and not rl.reward_model:
    raise _err("rl.reward_model", "the 'reward_model' reward function needs a reward "
               "model: WORKDIR[:STEP] of a reward-model run or an HF "
               "*ForSequenceClassification directory.")
  if "overlong" in names and not 0 < rl.overlong_cache <= rl.max_new_tokens:
    raise _err("rl.overlong_cache", f"{rl.overlong_cache}: the 'overlong' reward "
               f"needs 0 < overlong_cache <= rl.max_new_tokens={rl.max_new_tokens} "
               "(the soft band before L_max, DAPO).")


def _resolve_reward_model(rl: RLConfig) -> RLConfig:
  """``rl.reward_model`` as an absolute HF directory or ``/abs/workdir:step``, checked
  to be a reward model with a text tokenizer (file headers only; the record then
  names the exact checkpoint)."""
  if not rl.reward_model:
    return rl
  from jaxalign.rewards import model as rm  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(rl, reward_model=rm.resolve(rl.reward_model))


# RRHF's, online DPO's and GKD's losses read none of these; a non-default would be ignored.
_RL_POLICY_LOSS_DEFAULTS = {"loss_agg": "bnpo", "epsilon_low": 0.0, "epsilon_high": 0.0,
                            "dual_clip_c": 0.0, "importance_level": "token",
                            "policy_loss": "ppo_clip", "entropy_coef": 0.0,
                            "mask_truncated": False, "tis_cap": 0.0, "kl_placement": ""}


def _check_rl_policy_loss(rl: RLConfig) -> None:
  """The GRPO-family options (RLConfig doc): ranges and settings that contradict."""
  for key in ("epsilon_low", "epsilon_high", "entropy_coef", "tis_cap"):
    if getattr(rl, key) < 0:
      raise _err(f"rl.{key}", f"must be >= 0, got {getattr(rl, key)}.")
  if rl.dual_clip_c and not rl.dual_clip_c > 1:
    raise _err("rl.dual_clip_c", f"must be 0 (off) or > 1, got {rl.dual_clip_c}.")
  if rl.dual_clip_c and rl.policy_loss == "cispo":
    raise _err("rl.dual_clip_c", "the dual clip bounds PPO's clipped surrogate; "
               "policy_loss='cispo' has none. Set rl.dual_clip_c=0.")
  if not rl.grpo_scale_by_std and rl.scale_rewards in ("group", "batch"):
    raise _err("rl.scale_rewards", f"{rl.scale_rewards!r} contradicts "
               "rl.grpo_scale_by_std=False (no std scaling); keep one: "
               "rl.scale_rewards='none', or drop grpo_scale_by_std.")
  if rl.scale_rewards and rl.algorithm != "grpo":
    raise _err("rl.scale_rewards", f"only grpo's group advantages read it; "
               f"{rl.algorithm} would ignore it. Remove it.")
  if rl.adaptive_kl and rl.kl_coef == 0:
    raise _err("rl.adaptive_kl", "kl_coef=0 builds no reference and the controller "
               "cannot move from 0; set rl.kl_coef > 0 or rl.adaptive_kl=False.")
  if rl.algorithm in ("rrhf", "online_dpo", "gkd"):
    for key, default in _RL_POLICY_LOSS_DEFAULTS.items():
      if getattr(rl, key) != default:
        raise _err(f"rl.{key}", f"{rl.algorithm}'s loss does not read it (got "
                   f"{getattr(rl, key)!r}); remove it.")


def _check_rl_sampling(rl: RLConfig) -> None:
  """``dynamic_sampling`` and ``max_sampling_rounds`` (RLConfig doc)."""
  if not rl.dynamic_sampling:
    if rl.max_sampling_rounds != RLConfig.max_sampling_rounds:
      raise _err("rl.max_sampling_rounds", "is read only with rl.dynamic_sampling="
                 "True; set that, or remove max_sampling_rounds.")
    return
  if rl.max_sampling_rounds < 1:
    raise _err("rl.max_sampling_rounds", f"must be >= 1 (generation rounds per "
               f"iteration, the first included), got {rl.max_sampling_rounds}.")
  if rl.algorithm not in ("grpo", "rloo"):
    raise _err("rl.dynamic_sampling", f"drops groups whose completions all score "
               f"alike (zero group-relative advantage); {rl.algorithm} has no such "
               "groups. Use algorithm grpo or rloo, or dynamic_sampling=False.")
  if rl.reward == "checkpoint":
    raise _err("rl.dynamic_sampling", "filters groups on host scores before the "
               "rollout is scored; a reward model scores on device afterwards. Use "
               "rl.reward='functions' (or 'oracle'), or dynamic_sampling=False.")


def _check_rl_online(rl: RLConfig) -> None:
  """``online_dpo`` and ``gkd`` (RLConfig doc); the teacher's files are checked when
  the run is built (`jaxalign.train.rl_distill.load_teacher`), before compiling."""
  if rl.algorithm == "online_dpo":
    if not rl.kl_coef > 0:
      raise _err("rl.kl_coef", "is online_dpo's beta (DPO's KL coefficient): must "
                 "be > 0, e.g. 0.1.")
  gkd = rl.algorithm == "gkd"
  if gkd != bool(rl.teacher):
    raise _err("rl.teacher", "gkd distils from a teacher: set rl.teacher=WORKDIR[:STEP]"
               " or an HF checkpoint dir." if gkd else f"only algorithm 'gkd' reads it "
               f"(got {rl.algorithm!r}); remove rl.teacher.")
  if not 0.0 <= rl.gkd_beta <= 1.0 or (not gkd and rl.gkd_beta != RLConfig.gkd_beta):
    raise _err("rl.gkd_beta", f"{rl.gkd_beta}: gkd's JSD coefficient, in [0, 1] "
               "(0 forward KL, 1 reverse KL), read only with algorithm 'gkd'.")
  if gkd and rl.kl_coef != 0:
    raise _err("rl.kl_coef", "gkd's anchor is the teacher, not a reference model: set "
               f"rl.kl_coef=0 (got {rl.kl_coef}).")
  if gkd and rl.adaptive_kl:
    raise _err("rl.adaptive_kl", "gkd has no KL to a reference; set it False.")


def _check_rl_against(cfg: Config, rl: RLConfig, num_devices: int) -> None:
  """What the RL section must agree on with the rest of the config."""
  if rl.reward == "oracle" and cfg.data.source != "synthetic":
    raise _err("rl.reward", "the oracle reward exists only for data.source="
               "'synthetic'; use rl.reward='checkpoint' or 'functions' for other data.")
  if rl.reward == "functions" and cfg.data.source == "synthetic":
    raise _err("rl.reward", "reward functions score text; the synthetic task's "
               "prompts are token ids without text: use rl.reward='oracle', or "
               "data.source='arithmetic' / 'file' (format 'prompt').")
  if rl.sft_warmup_steps and cfg.data.source != "arithmetic":
    raise _err("rl.sft_warmup_steps", "the warm-up trains on the built-in task's "
               "answers: it needs data.source='arithmetic' (else set it to 0).")
  if cfg.data.source == "arithmetic":
    from jaxalign.data import verifiable  # pylint: disable=g-import-not-at-top
    verifiable.task_from_config(cfg)  # its range errors name the keys
    if cfg.model.lora.rank > 0:
      raise _err("model.lora.rank", "the warm-up and held-out evaluation of "
                 "data.source='arithmetic' run the full policy; set model.lora.rank=0.")
  if cfg.model.head != "lm":
    raise _err("model.head", "the RL policy needs head='lm'.")
  lora = cfg.model.lora  # LoRA RL: jaxalign/train/rl_lora.py
  if lora.enabled and lora.dropout > 0:
    raise _err("model.lora.dropout", f"{lora.dropout}: online RL compares the policy "
               "that sampled a rollout with the one it updates (ratios, KL); dropout "
               "would make them differ by noise. Set model.lora.dropout=0.")
  if lora.enabled and rl.uses_value and rl.value_init == "reward":
    raise _err("rl.value_init", f"'reward' with model.lora.rank={lora.rank}: a LoRA "
               "run's value model is its frozen base with its own adapters and a fresh "
               "head, not a copy of a full reward model. Use rl.value_init='policy', or "
               "model.lora.rank=0.")
  rows = cfg.data.batch_size * rl.group_size
  dp = int(cfg.mesh.axis_sizes(num_devices)[0] * cfg.mesh.axis_sizes(num_devices)[1])
  if rows % (rl.num_minibatches * dp):
    raise _err("rl.num_minibatches", f"rows per iteration data.batch_size*group_size="
               f"{rows} must split into {rl.num_minibatches} minibatches divisible by "
               f"the data-parallel size {dp}.")
  if rl.algorithm in ("rrhf", "online_dpo") and cfg.data.batch_size % rl.num_minibatches:
    raise _err("rl.num_minibatches", f"{rl.algorithm} splits prompts: data.batch_size="
               f"{cfg.data.batch_size} must be divisible by {rl.num_minibatches}.")
  if cfg.data.source == "synthetic":
    from jaxalign.data import synthetic  # pylint: disable=g-import-not-at-top
    longest = synthetic.SyntheticTaskConfig().prompt_len_range[1] + 1
    if rl.prompt_len < longest:
      raise _err("rl.prompt_len", f"{rl.prompt_len} is shorter than the task's "
                 f"longest prompt ({longest} tokens with BOS).")


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
      if f.metadata.get("derived"):
        continue
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
  model = {"hf_path": "", "init_from": "", "head": "lm",
           "logprob_chunk": ModelConfig().logprob_chunk}
  lora = ModelConfig().lora
  model["lora"] = ml_collections.ConfigDict(
      {f.name: getattr(lora, f.name) for f in dataclasses.fields(lora)})
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
  c.loss_hparams = loss_hparams_config()
  mesh = mesh_lib.MeshConfig()
  c.mesh = ml_collections.ConfigDict(
      {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor,
       "reference_placement": mesh.reference_placement})
  return c


def loss_hparams_config() -> ml_collections.ConfigDict:
  """``config.loss_hparams``: every hyperparameter of every registered loss, unset
  (None, typed by its default), so that ``--config.loss_hparams.NAME=VALUE`` parses on
  the locked command-line config for any loss; `validate` passes only the set ones
  and the loss's signature decides (an unknown name lists the valid ones). Losses
  registered after this call can still be given hyperparameters in an experiment
  file."""
  from jaxalign import losses  # pylint: disable=g-import-not-at-top
  types: dict[str, Any] = {}
  for name in losses.list_losses():
    for k, v in losses.get_loss(name).defaults.items():
      t = type(v) if isinstance(v, (bool, int, float, str)) else object
      types[k] = t if types.get(k, t) is t else object
  return ml_collections.ConfigDict({k: ml_collections.FieldReference(None, field_type=t)
                                    for k, t in sorted(types.items())})
