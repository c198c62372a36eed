"""LoRA: low-rank adapters on the transformer's projections (Hu et al. 2021, arXiv:2106.09685).

A frozen weight W gets a trainable low-rank update; in the paper's [out, in] notation

  W' = W + (alpha / r) B A,     A: [r, in],  B: [out, r],  r << min(in, out)

and in jaxalign's [in..., out...] layout (`transformer.py`, weights are applied as x @ W)

  y = x W + (alpha / r) (x A) B,   A: [in..., r],  B: [r, out...]

A starts uniform in +-1/sqrt(fan_in) (peft's kaiming_uniform(a=sqrt(5))) and B at zero,
so an untrained adapter is exactly the base model. Dropout (rate ``dropout``) acts on
the adapter's input x only, as in peft.

Adapters are a separate pytree, never part of the NNX graph: ``{weight name: {"a": [L,
in..., r], "b": [L, r, out...]}}`` with one entry per target (``wq`` for ``q`` and so
on), stacked over layers like the weights they modify, so the one layer scan slices both
together. `transformer.forward(..., lora=Adapters(params, config, rng))` applies them
unmerged inside each layer: the backward pass then never forms a full [in, out] weight
gradient, only the [tokens, r] intermediates. `merge` folds them into the weights (for
export), and `save_peft` writes the PEFT layout (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads on the
transformers base.

Why not a library: qwix's LoRA intercepts dot_general / einsum calls of NNX modules and
finds the weight operand among the calling module's attributes; inside the layer scan the
operands are per-layer slices (tracers), so it neither finds them nor can create one
adapter per layer, and it adds the adapters to the module graph. ``flax.nnx.LoRA`` is a
2-D ``x @ A @ B`` module with no alpha / r scale or dropout, and using it would also put
the adapters into the graph and the stacked layers through ``nnx.vmap``. Both would
trade the separate, explicit adapter pytree for a few lines of arithmetic.

Logical axes: A carries the weight's input axes, B its output axes (e.g. wq's A is
``("layers", "embed", "lora_rank")``, B ``("layers", "lora_rank", "heads", "head_dim")``),
so adapters shard by the same rules as the weights; ``lora_rank`` has no rule by default
(replicated).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# Config target name -> the transformer's weight (docs/architecture.md, section 1).
TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up",
           "down": "w_down"}
# Input (contracted) dimensions of each weight after its leading layer axis.
_N_IN = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
# The HF module each weight is (Llama, Mistral, Qwen2/3, Gemma 1-3 share the names).
HF_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
              "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
              "w_down": "mlp.down_proj"}
RANK_AXIS = "lora_rank"
# The name (jax.ad_checkpoint.checkpoint_name) of every projection's output in a
# forward with adapters; see `remat_policy`.
PROJECTION_NAME = "lora_projection"
BASE_DTYPES = ("float32", "bfloat16")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which projections get adapters and how they scale; ``rank=0`` is off.

  ``rank`` r, ``alpha`` (the update is scaled by alpha / r), ``dropout`` on the
  adapter input, ``targets`` among q, k, v, o, gate, up, down, and ``base_dtype``: the
  storage dtype of the frozen base in training (``"float32"`` or ``"bfloat16"``; the
  compute dtype stays the model's ``dtype``).
  """

  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = tuple(TARGETS)
  base_dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
      raise ValueError(f"lora.rank={self.rank!r}: an int >= 0 (0 = LoRA off).")
    if not self.alpha > 0:
      raise ValueError(f"lora.alpha={self.alpha!r}: must be > 0 (the update is scaled "
                       "by alpha / rank).")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"lora.dropout={self.dropout!r}: must be in [0, 1).")
    bad = [t for t in self.targets if t not in TARGETS]
    if bad or not self.targets or len(set(self.targets)) != len(self.targets):
      raise ValueError(
          f"lora.targets={self.targets!r}: " + (f"unknown target(s) {bad}; " if bad else
                                                 "give each target once; ")
          + f"valid targets are {tuple(TARGETS)}.")
    if self.base_dtype not in BASE_DTYPES:
      raise ValueError(f"lora.base_dtype={self.base_dtype!r}: one of {BASE_DTYPES}.")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    """alpha / r, the factor of the low-rank update."""
    return self.alpha / self.rank

  @property
  def weights(self) -> tuple[str, ...]:
    """The transformer weights that get adapters, in `TARGETS` order."""
    return tuple(w for t, w in TARGETS.items() if t in self.targets)


def _layer_axes(arch: Any) -> dict:
  from jaxalign.models import transformer  # pylint: disable=g-import-not-at-top
  return transformer.logical_axes(arch)["layers"]


def logical_axes(arch: Any, lcfg: LoraConfig) -> dict:
  """The adapters' logical axes: A takes the weight's input axes, B its output axes."""
  layer_axes = _layer_axes(arch)
  out = {}
  for name in lcfg.weights:
    axes, n_in = layer_axes[name], _N_IN[name]
    out[name] = {"a": (axes[0],) + axes[1:1 + n_in] + (RANK_AXIS,),
                 "b": (axes[0], RANK_AXIS) + axes[1 + n_in:]}
  return out


def shapes(arch: Any, lcfg: LoraConfig) -> dict:
  """``{name: {"a": shape, "b": shape}}`` of the adapters of `arch` (a TransformerConfig)."""
  l, d, h, g, k, f = (arch.n_layers, arch.d_model, arch.n_heads, arch.n_kv_heads,
                      arch.head_dim, arch.mlp_dim)
  weight = {"wq": (l, d, h, k), "wk": (l, d, g, k), "wv": (l, d, g, k), "wo": (l, h, k, d),
            "w_gate": (l, d, f), "w_up": (l, d, f), "w_down": (l, f, d)}
  out = {}
  for name in lcfg.weights:
    w, n_in = weight[name], _N_IN[name]
    out[name] = {"a": w[:1 + n_in] + (lcfg.rank,), "b": (w[0], lcfg.rank) + w[1 + n_in:]}
  return out


def init(arch: Any, lcfg: LoraConfig, key: jax.Array, dtype: Any = jnp.float32) -> dict:
  """Fresh adapters: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0 (the base model)."""
  shape = shapes(arch, lcfg)
  sizes = [math.prod(s["a"]) for s in shape.values()]
  # One draw for every A: each random op is its own costly threefry program on CPU.
  u = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
  out, start = {}, 0
  for (name, s), size in zip(shape.items(), sizes):
    bound = 1.0 / math.sqrt(math.prod(s["a"][1:-1]))
    a = bound * u[start:start + size].reshape(s["a"])
    out[name] = {"a": a.astype(dtype), "b": jnp.zeros(s["b"], dtype)}
    start += size
  return out


def _matmul(x: jax.Array, w: jax.Array, n_contract: int) -> jax.Array:
  """x[..., c...] @ w[c..., o...] as one 2-D matmul (as `transformer._matmul_2d`)."""
  k_in = math.prod(w.shape[:n_contract])
  y = x.reshape(-1, k_in) @ w.reshape(k_in, -1)
  return y.reshape(*x.shape[:x.ndim - n_contract], *w.shape[n_contract:])


def delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float,
          n_contract: int = 1) -> jax.Array:
  """The low-rank update of one layer's projection: (alpha / r) (x A) B.

  ``a``: [in..., r], ``b``: [r, out...] (one layer's slices), ``x``: [..., in...]. The
  scale multiplies the [..., r] intermediate, the smallest array on the way.
  """
  xa = _matmul(x, a.astype(x.dtype), n_contract)
  return _matmul(xa * jnp.asarray(scale, x.dtype), b.astype(x.dtype), 1)


@flax.struct.dataclass
class Adapters:
  """What `transformer.forward(..., lora=...)` applies: the adapter params, their
  config (static) and a dropout key (None: no dropout, e.g. evaluation)."""

  params: dict
  config: LoraConfig = flax.struct.field(pytree_node=False)
  rng: jax.Array | None = None

  def scan_inputs(self, n_layers: int) -> tuple[dict, jax.Array | None]:
    """What the layer scan slices: the params and one dropout key per layer."""
    use_rng = self.rng is not None and self.config.dropout > 0
    keys = jax.random.split(self.rng, n_layers) if use_rng else None
    return self.params, keys

  def layer(self, sliced: tuple[dict, jax.Array | None]) -> "LayerAdapters":
    params, key = sliced
    return LayerAdapters(params, self.config.scale, self.config.dropout, key)


class LayerAdapters(NamedTuple):
  """One layer's adapters inside the scan."""

  params: dict
  scale: float
  dropout: float
  key: jax.Array | None

  def project(self, name: str, x: jax.Array, y: jax.Array, n_contract: int) -> jax.Array:
    """``y = x W`` plus this weight's update (unchanged when it has no adapter)."""
    if name not in self.params:
      return y
    if self.key is not None:
      keep = 1.0 - self.dropout
      mask = jax.random.bernoulli(jax.random.fold_in(self.key, list(TARGETS.values())
                                                     .index(name)), keep, x.shape)
      x = jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))
    ad = self.params[name]
    return y + delta(x, ad["a"], ad["b"], self.scale, n_contract).astype(y.dtype)


def remat_policy(remat: str) -> Any:
  """The layer's remat policy with adapters, for ``TransformerConfig.remat`` "dots" /
  "dots_with_no_batch_dims" (others need none: "full" saves nothing, "none" does not
  remat).

  Those policies save every dot's output; with adapters, (x A) B is a dot as large
  as x W, so every projection would be kept twice (measured: +0.46 GB per Llama-3-8B
  layer per device on v5p-64 before this policy). Instead the projections' sums
  x W + (alpha / r) (x A) B, named `PROJECTION_NAME` by the transformer, are saved
  (what the base model saves), plus, for "dots", the batched (attention) dots; the
  rank-r products are recomputed.
  """
  names = jax.checkpoint_policies.save_only_these_names(PROJECTION_NAME)
  if remat == "dots_with_no_batch_dims":
    return names

  def batched_dots(prim, *_, **params):
    return prim is jax.lax.dot_general_p and bool(params["dimension_numbers"][1][0])
  return jax.checkpoint_policies.save_from_both_policies(names, batched_dots)


def merge(params: dict, adapters: dict, lcfg: LoraConfig) -> dict:
  """The transformer params with every adapter folded in: W + (alpha / r) A B per layer
  (computed in f32, stored in W's dtype). For export and as an oracle of the unmerged
  forward."""
  layers = dict(params["layers"])
  for name, ad in adapters.items():
    w = layers[name]
    a = jnp.asarray(ad["a"], jnp.float32)
    b = jnp.asarray(ad["b"], jnp.float32)
    l, r = a.shape[0], a.shape[-1]
    ab = jnp.einsum("lir,lro->lio", a.reshape(l, -1, r), b.reshape(l, r, -1))
    layers[name] = (jnp.asarray(w, jnp.float32) + lcfg.scale * ab.reshape(w.shape)
                    ).astype(w.dtype)
  return {**params, "layers": layers}


# ----------------------------------------------------------------------------- export


def peft_tensors(arch: Any, adapters: dict) -> dict[str, np.ndarray]:
  """Adapter tensors under the names peft saves (``base_model.model.<HF module>
  .lora_A.weight`` [r, in], ``lora_B.weight`` [out, r]), one pair per layer and target."""
  out = {}
  for name, ad in adapters.items():
    a, b = np.asarray(ad["a"]), np.asarray(ad["b"])
    r = a.shape[-1]
    for i in range(arch.n_layers):
      prefix = f"base_model.model.model.layers.{i}.{HF_MODULES[name]}"
      out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
      out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
  return out


def peft_config(lcfg: LoraConfig, base_model: str = "") -> dict:
  """``adapter_config.json`` of `save_peft` (peft's LoraConfig fields)."""
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lcfg.rank,
      "lora_alpha": lcfg.alpha, "lora_dropout": lcfg.dropout,
      "target_modules": sorted(HF_MODULES[w].split(".")[-1] for w in lcfg.weights),
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
      "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
      "base_model_name_or_path": base_model or None,
  }


def save_peft(path: str, arch: Any, adapters: dict, lcfg: LoraConfig, *,
              base_model: str = "", dtype: Any = np.float32) -> None:
  """Writes the PEFT layout: ``adapter_config.json`` and ``adapter_model.safetensors``.

  ``peft.PeftModel.from_pretrained(transformers_base, path)`` then computes what
  ``transformer.forward(..., lora=Adapters(adapters, lcfg))`` does; ``base_model`` (the
  base checkpoint's directory or hub name) is recorded for peft's loaders.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if set(adapters) != set(lcfg.weights):
    raise ValueError(f"save_peft: adapters for {sorted(adapters)} but the LoraConfig "
                     f"targets {list(lcfg.weights)}; pass the config they were trained with.")
  expected = shapes(arch, lcfg)
  for name, ad in adapters.items():
    got = {k: tuple(np.shape(v)) for k, v in ad.items()}
    if got != {k: tuple(v) for k, v in expected[name].items()}:
      raise ValueError(f"save_peft: adapters[{name!r}] has shapes {got}, the "
                       f"TransformerConfig and LoraConfig give {expected[name]}.")
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), dtype), adapters)
  os.makedirs(path, exist_ok=True)
  save_file(peft_tensors(arch, host), os.path.join(path, ADAPTER_WEIGHTS),
            metadata={"format": "pt"})
  with open(os.path.join(path, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
    json.dump(peft_config(lcfg, base_model), f, indent=2, sort_keys=True)


def save_merged(path: str, arch: Any, params: dict, adapters: dict, lcfg: LoraConfig,
                architecture: str) -> None:
  """The merged weights (`merge`) as an ordinary HF directory (`hf.save_hf`)."""
  from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
  merged = merge(jax.device_get(params), jax.device_get(adapters), lcfg)
  hf.save_hf(path, arch, jax.tree.map(np.asarray, merged), architecture)
