"""Shared builder of the online-RL experiment configs (experiments/{ppo,grpo,rloo,
rrhf_online}.py): the base ConfigDict plus an ``rl`` section (`rl.RLConfig` fields)."""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxalign import config as config_lib
from jaxalign.train import rl as rl_lib

# Per algorithm: (rl overrides, iterations for tiny, iterations for hh).
_ALGOS = {
    "ppo": (dict(algorithm="ppo", group_size=1, kl_coef=0.05), 60, 1000),
    "grpo": (dict(algorithm="grpo", group_size=4, kl_coef=0.02, ppo_epochs=1,
                  num_minibatches=2), 40, 1000),
    "rloo": (dict(algorithm="rloo", group_size=4, kl_coef=0.05, ppo_epochs=1,
                  num_minibatches=2), 40, 1000),
    "rrhf": (dict(algorithm="rrhf", group_size=4, ppo_epochs=1, num_minibatches=1),
             40, 1000),
}


def make(algorithm: str, arg: str | None) -> ml_collections.ConfigDict:
  """``arg``: ``tiny`` (default) or ``hh``, plus ``path=``, ``hf_path=``,
  ``reward_path=``, ``steps=``, ``runlocal``."""
  a = config_lib.parse_arg(arg, variant="tiny", path="", eval_path="", hf_path="",
                           reward_path="", steps=0, runlocal=False)
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
  c = config_lib.apply_variant(c, shared, num_steps=tiny_steps if a.variant == "tiny"
                               else hh_steps)
  c.eval.enabled = False  # RL metrics come from the rollouts themselves
  c.optimizer.learning_rate = 1e-3 if a.variant == "tiny" else 1e-6
  c.optimizer.warmup_steps = 0
  c.checkpoint.every_steps = max(c.num_steps // 4, 1)
  rl = {f.name: f.default for f in dataclasses.fields(rl_lib.RLConfig)}
  rl.update(overrides)
  if a.variant == "tiny":
    c.data.batch_size = 32 if algorithm == "ppo" else 8
    rl.update(prompt_len=8, max_new_tokens=12)
  else:
    c.data.batch_size = 16 if algorithm == "ppo" else 8
    rl.update(prompt_len=192, max_new_tokens=64, reward="checkpoint",
              reward_path=a.reward_path,
              value_init="reward" if algorithm == "ppo" else "policy")
  if a.runlocal:
    c.num_steps = 4
    c.checkpoint.every_steps = 2
    c.data.batch_size = 8
    rl["num_minibatches"] = 1  # 8 rows cannot be split over 8 data-parallel devices twice
  c.rl = ml_collections.ConfigDict(rl)
  return c
