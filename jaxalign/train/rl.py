"""Online RLHF: PPO with four models, GRPO, RLOO and online RRHF.

One iteration (all algorithms):

  prompts --Sampler (KV cache, the policy's current sharded params)--> completions
  --score_rollout (jit)--> old / reference log-probs, values, reward-model scores
  (or the synthetic task's oracle reward on the host) --advantages--> epochs of
  shuffled minibatches of ``update_step`` (jit, donated states).

* ``ppo``: per-token KL penalty (k1 or k3) added to the rewards, the score at the last
  response token, GAE, whitened advantages, clipped policy and value losses; a value
  model with its own params and optimizer (initialised from the reward model or from
  the policy with a fresh head, ``rl.value_init``); fixed or adaptive KL coefficient.
* ``grpo``: ``group_size`` completions per prompt, group-normalised scores as the
  advantage of every token, clipped policy loss plus ``kl_coef * k3`` in the loss.
* ``rloo``: scores minus ``kl_coef * sum_t k1`` per sequence, leave-one-out baseline,
  clipped policy loss.
* ``rrhf``: ``group_size`` completions per prompt ranked by score, the RRHF loss.

All loss maths come from ``jaxalign.losses`` (KL estimators, shaped rewards, GAE,
whitening, clipped losses, KL controller, group baselines, RRHF); policy-gradient
losses are token-level masked means over the minibatch.

Sequences are ``[B, P + N]``: left-padded prompts (bucket P, ``rl.prompt_len``) then
N = ``rl.max_new_tokens`` completion slots (see `jaxalign.models.sampling`). The
hidden state at slot ``P - 1 + t`` predicts completion token t, so log-probs, entropies
and values are all read from ``hidden[:, P-1 : P+N-1]``.

Config: the ``rl`` section of an experiment ConfigDict (fields of `RLConfig`); the
rest of the ConfigDict (model, optimizer, mesh, checkpoint, log, data.task, seed,
num_steps = iterations) is validated by `jaxalign.config.validate`. `validate_rl` is
the one function that reads the ``rl`` keys. Entry point: `run_rl(config, workdir)`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxalign import checkpoint as ckpt_lib
from jaxalign import config as config_lib
from jaxalign import losses
from jaxalign.data import synthetic
from jaxalign.models import heads
from jaxalign.models import sampling
from jaxalign.models import transformer as tfm
from jaxalign.ops import logprobs as lp_lib
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import build
from jaxalign.train import logging as log_lib
from jaxalign.train import state as state_lib
from jaxalign.train import steps as steps_lib

Array = jax.Array

ALGORITHMS = ("ppo", "grpo", "rloo", "rrhf")
REWARDS = ("oracle", "checkpoint")
VALUE_INITS = ("policy", "reward")


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The ``rl`` section.

  Rollouts: ``data.batch_size`` prompts per iteration, ``group_size`` completions each
  (rows B = batch_size * group_size), prompts left-padded to ``prompt_len``, up to
  ``max_new_tokens`` new tokens drawn with ``temperature`` / ``top_k`` / ``top_p``.
  Updates: ``ppo_epochs`` passes of ``num_minibatches`` shuffled minibatches.
  Reward: ``"oracle"`` (the synthetic task, ``data.task.*``) or ``"checkpoint"`` (a
  scalar-head reward model trained by ``experiments/reward.py``: its workdir in
  ``reward_path``; same model architecture and optimizer name as this config).
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
  kl_estimator: str = "k1"
  adaptive_kl: bool = False
  kl_target: float = 6.0
  kl_horizon: float = 10000.0
  grpo_scale_by_std: bool = True
  rrhf_rank_weight: float = 1.0
  rrhf_sft_weight: float = 1.0
  rrhf_length_penalty: float = 1.0
  reward: str = "oracle"
  reward_path: str = ""
  value_init: str = "policy"
  logprob_chunk_size: int = 1024

  @property
  def uses_value(self) -> bool:
    return self.algorithm == "ppo"


def _rl_err(key: str, msg: str) -> ValueError:
  return ValueError(f"config.rl.{key}: {msg}")


def validate_rl(config: ml_collections.ConfigDict | dict, num_devices: int
                ) -> tuple[config_lib.Config, RLConfig]:
  """Validates an RL experiment ConfigDict: the ``rl`` section into `RLConfig`, the
  rest through `jaxalign.config.validate`. Unknown keys / impossible values raise a
  ValueError naming the key."""
  raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  if "rl" not in raw:
    raise ValueError("config.rl: an RL experiment needs an 'rl' section (see "
                     "jaxalign.train.rl.RLConfig).")
  rl_raw = dict(raw.pop("rl"))
  fields = {f.name: f for f in dataclasses.fields(RLConfig)}
  kwargs = {}
  for k, v in rl_raw.items():
    if k not in fields:
      raise _rl_err(k, f"unknown key; valid keys are {sorted(fields)}.")
    default = fields[k].default
    if isinstance(default, bool):
      if not isinstance(v, (bool, np.bool_)):
        raise _rl_err(k, f"expected a bool, got {v!r}.")
    elif isinstance(default, int):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise _rl_err(k, f"expected an int, got {v!r}.")
    elif isinstance(default, float):
      if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
        raise _rl_err(k, f"expected a number, got {v!r}.")
      v = float(v)
    elif isinstance(default, str) and not isinstance(v, str):
      raise _rl_err(k, f"expected a string, got {v!r}.")
    kwargs[k] = v
  rl = RLConfig(**kwargs)
  cfg = config_lib.validate(ml_collections.ConfigDict(raw), num_devices)

  for key, choices in (("algorithm", ALGORITHMS), ("reward", REWARDS),
                       ("value_init", VALUE_INITS),
                       ("kl_estimator", tuple(losses.KL_ESTIMATORS))):
    if getattr(rl, key) not in choices:
      raise _rl_err(key, f"{getattr(rl, key)!r} is not one of {choices}.")
  for key in ("prompt_len", "max_new_tokens", "ppo_epochs", "num_minibatches",
              "group_size", "logprob_chunk_size"):
    if getattr(rl, key) < 1:
      raise _rl_err(key, f"must be >= 1, got {getattr(rl, key)}.")
  if not rl.temperature > 0:
    raise _rl_err("temperature", f"must be > 0, got {rl.temperature}.")
  if not 0 < rl.top_p <= 1:
    raise _rl_err("top_p", f"must be in (0, 1], got {rl.top_p}.")
  for key in ("clip_eps", "clip_value", "kl_target", "kl_horizon"):
    if not getattr(rl, key) > 0:
      raise _rl_err(key, f"must be > 0, got {getattr(rl, key)}.")
  for key in ("kl_coef", "vf_coef", "top_k"):
    if getattr(rl, key) < 0:
      raise _rl_err(key, f"must be >= 0, got {getattr(rl, key)}.")
  if not (0 <= rl.gamma <= 1 and 0 <= rl.lam <= 1):
    raise _rl_err("gamma", f"gamma={rl.gamma} and lam={rl.lam} must be in [0, 1].")
  if rl.algorithm in ("grpo", "rloo", "rrhf") and rl.group_size < 2:
    raise _rl_err("group_size", f"{rl.algorithm} compares completions of one prompt: "
                  f"needs group_size >= 2, got {rl.group_size}.")
  if rl.reward == "checkpoint" and not rl.reward_path:
    raise _rl_err("reward_path", "rl.reward='checkpoint' needs the workdir of a "
                  "reward-model run (experiments/reward.py).")
  if rl.reward == "oracle" and cfg.data.source != "synthetic":
    raise _rl_err("reward", "the oracle reward exists only for data.source="
                  "'synthetic'; use rl.reward='checkpoint' for other data.")
  if rl.uses_value and rl.value_init == "reward" and rl.reward != "checkpoint":
    raise _rl_err("value_init", "value_init='reward' needs a reward model "
                  "(rl.reward='checkpoint'); use value_init='policy' with the oracle.")
  if cfg.model.head != "lm":
    raise ValueError("config.model.head: the RL policy needs head='lm'.")
  rows = cfg.data.batch_size * rl.group_size
  dp = int(np.prod(cfg.mesh.axis_sizes(num_devices)[:2]))
  if rows % (rl.num_minibatches * dp):
    raise _rl_err("num_minibatches", f"rows per iteration data.batch_size*group_size="
                  f"{rows} must split into {rl.num_minibatches} minibatches divisible by "
                  f"the data-parallel size {dp}.")
  if rl.algorithm == "rrhf" and cfg.data.batch_size % rl.num_minibatches:
    raise _rl_err("num_minibatches", f"rrhf splits prompts: data.batch_size="
                  f"{cfg.data.batch_size} must be divisible by {rl.num_minibatches}.")
  if cfg.data.source == "synthetic":
    longest = synthetic.SyntheticTaskConfig().prompt_len_range[1] + 1
    if rl.prompt_len < longest:
      raise _rl_err("prompt_len", f"{rl.prompt_len} is shorter than the task's "
                    f"longest prompt ({longest} tokens with BOS).")
  return cfg, rl


# ----------------------------------------------------------------------------- pure steps


def response_hidden(fwd: Callable, params: Any, batch: dict, prompt_len: int) -> tuple:
  """(hidden at the N slots predicting the completion [B, N, D], unembed [D, V])."""
  hidden, unembed = fwd(params, batch["sequences"], batch["positions"], batch["segments"])
  n = batch["mask"].shape[1]
  return hidden[:, prompt_len - 1:prompt_len - 1 + n], unembed


def response_logprobs(fwd: Callable, params: Any, batch: dict, *, prompt_len: int,
                      temperature: float, chunk_size: int) -> tuple[Array, Array]:
  """Token log-probs and entropies [B, N] of the completions under logits / T."""
  h, unembed = response_hidden(fwd, params, batch, prompt_len)
  if temperature != 1.0:
    h = h / jnp.asarray(temperature, h.dtype)  # the unembedding is linear
  targets = batch["sequences"][:, prompt_len:]
  return lp_lib.token_logprobs(h, unembed, targets, chunk_size=chunk_size,
                               with_entropy=True)


def response_values(fwd: Callable, params: Any, batch: dict, *, prompt_len: int) -> Array:
  """Value-model outputs [B, N] at the states that emit each completion token."""
  h, _ = response_hidden(fwd, params["model"], batch, prompt_len)
  return heads.token_scores(h, params["head"])


def reward_scores(fwd: Callable, params: Any, batch: dict) -> Array:
  """Scalar-head scores [B] at each sequence's last real token."""
  hidden, _ = fwd(params["model"], batch["sequences"], batch["positions"],
                  batch["segments"])
  b, t, _ = hidden.shape
  n = batch["mask"].shape[1]
  last_B = (t - n) + jnp.sum(batch["mask"], axis=1) - 1
  return heads.sequence_scores(hidden, params["head"], jnp.arange(b) * t + last_B)


def score_rollout(policy_params, ref_params, value_params, reward_params, batch, *,
                  policy_fwd, value_fwd, reward_fwd, prompt_len, temperature, chunk_size
                  ) -> dict[str, Array]:
  """Old and reference log-probs, entropies, values and (model) scores of a rollout."""
  kw = dict(prompt_len=prompt_len, temperature=temperature, chunk_size=chunk_size)
  mask = batch["mask"].astype(jnp.float32)
  out = {}
  logp, ent = response_logprobs(policy_fwd, policy_params, batch, **kw)
  ref_logp, _ = response_logprobs(policy_fwd, ref_params, batch, **kw)
  out["old_logp"], out["entropy"], out["ref_logp"] = logp * mask, ent * mask, ref_logp * mask
  if value_params is not None:
    out["old_values"] = response_values(value_fwd, value_params, batch,
                                        prompt_len=prompt_len) * mask
  if reward_params is not None:
    out["scores"] = reward_scores(reward_fwd, reward_params, batch)
  return out


def ppo_advantages(rollout: dict, scores_B: Array, kl_coef: Array, *, rl: RLConfig
                   ) -> dict[str, Array]:
  """KL-penalised per-token rewards, GAE, (whitened) advantages and returns."""
  mask = rollout["mask"]
  rewards, kl = losses.kl_penalized_rewards(rollout["old_logp"], rollout["ref_logp"], mask,
                                            scores_B, kl_coef=kl_coef,
                                            estimator=rl.kl_estimator)
  adv, returns = losses.gae(rewards, rollout["old_values"], mask, gamma=rl.gamma, lam=rl.lam)
  if rl.whiten_advantages:
    adv = losses.masked_whiten(adv, mask)
  return {"adv": adv, "returns": returns, "kl": kl}


def group_advantages(rollout: dict, scores_B: Array, kl_coef: Array, *, rl: RLConfig
                     ) -> dict[str, Array]:
  """GRPO / RLOO: one advantage per sequence from its group, on every token."""
  mask = rollout["mask"].astype(jnp.float32)
  kl = losses.KL_ESTIMATORS[rl.kl_estimator](rollout["old_logp"], rollout["ref_logp"]) * mask
  g = rl.group_size
  if rl.algorithm == "grpo":
    adv_NxG = losses.grpo_advantages(scores_B.reshape(-1, g),
                                     scale_by_std=rl.grpo_scale_by_std)
  else:
    rewards_B = scores_B - kl_coef * jnp.sum(kl, axis=1)
    adv_NxG = losses.rloo_advantages(rewards_B.reshape(-1, g))
  return {"adv": adv_NxG.reshape(-1)[:, None] * mask, "kl": kl}


def _masked_mean(x_BxN: Array, mask_BxN: Array) -> Array:
  m = mask_BxN.astype(jnp.float32)
  return jnp.sum(x_BxN * m) / jnp.maximum(jnp.sum(m), 1.0)


def policy_value_loss(policy_params, value_params, mb, *, policy_fwd, value_fwd,
                      rl: RLConfig, kl_loss_coef: Array | None):
  """Clipped policy loss (+ clipped value loss, + k3 KL for GRPO), token means."""
  mask = mb["mask"]
  logp, ent = response_logprobs(policy_fwd, policy_params, mb, prompt_len=rl.prompt_len,
                                temperature=rl.temperature,
                                chunk_size=rl.logprob_chunk_size)
  pl, pm = losses.ppo_policy_loss(logp, mb["old_logp"], mb["adv"], mask,
                                  clip_eps=rl.clip_eps)
  loss_policy = _masked_mean(pl, mask)
  loss = loss_policy
  metrics = {"loss/policy": loss_policy,
             "policy/clipfrac": _masked_mean(pm["clipfrac"], mask),
             "policy/approxkl": _masked_mean(pm["approxkl"], mask),
             "policy/entropy": jax.lax.stop_gradient(_masked_mean(ent, mask))}
  if kl_loss_coef is not None:
    kl = _masked_mean(losses.kl_k3(logp, mb["ref_logp"]), mask)
    loss = loss + kl_loss_coef * kl
    metrics["loss/kl"] = jax.lax.stop_gradient(kl)
  if value_params is not None:
    v = response_values(value_fwd, value_params, mb, prompt_len=rl.prompt_len)
    vl, vm = losses.ppo_value_loss(v, mb["old_values"], mb["returns"], mask,
                                   clip_value=rl.clip_value)
    loss_value = _masked_mean(vl, mask)
    loss = loss + rl.vf_coef * loss_value
    metrics["loss/value"] = loss_value
    metrics["value/clipfrac"] = _masked_mean(vm["vf_clipfrac"], mask)
  return loss, metrics


def rrhf_loss(policy_params, mb, *, policy_fwd, rl: RLConfig):
  """RRHF on K sampled completions per prompt (sequence sums of token log-probs)."""
  logp, _ = response_logprobs(policy_fwd, policy_params, mb, prompt_len=rl.prompt_len,
                              temperature=1.0, chunk_size=rl.logprob_chunk_size)
  mask = mb["mask"].astype(jnp.float32)
  k = rl.group_size
  inputs = losses.RankedLogps(logps=jnp.sum(logp * mask, 1).reshape(-1, k),
                              tokens=jnp.maximum(jnp.sum(mask, 1), 1.0).reshape(-1, k),
                              scores=mb["scores"].reshape(-1, k))
  per_ex, m = losses.rrhf(inputs, rank_weight=rl.rrhf_rank_weight,
                          sft_weight=rl.rrhf_sft_weight,
                          length_penalty=rl.rrhf_length_penalty)
  return jnp.mean(per_ex), {"loss/rrhf": jnp.mean(per_ex),
                            "loss/rank": jnp.mean(m["rank_loss"]),
                            "loss/nll": jnp.mean(m["nll"])}


def update_step(policy_state, value_state, mb, kl_coef, *, policy_fwd, value_fwd,
                rl: RLConfig, optimizer):
  """One optimiser step of the policy (and value model) on a minibatch."""
  if rl.algorithm == "rrhf":
    (loss, metrics), g_p = jax.value_and_grad(
        functools.partial(rrhf_loss, policy_fwd=policy_fwd, rl=rl), has_aux=True)(
            policy_state.params, mb)
    g_v = None
  else:
    fn = functools.partial(policy_value_loss, policy_fwd=policy_fwd, value_fwd=value_fwd,
                           rl=rl, kl_loss_coef=kl_coef if rl.algorithm == "grpo" else None)
    if value_state is None:
      (loss, metrics), g_p = jax.value_and_grad(fn, has_aux=True)(
          policy_state.params, None, mb)
      g_v = None
    else:
      (loss, metrics), (g_p, g_v) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
          policy_state.params, value_state.params, mb)
  policy_state, skipped = steps_lib.apply_step(policy_state, g_p, loss, optimizer=optimizer)
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(g_p),
                 skipped=skipped.astype(jnp.float32))
  if value_state is not None:
    value_state, _ = steps_lib.apply_step(value_state, g_v, loss, optimizer=optimizer)
  return policy_state, value_state, metrics


# ----------------------------------------------------------------------------- run state


@flax.struct.dataclass
class RLState:
  """Everything an iteration updates, checkpointed together."""
  iteration: Array  # int32 scalar
  policy: state_lib.TrainState
  value: Any  # TrainState or None
  ref_params: Any
  reward_params: Any  # None with the oracle reward
  kl: losses.KLControllerState
  rollout_key: Array  # a PRNG key; folded with the iteration


def _to_tree(s: RLState) -> dict:
  def ts(t):
    return None if t is None else {"step": t.step, "params": t.params,
                                   "opt_state": t.opt_state,
                                   "rng": ckpt_lib.key_to_data(t.rng)}
  return {"iteration": s.iteration, "policy": ts(s.policy), "value": ts(s.value),
          "ref_params": s.ref_params, "reward_params": s.reward_params,
          "kl_coef": s.kl.kl_coef, "rollout_key": ckpt_lib.key_to_data(s.rollout_key)}


def _from_tree(t: dict) -> RLState:
  def ts(x):
    return None if x is None else state_lib.TrainState(
        step=x["step"], params=x["params"], opt_state=x["opt_state"],
        rng=ckpt_lib.data_to_key(x["rng"]))
  return RLState(iteration=t["iteration"], policy=ts(t["policy"]), value=ts(t["value"]),
                 ref_params=t["ref_params"], reward_params=t["reward_params"],
                 kl=losses.KLControllerState(kl_coef=t["kl_coef"]),
                 rollout_key=ckpt_lib.data_to_key(t["rollout_key"]))


def _place_scalars(s: RLState, repl) -> RLState:
  """Iteration, KL coefficient and rollout key replicated on the mesh (so a restore
  targets the same placement as a fresh run)."""
  put = lambda x: jax.device_put(x, repl)
  return s.replace(iteration=put(s.iteration), kl=jax.tree.map(put, s.kl),
                   rollout_key=put(s.rollout_key))


def _bytes_per_device(tree: Any) -> int:
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") and x.sharding \
        else x.shape
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total


def memory_plan(state: RLState, sampler: sampling.Sampler) -> dict[str, int]:
  """Bytes per device per role (params, optimizer states, the KV cache)."""
  plan = {"policy/params": _bytes_per_device(state.policy.params),
          "policy/opt_state": _bytes_per_device(state.policy.opt_state),
          "reference/params": _bytes_per_device(state.ref_params),
          "sampler/kv_cache": _bytes_per_device(sampler._cache)}  # pylint: disable=protected-access
  if state.value is not None:
    plan["value/params"] = _bytes_per_device(state.value.params)
    plan["value/opt_state"] = _bytes_per_device(state.value.opt_state)
  if state.reward_params is not None:
    plan["reward/params"] = _bytes_per_device(state.reward_params)
  plan["total"] = sum(plan.values())
  return plan


# ----------------------------------------------------------------------------- prompts


def _left_pad(prompts: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
  out = np.zeros((len(prompts), length), np.int32)
  lens = np.zeros((len(prompts),), np.int32)
  for i, p in enumerate(prompts):
    p = np.asarray(p, np.int32)[-length:]  # keep the end of an over-long prompt
    out[i, length - p.size:] = p
    lens[i] = p.size
  return out, lens


class PromptSource:
  """Prompts for iteration i: deterministic in (seed, i), so resuming needs no state."""

  def __init__(self, cfg: config_lib.Config, rl: RLConfig):
    self.cfg, self.rl = cfg, rl
    self.task = synthetic.SyntheticTaskConfig(vocab_size=cfg.data.task.vocab_size,
                                              target_len=cfg.data.task.target_len)
    self._pool = None
    if cfg.data.source == "file":
      from jaxalign.data import formats  # pylint: disable=g-import-not-at-top
      from jaxalign.train import loop  # pylint: disable=g-import-not-at-top
      tok = build.build_tokenizer(cfg)
      examples = formats.load_examples(cfg.data.path, cfg.data.format, tok,
                                       on_error=cfg.data.on_error)
      if not examples:
        raise ValueError(f"config.data.path={cfg.data.path!r}: no usable examples.")
      self._pool = [np.asarray(e.prompt, np.int32) for e in examples]

  def __call__(self, iteration: int) -> list[np.ndarray]:
    rng = np.random.default_rng([self.cfg.seed, iteration])
    n = self.cfg.data.batch_size
    if self._pool is None:
      return synthetic.make_prompts(rng, n, self.task)
    idx = rng.choice(len(self._pool), size=n, replace=len(self._pool) < n)
    return [self._pool[i] for i in idx]


# ----------------------------------------------------------------------------- the run


def _fwd(graphdef, activation_sharding: tfm.ActivationSharding | None = None):
  # Pinning activations to batch sharding keeps fsdp meshes from replicating the
  # whole batch's hidden states on every device (docs/scale_out.md, section 8).
  def fwd(params, tokens, positions, segments):
    return tfm.forward(graphdef, params, tokens, positions, segments,
                       activation_sharding=activation_sharding)
  return fwd


@dataclasses.dataclass
class RLResult:
  iteration: int
  state: RLState
  history: list[dict]  # per-iteration host metrics
  status: str = "done"  # or "preempted" (SIGTERM / SIGINT; a checkpoint was saved)


def _init_value_state(rl, arch, axes, optimizer, mesh, rules, policy_params,
                      reward_params, policy_fwd, reward_fwd, key):
  """The value model's TrainState: a copy of the reward model, or of the policy with a
  fresh scalar head; placed straight into its shardings."""
  if rl.value_init == "reward":
    src, fwd = reward_params, reward_fwd
    init_fn = lambda k: jax.tree.map(lambda x: x, reward_params)
    value_axes = {"model": axes, "head": heads.head_logical_axes()}
  else:
    src, fwd = policy_params, policy_fwd
    init_fn = lambda k: {"model": tfm.init(arch, k)[1],
                         "head": heads.init_head(arch.d_model, k)}
    value_axes = {"model": axes, "head": heads.head_logical_axes()}
  _, sh = state_lib.state_shardings(init_fn, optimizer, value_axes, mesh, rules)

  def make(src, k):
    if rl.value_init == "reward":
      p = jax.tree.map(jnp.copy, src)
    else:
      p = {"model": jax.tree.map(jnp.copy, src), "head": heads.init_head(arch.d_model, k)}
    return jax.tree.map(lambda x: x.astype(jnp.float32), p)
  params = jax.jit(make, out_shardings=sh.params)(src, key)
  opt_state = jax.jit(optimizer.init, out_shardings=sh.opt_state)(params)
  repl = mesh_lib.replicated(mesh)
  return state_lib.TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), repl),
                              params=params, opt_state=opt_state,
                              rng=jax.device_put(key, repl)), fwd


def _load_reward(cfg: config_lib.Config, rl: RLConfig, mesh, optimizer):
  """Params of a scalar-head reward model from the latest checkpoint of a reward run."""
  from jaxalign.train import loop  # pylint: disable=g-import-not-at-top
  rcfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, head="scalar"))
  model = loop.build_model(rcfg, cfg.model.arch.vocab_size if cfg.model.arch else 0)
  abstract, sh = state_lib.state_shardings(model.init_params, optimizer,
                                           model.logical_axes, mesh, cfg.mesh.rules)
  placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, sh)
  rng = jax.eval_shape(ckpt_lib.key_to_data, abstract.rng)
  target = {"step": placed.step, "params": placed.params, "opt_state": placed.opt_state,
            "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=sh.rng)}
  path = os.path.join(rl.reward_path, "checkpoints")
  if not os.path.isdir(path):
    raise ValueError(f"config.rl.reward_path={rl.reward_path!r}: no checkpoints/ folder; "
                     "give the workdir of an experiments/reward.py run.")
  with ckpt_lib.Checkpointer(path, save_every=1, keep=1000) as ck:
    restored = ck.restore(target)
  return model, restored.state["params"]


def run_rl(config: ml_collections.ConfigDict | dict, workdir: str, *,
           log: Callable[[str], None] | None = None, stop_after: int | None = None
           ) -> RLResult:
  """Trains per the RL experiment ``config`` in ``workdir`` (resuming from its
  checkpoints). ``stop_after``: return after that many iterations of this call
  (rehearses an interruption; the checkpoint at that point is forced)."""
  cfg, rl = validate_rl(config, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  rules = cfg.mesh.rules
  arch, loaded = cfg.model.arch, None
  if cfg.model.hf_path:  # the policy (and so the reference) start from an HF checkpoint
    from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
    arch, loaded = hf.load(cfg.model.hf_path)
  if arch.final_logit_softcap is not None:
    # response_logprobs scales the hidden state by 1/T, which is not the sampler's
    # distribution once logits are soft-capped; refuse rather than train on it.
    raise ValueError(f"config.model.hf_path={cfg.model.hf_path!r} soft-caps its final "
                     f"logits (final_logit_softcap={arch.final_logit_softcap}, Gemma 2); "
                     "online RL does not apply the cap in its learner log-probs yet. "
                     "Use an offline objective, or a model without logit soft-capping.")
  total_updates = cfg.num_steps * rl.ppo_epochs * rl.num_minibatches
  if cfg.optimizer.schedule == "constant" and cfg.optimizer.warmup_steps == 0:
    total_updates = 0  # the same optimizer whatever the run length: programs are shared
  optimizer_key = (cfg.optimizer, total_updates)
  optimizer = _optimizer(optimizer_key)
  key = jax.random.key(cfg.seed)
  k_policy, k_value, k_rollout = jax.random.split(key, 3)
  # Policy, reference, value and reward models share one architecture (module doc).
  policy_fwd = _fwd(_graphdef(arch))
  axes = tfm.logical_axes(arch)
  init_policy = lambda k: tfm.init(arch, k)[1]

  policy_state, policy_sh = state_lib.init_train_state(init_policy, optimizer, axes, mesh,
                                                       k_policy, rules)
  if loaded is not None:
    params = jax.device_put(jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), loaded),
                            policy_sh.params)
    policy_state = policy_state.replace(
        params=params,
        opt_state=jax.jit(optimizer.init, out_shardings=policy_sh.opt_state)(params))
  abstract_params = jax.eval_shape(init_policy, k_policy)
  ref_sh = mesh_lib.reference_shardings(axes, mesh, cfg.mesh, abstract_params)
  ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                       out_shardings=ref_sh)(policy_state.params)

  reward_params, reward_fwd = None, None
  if rl.reward == "checkpoint":
    _, reward_params = _load_reward(cfg, rl, mesh, optimizer)
    reward_fwd = policy_fwd

  value_state, value_fwd = None, None
  if rl.uses_value:
    value_state, value_fwd = _init_value_state(rl, arch, axes, optimizer, mesh, rules,
                                               policy_state.params, reward_params,
                                               policy_fwd, reward_fwd, k_value)

  state = RLState(iteration=jnp.zeros((), jnp.int32), policy=policy_state, value=value_state,
                  ref_params=ref_params, reward_params=reward_params,
                  kl=losses.adaptive_kl_init(rl.kl_coef), rollout_key=k_rollout)
  repl = mesh_lib.replicated(mesh)
  state = _place_scalars(state, repl)

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               save_every=cfg.checkpoint.every_steps,
                               keep=cfg.checkpoint.keep,
                               async_save=cfg.checkpoint.async_save)
  start = 0
  if ckpt.latest_step() is not None:
    restored = ckpt.restore(_to_tree(state))
    state = _from_tree(restored.state)
    start = restored.step

  rows = cfg.data.batch_size * rl.group_size
  scfg = sampling.SamplingConfig(max_new_tokens=rl.max_new_tokens,
                                 temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p,
                                 eos_id=synthetic.EOS_ID, pad_id=synthetic.PAD_ID)
  sampler = _sampler(arch, scfg, rows, rl.prompt_len, mesh, rules)
  prompts_fn = PromptSource(cfg, rl)

  logger = log_lib.MetricsLogger(workdir, total_steps=cfg.num_steps, start_step=start,
                                 tensorboard=cfg.log.tensorboard,
                                 progress_bar=cfg.log.progress_bar)
  say = log or logger.info
  plan = memory_plan(state, sampler)
  say("memory plan (bytes per device): " + ", ".join(f"{k}={v:,}" for k, v in plan.items()))
  if start:
    say(f"resumed from checkpoint iteration {start} in {ckpt.directory}")

  rows_sh = mesh_lib.batch_sharding(mesh)
  progs = _programs(arch, rl, optimizer_key, mesh, rules)
  score, adv_fn, update, take = progs.score, progs.adv_fn, progs.update, progs.take
  task = prompts_fn.task
  history = []
  it = start
  stop_at = cfg.num_steps if stop_after is None else min(cfg.num_steps, start + stop_after)
  from jaxalign.train import loop  # pylint: disable=g-import-not-at-top
  preempt = loop.Preemption()
  try:
    preempt.__enter__()  # SIGTERM / SIGINT: checkpoint after the current iteration
    while it < stop_at:
      t0 = time.perf_counter()
      prompts = prompts_fn(it)
      prompts = [p for p in prompts for _ in range(rl.group_size)]  # group members adjacent
      prompt_BxP, prompt_len_B = _left_pad(prompts, rl.prompt_len)
      it_key = jax.random.fold_in(state.rollout_key, it)
      out = sampler(state.policy.params, prompt_BxP, prompt_len_B,
                    jax.random.fold_in(it_key, 0))
      batch = {"sequences": out.sequences, "positions": out.positions,
               "segments": sampling.sequence_segments(jnp.asarray(prompt_BxP),
                                                      jnp.asarray(prompt_len_B), out.mask),
               "mask": out.mask}
      batch = jax.device_put(batch, rows_sh)
      jax.block_until_ready(batch)
      t1 = time.perf_counter()
      rollout = dict(batch, **score(state.policy.params, state.ref_params,
                                    None if state.value is None else state.value.params,
                                    state.reward_params, batch))
      if rl.reward == "oracle":
        scores = synthetic.oracle_reward(prompts, np.asarray(out.tokens), task)
        rollout["scores"] = jax.device_put(jnp.asarray(scores, jnp.float32), repl)
      if rl.algorithm != "rrhf":
        rollout.update(adv_fn(rollout, rollout["scores"], state.kl.kl_coef))
      jax.block_until_ready(rollout)
      t2 = time.perf_counter()

      policy_st, value_st = state.policy, state.value
      mb_rows = rows // rl.num_minibatches
      mb_metrics = []
      for epoch in range(rl.ppo_epochs):
        perm_key = jax.random.fold_in(it_key, 1 + epoch)
        if rl.algorithm == "rrhf":  # keep each prompt's K completions together
          perm = np.asarray(jax.random.permutation(perm_key, cfg.data.batch_size))
          perm = (perm[:, None] * rl.group_size + np.arange(rl.group_size)).reshape(-1)
        else:
          perm = np.asarray(jax.random.permutation(perm_key, rows))
        for m in range(rl.num_minibatches):
          idx = perm[m * mb_rows:(m + 1) * mb_rows]
          mb = take(rollout, jnp.asarray(idx))
          policy_st, value_st, met = update(policy_st, value_st, mb, state.kl.kl_coef)
          mb_metrics.append(met)
      jax.block_until_ready(policy_st.params)
      t3 = time.perf_counter()

      mask = np.asarray(out.mask)
      scores = np.asarray(rollout["scores"])
      kl_seq = np.sum(np.asarray(rollout["kl"]), 1) if "kl" in rollout else \
          np.sum(np.asarray(losses.kl_k1(rollout["old_logp"], rollout["ref_logp"])), 1)
      kl_coef = float(state.kl.kl_coef)
      metrics = {
          "objective/kl": float(kl_seq.mean()),
          "objective/entropy": float(np.sum(np.asarray(rollout["entropy"]), 1).mean()),
          "objective/scores": float(scores.mean()),
          "objective/rlhf_reward": float((scores - kl_coef * kl_seq).mean()),
          "objective/kl_coef": kl_coef,
          "response_length": float(mask.sum(1).mean()),
          "eos_rate": float((np.asarray(out.tokens) == synthetic.EOS_ID).any(1).mean()),
          "time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2,
      }
      for k in mb_metrics[0]:
        metrics[k] = float(np.mean([np.asarray(m[k]) for m in mb_metrics]))
      if rl.reward == "oracle":
        metrics["objective/oracle"] = float(scores.mean())

      kl_state = state.kl
      if rl.adaptive_kl:
        kl_state = losses.adaptive_kl_update(kl_state, jnp.asarray(kl_seq.mean()), rows,
                                             target=rl.kl_target, horizon=rl.kl_horizon)
      it += 1
      state = _place_scalars(state.replace(iteration=jnp.asarray(it, jnp.int32),
                                           policy=policy_st, value=value_st, kl=kl_state),
                             repl)
      history.append(metrics)
      if it % cfg.log.every_steps == 0 or it == cfg.num_steps:
        logger.write(it, metrics)
      logger.advance()
      ckpt.save(it, _to_tree(state), None, {"algorithm": rl.algorithm},
                force=(it == stop_at or preempt.requested))
      if preempt.requested:
        say(f"preempted by signal {preempt.signal} at iteration {it}; checkpoint saved")
        break
    ckpt.wait()
  finally:
    preempt.__exit__()
    ckpt.close()
    logger.close()
  return RLResult(iteration=it, state=state, history=history,
                  status="preempted" if preempt.requested else "done")


@functools.lru_cache(maxsize=4)
def _optimizer(key):
  from jaxalign.train import loop  # pylint: disable=g-import-not-at-top
  return loop.make_optimizer(*key)


@functools.lru_cache(maxsize=4)
def _sampler(arch, scfg, rows, prompt_len, mesh, rules):
  shapes = jax.eval_shape(lambda k: tfm.init(arch, k)[1], jax.random.key(0))
  sh = mesh_lib.param_shardings(tfm.logical_axes(arch), mesh, rules, shapes)
  return sampling.Sampler(arch, scfg, batch=rows, prompt_len=prompt_len, mesh=mesh,
                          param_shardings=sh)


@dataclasses.dataclass(frozen=True)
class _Programs:
  score: Callable
  adv_fn: Callable
  update: Callable
  take: Callable


@functools.lru_cache(maxsize=4)
def _programs(arch, rl: RLConfig, optimizer_key, mesh, rules) -> _Programs:
  """The jitted steps for one (architecture, RL config, optimizer, mesh, rules): cached
  so a resumed run in the same process (tests, notebooks) reuses the compiled programs."""
  fwd = _fwd(_graphdef(arch), tfm.ActivationSharding(mesh, rules))
  score = jax.jit(functools.partial(
      score_rollout, policy_fwd=fwd, value_fwd=fwd, reward_fwd=fwd,
      prompt_len=rl.prompt_len, temperature=rl.temperature,
      chunk_size=rl.logprob_chunk_size))
  adv_fn = jax.jit(functools.partial(
      ppo_advantages if rl.algorithm == "ppo" else group_advantages, rl=rl))
  update = jax.jit(functools.partial(update_step, policy_fwd=fwd, value_fwd=fwd, rl=rl,
                                     optimizer=_optimizer(optimizer_key)),
                   donate_argnums=(0, 1))
  rows_sh = mesh_lib.batch_sharding(mesh)

  def take_fn(rollout, idx):
    return {k: v[idx] for k, v in rollout.items() if v.ndim >= 1}
  take = jax.jit(take_fn, out_shardings=rows_sh)
  return _Programs(score, adv_fn, update, take)


@functools.lru_cache(maxsize=8)
def _graphdef(arch: tfm.TransformerConfig):
  box = {}

  def f(k):
    g, p = tfm.init(arch, k)
    box["g"] = g
    return p
  jax.eval_shape(f, jax.random.key(0))
  return box["g"]
