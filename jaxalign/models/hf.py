"""Local Hugging Face checkpoint interop for Llama, Mistral, Qwen2 and Gemma (v1).

`load_hf(path)` reads `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`) with `safetensors` in NumPy mode (never pickle / torch)
and returns `(TransformerConfig, params)`. `save_hf(path, cfg, params, architecture)`
writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

Layout notes. HF `nn.Linear` weights are [out, in]; ours are [in, ...]. HF applies RoPE
with `rotate_half` (dimension i pairs with i + K/2), which is also the layout our
`apply_rope` uses, so q/k projections are copied without any head-dim permutation.
Gemma stores RMSNorm weights as `scale - 1` and scales embeddings by sqrt(d_model); the
converter adds / subtracts the 1 and sets `embed_multiplier`. Sliding windows are
honoured (a position-distance mask, same as HF for unpacked rows); a window that differs
between layers (Qwen2 `max_window_layers`) is rejected.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxalign.models import transformer
from jaxalign.models.transformer import RopeScaling, TransformerConfig

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
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


def _norm_offset(model_type: str) -> float:
  """What HF adds to a stored RMSNorm weight to get the scale (Gemma: 1 + w)."""
  return 1.0 if model_type == "gemma" else 0.0
_CONFIG = "config.json"
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def _fail(where: str, msg: str) -> ValueError:
  return ValueError(f"{where}: {msg}")


# ----------------------------------------------------------------------------- config


def _model_type(hf: dict, where: str) -> str:
  model_type = hf.get("model_type")
  if model_type in _ARCHITECTURES:
    return model_type
  for arch in hf.get("architectures") or []:
    for mt, name in _ARCHITECTURES.items():
      if arch == name:
        return mt
  raise _fail(
      where,
      f"unsupported architecture (model_type={model_type!r}, "
      f"architectures={hf.get('architectures')!r}); jaxalign reads "
      f"{sorted(_ARCHITECTURES)} ({sorted(_ARCHITECTURES.values())}).",
  )


def _rope_from_hf(hf: dict, where: str) -> tuple[float, RopeScaling | None]:
  """rope_theta and scaling from transformers 5 `rope_parameters` or 4.x `rope_scaling`."""
  params = hf.get("rope_parameters")
  if params:
    spec, theta = params, params.get("rope_theta", hf.get("rope_theta", 10000.0))
  else:
    spec, theta = hf.get("rope_scaling") or {}, hf.get("rope_theta", 10000.0)
  rope_type = spec.get("rope_type", spec.get("type", "default"))
  if rope_type == "default":
    return float(theta), None
  if rope_type == "linear":
    return float(theta), RopeScaling(rope_type="linear", factor=float(spec["factor"]))
  if rope_type == "llama3":
    try:
      return float(theta), RopeScaling(
          rope_type="llama3",
          factor=float(spec["factor"]),
          low_freq_factor=float(spec["low_freq_factor"]),
          high_freq_factor=float(spec["high_freq_factor"]),
          original_max_position_embeddings=int(spec["original_max_position_embeddings"]),
      )
    except KeyError as e:
      raise _fail(where, f"rope_parameters of type llama3 lacks field {e}.") from None
  raise _fail(
      where,
      f"rope type {rope_type!r} is not supported; jaxalign implements 'default', 'linear' "
      "and 'llama3'. Convert the checkpoint or drop the rope scaling.",
  )


def _sliding_window_from_hf(hf: dict, model_type: str, n_layers: int, where: str) -> int | None:
  window = hf.get("sliding_window")
  if model_type == "llama":
    return None
  if model_type == "qwen2":
    layer_types = hf.get("layer_types")
    if layer_types is None:
      use = hf.get("use_sliding_window", False) and window is not None
      first = hf.get("max_window_layers", n_layers)
      layer_types = [
          "sliding_attention" if use and i >= first else "full_attention" for i in range(n_layers)
      ]
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
      return None
    if kinds == {"sliding_attention"}:
      return int(window)
    raise _fail(
        where,
        f"layer_types={layer_types} mixes sliding and full attention across layers; jaxalign "
        "uses one attention rule for all layers. Set use_sliding_window=false (exact while "
        f"sequences are shorter than sliding_window={window}).",
    )
  return None if window is None else int(window)


def config_from_hf(hf: dict, where: str = _CONFIG, **overrides) -> TransformerConfig:
  """TransformerConfig from a parsed HF config.json dict; `where` names it in errors."""
  model_type = _model_type(hf, where)
  act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
  if act not in _HF_ACTIVATIONS:
    raise _fail(
        where, f"hidden_act={act!r} is not supported; jaxalign's gated MLP takes one of "
        f"{sorted(_HF_ACTIVATIONS)}."
    )
  if hf.get("use_bidirectional_attention"):
    raise _fail(where, "use_bidirectional_attention=true is not supported (causal LMs only).")
  if hf.get("mlp_bias"):
    raise _fail(where, "mlp_bias=true is not supported (jaxalign's MLP has no biases).")
  if model_type in ("llama", "gemma") and hf.get("attention_bias"):
    raise _fail(
        where,
        f"attention_bias=true ({model_type} puts biases on q, k, v and o) is not supported; "
        "only Qwen2-style q/k/v biases are.",
    )
  try:
    d_model = int(hf["hidden_size"])
    n_heads = int(hf["num_attention_heads"])
    n_layers = int(hf["num_hidden_layers"])
    kwargs: dict[str, Any] = dict(
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
  theta, scaling = _rope_from_hf(hf, where)
  kwargs.update(
      rope_theta=theta,
      rope_scaling=scaling,
      qkv_bias=model_type == "qwen2",
      tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "gemma")),
      mlp_activation=_HF_ACTIVATIONS[act],
      embed_multiplier=math.sqrt(d_model) if model_type == "gemma" else 1.0,
      sliding_window=_sliding_window_from_hf(hf, model_type, n_layers, where),
  )
  kwargs.update(overrides)
  return TransformerConfig(**kwargs)


def config_to_hf(cfg: TransformerConfig, architecture: str,
                 max_position_embeddings: int = 4096) -> dict:
  """HF config.json dict for `cfg` as `architecture` (llama | mistral | qwen2)."""
  arch = architecture.lower()
  for mt, name in _ARCHITECTURES.items():
    if architecture == name:
      arch = mt
  if arch not in _ARCHITECTURES:
    raise ValueError(
        f"save_hf architecture={architecture!r}; choose one of {sorted(_ARCHITECTURES)}."
    )
  if cfg.qkv_bias and arch != "qwen2":
    raise ValueError(
        f"TransformerConfig.qkv_bias=True cannot be written as {arch}: its attention has no "
        "q/k/v-only biases. Save as architecture='qwen2'."
    )
  if cfg.sliding_window is not None and arch in ("llama", "gemma"):
    raise ValueError(
        f"TransformerConfig.sliding_window={cfg.sliding_window} cannot be written as {arch}; "
        "save as 'mistral' or 'qwen2'."
    )
  want_act, want_mult = (("gelu_tanh", math.sqrt(cfg.d_model)) if arch == "gemma"
                         else ("silu", 1.0))
  if arch == "gemma" and cfg.mlp_activation == "gelu":
    want_act = "gelu"
  if cfg.mlp_activation != want_act or not math.isclose(cfg.embed_multiplier, want_mult,
                                                        rel_tol=1e-6):
    raise ValueError(
        f"TransformerConfig(mlp_activation={cfg.mlp_activation!r}, embed_multiplier="
        f"{cfg.embed_multiplier}) cannot be written as {arch}, which uses {want_act!r} and "
        f"{want_mult:g}; pick the matching architecture."
    )
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    rope["rope_type"] = cfg.rope_scaling.rope_type
    rope["factor"] = cfg.rope_scaling.factor
    if cfg.rope_scaling.rope_type == "llama3":
      rope.update(
          low_freq_factor=cfg.rope_scaling.low_freq_factor,
          high_freq_factor=cfg.rope_scaling.high_freq_factor,
          original_max_position_embeddings=cfg.rope_scaling.original_max_position_embeddings,
      )
  hf: dict[str, Any] = {
      "architectures": [_ARCHITECTURES[arch]],
      "model_type": arch,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": _ACTIVATION_TO_HF[cfg.mlp_activation],
      "rms_norm_eps": cfg.norm_eps,
      "max_position_embeddings": max_position_embeddings,
      "rope_parameters": rope,
      "tie_word_embeddings": cfg.tie_embeddings,
      "dtype": cfg.param_dtype,
  }
  if arch in ("llama", "gemma"):
    hf.update(attention_bias=False)
  if arch == "llama":
    hf["mlp_bias"] = False
  elif arch == "mistral":
    hf["sliding_window"] = cfg.sliding_window
  else:
    window = cfg.sliding_window
    hf.update(
        use_sliding_window=window is not None,
        sliding_window=window,
        max_window_layers=0 if window is not None else cfg.n_layers,
        layer_types=[
            "sliding_attention" if window is not None else "full_attention"
        ] * cfg.n_layers,
    )
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


def load_hf(path: str, *, param_dtype: str = "float32", **cfg_overrides
            ) -> tuple[TransformerConfig, dict]:
  """Loads a local HF checkpoint directory into (TransformerConfig, params).

  `param_dtype` is the dtype params are cast to; `cfg_overrides` set other config fields
  (e.g. dtype="bfloat16", remat="full").
  """
  cfg_file = os.path.join(path, _CONFIG)
  if not os.path.exists(cfg_file):
    raise ValueError(f"{cfg_file}: not found; a HF checkpoint directory needs config.json.")
  with open(cfg_file) as f:
    try:
      hf = json.load(f)
    except json.JSONDecodeError as e:
      raise _fail(cfg_file, f"invalid JSON ({e}).") from None
  cfg = config_from_hf(hf, cfg_file, param_dtype=param_dtype, **cfg_overrides)
  reader = _Reader(path)
  d, h, g, k, f_, v = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim,
                       cfg.vocab_size)

  def stack(name: str, shape: tuple[int, ...], convert) -> np.ndarray:
    return np.stack([convert(reader.get(_layer_key(i, name), shape)) for i in range(cfg.n_layers)])

  offset = _norm_offset(_model_type(hf, cfg_file))
  to_scale = lambda x: x.astype(np.float32) + offset  # noqa: E731
  layers = {
      "attn_norm": stack("input_layernorm.weight", (d,), to_scale),
      "mlp_norm": stack("post_attention_layernorm.weight", (d,), to_scale),
      "wq": stack("self_attn.q_proj.weight", (h * k, d), lambda x: x.T.reshape(d, h, k)),
      "wk": stack("self_attn.k_proj.weight", (g * k, d), lambda x: x.T.reshape(d, g, k)),
      "wv": stack("self_attn.v_proj.weight", (g * k, d), lambda x: x.T.reshape(d, g, k)),
      "wo": stack("self_attn.o_proj.weight", (d, h * k), lambda x: x.T.reshape(h, k, d)),
      "w_gate": stack("mlp.gate_proj.weight", (f_, d), lambda x: x.T),
      "w_up": stack("mlp.up_proj.weight", (f_, d), lambda x: x.T),
      "w_down": stack("mlp.down_proj.weight", (d, f_), lambda x: x.T),
  }
  if cfg.qkv_bias:
    layers["bq"] = stack("self_attn.q_proj.bias", (h * k,), lambda x: x.reshape(h, k))
    layers["bk"] = stack("self_attn.k_proj.bias", (g * k,), lambda x: x.reshape(g, k))
    layers["bv"] = stack("self_attn.v_proj.bias", (g * k,), lambda x: x.reshape(g, k))
  params: dict[str, Any] = {
      "embed": reader.get("model.embed_tokens.weight", (v, d)),
      "final_norm": to_scale(reader.get("model.norm.weight", (d,))),
      "layers": layers,
  }
  if not cfg.tie_embeddings:
    params["lm_head"] = reader.get("lm_head.weight", (v, d)).T
  unused = sorted(
      key for key in set(reader.files) - reader.used
      if not key.endswith("rotary_emb.inv_freq")
      # Some writers keep the tied lm_head copy; it is the embedding by definition.
      and not (cfg.tie_embeddings and key == "lm_head.weight")
  )
  if unused:
    raise _fail(
        path,
        f"{len(unused)} tensors are not used by the {hf.get('model_type')} layout, e.g. "
        f"{unused[:3]}; the checkpoint has options jaxalign does not implement (biases, "
        "extra norms) or its config.json does not describe it.",
    )
  dtype = cfg.jnp_param_dtype
  params = _map(lambda x: np.ascontiguousarray(x).astype(dtype), params)
  return cfg, params


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
          "for this TransformerConfig (tie_embeddings / qkv_bias must match the params)."
      )
    for key in sorted(exp):
      walk(exp[key], got[key], f"{prefix}/{key}" if prefix else key)

  walk(expected, params, "")


def save_hf(path: str, cfg: TransformerConfig, params: dict, architecture: str,
            *, max_position_embeddings: int = 4096) -> None:
  """Writes config.json + model.safetensors loadable by transformers' from_pretrained.

  Tensors are written in the params' dtype. Qwen2 always has q/k/v biases, so a
  bias-free model saved as qwen2 gets exact zero biases.
  """
  hf = config_to_hf(cfg, architecture, max_position_embeddings)
  _check_params(cfg, params)
  d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  p = _map(np.asarray, params)
  lp = p["layers"]
  offset = _norm_offset(hf["model_type"])
  from_scale = lambda x: (x.astype(np.float32) - offset).astype(x.dtype)  # noqa: E731
  out: dict[str, np.ndarray] = {"model.embed_tokens.weight": p["embed"],
                                "model.norm.weight": from_scale(p["final_norm"])}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = p["lm_head"].T
  for i in range(cfg.n_layers):
    out[_layer_key(i, "input_layernorm.weight")] = from_scale(lp["attn_norm"][i])
    out[_layer_key(i, "post_attention_layernorm.weight")] = from_scale(lp["mlp_norm"][i])
    out[_layer_key(i, "self_attn.q_proj.weight")] = lp["wq"][i].reshape(d, h * k).T
    out[_layer_key(i, "self_attn.k_proj.weight")] = lp["wk"][i].reshape(d, g * k).T
    out[_layer_key(i, "self_attn.v_proj.weight")] = lp["wv"][i].reshape(d, g * k).T
    out[_layer_key(i, "self_attn.o_proj.weight")] = lp["wo"][i].reshape(h * k, d).T
    out[_layer_key(i, "mlp.gate_proj.weight")] = lp["w_gate"][i].T
    out[_layer_key(i, "mlp.up_proj.weight")] = lp["w_up"][i].T
    out[_layer_key(i, "mlp.down_proj.weight")] = lp["w_down"][i].T
    if hf["model_type"] == "qwen2":
      for name, heads in (("q", h), ("k", g), ("v", g)):
        bias = lp.get(f"b{name}")
        bias = (np.zeros((heads * k,), lp["wq"].dtype) if bias is None
                else bias[i].reshape(heads * k))
        out[_layer_key(i, f"self_attn.{name}_proj.bias")] = bias
  os.makedirs(path, exist_ok=True)
  out = {key: np.ascontiguousarray(x) for key, x in out.items()}
  save_file(out, os.path.join(path, _SINGLE), metadata={"format": "pt"})
  with open(os.path.join(path, _CONFIG), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)


# Short names used by the training code.
load = load_hf
save = save_hf
