"""What the experiment configs share (as big_vision's ``configs/common.py``): the
``get_config`` argument parser, model-size presets, the ``tiny`` / ``hh`` variants
with the ``runlocal`` switch, and the online-RL config builder.

The library's defaults are `jaxalign.config.base_config`; nothing here is read by
the library itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from jaxalign import config as config_lib


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
    # () = derived from the data: one bucket (48 tokens for prefix-shared pairs).
    c.data.buckets = ()
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
    c.data.buckets = ()  # derived from max_length and the layout
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


# Per algorithm: (rl overrides, iterations for tiny, iterations for hh).
_ALGOS = {
    "ppo": (dict(algorithm="ppo", group_size=1, kl_coef=0.05), 60, 1000),
    "grpo": (dict(algorithm="grpo", group_size=4, kl_coef=0.02, ppo_epochs=1,
                  num_minibatches=2), 40, 1000),
    "rloo": (dict(algorithm="rloo", group_size=4, kl_coef=0.05, ppo_epochs=1,
                  num_minibatches=2), 40, 1000),
    "rrhf": (dict(algorithm="rrhf", group_size=4, ppo_epochs=1, num_minibatches=1),
             40, 1000),
    "online_dpo": (dict(algorithm="online_dpo", group_size=2, kl_coef=0.1, ppo_epochs=1,
                        num_minibatches=1), 40, 1000),
    "gkd": (dict(algorithm="gkd", group_size=1, kl_coef=0.0, gkd_beta=0.5, ppo_epochs=1,
                 num_minibatches=1), 40, 1000),
}


def rl_config(algorithm: str, arg: str | None,
              recipes: dict[str, dict] | None = None) -> ml_collections.ConfigDict:
  """``arg``: ``tiny`` (default) or ``hh``, plus ``path=``, ``hf_path=``,
  ``reward_path=``, ``steps=``, ``runlocal``. ``recipes``: named sets of ``rl``
  overrides (a loss variant); ``arg`` picks one with ``recipe=NAME`` or, on the tiny
  task, as the variant word itself (``grpo.py:dapo`` = ``grpo.py:tiny,recipe=dapo``)."""
  recipes = recipes or {}
  a = parse_arg(arg, variant="tiny", path="", eval_path="", hf_path="",
                           reward_path="", steps=0, runlocal=False, recipe="")
  if a.variant in recipes and not a.recipe:
    a.variant, a.recipe = "tiny", a.variant
  if a.recipe and a.recipe not in recipes:
    raise ValueError(f"config argument recipe={a.recipe!r}: {algorithm} knows "
                     f"{sorted(recipes) or 'none'}.")
  if a.variant not in ("tiny", "hh"):
    raise ValueError(f"config argument variant {a.variant!r}: expected 'tiny' or 'hh'.")
  if a.variant == "hh" and not (a.path and a.reward_path):
    raise ValueError(f"the 'hh' variant needs path=<HH-RLHF .jsonl(.gz)> and "
                     f"reward_path=<reward run workdir>, e.g. --config experiments/"
                     f"{algorithm}.py:hh,path=/data/hh.jsonl.gz,reward_path=/runs/rm")
  overrides, tiny_steps, hh_steps = _ALGOS[algorithm]
  c = config_lib.base_config()
  c.loss = "dpo"  # unused by RL; keeps the shared validator's defaults consistent
  c.reference.kind = "initial"
  # apply_variant knows only the shared keys; it reads variant/path/hf_path/steps.
  shared = ml_collections.ConfigDict(
      {k: a[k] for k in ("variant", "path", "eval_path", "hf_path", "steps", "runlocal")})
  c = apply_variant(c, shared, num_steps=tiny_steps if a.variant == "tiny"
                               else hh_steps)
  c.eval.enabled = False  # RL metrics come from the rollouts themselves
  # tiny: auto (1e-3 from random init, 1e-6 from hf_path / init_from; OptimizerConfig).
  c.optimizer.learning_rate = config_lib.AUTO_LR if a.variant == "tiny" else 1e-6
  c.optimizer.warmup_steps = 0
  c.checkpoint.every_steps = max(c.num_steps // 4, 1)
  rl = {f.name: f.default for f in dataclasses.fields(config_lib.RLConfig)}
  rl.update(overrides)
  rl.update(recipes.get(a.recipe, {}))
  if a.variant == "tiny":
    c.data.batch_size = 32 if algorithm == "ppo" else 8
    rl.update(prompt_len=8, max_new_tokens=12)
  else:
    c.data.batch_size = 16 if algorithm == "ppo" else 8
    rl.update(prompt_len=192, max_new_tokens=64, reward="checkpoint",
              reward_path=a.reward_path,
              value_init="reward" if algorithm == "ppo" else "policy")
  if a.runlocal:
    # steps= wins over runlocal's 4 iterations (as in apply_variant): an explicit
    # step count must not be replaced without a word.
    c.num_steps = a.steps or 4
    c.checkpoint.every_steps = max(c.num_steps // 2, 1)
    c.data.batch_size = 8
    rl["num_minibatches"] = 1  # 8 rows cannot be split over 8 data-parallel devices twice
  c.rl = ml_collections.ConfigDict(rl)
  return c
