"""The offline training driver: build a run from a validated `Config`, train,
checkpoint, evaluate.

``run(cfg, workdir)`` is the whole job (``jaxalign.main`` only parses flags). It
first locks the run directory and checks a resume against its record
(`jaxalign.train.rundir`: one writer, no silent change of what defines the run,
``checkpoint.restore_step`` rollbacks), then:

1. `setup` builds the run once (`Run`): the mesh, the data stream
   (`jaxalign.train.stream`), the model, optimizer, initial or restored state and
   reference (`jaxalign.train.build`), and the jitted train step
   (`jaxalign.train.steps`). It resumes from the latest *complete* checkpoint in
   ``workdir/checkpoints`` if there is one (params, optimizer state, step, PRNG key
   and data-iterator state), so a restarted run continues bit-for-bit;
2. `train_step` is one iteration: the next batch of the stream, its cached
   reference log-probs (``reference.cache_dir``), the compiled step;
3. the driver's hooks (`jaxalign.train.hooks`), after each step: count non-finite
   steps (a step whose loss or gradients are non-finite leaves the state unchanged;
   ``max_nonfinite_in_a_row`` in a row raise `NonFiniteError`, with no checkpoint
   after the last good one), judge the update (`hooks.DivergenceGuard`: a divergent
   step is not saved, ``divergence.max_in_a_row`` in a row raise
   `hooks.DivergenceError` naming the checkpoint to resume from), log
   (``metrics.jsonl``, TensorBoard, a tqdm bar), evaluate every
   ``eval.every_steps``, save every ``checkpoint.every_steps``, and on SIGTERM /
   SIGINT save and return ``status="preempted"``;
4. at the end: a final eval, a final checkpoint, ``final_eval.json``, PNG plots.

The loop step (batches consumed) is the checkpoint step; the optimizer step
``state.step`` lags behind it by the number of skipped updates.

Under ``jax.distributed`` (``main.py --distributed``) every process runs this same
code: each feeds its devices its rows of the global batch
(`jaxalign.parallel.mesh.global_batch`), all save checkpoints together (Orbax), and
only process 0 writes metrics and plots.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxalign import checkpoint as ckpt_lib
from jaxalign import config as config_lib
from jaxalign import eval as eval_lib
from jaxalign.config import Config
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import build
from jaxalign.train import gen_eval
from jaxalign.train import hooks
from jaxalign.train import logging as log_lib
from jaxalign.train import objectives as obj_lib
from jaxalign.train import refcache
from jaxalign.train import rundir
from jaxalign.train import state as state_lib
from jaxalign.train import steps as steps_lib
from jaxalign.train import stream

# Metrics drawn as PNGs at the end of a run.
PLOT_KEYS = (("train", "loss"), ("train", "grad_norm"), ("eval", "pair_accuracy"),
             ("eval", "pair_margin"), ("eval", "oracle_expected"),
             ("eval", "kl_to_reference"), ("eval", "gen_oracle_reward"),
             ("eval", "gen_reward_model"), ("eval", "gen_win_rate"),
             ("eval", "gen_length"))


NonFiniteError = hooks.NonFiniteError  # too many non-finite steps in a row


@dataclasses.dataclass
class RunResult:
  status: str  # "done" | "preempted"
  step: int
  state: Any
  eval_metrics: dict
  skipped_steps: int


@dataclasses.dataclass
class Run:
  """What `setup` builds once; `train_step` and the hooks only read it."""
  cfg: Config
  workdir: str
  mesh: Any
  data: stream.Data
  model: build.Model
  ckpt: ckpt_lib.Checkpointer
  state: state_lib.TrainState  # the initial (or restored) state
  start: int  # the loop step it resumes at
  step_fn: Callable  # (state, ref_params, device batch) -> (state, metrics)
  ref_params: Any  # what step_fn gets: the live reference, a LoRA run's base, or None
  eval_ref_params: Any  # the reference for eval's implicit rewards and KL, or None
  score_fn: Callable  # (params, host batch) -> per-sequence scores (eval)
  to_device: Callable[[dict], Any]
  ref_source: refcache.CachedReference | None
  faults: hooks.FaultInjection | None
  logger: Any
  say: Callable[[str], None]
  lead: bool
  gen_eval: Any = None  # gen_eval.GenEval: evaluation by generation, or None
  # Facts every checkpoint's metadata carries (a LoRA run's base fingerprint).
  ckpt_meta: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------
# Setup.


def objective_kind(cfg: Config) -> str:
  return "reward" if cfg.model.head == "scalar" else cfg.loss.input_kind


def loss_fn(cfg: Config) -> obj_lib.LossFn:
  """The loss bound to its hyperparameters: ``fn(inputs) -> (losses [N], metrics)``."""
  from jaxalign import losses  # pylint: disable=g-import-not-at-top
  fn, _ = losses.resolve(config_lib.loss_arg(cfg.loss.terms), cfg.loss.hparams_dict())
  return fn


def make_objective(cfg: Config, model: build.Model, forward: obj_lib.ForwardFn):
  """``(trained params, frozen params, batch, ...) -> (loss, metrics)``; with LoRA
  the trained params are the adapters and the frozen ones the base
  (`objectives.lora_objective`)."""
  if model.scalar:
    from jaxalign.models import heads  # pylint: disable=g-import-not-at-top

    def reward_fn(params, batch):
      hidden, _ = forward(params, batch)
      return heads.token_scores(hidden, params["head"])
    objective = obj_lib.make_objective("reward", loss_fn=loss_fn(cfg),
                                       reward_fn=reward_fn)
  else:
    objective = obj_lib.make_objective(
        cfg.loss.input_kind, loss_fn=loss_fn(cfg), forward_fn=forward,
        needs_reference=cfg.loss.needs_reference, chunk_size=cfg.model.logprob_chunk,
        logit_softcap=model.arch.final_logit_softcap)
  if not model.uses_lora:
    return objective
  return obj_lib.make_lora_objective(objective, live_reference=_live_reference(cfg))


def _live_reference(cfg: Config) -> bool:
  """Whether the step runs the reference forward (not read from the cache)."""
  return cfg.loss.needs_reference and not cfg.reference.cache_dir


def _restore_or_init(cfg: Config, model, optimizer, mesh, key, ckpt, train,
                     base_id: dict | None = None):
  """(state, shardings, start step, fresh?): the latest checkpoint, read straight
  into the target shardings (no init is compiled), or step 0. ``base_id``: a LoRA
  run's `build.base_fingerprint`, which the checkpoint must carry."""
  latest = ckpt.latest_step()
  loss_state = obj_lib.initial_loss_state(cfg.loss.terms)  # e.g. bco_pair's delta
  if latest is None:
    state, shardings = build.initial_state(model, optimizer, mesh, cfg.mesh.rules, key)
    return (*state_lib.with_loss_state(state, shardings, loss_state), 0, True)
  abstract, shardings = state_lib.with_loss_state(
      *build.state_shardings(model, optimizer, mesh, cfg.mesh.rules), loss_state)
  restored = _restore(cfg, ckpt, state_lib.abstract_tree(abstract, shardings), latest)
  if base_id is not None:
    build.check_base_fingerprint(restored.meta, base_id,
                                 f"{ckpt.directory} step {latest}")
  train.set_state(restored.data_state)
  return state_lib.from_tree(restored.state), shardings, restored.step, False


def _restore(cfg: Config, ckpt, target, step: int):
  """`Checkpointer.restore`, naming the LoRA setting when the trees disagree (a full
  fine-tune's checkpoint holds every weight, a LoRA run's only its adapters)."""
  try:
    return ckpt.restore(target, step)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f"{ckpt.directory} step {step}: its state does not fit this run's "
        f"(config.model.lora.rank={cfg.model.lora.rank}, the model and optimizer "
        "config); resume with the settings that wrote it, or start in a new workdir. "
        f"Orbax: {str(e)[:800]}") from e


def _references(cfg: Config, model, state, mesh, key, fresh: bool):
  """(reference params or None, their shardings or None). The reference is a frozen
  copy of the initial policy (a restart recomputes it from the seed, bit-identical)
  or an HF checkpoint. With a cache it is never loaded up front (only on a cache
  miss), so evaluation runs without one; a reward model has none. With LoRA: the
  frozen base, which every step takes (the reference is it, adapters off)."""
  if model.uses_lora:
    return build.base_params(model, mesh, cfg.mesh.rules, key)
  use_cache = cfg.loss.needs_reference and bool(cfg.reference.cache_dir)
  want_for_eval = cfg.reference.kind != "none" and not model.scalar and not use_cache
  if not (cfg.loss.needs_reference or want_for_eval):
    return None, None
  abstract = jax.eval_shape(model.init_params, jax.random.key(0))
  shardings = mesh_lib.reference_shardings(model.logical_axes, mesh, cfg.mesh, abstract)
  if use_cache:
    return None, shardings
  if fresh and cfg.reference.kind == "initial":
    return build.copy_params(state.params, shardings), shardings
  return build.reference_params(cfg.reference, model, key, shardings), shardings


def _sample_batch(cfg: Config, data: stream.Data, faults) -> dict:
  """The first batch's shapes, with every key the step will see."""
  sample = data.train.peek()
  if faults is not None:
    sample = faults.gate(sample, 0)
  if cfg.loss.needs_reference and cfg.reference.cache_dir:
    sample = dict(sample, **{obj_lib.REF_LOGPS_KEY: np.zeros(
        np.shape(sample["seq_last"]), np.float32)})
  return sample


def _cached_reference(cfg, model, forward, mesh, key, ref_sh, data, say, base=None):
  """``base``: a LoRA run's frozen base, the reference a cache miss computes with."""
  micro = data.train.micro_batches
  sample = data.train.peek()
  step = steps_lib.make_logprob_step(
      forward_fn=forward, mesh=mesh, param_shardings=ref_sh,
      batch_ndims=steps_lib.batch_signature(
          jax.tree.map(lambda x: x[0], sample) if micro > 1 else sample),
      chunk_size=cfg.model.logprob_chunk, logit_softcap=model.arch.final_logit_softcap)

  def logprob(params, batch):
    if micro == 1:
      return np.asarray(step(params, batch)[0])
    return np.stack([np.asarray(step(params, jax.tree.map(lambda x: x[i], batch))[0])
                     for i in range(micro)])
  load = ((lambda: base) if base is not None
          else (lambda: build.reference_params(cfg.reference, model, key, ref_sh)))
  return refcache.CachedReference(cfg, load, logprob, data.train.fresh, data.layout, say)


def _logger(cfg: Config, workdir: str, start: int, lead: bool, log):
  if lead:
    logger = log_lib.MetricsLogger(workdir, total_steps=cfg.num_steps, start_step=start,
                                   tensorboard=cfg.log.tensorboard,
                                   progress_bar=cfg.log.progress_bar)
  else:  # only process 0 writes metrics, TensorBoard and plots
    logger = hooks.NullLogger()
  return logger, (log or logger.info)


def setup(cfg: Config, workdir: str, log: Callable[[str], None] | None = None) -> Run:
  """Builds everything the run needs, before the first step; see the module doc."""
  multi, lead = jax.process_count() > 1, jax.process_index() == 0
  if multi and cfg.reference.cache_dir:
    raise ValueError("config.reference.cache_dir: the reference cache is built by one "
                     f"process; this run has jax.process_count()={jax.process_count()}. "
                     "Build it with a single-process run, or set "
                     "reference.cache_dir='' (live reference).")
  os.makedirs(workdir, exist_ok=True)
  mesh, key = mesh_lib.make_mesh(cfg.mesh), jax.random.key(cfg.seed)
  data = stream.build_data(cfg, objective_kind(cfg))
  model = build.build_model(cfg.model, data.vocab_size)
  optimizer = build.make_optimizer(cfg.optimizer, cfg.num_steps)
  faults = hooks.FaultInjection.from_config(cfg.debug)
  from jaxalign.models import transformer  # pylint: disable=g-import-not-at-top
  forward = build.make_forward(model, transformer.ActivationSharding(mesh, cfg.mesh.rules))
  if faults is not None:
    forward = faults.wrap_forward(forward)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               save_every=cfg.checkpoint.every_steps,
                               keep=cfg.checkpoint.keep,
                               async_save=cfg.checkpoint.async_save)
  base_id = (build.base_fingerprint(cfg.model, model.arch, cfg.seed)
             if model.uses_lora else None)
  state, shardings, start, fresh = _restore_or_init(cfg, model, optimizer, mesh, key,
                                                    ckpt, data.train, base_id)
  ref_params, ref_sh = _references(cfg, model, state, mesh, key, fresh)
  base = ref_params if model.uses_lora else None  # every LoRA step takes the base
  micro = cfg.data.micro_batches > 1
  sample = _sample_batch(cfg, data, faults)
  mesh_lib.check_batch_divisible(sample, mesh, microbatched=micro)
  step_fn = _make_step(cfg, model, forward, optimizer, mesh, shardings, ref_sh, sample)
  logger, say = _logger(cfg, workdir, start, lead, log)
  to_device = ((lambda b, m=micro: mesh_lib.global_batch(b, mesh, m)) if multi
               else (lambda b, m=micro: b))
  ref_source = (_cached_reference(cfg, model, forward, mesh, key, ref_sh, data, say, base)
                if cfg.loss.needs_reference and cfg.reference.cache_dir else None)
  score = gen_eval.score_fn(forward, cfg, model, mesh, lambda b: to_device(b, False), base)
  eval_ref = gen_eval.eval_reference(cfg, model, ref_params)
  run = Run(cfg=cfg, workdir=workdir, mesh=mesh, data=data, model=model, ckpt=ckpt,
            state=state, start=start, step_fn=step_fn,
            ref_params=ref_params if _live_reference(cfg) or base is not None else None,
            eval_ref_params=eval_ref, score_fn=score,
            to_device=to_device, ref_source=ref_source, faults=faults, logger=logger,
            say=say, lead=lead, ckpt_meta=base_id or {})
  run.gen_eval = gen_eval.build(  # a judge's reference: eval's, else loaded (a cache)
      cfg, model, mesh, data.eval_examples, state.params, base=base, say=say,
      reference=lambda: eval_ref if eval_ref is not None else build.reference_params(
          cfg.reference, model, key, ref_sh))
  _startup_messages(run)
  return run


def _make_step(cfg: Config, model: build.Model, forward, optimizer, mesh, shardings,
               ref_sh, sample: dict) -> Callable:
  """The compiled train step: ``(state, frozen params, batch) -> (state, metrics)``;
  the frozen params are the live reference, a LoRA run's base, or None."""
  frozen = _live_reference(cfg) or model.uses_lora
  micro = cfg.data.micro_batches > 1
  return steps_lib.make_train_step(
      objective=make_objective(cfg, model, forward), optimizer=optimizer, mesh=mesh,
      state_shardings=shardings, ref_shardings=ref_sh if frozen else None,
      batch_ndims=steps_lib.batch_signature(sample), microbatched=micro,
      stochastic=model.uses_lora and model.lora.dropout > 0)


_startup_messages = hooks.startup_messages  # layout, resume, data report, warnings


# ----------------------------------------------------------------------------
# One iteration and the hooks.


def train_step(run: Run, state: state_lib.TrainState, step: int
               ) -> tuple[state_lib.TrainState, dict, dict]:
  """Loop step ``step`` -> ``step + 1``: (new state, device metrics, host batch)."""
  batch = next(run.data.train)
  if run.ref_source is not None:
    batch = run.ref_source.attach(batch)
  if run.faults is not None:
    batch = run.faults.gate(batch, step + 1)
  state, metrics = run.step_fn(state, run.ref_params, run.to_device(batch))
  return state, metrics, batch


def evaluate(run: Run, step: int, state: state_lib.TrainState) -> dict:
  if not run.cfg.eval.enabled:
    return {}
  beta = float(run.cfg.loss.hparams_dict().get("beta", 1.0))
  metrics = eval_lib.evaluate(run.score_fn, state.params, run.eval_ref_params,
                              run.data.eval_set, beta=beta,
                              implicit=not run.model.scalar)
  if run.gen_eval is not None:  # the policy's own responses (gen_eval module doc)
    metrics.update(run.gen_eval(state.params))
  run.logger.write(step, metrics, split="eval")
  return metrics


def save(run: Run, step: int, state: state_lib.TrainState, force: bool = False,
         meta: dict | None = None) -> bool:
  return run.ckpt.save(step, state_lib.to_tree(state), run.data.train.get_state(),
                       {"optimizer_step": int(state.step), **run.ckpt_meta,
                        **(meta or {})}, force=force)


# ----------------------------------------------------------------------------
# The driver.


def run(cfg: Config, workdir: str, *, log: Callable[[str], None] | None = None
        ) -> RunResult:
  """Trains per ``cfg`` in ``workdir`` (resuming from its checkpoints); see module doc.

  First `rundir.prepare` locks ``workdir`` and checks a resume against its record
  (raising `rundir.RunDirError` before anything is built); the lock is released at
  the end, whatever happens."""
  lead = jax.process_index() == 0
  say = (log or print) if lead else (lambda message: None)
  run_dir = rundir.prepare(cfg, workdir, lead=lead, say=say)
  try:
    hooks.announce_setup(cfg, say)
    return _train(setup(cfg, workdir, log), run_dir.digest)
  finally:
    run_dir.release()


def _train(r: Run, run_digest: str) -> RunResult:
  cfg, every_eval = r.cfg, r.cfg.eval.every_steps
  guard = hooks.DivergenceGuard(cfg.divergence,
                                r.ckpt.read_meta(r.start).get("guard") if r.start else None)
  c = hooks.Counters(guard=guard, run_digest=run_digest)
  state, step, status, last_eval = r.state, r.start, "done", {}
  try:
    with hooks.Preemption(r.say) as preempt:
      if every_eval and step == 0:  # the eval plots' step-0 point: the initial policy
        last_eval = evaluate(r, 0, state)
      hooks.announce_compile(r)
      t0 = time.perf_counter()
      while step < cfg.num_steps:
        state, metrics, batch = train_step(r, state, step)
        step += 1
        c.examples += hooks.valid_examples(batch, cfg.data.batch_size)
        hold = hooks.check_step(r, c, metrics, step)
        hooks.log_step(r, c, step, metrics)
        r.logger.advance()
        if step == r.start + 1:
          r.say(f"first step done in {time.perf_counter() - t0:.1f} s (compiling "
                "included); training")
        if every_eval and step % every_eval == 0:
          last_eval = evaluate(r, step, state)
        if not hold:
          started = save(r, step, state, meta=c.meta())
          if r.faults is not None:
            r.faults.after_save(step, started)
        if r.faults is not None:
          r.faults.after_step(step)
        if preempt.requested:
          status = "preempted"
          _preempted(r, c, step, state, preempt.signal, hold)
          break
    if status == "done":
      if not last_eval or every_eval == 0 or step % every_eval:
        last_eval = evaluate(r, step, state)
      if not c.divergent_in_a_row:  # never save a state a divergent step produced
        save(r, step, state, force=True, meta=c.meta())
    r.ckpt.wait()
  finally:
    r.ckpt.close()
    r.logger.close()
  hooks.finish(r, status, step, last_eval, c.skipped_total, PLOT_KEYS)
  return RunResult(status=status, step=step, state=state, eval_metrics=last_eval,
                   skipped_steps=c.skipped_total)


def _preempted(r: Run, c: hooks.Counters, step: int, state, signum, hold: bool) -> None:
  saved = not c.divergent_in_a_row and save(r, step, state, force=True, meta=c.meta())
  r.ckpt.wait()
  where = (f"checkpoint step {step} saved" if saved or not hold
           else f"not saved (a suspect state); {hooks.resume_hint(r.ckpt, step)}")
  r.say(f"preempted by signal {signum} at step {step}; {where}")
