"""Local Hugging Face checkpoint interop: Llama, Mistral, Qwen2, Qwen3, Gemma 1 / 2 / 3 (text).

`load_hf(path)` reads `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`) with `safetensors` in NumPy mode (never pickle / torch)
and returns `(TransformerConfig, params)`. `save_hf(path, cfg, params, architecture)`
writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.
`load_hf_reward` / `save_hf_reward`: the same trunk under a sequence-classification
reward head (``XForSequenceClassification``, ``score.weight`` [1, D]).

Every architecture is one row of `_ARCHS` (what its HF config and tensors mean in
TransformerConfig terms); the reader and the writer share that row and one list of
per-layer tensors (`_layer_tensors`), so import and export cannot drift apart.

Layout notes. HF `nn.Linear` weights are [out, in]; ours are [in, ...]. HF applies RoPE
with `rotate_half` (dimension i pairs with i + K/2), which is also the layout our
`apply_rope` uses, so q/k projections are copied without any head-dim permutation.
Gemma stores RMSNorm weights as `scale - 1`; we keep them so and set
`TransformerConfig.norm_offset=1` (the 1 is added in f32 at run time, as HF does).
Gemma scales embeddings by sqrt(d_model) (`embed_multiplier`). Gemma 2 / 3 name their
norms differently: `post_attention_layernorm` is the norm *on the attention output*
(Llama: the pre-MLP norm), `pre_feedforward_layernorm` the pre-MLP one.

Per-layer attention (`layer_types`): Qwen3, Gemma 2 and Gemma 3 mix sliding-window and
full layers; Gemma 3's sliding layers also rotate with their own base
(`rope_parameters["sliding_attention"]`, 4.x: `rope_local_base_freq`). transformers 5
(checked on 5.24) does not apply `attn_logit_softcapping` in Gemma 3 (only Gemma 2 passes
it to the attention), so it is ignored on import and refused on export for gemma3_text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxalign.models import transformer
from jaxalign.models.transformer import RopeScaling, TransformerConfig

_SLIDING, _FULL = "sliding_attention", "full_attention"


def _qwen_layer_types(hf: dict, n_layers: int) -> list[str]:
  """Qwen2 / Qwen3 configs without `layer_types`: layers >= max_window_layers slide."""
  use = hf.get("use_sliding_window", False) and hf.get("sliding_window") is not None
  first = hf.get("max_window_layers", n_layers)
  return [_SLIDING if use and i >= first else _FULL for i in range(n_layers)]


def _every_nth_full(key: str, default: int) -> Callable[[dict, int], list[str]]:
  """Gemma 2 / 3 without `layer_types`: every n-th layer (1-based) is full, the rest slide."""
  def layer_types(hf: dict, n_layers: int) -> list[str]:
    n = int(hf.get(key) or hf.get("_" + key) or default)
    return [_SLIDING if (i + 1) % n else _FULL for i in range(n_layers)]
  return layer_types


@dataclasses.dataclass(frozen=True)
class _Arch:
  """What one HF `model_type` means in TransformerConfig terms (read and written alike)."""

  hf_class: str
  qkv_bias: bool = False  # q/k/v projections carry biases (o does not): Qwen2
  qk_norm: bool = False  # self_attn.{q,k}_norm over head_dim: Qwen3, Gemma 3
  post_norms: bool = False  # norms on the attention / MLP outputs: Gemma 2 / 3
  norm_offset: float = 0.0  # HF scales by (offset + weight): Gemma
  scaled_embed: bool = False  # embeddings times sqrt(hidden_size): Gemma
  tied_default: bool = False  # tie_word_embeddings when config.json omits it
  activations: tuple[str, ...] = ("silu",)  # ours it can hold; the first is its default
  act_key: str = "hidden_act"  # the config.json key naming the MLP activation
  # Sliding windows: None (never), "uniform" (one `sliding_window` for every layer) or a
  # function giving `layer_types` when config.json lacks them (per-layer kinds).
  windows: str | Callable[[dict, int], list[str]] | None = None
  mixed_layers: bool = False  # sliding and full layers may alternate
  window_switch: str | None = None  # config key that must be true for sliding_window to count
  pre_attn_scalar: bool = False  # query_pre_attn_scalar sets the score scale: Gemma 2 / 3
  attn_softcap: float | None | bool = False  # False: not applied by HF; else its default
  final_softcap: float | None | bool = False  # False: not applied by HF; else its default
  local_rope: bool = False  # rope_parameters keyed by layer type: Gemma 3
  theta_default: float = 10000.0


_GEGLU = ("gelu_tanh", "gelu")
_ARCHS: dict[str, _Arch] = {
    "llama": _Arch("LlamaForCausalLM"),
    "mistral": _Arch("MistralForCausalLM", windows="uniform"),
    "qwen2": _Arch("Qwen2ForCausalLM", qkv_bias=True, windows=_qwen_layer_types,
                   window_switch="use_sliding_window"),
    "qwen3": _Arch("Qwen3ForCausalLM", qk_norm=True, windows=_qwen_layer_types,
                   mixed_layers=True, window_switch="use_sliding_window"),
    "gemma": _Arch("GemmaForCausalLM", norm_offset=1.0, scaled_embed=True, tied_default=True,
                   activations=_GEGLU),
    "gemma2": _Arch("Gemma2ForCausalLM", post_norms=True, norm_offset=1.0, scaled_embed=True,
                    tied_default=True, activations=_GEGLU, act_key="hidden_activation",
                    windows=_every_nth_full("sliding_window_pattern", 2), mixed_layers=True,
                    pre_attn_scalar=True, attn_softcap=50.0, final_softcap=30.0),
    "gemma3_text": _Arch("Gemma3ForCausalLM", qk_norm=True, post_norms=True, norm_offset=1.0,
                         scaled_embed=True, tied_default=True, activations=_GEGLU,
                         act_key="hidden_activation",
                         windows=_every_nth_full("sliding_window_pattern", 6),
                         mixed_layers=True, pre_attn_scalar=True, final_softcap=None,
                         local_rope=True, theta_default=1_000_000.0),
}
# HF activation name -> TransformerConfig.mlp_activation.
_HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
}
_ACTIVATION_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
_LOCAL_ROPE_THETA_DEFAULT = 10000.0  # Gemma 3 rope_local_base_freq
_PRE_ATTN_SCALAR_DEFAULT = 256  # Gemma 2 / 3 query_pre_attn_scalar

_CONFIG = "config.json"
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def _fail(where: str, msg: str) -> ValueError:
  return ValueError(f"{where}: {msg}")


def _supported() -> str:
  return (f"{sorted(_ARCHS)} "
          f"({sorted(a.hf_class for a in _ARCHS.values())})")


# ----------------------------------------------------------------------------- config


def _model_type(hf: dict, where: str) -> str:
  model_type = hf.get("model_type")
  if model_type in _ARCHS:
    return model_type
  for arch in hf.get("architectures") or []:
    for mt, row in _ARCHS.items():
      if arch in (row.hf_class, _seq_cls_class(row)):
        return mt
  hint = ""
  if model_type == "gemma3":
    hint = (" A multimodal gemma3 checkpoint keeps its language model under "
            "'language_model.'; jaxalign reads the text-only gemma3_text layout "
            "(Gemma3ForCausalLM).")
  raise _fail(
      where,
      f"unsupported architecture (model_type={model_type!r}, "
      f"architectures={hf.get('architectures')!r}); jaxalign reads {_supported()}.{hint}",
  )


def _rope_spec(spec: dict, theta: float, where: str, key: str) -> tuple[float, RopeScaling | None]:
  """(rope_theta, scaling) of one HF rope dict; `key` names it in errors."""
  theta = float(spec.get("rope_theta", theta))
  rope_type = spec.get("rope_type", spec.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type == "linear":
    return theta, RopeScaling(rope_type="linear", factor=float(spec["factor"]))
  if rope_type == "llama3":
    try:
      return theta, RopeScaling(
          rope_type="llama3",
          factor=float(spec["factor"]),
          low_freq_factor=float(spec["low_freq_factor"]),
          high_freq_factor=float(spec["high_freq_factor"]),
          original_max_position_embeddings=int(spec["original_max_position_embeddings"]),
      )
    except KeyError as e:
      raise _fail(where, f"{key} of type llama3 lacks field {e}.") from None
  raise _fail(
      where,
      f"rope type {rope_type!r} is not supported ({key}); jaxalign implements 'default', "
      "'linear' and 'llama3'. Convert the checkpoint or drop the rope scaling.",
  )


def _rope_from_hf(hf: dict, where: str, theta_default: float = 10000.0
                  ) -> tuple[float, RopeScaling | None]:
  """rope_theta and scaling from transformers 5 `rope_parameters` or 4.x `rope_scaling`."""
  params = hf.get("rope_parameters")
  if params:
    theta = params.get("rope_theta", hf.get("rope_theta", theta_default))
    return _rope_spec(params, theta, where, "rope_parameters")
  return _rope_spec(hf.get("rope_scaling") or {}, hf.get("rope_theta", theta_default), where,
                    "rope_scaling")


def _local_rope_from_hf(hf: dict, arch: _Arch, where: str
                        ) -> tuple[float, RopeScaling | None, float | None]:
  """Gemma 3: (global theta, global scaling, local_rope_theta or None = as global).

  transformers 5 writes `rope_parameters = {"full_attention": {...}, "sliding_attention":
  {...}}`; 4.x wrote `rope_theta` + `rope_scaling` (global) and `rope_local_base_freq`.
  """
  params = hf.get("rope_parameters")
  if params and (_FULL in params or _SLIDING in params):
    theta, scaling = _rope_spec(params.get(_FULL) or {}, hf.get("rope_theta", arch.theta_default),
                                where, "rope_parameters.full_attention")
    local_spec = params.get(_SLIDING) or {}
  elif params:
    raise _fail(where, "rope_parameters must be keyed by layer type ('full_attention', "
                "'sliding_attention') for gemma3_text, as transformers 5 writes them.")
  else:
    theta, scaling = _rope_from_hf(hf, where, arch.theta_default)
    local_spec = {"rope_type": "default"}
  local_theta, local_scaling = _rope_spec(
      local_spec, hf.get("rope_local_base_freq", _LOCAL_ROPE_THETA_DEFAULT), where,
      "rope_parameters.sliding_attention")
  if local_scaling is not None:
    if (local_theta, local_scaling) == (theta, scaling):
      return theta, scaling, None
    raise _fail(where, "rope scaling on sliding layers (rope_parameters.sliding_attention) "
                "is not supported; jaxalign's sliding layers use plain RoPE with their own base.")
  # Same base and no global scaling: the local tables are the global ones.
  return theta, scaling, None if (local_theta == theta and scaling is None) else local_theta


def _layer_fields(hf: dict, arch: _Arch, model_type: str, n_layers: int, where: str) -> dict:
  """layer_types / sliding_window for TransformerConfig, uniform stacks canonicalised.

  All-full -> (None, None); all-sliding with a window -> (None, window): the forms every
  existing Llama / Mistral / Qwen2 config has. Only a mixed stack keeps `layer_types`.
  """
  window = hf.get("sliding_window")
  if arch.windows is None:
    return dict(layer_types=None, sliding_window=None)
  if arch.windows == "uniform":
    return dict(layer_types=None, sliding_window=None if window is None else int(window))
  types = list(hf.get("layer_types") or arch.windows(hf, n_layers))
  if len(types) != n_layers or set(types) - {_SLIDING, _FULL}:
    raise _fail(where, f"layer_types={types} must list num_hidden_layers={n_layers} entries, "
                f"each '{_SLIDING}' or '{_FULL}'.")
  if len(set(types)) > 1 and not arch.mixed_layers:
    raise _fail(
        where,
        f"layer_types={types} mixes sliding and full attention across layers; jaxalign reads "
        f"{model_type} with one attention rule for all layers (per-layer windows: "
        f"{sorted(mt for mt, a in _ARCHS.items() if a.mixed_layers)}). Set "
        f"use_sliding_window=false (exact while sequences are shorter than "
        f"sliding_window={window}).",
    )
  if arch.window_switch is not None and not hf.get(arch.window_switch, False):
    window = None  # e.g. Qwen3Config: sliding_window = sliding_window if use_sliding_window
  if window is None and not arch.local_rope:
    types = [_FULL] * n_layers  # HF: a sliding layer without a window attends to everything
  kinds = set(types)
  if kinds == {_FULL}:
    return dict(layer_types=None, sliding_window=None)
  if kinds == {_SLIDING} and window is not None:
    return dict(layer_types=None, sliding_window=int(window))
  return dict(layer_types=tuple(types), sliding_window=None if window is None else int(window))


def _softcap(hf: dict, key: str, default: float | None | bool) -> float | None:
  if default is False:  # the HF model does not apply this cap
    return None
  value = hf.get(key, default)
  return None if value is None else float(value)


def _activation_from_hf(hf: dict, arch: _Arch, where: str) -> str:
  """The jaxalign mlp_activation of the HF gate activation (the architecture's default)."""
  act = hf.get("hidden_activation") or hf.get("hidden_act") or _ACTIVATION_TO_HF[
      arch.activations[0]]
  if act not in _HF_ACTIVATIONS:
    raise _fail(
        where, f"hidden_act={act!r} is not supported; jaxalign's gated MLP takes one of "
        f"{sorted(_HF_ACTIVATIONS)}."
    )
  return _HF_ACTIVATIONS[act]


def _check_supported_options(hf: dict, arch: _Arch, model_type: str, where: str) -> None:
  if hf.get("use_bidirectional_attention"):
    raise _fail(where, "use_bidirectional_attention=true is not supported (causal LMs only).")
  if hf.get("mlp_bias"):
    raise _fail(where, "mlp_bias=true is not supported (jaxalign's MLP has no biases).")
  if not arch.qkv_bias and hf.get("attention_bias"):
    raise _fail(
        where,
        f"attention_bias=true ({model_type} puts biases on q, k, v and o) is not supported; "
        "only Qwen2-style q/k/v biases are.",
    )


def _shape_from_hf(hf: dict, where: str) -> dict[str, Any]:
  """Vocabulary, widths, depth, heads and norm epsilon."""
  try:
    d_model = int(hf["hidden_size"])
    n_heads = int(hf["num_attention_heads"])
    n_layers = int(hf["num_hidden_layers"])
    return dict(
        vocab_size=int(hf["vocab_size"]),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d_model // n_heads),
        mlp_dim=int(hf["intermediate_size"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    )
  except KeyError as e:
    raise _fail(where, f"missing required field {e}.") from None


def _rope_fields(hf: dict, arch: _Arch, layer_fields: dict[str, Any],
                 where: str) -> dict[str, Any]:
  """rope_theta, rope_scaling and local_rope_theta (given the layers' kinds)."""
  local_theta = None
  if arch.local_rope:
    theta, scaling, local_theta = _local_rope_from_hf(hf, arch, where)
    if layer_fields == dict(layer_types=None, sliding_window=None):
      local_theta = None  # every layer is full: none rotates with the local base
  else:
    theta, scaling = _rope_from_hf(hf, where, arch.theta_default)
  return dict(rope_theta=theta, rope_scaling=scaling, local_rope_theta=local_theta)


def _variant_fields(hf: dict, arch: _Arch, d_model: int) -> dict[str, Any]:
  """The architecture's fixed options and its scalars: norms, biases, scales, soft caps."""
  scalar = None
  if arch.pre_attn_scalar:
    scalar = float(hf.get("query_pre_attn_scalar") or _PRE_ATTN_SCALAR_DEFAULT)
  return dict(
      qkv_bias=arch.qkv_bias,
      qk_norm=arch.qk_norm,
      post_norms=arch.post_norms,
      norm_offset=arch.norm_offset,
      tie_embeddings=bool(hf.get("tie_word_embeddings", arch.tied_default)),
      embed_multiplier=math.sqrt(d_model) if arch.scaled_embed else 1.0,
      query_pre_attn_scalar=scalar,
      attn_logit_softcap=_softcap(hf, "attn_logit_softcapping", arch.attn_softcap),
      final_logit_softcap=_softcap(hf, "final_logit_softcapping", arch.final_softcap),
  )


def config_from_hf(hf: dict, where: str = _CONFIG, **overrides) -> TransformerConfig:
  """TransformerConfig from a parsed HF config.json dict; `where` names it in errors."""
  model_type = _model_type(hf, where)
  arch = _ARCHS[model_type]
  mlp_activation = _activation_from_hf(hf, arch, where)
  _check_supported_options(hf, arch, model_type, where)
  kwargs = _shape_from_hf(hf, where)
  layer_fields = _layer_fields(hf, arch, model_type, kwargs["n_layers"], where)
  kwargs.update(layer_fields)
  kwargs.update(_rope_fields(hf, arch, layer_fields, where))
  kwargs.update(_variant_fields(hf, arch, kwargs["d_model"]))
  kwargs["mlp_activation"] = mlp_activation
  kwargs.update(overrides)
  return TransformerConfig(**kwargs)


# What `cfg` must satisfy to be written as an architecture: each check returns None when
# the architecture can hold the config, else why not.
def _check_bias(cfg, a):
  if cfg.qkv_bias and not a.qkv_bias:
    return "its attention has no q/k/v-only biases"
  return None


def _check_qk_norm(cfg, a):
  if cfg.qk_norm != a.qk_norm:
    return f"its q/k RMSNorm is {'always' if a.qk_norm else 'never'} there"
  return None


def _check_post_norms(cfg, a):
  if cfg.post_norms != a.post_norms:
    return f"its attention / MLP output norms are {'always' if a.post_norms else 'never'} there"
  return None


def _check_activation(cfg, a):
  if cfg.mlp_activation not in a.activations:
    return f"its MLP uses {list(a.activations)}"
  return None


def _check_embed(cfg, a):
  want = math.sqrt(cfg.d_model) if a.scaled_embed else 1.0
  if not math.isclose(cfg.embed_multiplier, want, rel_tol=1e-6):
    return f"it scales embeddings by {want:g}"
  return None


def _check_scalar(cfg, a):
  s = cfg.query_pre_attn_scalar
  if s is not None and not a.pre_attn_scalar and s != cfg.head_dim:
    return "its attention scale is 1/sqrt(head_dim)"
  return None


def _check_attn_softcap(cfg, a):
  if cfg.attn_logit_softcap is not None and a.attn_softcap is False:
    return "transformers does not soft-cap its attention scores"
  return None


def _check_final_softcap(cfg, a):
  if cfg.final_logit_softcap is not None and a.final_softcap is False:
    return "transformers does not soft-cap its logits"
  return None


def _check_windows(cfg, a):
  kinds = set(cfg.sliding_layers)
  if True in kinds and a.windows is None:
    return "it has no sliding-window attention"
  if len(kinds) > 1 and not a.mixed_layers:
    return "it uses one attention rule for all layers"
  return None


def _check_local_rope(cfg, a):
  if cfg.local_rope_theta is not None and any(cfg.sliding_layers) and not a.local_rope:
    return "all its layers share one RoPE base"
  return None


_EXPORT_CHECKS = (
    ("qkv_bias", _check_bias), ("qk_norm", _check_qk_norm), ("post_norms", _check_post_norms),
    ("mlp_activation", _check_activation), ("embed_multiplier", _check_embed),
    ("query_pre_attn_scalar", _check_scalar), ("attn_logit_softcap", _check_attn_softcap),
    ("final_logit_softcap", _check_final_softcap), ("layer_types", _check_windows),
    ("local_rope_theta", _check_local_rope),
)


def _export_fix(cfg: TransformerConfig, failed_check) -> str:
  """Where `cfg` can be saved instead: the architectures passing every check, else
  those that at least have the feature that failed."""
  fits = [mt for mt, a in _ARCHS.items() if all(c(cfg, a) is None for _, c in _EXPORT_CHECKS)]
  if fits:
    return f"save as architecture={fits[0]!r}" if len(fits) == 1 else f"save as one of {fits}"
  have = [mt for mt, a in _ARCHS.items() if failed_check(cfg, a) is None]
  return (f"no architecture jaxalign writes holds this whole config; this part fits "
          f"{have}" if have else "no architecture jaxalign writes has it")


def _arch_name(architecture: str) -> str:
  for mt, row in _ARCHS.items():
    if architecture == row.hf_class:
      return mt
  arch = architecture.lower()
  if arch not in _ARCHS:
    raise ValueError(f"save_hf architecture={architecture!r}; choose one of {_supported()}.")
  return arch


def _rope_to_hf(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
  if scaling is not None:
    rope["rope_type"] = scaling.rope_type
    rope["factor"] = scaling.factor
    if scaling.rope_type == "llama3":
      rope.update(
          low_freq_factor=scaling.low_freq_factor,
          high_freq_factor=scaling.high_freq_factor,
          original_max_position_embeddings=scaling.original_max_position_embeddings,
      )
  return rope


def _layer_types_to_hf(cfg: TransformerConfig) -> list[str]:
  return [_SLIDING if s else _FULL for s in cfg.sliding_layers]


def config_to_hf(cfg: TransformerConfig, architecture: str,
                 max_position_embeddings: int = 4096) -> dict:
  """HF config.json dict for `cfg` as `architecture` (a model_type or HF class name)."""
  arch_name = _arch_name(architecture)
  arch = _ARCHS[arch_name]
  for field, check in _EXPORT_CHECKS:
    why = check(cfg, arch)
    if why is not None:
      raise ValueError(f"TransformerConfig.{field}={getattr(cfg, field)!r} cannot be written "
                       f"as {arch_name}: {why}; {_export_fix(cfg, check)}.")
  rope = _rope_to_hf(cfg.rope_theta, cfg.rope_scaling)
  hf: dict[str, Any] = {
      "architectures": [arch.hf_class],
      "model_type": arch_name,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      arch.act_key: _ACTIVATION_TO_HF[cfg.mlp_activation],
      "rms_norm_eps": cfg.norm_eps,
      "max_position_embeddings": max_position_embeddings,
      "rope_parameters": rope,
      "tie_word_embeddings": cfg.tie_embeddings,
      "dtype": cfg.param_dtype,
  }
  if not arch.qkv_bias and arch_name != "mistral":
    hf["attention_bias"] = False
  if arch_name == "llama":
    hf["mlp_bias"] = False
  window = cfg.sliding_window if any(cfg.sliding_layers) else None
  if arch.windows == "uniform":
    hf["sliding_window"] = window
  elif arch.window_switch is not None:
    first = cfg.sliding_layers.index(True) if window is not None else cfg.n_layers
    hf.update({arch.window_switch: window is not None}, sliding_window=window,
              max_window_layers=first, layer_types=_layer_types_to_hf(cfg))
  elif arch.windows is not None:
    # Gemma 2 / 3 always build a sliding mask; an unused window must still be a number.
    hf.update(sliding_window=window or max_position_embeddings,
              layer_types=_layer_types_to_hf(cfg))
  if arch.pre_attn_scalar:
    scalar = float(cfg.query_pre_attn_scalar or cfg.head_dim)
    if not scalar.is_integer():  # transformers' config class types it as int
      raise ValueError(f"TransformerConfig.query_pre_attn_scalar={scalar} cannot be written as "
                       f"{arch_name}, whose config.json holds an integer; round it.")
    hf["query_pre_attn_scalar"] = int(scalar)
  if arch.attn_softcap is not False or arch.final_softcap is not False:
    hf.update(attn_logit_softcapping=cfg.attn_logit_softcap,
              final_logit_softcapping=cfg.final_logit_softcap)
  if arch.local_rope:
    local = (dict(rope) if cfg.local_rope_theta is None
             else _rope_to_hf(cfg.local_rope_theta, None))
    hf["rope_parameters"] = {_FULL: rope, _SLIDING: local}
  return hf


# ----------------------------------------------------------------------------- tensors


def _tensor_files(path: str) -> dict[str, str]:
  """Tensor key -> safetensors file, from the index or the single file."""
  index = os.path.join(path, _INDEX)
  single = os.path.join(path, _SINGLE)
  if os.path.exists(index):
    with open(index) as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise _fail(index, f"not a safetensors index with a 'weight_map' ({e}).") from None
    return {k: os.path.join(path, v) for k, v in weight_map.items()}
  if os.path.exists(single):
    with safe_open(single, framework="np") as f:
      return {k: single for k in f.keys()}
  raise ValueError(
      f"{path}: no {_SINGLE} or {_INDEX}; save the checkpoint with "
      "save_pretrained(..., safe_serialization=True) (pickled .bin files are not read)."
  )


class _Reader:
  """Reads tensors by key, checking presence and shape, naming file and key in errors."""

  def __init__(self, path: str):
    self.path = path
    self.files = _tensor_files(path)
    self.used: set[str] = set()

  def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in self.files:
      where = os.path.join(self.path, _INDEX if os.path.exists(
          os.path.join(self.path, _INDEX)) else _SINGLE)
      raise _fail(
          where,
          f"missing tensor {key!r} (expected shape {shape}); the checkpoint is incomplete or "
          "its config.json does not match its weights.",
      )
    file = self.files[key]
    if not os.path.exists(file):
      raise _fail(file, f"shard file for tensor {key!r} does not exist; copy the missing shard.")
    with safe_open(file, framework="np") as f:
      if key not in f.keys():
        raise _fail(file, f"tensor {key!r} is listed in the index but absent from this shard.")
      x = f.get_tensor(key)
    if tuple(x.shape) != tuple(shape):
      raise _fail(
          file,
          f"tensor {key!r} has shape {tuple(x.shape)}, expected {tuple(shape)} from config.json; "
          "fix config.json (sizes, heads, head_dim) to match the weights.",
      )
    self.used.add(key)
    return x


def _layer_key(i: int, name: str) -> str:
  return f"model.layers.{i}.{name}"


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One per-layer tensor: our name, the HF key suffix and shape, and both conversions."""

  ours: str
  hf_key: str
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _norm_converters(cfg: TransformerConfig, arch: _Arch):
  """HF stores (scale - arch offset), we store (scale - cfg.norm_offset); equal offsets
  (every config read by `config_from_hf`) copy the weights unchanged."""
  delta = arch.norm_offset - cfg.norm_offset
  if not delta:
    return (lambda x: x), (lambda x: x)
  return ((lambda x: x.astype(np.float32) + delta),
          (lambda x: (x.astype(np.float32) - delta).astype(x.dtype)))


def _layer_tensors(cfg: TransformerConfig, arch: _Arch) -> list[_Tensor]:
  d, h, g, k, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
  n_in, n_out = _norm_converters(cfg, arch)
  t = lambda x: x.T  # noqa: E731
  rows = [
      _Tensor("attn_norm", "input_layernorm.weight", (d,), n_in, n_out),
      # Gemma 2 / 3: post_attention_layernorm is the norm on the attention output.
      _Tensor("mlp_norm", ("pre_feedforward_layernorm.weight" if arch.post_norms
                           else "post_attention_layernorm.weight"), (d,), n_in, n_out),
      _Tensor("wq", "self_attn.q_proj.weight", (h * k, d), lambda x: x.T.reshape(d, h, k),
              lambda x: x.reshape(d, h * k).T),
      _Tensor("wk", "self_attn.k_proj.weight", (g * k, d), lambda x: x.T.reshape(d, g, k),
              lambda x: x.reshape(d, g * k).T),
      _Tensor("wv", "self_attn.v_proj.weight", (g * k, d), lambda x: x.T.reshape(d, g, k),
              lambda x: x.reshape(d, g * k).T),
      _Tensor("wo", "self_attn.o_proj.weight", (d, h * k), lambda x: x.T.reshape(h, k, d),
              lambda x: x.reshape(h * k, d).T),
      _Tensor("w_gate", "mlp.gate_proj.weight", (f, d), t, t),
      _Tensor("w_up", "mlp.up_proj.weight", (f, d), t, t),
      _Tensor("w_down", "mlp.down_proj.weight", (d, f), t, t),
  ]
  if cfg.qkv_bias:
    for name, heads in (("q", h), ("k", g), ("v", g)):
      rows.append(_Tensor(f"b{name}", f"self_attn.{name}_proj.bias", (heads * k,),
                          lambda x, n=heads: x.reshape(n, k), lambda x, n=heads: x.reshape(n * k)))
  if cfg.qk_norm:
    rows += [_Tensor("q_norm", "self_attn.q_norm.weight", (k,), n_in, n_out),
             _Tensor("k_norm", "self_attn.k_norm.weight", (k,), n_in, n_out)]
  if cfg.post_norms:
    rows += [_Tensor("post_attn_norm", "post_attention_layernorm.weight", (d,), n_in, n_out),
             _Tensor("post_mlp_norm", "post_feedforward_layernorm.weight", (d,), n_in, n_out)]
  return rows


def _read_config(path: str) -> tuple[dict, str]:
  """(parsed config.json, its path)."""
  cfg_file = os.path.join(path, _CONFIG)
  if not os.path.exists(cfg_file):
    raise ValueError(f"{cfg_file}: not found; a HF checkpoint directory needs config.json.")
  with open(cfg_file) as f:
    try:
      return json.load(f), cfg_file
    except json.JSONDecodeError as e:
      raise _fail(cfg_file, f"invalid JSON ({e}).") from None


def _read_trunk(reader: _Reader, cfg: TransformerConfig, arch: _Arch) -> dict[str, Any]:
  """Embedding, final norm and layers (everything but an LM head)."""
  layers = {
      row.ours: np.stack([row.to_ours(reader.get(_layer_key(i, row.hf_key), row.hf_shape))
                          for i in range(cfg.n_layers)])
      for row in _layer_tensors(cfg, arch)
  }
  d, v = cfg.d_model, cfg.vocab_size
  return {
      "embed": reader.get("model.embed_tokens.weight", (v, d)),
      "final_norm": _norm_converters(cfg, arch)[0](reader.get("model.norm.weight", (d,))),
      "layers": layers,
  }


def _check_unused(reader: _Reader, hf: dict, ignore: Callable[[str], bool]) -> None:
  unused = sorted(key for key in set(reader.files) - reader.used
                  if not key.endswith("rotary_emb.inv_freq") and not ignore(key))
  if unused:
    raise _fail(
        reader.path,
        f"{len(unused)} tensors are not used by the {hf.get('model_type')} layout, e.g. "
        f"{unused[:3]}; the checkpoint has options jaxalign does not implement (biases, "
        "extra norms) or its config.json does not describe it.",
    )


def load_hf(path: str, *, param_dtype: str = "float32", **cfg_overrides
            ) -> tuple[TransformerConfig, dict]:
  """Loads a local HF checkpoint directory into (TransformerConfig, params).

  `param_dtype` is the dtype params are cast to; `cfg_overrides` set other config fields
  (e.g. dtype="bfloat16", remat="full").
  """
  hf, cfg_file = _read_config(path)
  cfg = config_from_hf(hf, cfg_file, param_dtype=param_dtype, **cfg_overrides)
  reader = _Reader(path)
  if SCORE_KEY in reader.files and "lm_head.weight" not in reader.files:
    raise _fail(path, f"a sequence-classification model ({SCORE_KEY}, no LM head): a "
                "reward model, not a causal LM; read it with load_hf_reward (rl.reward_model).")
  params = _read_trunk(reader, cfg, _ARCHS[_model_type(hf, cfg_file)])
  if not cfg.tie_embeddings:
    params["lm_head"] = reader.get("lm_head.weight", (cfg.vocab_size, cfg.d_model)).T
  # Some writers keep the tied lm_head copy; it is the embedding by definition.
  _check_unused(reader, hf, lambda k: cfg.tie_embeddings and k == "lm_head.weight")
  dtype = cfg.jnp_param_dtype
  params = _map(lambda x: np.ascontiguousarray(x).astype(dtype), params)
  return cfg, params


# ----------------------------------------------------------------------------- reward models

SCORE_KEY = "score.weight"  # transformers' *ForSequenceClassification head: Linear, no bias
SCORE_BIAS_KEY = "score.bias"  # written by jaxalign only when its head's bias is not 0


def _seq_cls_class(arch: _Arch) -> str:
  if arch.hf_class == "Gemma3ForCausalLM":
    return "Gemma3TextForSequenceClassification"
  return arch.hf_class.replace("ForCausalLM", "ForSequenceClassification")


def _check_score(reader: _Reader, hf: dict, d: int) -> None:
  if SCORE_KEY not in reader.files:
    raise _fail(reader.path, f"no {SCORE_KEY!r} tensor (architectures="
                f"{hf.get('architectures')}): not a sequence-classification reward model; "
                "give a *ForSequenceClassification checkpoint with one label, or a "
                "jaxalign reward-model run (WORKDIR[:STEP]).")
  with safe_open(reader.files[SCORE_KEY], framework="np") as f:
    shape = tuple(f.get_slice(SCORE_KEY).get_shape())
  if shape != (1, d):
    raise _fail(reader.path, f"{SCORE_KEY} has shape {shape}; a reward model has one "
                f"label (num_labels=1): shape (1, {d}), one score per sequence.")


def check_reward_dir(path: str) -> None:
  """`load_hf_reward`'s checks of config.json and the score head, no weights read."""
  hf, cfg_file = _read_config(path)
  cfg = config_from_hf(hf, cfg_file)
  _check_score(_Reader(path), hf, cfg.d_model)


def load_hf_reward(path: str, *, param_dtype: str = "float32"
                   ) -> tuple[TransformerConfig, dict, dict, int | None]:
  """A sequence-classification reward model (``XForSequenceClassification`` with one
  label): ``(config, trunk params, head {"w": [D], "b": []}, pad_token_id or None)``.

  transformers scores a sequence at its rightmost token that is not ``pad_token_id``
  (the last token when that is None); the trunk is read as tied (a reward model has no
  LM head and its logits are never computed).
  """
  hf, cfg_file = _read_config(path)
  cfg = config_from_hf(hf, cfg_file, param_dtype=param_dtype, tie_embeddings=True)
  reader = _Reader(path)
  _check_score(reader, hf, cfg.d_model)
  trunk = _read_trunk(reader, cfg, _ARCHS[_model_type(hf, cfg_file)])
  w = reader.get(SCORE_KEY, (1, cfg.d_model))[0]
  b = (reader.get(SCORE_BIAS_KEY, (1,))[0] if SCORE_BIAS_KEY in reader.files
       else np.zeros((), np.float32))
  _check_unused(reader, hf, lambda k: k == "lm_head.weight")
  dtype = cfg.jnp_param_dtype
  trunk = _map(lambda x: np.ascontiguousarray(x).astype(dtype), trunk)
  head = {"w": np.asarray(w, np.float32), "b": np.asarray(b, np.float32).reshape(())}
  pad = hf.get("pad_token_id")
  return cfg, trunk, head, (None if pad is None else int(pad))


def save_hf_reward(path: str, cfg: TransformerConfig, params: dict, head: dict,
                   architecture: str, *, pad_token_id: int | None,
                   max_position_embeddings: int = 4096) -> None:
  """Writes a reward model (trunk ``params`` + scalar ``head``) as the
  ``XForSequenceClassification`` layout `load_hf_reward` and transformers read:
  ``score.weight`` [1, D]; a non-zero head bias as ``score.bias`` [1], which
  transformers' bias-free score layer does not load (its scores are then jaxalign's
  minus that constant). ``pad_token_id``: where transformers stops reading (module
  doc of `load_hf_reward`)."""
  trunk = {k: v for k, v in params.items() if k != "lm_head"}
  cfg = dataclasses.replace(cfg, tie_embeddings=True)
  hf = config_to_hf(cfg, architecture, max_position_embeddings)
  _check_params(cfg, trunk)
  hf.update(architectures=[_seq_cls_class(_ARCHS[hf["model_type"]])], num_labels=1,
            id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
            pad_token_id=pad_token_id, tie_word_embeddings=False)
  out = _tensors(cfg, trunk, _ARCHS[hf["model_type"]])
  out.pop("lm_head.weight", None)
  out[SCORE_KEY] = np.asarray(head["w"], np.float32).reshape(1, -1)
  if float(np.asarray(head["b"])) != 0.0:
    out[SCORE_BIAS_KEY] = np.asarray(head["b"], np.float32).reshape(1)
  _write(path, hf, out)


def _map(fn, tree):
  if isinstance(tree, dict):
    return {k: _map(fn, v) for k, v in tree.items()}
  return fn(tree)


def _check_params(cfg: TransformerConfig, params: dict) -> None:
  """ValueError naming the first param whose presence or shape disagrees with `cfg`."""
  expected = jax.eval_shape(lambda key: transformer.init(cfg, key)[1], jax.random.key(0))

  def walk(exp, got, prefix):
    if not isinstance(exp, dict):
      if tuple(np.shape(got)) != tuple(exp.shape):
        raise ValueError(
            f"save_hf: params[{prefix}] has shape {tuple(np.shape(got))}, but the "
            f"TransformerConfig gives {tuple(exp.shape)}; pass the config the params were "
            "made with."
        )
      return
    if not isinstance(got, dict) or set(got) != set(exp):
      have = sorted(got) if isinstance(got, dict) else type(got).__name__
      raise ValueError(
          f"save_hf: params[{prefix or 'root'}] has keys {have}, expected {sorted(exp)} "
          "for this TransformerConfig (tie_embeddings / qkv_bias / qk_norm / post_norms "
          "must match the params)."
      )
    for key in sorted(exp):
      walk(exp[key], got[key], f"{prefix}/{key}" if prefix else key)

  walk(expected, params, "")


def _tensors(cfg: TransformerConfig, params: dict, arch: _Arch) -> dict[str, np.ndarray]:
  """HF key -> tensor of a transformer's params (the LM head only when untied)."""
  p = _map(np.asarray, params)
  lp = p["layers"]
  out: dict[str, np.ndarray] = {
      "model.embed_tokens.weight": p["embed"],
      "model.norm.weight": _norm_converters(cfg, arch)[1](p["final_norm"]),
  }
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = p["lm_head"].T
  rows = _layer_tensors(cfg, arch)
  for i in range(cfg.n_layers):
    for row in rows:
      out[_layer_key(i, row.hf_key)] = row.to_hf(lp[row.ours][i])
    if arch.qkv_bias and not cfg.qkv_bias:
      for name, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)):
        out[_layer_key(i, f"self_attn.{name}_proj.bias")] = np.zeros(
            (heads * cfg.head_dim,), lp["wq"].dtype)
  return out


def _write(path: str, hf: dict, out: dict[str, np.ndarray]) -> None:
  os.makedirs(path, exist_ok=True)
  out = {key: np.ascontiguousarray(x) for key, x in out.items()}
  save_file(out, os.path.join(path, _SINGLE), metadata={"format": "pt"})
  with open(os.path.join(path, _CONFIG), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)


def save_hf(path: str, cfg: TransformerConfig, params: dict, architecture: str,
            *, max_position_embeddings: int = 4096) -> None:
  """Writes config.json + model.safetensors loadable by transformers' from_pretrained.

  Tensors are written in the params' dtype. Qwen2 always has q/k/v biases, so a
  bias-free model saved as qwen2 gets exact zero biases.
  """
  hf = config_to_hf(cfg, architecture, max_position_embeddings)
  _check_params(cfg, params)
  _write(path, hf, _tensors(cfg, params, _ARCHS[hf["model_type"]]))


# Short names used by the training code.
load = load_hf
save = save_hf
