"""What both trainers (`loop`, `rl`) build from a validated config before compiling.

* the tokenizer, and the check that it is the tokenizer of every checkpoint the run
  loads (policy, reference). Its ids must mean the same tokens to the model: a byte
  tokenizer's ids fed to a 49,152-token BPE model train without an error but on
  noise, so a mismatch stops the run here, naming both sides, before any data is
  tokenised;
* the optimizer (`make_optimizer`);
* the model (`build_model`: architecture, graphdef, init function, logical axes,
  weights loaded from ``model.hf_path``), its batch forward (`make_forward`) and
  graphdef (`graphdef`);
* the initial sharded `TrainState` (`initial_state`), the frozen reference params
  (`reference_params`) and params restored from another run's checkpoints
  (`restore_params`, e.g. a reward model);
* with LoRA (``model.lora.rank > 0``): the state trains only ``{"lora": adapters}``
  (plus a scalar model's fresh ``"head"``; `trainable_init`, `trainable_axes`), and
  the frozen base (`base_params`, stored in ``model.lora.base_dtype``) is an explicit
  argument of every step, where it is also the reference (adapters off). Checkpoints
  carry `base_fingerprint`; resuming against another base is an error
  (`check_base_fingerprint`).

The data stream is `jaxalign.train.stream`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import objectives as obj_lib
from jaxalign.train import state as state_lib

AUTO = "auto"
BYTE = "byte"


def tokenizer_spec(data_tokenizer: str, hf_path: str) -> str:
  """The tokenizer a run uses: ``auto`` means the checkpoint's own when ``hf_path`` is
  set, else the byte tokenizer (what random-init runs have always used)."""
  if data_tokenizer == AUTO:
    return hf_path or BYTE
  return data_tokenizer


def load_tokenizer(spec: str):
  """``byte``, a SentencePiece ``.model`` file trained by jaxalign, or a checkpoint
  directory (``tokenizer.json`` or ``tokenizer.model``, with its chat template)."""
  from jaxalign.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  if spec == BYTE:
    return tok_lib.ByteTokenizer()
  if os.path.isdir(spec):
    return tok_lib.from_pretrained(spec)
  if os.path.isfile(spec):
    return tok_lib.SentencePieceTokenizer.from_file(spec)
  raise ValueError(f"config.data.tokenizer={spec!r}: not 'auto', 'byte', a checkpoint "
                   "directory (tokenizer.json / tokenizer.model) or a SentencePiece "
                   ".model file. Use 'auto' to take model.hf_path's tokenizer.")


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON ({e}).") from None


def _ids(value: Any) -> set[int]:
  if value is None:
    return set()
  if isinstance(value, (list, tuple)):
    return {int(v) for v in value}
  return {int(value)}


def checkpoint_special_ids(hf_dir: str) -> dict[str, Any]:
  """vocab size, bos and eos ids a checkpoint's config.json / generation_config.json
  declare (eos may be several ids, e.g. Llama-3's end-of-turn and end-of-text)."""
  config = _read_json(os.path.join(hf_dir, "config.json"))
  config = config.get("text_config", config)  # Multimodal configs nest the LM's.
  gen = _read_json(os.path.join(hf_dir, "generation_config.json"))
  return {"vocab_size": config.get("vocab_size"),
          "bos": _ids(config.get("bos_token_id")) | _ids(gen.get("bos_token_id")),
          "eos": _ids(config.get("eos_token_id")) | _ids(gen.get("eos_token_id"))}


def _describe(tok: Any, spec: str) -> str:
  return (f"{spec!r} ({type(tok).__name__}, vocab {tok.vocab_size}, bos "
          f"{getattr(tok, 'bos_id', None)}, eos {getattr(tok, 'eos_id', None)})")


def check_tokenizer_matches(tok: Any, spec: str, hf_dir: str, key: str) -> None:
  """ValueError unless ``tok`` can be the tokenizer of the checkpoint at ``hf_dir``.

  Checked: every id the tokenizer can produce exists in the model's embedding, its
  EOS is one the checkpoint stops on, and its BOS is the checkpoint's.
  """
  ck = checkpoint_special_ids(hf_dir)
  problems = []
  if ck["vocab_size"] is not None and tok.vocab_size > int(ck["vocab_size"]):
    problems.append(f"the tokenizer has {tok.vocab_size} ids but the model's vocabulary "
                    f"has {ck['vocab_size']}")
  eos = getattr(tok, "eos_id", None)
  if ck["eos"] and eos is not None and int(eos) not in ck["eos"]:
    problems.append(f"the tokenizer's eos id {eos} is not the checkpoint's "
                    f"{sorted(ck['eos'])}")
  bos = getattr(tok, "bos_id", None)
  if ck["bos"] and bos is not None and int(bos) not in ck["bos"]:
    problems.append(f"the tokenizer's bos id {bos} is not the checkpoint's "
                    f"{sorted(ck['bos'])}")
  if problems:
    raise ValueError(
        f"config.data.tokenizer={_describe(tok, spec)} does not belong to config.{key}="
        f"{hf_dir!r} (vocab {ck['vocab_size']}, bos {sorted(ck['bos'])}, eos "
        f"{sorted(ck['eos'])}): " + "; ".join(problems) + ". Set data.tokenizer='auto' "
        "(or the checkpoint directory) to use the checkpoint's own tokenizer; models "
        "with different tokenizers in one run are not supported yet.")


def build_tokenizer(cfg: Any):
  """The run's tokenizer, checked against every checkpoint the run loads."""
  spec = tokenizer_spec(cfg.data.tokenizer, cfg.model.hf_path)
  tok = load_tokenizer(spec)
  if cfg.model.hf_path:
    check_tokenizer_matches(tok, spec, cfg.model.hf_path, "model.hf_path")
  if cfg.reference.kind == "hf" and cfg.reference.hf_path:
    check_tokenizer_matches(tok, spec, cfg.reference.hf_path, "reference.hf_path")
  return tok


# ----------------------------------------------------------------------------
# Optimizer.


def make_optimizer(opt_cfg, num_steps: int) -> optax.GradientTransformation:
  """optax chain from `OptimizerConfig`: clip, then adam(w)/sgd with a schedule
  (linear warmup, then constant / cosine / linear decay over the rest)."""
  peak = opt_cfg.learning_rate
  if not peak > 0:  # 0 is "auto": a config that skipped validation would not train
    raise ValueError(f"optimizer.learning_rate={peak}: 0 (auto) is resolved by "
                     "jaxalign.config.validate; pass a validated config or a rate > 0.")
  warm = min(opt_cfg.warmup_steps, max(num_steps - 1, 0))
  if opt_cfg.schedule == "constant":
    decay = optax.constant_schedule(peak)
  elif opt_cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, max(num_steps - warm, 1))
  else:
    decay = optax.linear_schedule(peak, 0.0, max(num_steps - warm, 1))
  lr = (optax.join_schedules([optax.linear_schedule(0.0, peak, warm), decay], [warm])
        if warm else decay)
  if opt_cfg.name == "adamw":
    opt = optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                      weight_decay=opt_cfg.weight_decay)
  elif opt_cfg.name == "adam":
    opt = optax.adam(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)
  else:
    opt = optax.sgd(lr)
  if opt_cfg.grad_clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip_norm), opt)
  return opt


# ----------------------------------------------------------------------------
# Model.


def graphdef(arch: Any) -> Any:
  """The NNX graphdef of a `TransformerConfig`, without allocating any weights."""
  from jaxalign.models import transformer  # pylint: disable=g-import-not-at-top
  box = []
  jax.eval_shape(lambda k: box.append(transformer.init(arch, k)[0]) or 0,
                 jax.random.key(0))
  return box[0]


@dataclasses.dataclass
class Model:
  """A model role's static parts. ``params`` pytrees are ``init_params(key)``'s
  structure: the transformer's params, or ``{"model": ..., "head": ...}`` with a
  scalar head (reward and value models)."""
  arch: Any  # TransformerConfig
  graphdef: Any
  init_params: Callable[[jax.Array], Any]  # key -> params pytree
  logical_axes: Any
  loaded_params: Any = None  # host params from model.hf_path
  head: str = "lm"
  lora: Any = None  # a models.lora.LoraConfig; None or rank 0: every weight trains

  @property
  def scalar(self) -> bool:
    return self.head == "scalar"

  @property
  def uses_lora(self) -> bool:
    return self.lora is not None and self.lora.enabled


def resolved_arch(model_cfg: Any) -> Any:
  """The architecture a ``ModelConfig`` builds: ``hf_path``'s config.json (no weights
  read), else the configured one."""
  if not model_cfg.hf_path:
    return model_cfg.arch
  from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
  path = os.path.join(model_cfg.hf_path, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"config.model.hf_path={model_cfg.hf_path!r}: no config.json; give "
                     "an HF checkpoint directory.")
  return hf.config_from_hf(_read_json(path), path)


def build_model(model_cfg: Any, vocab_size: int) -> Model:
  """The `Model` of a ``ModelConfig``: ``hf_path``'s architecture and weights, or the
  configured architecture (random init); ``head="scalar"`` adds a fresh reward head.
  ``init_from``: the weights of another run's checkpoint (`rundir.source_params`)
  on this architecture (which `rundir.check_init_source` compared with the source's);
  a reward model keeps the source's head when it has one."""
  from jaxalign.models import heads  # pylint: disable=g-import-not-at-top
  from jaxalign.models import transformer  # pylint: disable=g-import-not-at-top
  loaded = head = None
  if model_cfg.init_from:  # another run's weights (`rundir.source_params`)
    from jaxalign.train import rundir  # pylint: disable=g-import-not-at-top
    arch = resolved_arch(model_cfg)
    loaded, head, note = rundir.source_params(model_cfg.init_from)
    print(note + ("; its head is dropped (the trunk starts this policy)"
                  if head is not None and model_cfg.head != "scalar" else ""), flush=True)
  elif model_cfg.hf_path:
    from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
    arch, loaded = hf.load(model_cfg.hf_path)
  else:
    arch = model_cfg.arch
  if arch.vocab_size < vocab_size:
    raise ValueError(f"config.model.vocab_size={arch.vocab_size} is smaller than the "
                     f"data's vocabulary ({vocab_size}); raise it.")
  init_lm = lambda key: transformer.init(arch, key)[1]
  if model_cfg.head == "scalar":
    def init_params(key):
      k1, k2 = jax.random.split(key)
      return {"model": init_lm(k1), "head": heads.init_head(arch.d_model, k2)}
    axes = {"model": transformer.logical_axes(arch), "head": heads.head_logical_axes()}
    loaded = None if loaded is None else {"model": loaded, "head": head}
  else:
    init_params = init_lm
    axes = transformer.logical_axes(arch)
  return Model(arch=arch, graphdef=graphdef(arch), init_params=init_params,
               logical_axes=axes, loaded_params=loaded, head=model_cfg.head,
               lora=getattr(model_cfg, "lora", None))


def make_forward(model: Model, activation_sharding: Any = None) -> obj_lib.ForwardFn:
  """``forward(params, batch) -> (hidden, unembed)`` of a model role (`Model`);
  ``activation_sharding`` pins the residual stream to the batch sharding, so under
  fsdp the weights are all-gathered, not the activations (docs/scale_out.md,
  section 8). With LoRA, params holding adapters under ``objectives.LORA_KEY`` run
  with them, the bare base without (`objectives.model_forward_fn`)."""
  return obj_lib.model_forward_fn(model.graphdef, activation_sharding,
                                  params_key="model" if model.scalar else None,
                                  lora_config=model.lora if model.uses_lora else None)


# ----------------------------------------------------------------------------
# State and reference.


def _as_f32(tree: Any) -> Any:
  return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), tree)


def merge_loaded(fresh: Any, loaded: Any) -> Any:
  """Loaded HF weights, keeping freshly initialised leaves where none were loaded
  (a new reward head)."""
  if loaded is None:
    return fresh
  if isinstance(fresh, dict):
    return {k: merge_loaded(v, loaded.get(k) if isinstance(loaded, dict) else None)
            for k, v in fresh.items()}
  return loaded


def initial_state(model: Model, optimizer, mesh, rules, key
                  ) -> tuple[state_lib.TrainState, state_lib.TrainState]:
  """``(state, shardings)`` of step 0, placed straight into its shardings: random
  init, or ``model.hf_path``'s weights (f32 master copy) with fresh leaves where the
  checkpoint has none. With LoRA: fresh adapters (and head); see `base_params`."""
  if model.uses_lora:
    return state_lib.init_train_state(trainable_init(model), optimizer,
                                      trainable_axes(model), mesh, key, rules)
  if model.loaded_params is None:
    return state_lib.init_train_state(model.init_params, optimizer, model.logical_axes,
                                      mesh, key, rules)
  _, shardings = state_lib.state_shardings(model.init_params, optimizer,
                                           model.logical_axes, mesh, rules)
  params_key, rng = jax.random.split(key)
  fresh = jax.jit(model.init_params, out_shardings=shardings.params)(params_key)
  params = jax.device_put(_as_f32(merge_loaded(fresh, model.loaded_params)),
                          shardings.params)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=opt_state, rng=rng)
  return state, shardings


def copy_params(params: Any, shardings: Any) -> Any:
  """A real copy of ``params`` in ``shardings`` (a train step donates, and so deletes,
  the state's own buffers)."""
  return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params)


def reference_params(reference: Any, model: Model, key, shardings) -> Any:
  """The frozen reference of a ``ReferenceConfig``: ``hf_path``'s weights for
  ``kind="hf"``, else the initial policy, recomputed bit-identically from the seed
  (the same key split as `initial_state`) or from ``model.hf_path``."""
  if reference.kind == "hf":
    from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
    _, params = hf.load(reference.hf_path)
    return jax.device_put(params, shardings)
  fresh = jax.jit(model.init_params, out_shardings=shardings)(jax.random.split(key)[0])
  if model.loaded_params is None:
    return fresh
  return jax.device_put(_as_f32(merge_loaded(fresh, model.loaded_params)), shardings)


def state_shardings(model: Model, optimizer, mesh, rules
                    ) -> tuple[state_lib.TrainState, state_lib.TrainState]:
  """``(abstract state, shardings)`` of what the run trains (`trainable_init`)."""
  return state_lib.state_shardings(trainable_init(model), optimizer,
                                   trainable_axes(model), mesh, rules)


# ----------------------------------------------------------------------------
# LoRA: what trains, the frozen base, and the base's fingerprint.


def trainable_init(model: Model) -> Callable[[jax.Array], Any]:
  """``key -> params`` the optimizer trains: every weight, or with LoRA
  ``{"lora": adapters}`` (B = 0, so step 0 is the base) plus a scalar model's
  fresh ``"head"``."""
  if not model.uses_lora:
    return model.init_params
  from jaxalign.models import heads  # pylint: disable=g-import-not-at-top
  from jaxalign.models import lora as lora_lib  # pylint: disable=g-import-not-at-top

  def init(key):
    k_lora, k_head = jax.random.split(key)
    out = {obj_lib.LORA_KEY: lora_lib.init(model.arch, model.lora, k_lora)}
    if model.scalar:
      out["head"] = heads.init_head(model.arch.d_model, k_head)
    return out
  return init


def trainable_axes(model: Model) -> Any:
  """Logical axes of `trainable_init`'s tree (adapters: those of their weights)."""
  if not model.uses_lora:
    return model.logical_axes
  from jaxalign.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  out = {obj_lib.LORA_KEY: lora_lib.logical_axes(model.arch, model.lora)}
  if model.scalar:
    out["head"] = model.logical_axes["head"]
  return out


def _base_part(model: Model, tree: Any) -> Any:
  """The frozen part of a full params-shaped tree: all but a scalar model's head."""
  return {"model": tree["model"]} if model.scalar else tree


def base_params(model: Model, mesh, rules, key) -> tuple[Any, Any]:
  """``(base, shardings)``: a LoRA run's frozen base in ``model.lora.base_dtype``,
  placed by the policy's rules (it is the policy's weights, and its reference):
  ``model.hf_path``'s weights, or the seed's init (the key split of `initial_state`,
  so the base is the initial policy a full fine-tune would start from)."""
  dtype = jnp.dtype(model.lora.base_dtype)
  init = lambda k: jax.tree.map(lambda p: p.astype(dtype),  # noqa: E731
                                _base_part(model, model.init_params(k)))
  abstract = jax.eval_shape(init, key)
  shardings = mesh_lib.param_shardings(_base_part(model, model.logical_axes), mesh,
                                       rules, abstract)
  if model.loaded_params is None:
    return jax.jit(init, out_shardings=shardings)(jax.random.split(key)[0]), shardings
  host = jax.tree.map(lambda p: np.asarray(p).astype(dtype),
                      _base_part(model, model.loaded_params))
  return jax.device_put(host, shardings), shardings


def base_fingerprint(model_cfg: Any, arch: Any, seed: int) -> dict[str, str]:
  """What identifies a LoRA run's base, for its checkpoints' metadata: the bytes of
  ``model.hf_path``'s files, or the architecture and seed of a random init."""
  from jaxalign.train import refcache  # pylint: disable=g-import-not-at-top
  if model_cfg.init_from:
    source = f"model.init_from={model_cfg.init_from!r}"
    digest = refcache.init_from_fingerprint(model_cfg.init_from)
  elif model_cfg.hf_path:
    source = f"model.hf_path={model_cfg.hf_path!r}"
    digest = refcache.fingerprint_files([model_cfg.hf_path])
  else:
    source = f"random init (seed {seed})"
    blob = json.dumps({"arch": dataclasses.asdict(arch), "seed": seed}, sort_keys=True,
                      default=repr)
    digest = hashlib.sha256(blob.encode()).hexdigest()
  return {"lora_base": digest[:32], "lora_base_source": source}


def check_base_fingerprint(meta: dict, expected: dict[str, str], where: str) -> None:
  """ValueError unless the checkpoint metadata ``meta`` names the base ``expected``."""
  got = meta.get("lora_base")
  if got == expected["lora_base"]:
    return
  theirs = (f"the base {meta.get('lora_base_source')} (fingerprint {got})" if got
            else "no base fingerprint (not a LoRA checkpoint)")
  raise ValueError(
      f"{where}: the checkpoint's adapters belong to {theirs}, but this run's base is "
      f"{expected['lora_base_source']} (fingerprint {expected['lora_base']}). Resume "
      "with the base the adapters were trained on, or start in a new workdir.")


def restore_params(run_dir: str, model: Model, optimizer, mesh, rules, *,
                   key: str) -> Any:
  """The params of the latest checkpoint of the run in ``run_dir`` (a workdir), read
  straight into their shardings; ``key`` names the config key that gave the path."""
  from jaxalign import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  abstract, sh = state_lib.state_shardings(model.init_params, optimizer,
                                           model.logical_axes, mesh, rules)
  path = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(path):
    raise ValueError(f"config.{key}={run_dir!r}: no checkpoints/ folder; give the "
                     "workdir of a finished jaxalign run.")
  with ckpt_lib.Checkpointer(path, save_every=1, keep=1000) as ck:
    restored = ck.restore(state_lib.abstract_tree(abstract, sh))
  return restored.state["params"]
