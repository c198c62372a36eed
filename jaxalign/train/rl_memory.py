"""The online-RL run's memory plan: bytes per device per model role, printed at
startup (`jaxalign.train.rl.setup`)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of ``tree`` (its shard of each sharded leaf)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") and x.sharding \
        else x.shape
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total


def memory_plan(state: Any, sampler: Any, teacher: Any = None) -> dict[str, int]:
  """Bytes per device per role (params, optimizer states, the KV cache) of an
  `rl.RLState`, its sampler and GKD's teacher params (None without one)."""
  plan = {"policy/params": bytes_per_device(state.policy.params),
          "policy/opt_state": bytes_per_device(state.policy.opt_state),
          # The engine also counts the prompt cache its program allocates.
          "sampler/kv_cache": sampler.kv_cache_bytes() if hasattr(sampler, "kv_cache_bytes")
                              else bytes_per_device(sampler._cache)}  # pylint: disable=protected-access
  if state.ref_params is not None and state.base is None:  # kl_coef = 0 builds none
    plan["reference/params"] = bytes_per_device(state.ref_params)
  if state.base is not None:  # LoRA: the policy's, reference's and value's weights
    plan["base/params"] = bytes_per_device(state.base)
  if state.value is not None:
    plan["value/params"] = bytes_per_device(state.value.params)
    plan["value/opt_state"] = bytes_per_device(state.value.opt_state)
  if state.reward_params is not None:
    plan["reward/params"] = bytes_per_device(state.reward_params)
  if teacher is not None:
    plan["teacher/params"] = bytes_per_device(teacher)
  plan["total"] = sum(plan.values())
  return plan
