"""The online-RL driver: PPO with four models, GRPO, RLOO, online RRHF / DPO, GKD.

``run_rl(config, workdir)`` is the whole job (``jaxalign.main`` only parses flags):

1. `setup` builds the run once (`RLRun`) with `jaxalign.train.build`: optimizer,
   policy state, reference (the initial policy), reward model (``rl.reward=
   "checkpoint"``: the latest checkpoint of an ``experiments/reward.py`` run), value
   model (``rl.value_init``), and the compiled `rl_steps.Programs` (a second run of
   the same config in one process may reuse them: ``programs=``). It resumes from the
   latest checkpoint in ``workdir/checkpoints`` (``checkpoint.restore_step=N``: from
   kept iteration N, `jaxalign.train.rundir`). With ``model.lora.rank > 0`` only
   adapters (and the value head) train, on one frozen base that is also the
   reference (`jaxalign.train.rl_lora`).
2. `iteration`, the same for every algorithm: prompts --sampler (KV cache, the
   policy's sharded params)--> completions --score--> old / reference log-probs,
   values, reward-model (or the synthetic task's oracle) scores --advantages-->
   epochs of shuffled minibatches of ``update_step`` (donated states). The algorithm
   is a table entry of parts (`rl_steps.ALGORITHMS`).
3. hooks (`hooks.run_iterations`): the divergence guard (`hooks.check_iteration`:
   non-finite losses or rewards, updates out of scale; a suspect iteration is not
   saved, too many in a row raise a `hooks.GuardError` naming the checkpoint to
   resume from), log, save every ``checkpoint.every_steps``; SIGTERM / SIGINT save
   and return ``status="preempted"``.

Config: the ``rl`` section (`jaxalign.config.RLConfig`, validated with the rest by
`jaxalign.config.validate_rl`); ``num_steps`` counts iterations. Policy, reference,
value and reward models share one architecture.
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

from jaxalign import checkpoint as ckpt_lib
from jaxalign import config as config_lib
from jaxalign import losses
from jaxalign.models import heads
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import build
from jaxalign.train import hooks
from jaxalign.train import logging as log_lib
from jaxalign.train import rl_distill
from jaxalign.train import rl_dynamic
from jaxalign.train import rl_lora
from jaxalign.train import rl_memory
from jaxalign.train import rl_rewards
from jaxalign.train import rl_steps
from jaxalign.train import rundir
from jaxalign.train import state as state_lib
from jaxalign.train import stream

Array = jax.Array
RLConfig = config_lib.RLConfig


# ----------------------------------------------------------------------------- run state


@flax.struct.dataclass
class RLState:
  """Everything an iteration updates, checkpointed together."""
  iteration: Array  # int32 scalar
  policy: state_lib.TrainState
  value: Any  # TrainState or None
  ref_params: Any  # with LoRA: the base itself (adapters off), or None
  reward_params: Any  # None with the oracle reward
  kl: losses.KLControllerState
  rollout_key: Array  # a PRNG key; folded with the iteration
  base: Any = None  # LoRA: the frozen base (`rl_lora`), rebuilt on restore, not saved


def to_tree(s: RLState) -> dict:
  """The checkpoint layout of an `RLState` (PRNG keys as raw key data)."""
  ts = lambda t: None if t is None else state_lib.to_tree(t)
  return {"iteration": s.iteration, "policy": ts(s.policy), "value": ts(s.value),
          "ref_params": None if s.base is not None else s.ref_params,
          "reward_params": s.reward_params,
          "kl_coef": s.kl.kl_coef, "rollout_key": ckpt_lib.key_to_data(s.rollout_key)}


def from_tree(t: dict) -> RLState:
  ts = lambda x: None if x is None else state_lib.from_tree(x)
  return RLState(iteration=t["iteration"], policy=ts(t["policy"]), value=ts(t["value"]),
                 ref_params=t["ref_params"], reward_params=t["reward_params"],
                 kl=losses.KLControllerState(kl_coef=t["kl_coef"]),
                 rollout_key=ckpt_lib.data_to_key(t["rollout_key"]))


def _place_scalars(s: RLState, repl) -> RLState:
  """Iteration, KL coefficient and rollout key replicated on the mesh (so a restore
  targets the same placement as a fresh run)."""
  put = functools.partial(mesh_lib.put, sharding=repl)  # also under jax.distributed
  return s.replace(iteration=put(s.iteration), kl=jax.tree.map(put, s.kl),
                   rollout_key=put(s.rollout_key))


_bytes_per_device = rl_memory.bytes_per_device  # the name tests read
memory_plan = rl_memory.memory_plan


# ----------------------------------------------------------------------------- iteration


@dataclasses.dataclass(frozen=True)
class Trainer:
  """What `iteration` reads besides the state: the RL section, the programs, the
  prompts of iteration i, the oracle reward ``(prompts, completion tokens [B, N]) ->
  scores [B]`` (None: the reward model scores), and the placements of rollout rows
  and of scalars (None: unsharded)."""
  rl: RLConfig
  programs: rl_steps.Programs
  prompts: Callable[[int], list[np.ndarray]]
  oracle: Callable[[list, np.ndarray], np.ndarray] | None = None
  text_reward: Any = None  # rl.reward="functions": rl_rewards.TextReward
  teacher: Any = None  # gkd: the teacher's frozen params (rl_distill)
  rows_sharding: Any = None
  replicated: Any = None

  @property
  def algorithm(self) -> rl_steps.Algorithm:
    return rl_steps.ALGORITHMS[self.rl.algorithm]


def _put(x: Any, sharding: Any) -> Any:
  return x if sharding is None else mesh_lib.put(x, sharding)


def _rollout(t: Trainer, state: RLState, prompts: list, key) -> tuple[dict, Any]:
  prompt_BxP, prompt_len_B = rl_steps.left_pad(prompts, t.rl.prompt_len)
  params, _ = rl_steps.with_base(state.policy.params, None, state.base)
  out = t.programs.sampler(params, prompt_BxP, prompt_len_B, key)
  batch = _put(rl_steps.rollout_batch(prompt_BxP, prompt_len_B, out), t.rows_sharding)
  return jax.block_until_ready(batch), out


def _score(t: Trainer, state: RLState, batch: dict, prompts: list, out, it: int = 0,
           pre: tuple | None = None) -> tuple[dict, dict]:
  rollout = dict(batch, **t.programs.score(
      state.policy.params, state.ref_params,
      None if state.value is None else state.value.params, state.reward_params, batch,
      state.base))
  scores, host = pre or rl_rewards.host_scores(t.oracle, t.text_reward, it, prompts, out)
  if scores is not None:
    rollout["scores"] = _put(jnp.asarray(scores, jnp.float32), t.replicated)
  if t.programs.advantages is not None:
    rollout.update(t.programs.advantages(rollout, rollout["scores"], state.kl.kl_coef))
  return jax.block_until_ready(rollout), host


def _update(t: Trainer, state: RLState, rollout: dict, it_key) -> tuple[Any, Any, list]:
  rl, rows = t.rl, rollout["mask"].shape[0]
  mb_rows = rows // rl.num_minibatches
  policy, value, mb_metrics = state.policy, state.value, []
  for epoch in range(rl.ppo_epochs):
    order = rl_steps.epoch_order(jax.random.fold_in(it_key, 1 + epoch), rows,
                                 rl.group_size, t.algorithm.keeps_groups)
    for m in range(rl.num_minibatches):
      mb = t.programs.take(rollout, jnp.asarray(order[m * mb_rows:(m + 1) * mb_rows]))
      policy, value, met = t.programs.update(policy, value, mb, state.kl.kl_coef,
                                             state.base, t.teacher)
      mb_metrics.append(met)
  jax.block_until_ready(policy.params)
  return policy, value, mb_metrics


def _metrics(t: Trainer, rollout: dict, out, kl_coef: float, mb_metrics: list
             ) -> tuple[dict, np.ndarray]:
  """Host metrics of an iteration, and the per-sequence KL [B]."""
  host = mesh_lib.to_host  # rows may span processes (jax.distributed)
  scores = host(rollout["scores"])
  kl_seq = np.sum(host(rollout["kl"]), 1) if "kl" in rollout else \
      np.sum(host(losses.kl_k1(rollout["old_logp"], rollout["ref_logp"])), 1)
  metrics = {
      "objective/kl": float(kl_seq.mean()),
      "objective/entropy": float(np.sum(host(rollout["entropy"]), 1).mean()),
      "objective/scores": float(scores.mean()),
      "objective/rlhf_reward": float((scores - kl_coef * kl_seq).mean()),
      "objective/kl_coef": kl_coef,
      "response_length": float(np.asarray(out.mask).sum(1).mean()),
      "eos_rate": float(np.isin(np.asarray(out.tokens),
                                t.programs.sampler.scfg.stop_ids).any(1).mean()),
  }
  for k in mb_metrics[0]:
    metrics[k] = float(np.mean([np.asarray(m[k]) for m in mb_metrics]))
  metrics.update(hooks.largest_update(mb_metrics))  # what the divergence guard judges
  if t.oracle is not None:
    metrics["objective/oracle"] = float(scores.mean())
  return metrics, kl_seq


def iteration(t: Trainer, state: RLState, it: int) -> tuple[RLState, dict]:
  """Iteration ``it`` -> ``it + 1``: sample, score, advantages, epochs of minibatch
  updates, the KL controller; returns the new state and the host metrics."""
  t0 = time.perf_counter()
  prompts = [p for p in t.prompts(it) for _ in range(t.rl.group_size)]  # groups adjacent
  it_key = jax.random.fold_in(state.rollout_key, it)
  batch, out = _rollout(t, state, prompts, jax.random.fold_in(it_key, 0))
  pre = None  # rl.dynamic_sampling: DAPO's extra rounds, with the batch's host scores
  if t.rl.dynamic_sampling:
    batch, out, prompts, pre = rl_dynamic.fill(t, state, it, it_key, prompts, out)
  t1 = time.perf_counter()
  rollout, host = _score(t, state, batch, prompts, out, it, pre)
  t2 = time.perf_counter()
  policy, value, mb_metrics = _update(t, state, rollout, it_key)
  t3 = time.perf_counter()
  metrics, kl_seq = _metrics(t, rollout, out, float(state.kl.kl_coef), mb_metrics)
  metrics.update({"time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2})
  metrics.update(host)  # reward/<name>: each reward function's raw mean
  kl_state = state.kl
  if t.rl.adaptive_kl:
    kl_state = losses.adaptive_kl_update(kl_state, jnp.asarray(kl_seq.mean()), len(prompts),
                                         target=t.rl.kl_target, horizon=t.rl.kl_horizon)
  state = state.replace(iteration=jnp.asarray(it + 1, jnp.int32), policy=policy,
                        value=value, kl=kl_state)
  if t.replicated is not None:
    state = _place_scalars(state, t.replicated)
  return state, metrics


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass
class RLRun:
  """What `setup` builds once; `iteration` and the hooks only read it."""
  cfg: config_lib.Config
  rl: RLConfig
  workdir: str
  trainer: Trainer
  ckpt: ckpt_lib.Checkpointer
  logger: Any
  say: Callable[[str], None]
  state: RLState  # the initial (or restored) state
  start: int  # the iteration it resumes at
  ckpt_meta: dict = dataclasses.field(default_factory=dict)  # a LoRA base's fingerprint


def init_value_state(rl: RLConfig, scalar: build.Model, optimizer, mesh, rules,
                     policy_params, reward_params, key) -> state_lib.TrainState:
  """The value model's TrainState: a copy of the reward model, or of the policy with a
  fresh scalar head (``rl.value_init``); placed straight into its shardings."""
  _, sh = state_lib.state_shardings(scalar.init_params, optimizer, scalar.logical_axes,
                                    mesh, rules)
  from_reward = rl.value_init == "reward"

  def make(src, k):
    if from_reward:
      p = jax.tree.map(jnp.copy, src)
    else:
      p = {"model": jax.tree.map(jnp.copy, src),
           "head": heads.init_head(scalar.arch.d_model, k)}
    return jax.tree.map(lambda x: x.astype(jnp.float32), p)
  params = jax.jit(make, out_shardings=sh.params)(
      reward_params if from_reward else policy_params, key)
  opt_state = jax.jit(optimizer.init, out_shardings=sh.opt_state)(params)
  repl = mesh_lib.replicated(mesh)
  return state_lib.TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), repl),
                              params=params, opt_state=opt_state,
                              rng=mesh_lib.put(key, repl))


def _reward_params(rl: RLConfig, scalar, optimizer, mesh, rules) -> Any:
  """The reward model's params (latest checkpoint of ``rl.reward_path``), or None."""
  if rl.reward != "checkpoint":
    return None
  return build.restore_params(rl.reward_path, scalar, optimizer, mesh, rules,
                              key="rl.reward_path")


def _initial_state(cfg, rl: RLConfig, policy: build.Model, scalar, optimizer, mesh
                   ) -> tuple[RLState, Any]:
  """(step-0 state, the policy's param shardings)."""
  rules = cfg.mesh.rules
  reward_params = _reward_params(rl, scalar, optimizer, mesh, rules)  # fails fast
  k_policy, k_value, k_rollout = jax.random.split(jax.random.key(cfg.seed), 3)
  kl0 = losses.adaptive_kl_init(rl.kl_coef)
  if policy.uses_lora:  # adapters on one frozen base, which is also the reference
    policy_state, value, base, sh = rl_lora.initial_states(
        policy, scalar, optimizer, mesh, rules, k_policy, k_value, rl.uses_value)
    state = RLState(jnp.zeros((), jnp.int32), policy_state, value,
                    base if rl_steps.needs_reference(rl) else None, reward_params, kl0,
                    k_rollout, base=base)
    return _place_scalars(state, mesh_lib.replicated(mesh)), sh
  policy_state, policy_sh = build.initial_state(policy, optimizer, mesh, rules, k_policy)
  ref_params = None  # kl_coef = 0: no reference model at all (rl_steps.needs_reference)
  if rl_steps.needs_reference(rl):
    abstract = jax.eval_shape(policy.init_params, k_policy)
    ref_sh = mesh_lib.reference_shardings(policy.logical_axes, mesh, cfg.mesh, abstract)
    ref_params = build.copy_params(policy_state.params, ref_sh)
  value = None
  if rl_steps.ALGORITHMS[rl.algorithm].uses_value:
    value = init_value_state(rl, scalar, optimizer, mesh, rules, policy_state.params,
                             reward_params, k_value)
  state = RLState(iteration=jnp.zeros((), jnp.int32), policy=policy_state, value=value,
                  ref_params=ref_params, reward_params=reward_params,
                  kl=losses.adaptive_kl_init(rl.kl_coef), rollout_key=k_rollout)
  return _place_scalars(state, mesh_lib.replicated(mesh)), policy_sh.params


def _models(cfg, rl: RLConfig, vocab_size: int) -> tuple[build.Model, build.Model | None]:
  """The policy, and the scalar-head model of the value / reward roles (the policy's
  architecture; its weights come from the policy or the reward run, not hf_path)."""
  policy = build.build_model(cfg.model, vocab_size)
  if not (rl_steps.ALGORITHMS[rl.algorithm].uses_value or rl.reward == "checkpoint"):
    return policy, None
  scalar_cfg = dataclasses.replace(cfg.model, head="scalar", hf_path="", init_from="",
                                   arch=policy.arch)
  return policy, build.build_model(scalar_cfg, vocab_size)


def setup(cfg: config_lib.Config, rl: RLConfig, workdir: str, *,
          log: Callable[[str], None] | None = None,
          programs: rl_steps.Programs | None = None) -> RLRun:
  """Builds everything the run needs, before the first iteration; see the module doc."""
  os.makedirs(workdir, exist_ok=True)
  mesh, rules = mesh_lib.make_mesh(cfg.mesh), cfg.mesh.rules
  prompts = stream.PromptSource(cfg)
  policy, scalar = _models(cfg, rl, prompts.vocab_size)
  total_updates = cfg.num_steps * rl.ppo_epochs * rl.num_minibatches
  if cfg.optimizer.schedule == "constant" and cfg.optimizer.warmup_steps == 0:
    total_updates = 0  # the same optimizer whatever the run length: programs are shared
  optimizer = build.make_optimizer(cfg.optimizer, total_updates)
  rows = cfg.data.batch_size * rl.group_size
  key = (policy.arch, rl, cfg.optimizer, total_updates, mesh, rules, rows,
         tuple(sorted(prompts.stops.items())))
  if programs is not None and programs.key != key:
    raise ValueError("run_rl(programs=...): those programs were compiled for another "
                     "architecture, rl section, optimizer or mesh; pass programs=None.")
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               save_every=cfg.checkpoint.every_steps,
                               keep=cfg.checkpoint.keep,
                               async_save=cfg.checkpoint.async_save)
  teacher = rl_distill.load_teacher(cfg, rl, policy, mesh, ckpt)  # gkd; checks first
  state, policy_sh = _initial_state(cfg, rl, policy, scalar, optimizer, mesh)
  start, base_id = 0, rl_lora.base_id(cfg, policy)
  if ckpt.latest_step() is not None:
    rl_lora.check_resume(ckpt, ckpt.latest_step(), base_id)
    restored = ckpt.restore(to_tree(state))
    state, start = rl_lora.reattach(from_tree(restored.state), state), restored.step
  if programs is None:
    programs = rl_steps.build_programs(policy, scalar, rl, optimizer, rows=rows,
                                       mesh=mesh, rules=rules,
                                       param_shardings=policy_sh, key=key,
                                       stops=prompts.stops, teacher=teacher.model)
  oracle, text_reward = rl_rewards.host_rewards(rl, prompts, rows=rows, mesh=mesh,
                                                mesh_cfg=cfg.mesh)
  trainer = Trainer(rl=rl, programs=programs, prompts=prompts, oracle=oracle,
                    text_reward=text_reward, rows_sharding=mesh_lib.batch_sharding(mesh),
                    replicated=mesh_lib.replicated(mesh), teacher=teacher.params)
  logger = hooks.NullLogger() if jax.process_index() else log_lib.MetricsLogger(
      workdir, total_steps=cfg.num_steps, start_step=start,
      tensorboard=cfg.log.tensorboard, progress_bar=cfg.log.progress_bar)
  say = log or logger.info
  plan = memory_plan(state, programs.sampler, teacher.params)
  say("memory plan (bytes per device): " + ", ".join(f"{k}={v:,}" for k, v in plan.items()))
  if start:
    say(f"resumed from checkpoint iteration {start} in {ckpt.directory}")
  return RLRun(cfg=cfg, rl=rl, workdir=workdir, trainer=trainer, ckpt=ckpt, logger=logger,
               say=say, state=state, start=start,
               ckpt_meta={**base_id, **teacher.meta})


# ----------------------------------------------------------------------------- hooks


def _log(run: RLRun, it: int, metrics: dict) -> None:
  if it % run.cfg.log.every_steps == 0 or it == run.cfg.num_steps:
    run.logger.write(it, metrics)
  run.logger.advance()


def save(run: RLRun, it: int, state: RLState, force: bool = False,
         meta: dict | None = None) -> bool:
  return run.ckpt.save(it, to_tree(state), None, {"algorithm": run.rl.algorithm,
                                                  **run.ckpt_meta, **(meta or {})},
                       force=force)


# ----------------------------------------------------------------------------- the driver


@dataclasses.dataclass
class RLResult:
  iteration: int
  state: RLState
  history: list[dict]  # per-iteration host metrics
  status: str = "done"  # or "preempted" (SIGTERM / SIGINT; a checkpoint was saved)
  programs: rl_steps.Programs | None = None  # reusable by a run of the same config


def run_rl(config: ml_collections.ConfigDict | dict, workdir: str, *,
           log: Callable[[str], None] | None = None, stop_after: int | None = None,
           programs: rl_steps.Programs | None = None) -> RLResult:
  """Trains per the RL experiment ``config`` in ``workdir`` (resuming from its
  checkpoints). ``stop_after``: return after that many iterations of this call
  (rehearses an interruption; the checkpoint at that point is forced).
  ``programs``: an earlier result's ``programs`` for the same config (skips
  compiling again in one process)."""
  cfg, rl = config_lib.validate_rl(config, jax.device_count())
  lead = jax.process_index() == 0  # jax.distributed: process 0 logs and writes files
  say = (log or print) if lead else (lambda message: None)
  # One writer per run directory, and a resume that would change the run is refused
  # (the offline loop's protections, with the rl section recorded too).
  run_dir = rundir.prepare(cfg, workdir, lead=lead, say=say, extra={"rl": rl})
  try:
    run = setup(cfg, rl, workdir, log=log, programs=programs)
    heldout = rl_rewards.prepare(run)  # SFT warm-up, held-out accuracy before RL
    stop_at = cfg.num_steps if stop_after is None else min(cfg.num_steps,
                                                           run.start + stop_after)
    state, it, history, status = hooks.run_iterations(  # the guard, saves, SIGTERM
        run, stop_at, functools.partial(iteration, run.trainer),
        functools.partial(_log, run), functools.partial(save, run), run_dir.digest)
  finally:
    run_dir.release()
  hooks.finish_rl(workdir, cfg, status, it, history, run.say,
                  extra=rl_rewards.finish(heldout, state, status, run))
  return RLResult(iteration=it, state=state, history=history, status=status,
                  programs=run.trainer.programs)
