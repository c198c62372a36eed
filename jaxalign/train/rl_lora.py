"""LoRA for online RL (``model.lora.rank > 0``): what trains, what stays frozen, and
the resume check. `jaxalign.train.rl` calls these when the policy uses LoRA.

* **Policy**: its `TrainState` holds only ``{"lora": adapters}`` and their optimizer
  state (`build.trainable_init`; B = 0, so the first rollout is the base's).
* **Base**: the policy's weights (`build.base_params`, stored in
  ``model.lora.base_dtype``), held once, in no `TrainState`: the steps take it as a
  separate argument (`rl_steps.with_base`) and never differentiate it.
* **Reference**: the base with the adapters off -- the same buffers, no second copy
  (``RLState.ref_params`` *is* ``RLState.base``).
* **Value model** (PPO): the same base with its own adapters and a fresh scalar head,
  ``{"lora": value adapters, "head": head}``; only those train. A separate full value
  model would bring back a full copy of the weights and its Adam moments (about three
  times the model), which LoRA is meant to avoid; sharing the policy's adapters would
  couple the policy and value losses. ``rl.value_init='reward'`` (a copy of a full
  reward model) has no such form and `jaxalign.config.validate_rl` refuses it.
* **Sampler**: decodes with the adapters unmerged (`jaxalign.models.sampling`).
* **Checkpoints** hold the adapters, heads, optimizer states, iteration, KL
  coefficient and key (no base); their meta carries the base's fingerprint
  (`build.base_fingerprint`), and a resume on another base is an error naming both.
"""

from __future__ import annotations

from typing import Any

from jaxalign.train import build
from jaxalign.train import state as state_lib


def initial_states(policy: build.Model, scalar: build.Model | None, optimizer, mesh,
                   rules, k_policy, k_value, uses_value: bool):
  """``(policy state, value state or None, base, the sampler's param shardings)`` of
  iteration 0. ``k_policy`` is the key a full fine-tune's policy init takes, so the
  base is the initial policy such a run would start from."""
  policy_state, policy_sh = build.initial_state(policy, optimizer, mesh, rules, k_policy)
  base, base_sh = build.base_params(policy, mesh, rules, k_policy)
  value = None
  if uses_value:
    value, _ = state_lib.init_train_state(build.trainable_init(scalar), optimizer,
                                          build.trainable_axes(scalar), mesh, k_value,
                                          rules)
  return policy_state, value, base, {**base_sh, **policy_sh.params}


def base_id(cfg: Any, policy: build.Model) -> dict[str, str]:
  """The checkpoint meta naming a LoRA run's base; empty without LoRA."""
  if not policy.uses_lora:
    return {}
  return build.base_fingerprint(cfg.model, policy.arch, cfg.seed)


def check_resume(ckpt: Any, step: int, expected: dict[str, str]) -> None:
  """ValueError, before anything is read, when checkpoint ``step``'s adapters belong
  to another base than this run's (or the checkpoint is a full fine-tune's)."""
  if expected:
    build.check_base_fingerprint(ckpt.read_meta(step), expected,
                                 f"{ckpt.directory} step {step}")


def reattach(restored: Any, fresh: Any) -> Any:
  """A restored `rl.RLState` with the fresh state's base (and the reference, which is
  the base): neither is in a LoRA checkpoint."""
  if fresh.base is None:
    return restored
  return restored.replace(base=fresh.base, ref_params=fresh.ref_params)
