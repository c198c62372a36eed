"""Name -> loss registry, hyperparameter validation and weighted combinations.

Adding a loss is one function plus one ``register_loss`` call (see docs/losses.md).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, Sequence

import jax

from jaxalign.losses import _kto, _math, _preference, _ranking, _reward, _sft

Array = jax.Array
LossFn = Callable[..., tuple[Array, dict[str, Array]]]
INPUT_KINDS = ("sft", "pairwise", "unpaired", "ranked", "reward")


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """What the training code needs to know about a loss.

  Attributes:
    name: registry name.
    fn: ``fn(inputs, **hparams) -> (losses [N], metrics)``.
    input_kind: one of "sft", "pairwise", "unpaired", "ranked", "reward".
    needs_reference: whether the inputs must carry reference-model log-probs.
    defaults: hyperparameter defaults (the keyword-only parameters of ``fn``).
  """

  name: str
  fn: LossFn
  input_kind: str
  needs_reference: bool
  defaults: Mapping[str, Any]


_REGISTRY: dict[str, LossSpec] = {}


def _signature_defaults(fn: LossFn) -> dict[str, Any]:
  params = inspect.signature(fn).parameters.values()
  return {p.name: p.default for p in params
          if p.kind is inspect.Parameter.KEYWORD_ONLY}


def register_loss(name: str, fn: LossFn, *, input_kind: str,
                  needs_reference: bool, overwrite: bool = False) -> LossSpec:
  """Adds ``fn`` to the registry under ``name`` and returns its spec.

  Hyperparameters are ``fn``'s keyword-only parameters; their defaults become the
  spec's defaults (every hyperparameter must have one).
  """
  if input_kind not in INPUT_KINDS:
    raise ValueError(f"register_loss({name!r}): input_kind={input_kind!r} is not "
                     f"one of {INPUT_KINDS}.")
  if name in _REGISTRY and not overwrite:
    raise ValueError(f"register_loss: a loss named {name!r} already exists; pass "
                     "overwrite=True to replace it.")
  defaults = _signature_defaults(fn)
  missing = [k for k, v in defaults.items() if v is inspect.Parameter.empty]
  if missing:
    raise ValueError(f"register_loss({name!r}): hyperparameters {missing} need "
                     "default values.")
  spec = LossSpec(name=name, fn=fn, input_kind=input_kind,
                  needs_reference=needs_reference, defaults=defaults)
  _REGISTRY[name] = spec
  return spec


def unregister_loss(name: str) -> None:
  """Removes ``name`` from the registry (ValueError if it is not registered)."""
  get_loss(name)
  del _REGISTRY[name]


def list_losses() -> list[str]:
  return sorted(_REGISTRY)


def get_loss(name: str) -> LossSpec:
  """The spec registered under ``name``; ValueError listing valid names if none."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown loss {name!r}. Valid loss names: "
                     f"{', '.join(list_losses())}.")
  return _REGISTRY[name]


# Hyperparameters that take one of a few strings: checked when a loss is bound, so a
# typo is a config error, not a failure inside the traced step.
_CHOICES = {"nll_reduction": _math.NLL_REDUCTIONS}


def _check_hparams(spec: LossSpec, hparams: Mapping[str, Any], where: str) -> None:
  unknown = sorted(set(hparams) - set(spec.defaults))
  if unknown:
    raise ValueError(
        f"{where}: unknown hyperparameter(s) {unknown} for loss '{spec.name}'. "
        f"Valid hyperparameters: {sorted(spec.defaults) or 'none'}.")
  for key, choices in _CHOICES.items():
    if key in hparams and hparams[key] not in choices:
      raise ValueError(f"{where}: {key}={hparams[key]!r} for loss '{spec.name}' is not "
                       f"one of {choices}.")


def _effective(spec: LossSpec, hparams: Mapping[str, Any]) -> LossSpec:
  """The spec as bound: ``reference_free=True`` drops the reference requirement."""
  if spec.needs_reference and hparams.get("reference_free") is True:
    return dataclasses.replace(spec, needs_reference=False)
  return spec


def _bind(spec: LossSpec, hparams: Mapping[str, Any]) -> LossFn:
  hparams = dict(hparams)

  def bound(inputs, **overrides):
    return spec.fn(inputs, **{**hparams, **overrides})

  return bound


def resolve(loss: str | Sequence[tuple[str, float]],
            hparams: Mapping[str, Any] | None = None) -> tuple[LossFn, LossSpec]:
  """Binds a loss (or a weighted sum of losses) to validated hyperparameters.

  Args:
    loss: a registry name, or a list of ``(name, weight)`` pairs whose weighted sum
      is the objective (e.g. ``[("dpo", 1.0), ("nll", 1.0)]`` for RPO). All parts
      must have the same input kind.
    hparams: for a single loss, its keyword arguments. For a combination, either a
      flat dict (each key goes to every part that accepts it and must be accepted
      by at least one) or entries keyed by a part's name holding that part's own
      dict, e.g. ``{"beta": 0.1, "nll": {"length_power": 0.0}}``.

  Returns:
    ``(fn, spec)``: ``fn(inputs, **overrides) -> (losses [N], metrics)``, and the
    spec (for a combination, a synthesised spec named "a+b" whose ``needs_reference``
    is true if any part needs one). ``reference_free=True`` in a part's
    hyperparameters makes that part's ``needs_reference`` false. A combination's metrics are the parts' metrics
    (first part wins on a shared key; later parts' copies go under
    ``"{name}/{key}"``) plus ``"loss/{name}"``, each part's unweighted loss.

  Raises:
    ValueError: unknown loss name, unknown hyperparameter, mixed input kinds.
  """
  hparams = dict(hparams or {})
  if isinstance(loss, str):
    spec = get_loss(loss)
    _check_hparams(spec, hparams, "resolve")
    return _bind(spec, hparams), _effective(spec, hparams)
  return _resolve_combination(list(loss), hparams)


def _resolve_combination(parts: list[tuple[str, float]],
                         hparams: dict[str, Any]) -> tuple[LossFn, LossSpec]:
  if not parts:
    raise ValueError("resolve: the list of (name, weight) pairs is empty.")
  for part in parts:
    if not (isinstance(part, (tuple, list)) and len(part) == 2
            and isinstance(part[0], str)):
      raise ValueError(f"resolve: each entry must be a (name, weight) pair; got "
                       f"{part!r}.")
  names = [name for name, _ in parts]
  if len(set(names)) != len(names):
    raise ValueError(f"resolve: loss names repeat in {names}; merge their weights.")
  specs = [get_loss(name) for name in names]
  kinds = {s.input_kind for s in specs}
  if len(kinds) > 1:
    raise ValueError("resolve: cannot combine losses with different input kinds: "
                     + ", ".join(f"{s.name} ({s.input_kind})" for s in specs))
  per_part = {k: hparams.pop(k) for k in list(hparams) if k in names}
  for name, value in per_part.items():
    if not isinstance(value, Mapping):
      raise ValueError(f"resolve: hparams[{name!r}] must be a dict of that loss's "
                       f"hyperparameters; got {value!r}.")
  accepted = set().union(*(s.defaults for s in specs))
  unknown = sorted(set(hparams) - accepted)
  if unknown:
    raise ValueError(
        f"resolve: unknown hyperparameter(s) {unknown} for losses {names}. Valid "
        f"hyperparameters: {sorted(accepted)} (or a dict keyed by a loss name).")
  bound = []
  for (name, weight), spec in zip(parts, specs):
    own = {k: v for k, v in hparams.items() if k in spec.defaults}
    own.update(per_part.get(name, {}))
    _check_hparams(spec, own, f"resolve (part {name!r})")
    bound.append((name, float(weight), spec, own))

  def combined(inputs, **overrides):
    total = None
    metrics: dict[str, Array] = {}
    for name, weight, spec, own in bound:
      kwargs = {**own, **{k: v for k, v in overrides.items() if k in spec.defaults}}
      losses, part_metrics = spec.fn(inputs, **kwargs)
      total = weight * losses if total is None else total + weight * losses
      metrics[f"loss/{name}"] = jax.lax.stop_gradient(losses)
      for key, value in part_metrics.items():
        metrics[f"{name}/{key}" if key in metrics else key] = value
    return total, metrics

  defaults: dict[str, Any] = {}
  for spec in specs:
    for k, v in spec.defaults.items():
      defaults.setdefault(k, v)
  spec = LossSpec(name="+".join(names), fn=combined, input_kind=kinds.pop(),
                  needs_reference=any(_effective(s, own).needs_reference
                                      for _, _, s, own in bound),
                  defaults=defaults)
  return combined, spec


# --- the built-in losses -----------------------------------------------------
register_loss("sft", _sft.sft, input_kind="sft", needs_reference=False)
register_loss("bradley_terry", _reward.bradley_terry, input_kind="reward",
              needs_reference=False)
register_loss("kto", _kto.kto, input_kind="unpaired", needs_reference=True)
register_loss("rrhf", _ranking.rrhf, input_kind="ranked", needs_reference=False)
for _name in ("dpo", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down",
              "discopop", "sigmoid_norm", "f_dpo"):
  register_loss(_name, getattr(_preference, _name), input_kind="pairwise",
                needs_reference=True)
for _name in ("cpo", "simpo", "orpo", "nll"):
  register_loss(_name, getattr(_preference, _name), input_kind="pairwise",
                needs_reference=False)
