"""The offline training driver: build a run from a validated `Config`, train,
checkpoint, evaluate.

``run(cfg, workdir)`` is the whole job (``jaxalign.main`` only parses flags):

1. `setup` builds the run once (`Run`): the mesh, the data stream
   (`jaxalign.train.stream`), the model, optimizer, initial or restored state and
   reference (`jaxalign.train.build`), and the jitted train step
   (`jaxalign.train.steps`). It resumes from the latest *complete* checkpoint in
   ``workdir/checkpoints`` if there is one (params, optimizer state, step, PRNG key
   and data-iterator state), so a restarted run continues bit-for-bit;
2. `train_step` is one iteration: the next batch of the stream, its cached
   reference log-probs (``reference.cache_dir``), the compiled step;
3. the driver's hooks, after each step: count non-finite steps (a step whose loss or
   gradients are non-finite leaves the state unchanged; ``max_nonfinite_in_a_row``
   in a row raise `NonFiniteError`, with no checkpoint after the last good one), log
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
import functools
import json
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
from jaxalign.train import hooks
from jaxalign.train import logging as log_lib
from jaxalign.train import objectives as obj_lib
from jaxalign.train import refcache
from jaxalign.train import state as state_lib
from jaxalign.train import steps as steps_lib
from jaxalign.train import stream

# Metrics drawn as PNGs at the end of a run.
PLOT_KEYS = (("train", "loss"), ("train", "grad_norm"), ("eval", "pair_accuracy"),
             ("eval", "pair_margin"), ("eval", "oracle_expected"),
             ("eval", "kl_to_reference"))


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite steps; the last good checkpoint is intact."""


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
  ref_params: Any  # what step_fn gets: None without a live reference
  eval_ref_params: Any  # the reference for eval's implicit rewards and KL, or None
  score_fn: Callable  # (params, host batch) -> per-sequence scores (eval)
  to_device: Callable[[dict], Any]
  ref_source: refcache.CachedReference | None
  faults: hooks.FaultInjection | None
  logger: Any
  say: Callable[[str], None]
  lead: bool


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
  if model.scalar:
    from jaxalign.models import heads  # pylint: disable=g-import-not-at-top

    def reward_fn(params, batch):
      hidden, _ = forward(params, batch)
      return heads.token_scores(hidden, params["head"])
    return obj_lib.make_objective("reward", loss_fn=loss_fn(cfg), reward_fn=reward_fn)
  return obj_lib.make_objective(
      cfg.loss.input_kind, loss_fn=loss_fn(cfg), forward_fn=forward,
      needs_reference=cfg.loss.needs_reference, chunk_size=cfg.model.logprob_chunk,
      logit_softcap=model.arch.final_logit_softcap)


def _restore_or_init(cfg: Config, model, optimizer, mesh, key, ckpt, train):
  """(state, shardings, start step, fresh?): the latest checkpoint, read straight
  into the target shardings (no init is compiled), or step 0."""
  latest = ckpt.latest_step()
  if latest is None:
    state, shardings = build.initial_state(model, optimizer, mesh, cfg.mesh.rules, key)
    return state, shardings, 0, True
  abstract, shardings = state_lib.state_shardings(
      model.init_params, optimizer, model.logical_axes, mesh, cfg.mesh.rules)
  restored = ckpt.restore(state_lib.abstract_tree(abstract, shardings), latest)
  train.set_state(restored.data_state)
  return state_lib.from_tree(restored.state), shardings, restored.step, False


def _references(cfg: Config, model, state, mesh, key, fresh: bool):
  """(reference params or None, their shardings or None). The reference is a frozen
  copy of the initial policy (a restart recomputes it from the seed, bit-identical)
  or an HF checkpoint. With a cache it is never loaded up front (only on a cache
  miss), so evaluation runs without one; a reward model has none."""
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


def _cached_reference(cfg, model, forward, mesh, key, ref_sh, data, say):
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
  return refcache.CachedReference(
      cfg, lambda: build.reference_params(cfg.reference, model, key, ref_sh), logprob,
      data.train.fresh, data.layout, say)


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
  state, shardings, start, fresh = _restore_or_init(cfg, model, optimizer, mesh, key,
                                                    ckpt, data.train)
  ref_params, ref_sh = _references(cfg, model, state, mesh, key, fresh)
  micro = cfg.data.micro_batches > 1
  sample = _sample_batch(cfg, data, faults)
  mesh_lib.check_batch_divisible(sample, mesh, microbatched=micro)
  live_ref = cfg.loss.needs_reference and not cfg.reference.cache_dir
  step_fn = steps_lib.make_train_step(
      objective=make_objective(cfg, model, forward), optimizer=optimizer, mesh=mesh,
      state_shardings=shardings, ref_shardings=ref_sh if live_ref else None,
      batch_ndims=steps_lib.batch_signature(sample), microbatched=micro)
  logger, say = _logger(cfg, workdir, start, lead, log)
  to_device = ((lambda b, m=micro: mesh_lib.global_batch(b, mesh, m)) if multi
               else (lambda b, m=micro: b))
  ref_source = (_cached_reference(cfg, model, forward, mesh, key, ref_sh, data, say)
                if cfg.loss.needs_reference and cfg.reference.cache_dir else None)
  score = _score_fn(forward, cfg, model, mesh, lambda b: to_device(b, False))
  run = Run(cfg=cfg, workdir=workdir, mesh=mesh, data=data, model=model, ckpt=ckpt,
            state=state, start=start, step_fn=step_fn,
            ref_params=ref_params if live_ref else None,
            eval_ref_params=None if model.scalar else ref_params, score_fn=score,
            to_device=to_device, ref_source=ref_source, faults=faults, logger=logger,
            say=say, lead=lead)
  _startup_messages(run)
  return run


def _score_fn(forward, cfg: Config, model: build.Model, mesh, to_device):
  repl = mesh_lib.replicated(mesh)
  if model.scalar:
    from jaxalign.models import heads  # pylint: disable=g-import-not-at-top

    @functools.partial(jax.jit, out_shardings=repl)
    def score(params, batch):
      hidden, _ = forward(params, batch)
      return obj_lib.gather_last(heads.token_scores(hidden, params["head"]),
                                 batch["seq_last"])
  else:
    @functools.partial(jax.jit, out_shardings=repl)
    def score(params, batch):
      return obj_lib.sequence_stats(forward, params, batch,
                                    chunk_size=cfg.model.logprob_chunk,
                                    logit_softcap=model.arch.final_logit_softcap)[0]
  return lambda params, batch: np.asarray(score(params, to_device(batch)))


def _startup_messages(run: Run) -> None:
  layout = run.data.layout
  run.say(f"data: layout={layout.kind}, buckets={tuple(layout.buckets)}, "
          f"{layout.examples_per_batch} examples per "
          f"{'micro-batch' if run.cfg.data.micro_batches > 1 else 'batch'}")
  if run.start:
    run.say(f"resumed from checkpoint step {run.start} in {run.ckpt.directory}")
  report = run.data.report
  if report is not None:
    run.say(f"data: {report.summary()}")
    if run.lead:
      with open(os.path.join(run.workdir, "data_report.json"), "w",
                encoding="utf-8") as f:
        json.dump(report.to_dict(), f, indent=1)


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
  run.logger.write(step, metrics, split="eval")
  return metrics


def save(run: Run, step: int, state: state_lib.TrainState, force: bool = False) -> bool:
  return run.ckpt.save(step, state_lib.to_tree(state), run.data.train.get_state(),
                       {"optimizer_step": int(state.step)}, force=force)


@dataclasses.dataclass
class _Counters:
  """The driver's host-side bookkeeping between log lines."""
  in_a_row: int = 0
  skipped_total: int = 0
  examples: int = 0  # valid examples trained on since the last log line
  t_last: float = dataclasses.field(default_factory=time.perf_counter)


def _check_nonfinite(run: Run, c: _Counters, metrics: dict, step: int) -> bool:
  """Counts a skipped (non-finite) step; raises after too many in a row."""
  if not bool(metrics["skipped"]):
    c.in_a_row = 0
    return False
  c.in_a_row += 1
  c.skipped_total += 1
  limit = run.cfg.max_nonfinite_in_a_row
  if c.in_a_row >= limit:
    run.ckpt.wait()
    raise NonFiniteError(
        f"{c.in_a_row} consecutive steps (up to step {step}) had a non-finite loss or "
        f"gradient (config.max_nonfinite_in_a_row={limit}); stopped without saving. "
        f"The last good checkpoint is step {run.ckpt.latest_step()} in "
        f"{run.ckpt.directory}.")
  return True


def _valid_examples(batch: dict, default: int) -> int:
  # A packed batch may hold fewer examples than asked (the rest were carried).
  valid = batch.get("example_valid")
  return default if valid is None else int(np.sum(valid))


def _log(run: Run, c: _Counters, step: int, metrics: dict) -> None:
  cfg = run.cfg
  if step % cfg.log.every_steps and step != cfg.num_steps:
    return
  now = time.perf_counter()
  host = {k: float(np.asarray(v)) for k, v in metrics.items()}
  host["pairs_per_s"] = c.examples / max(now - c.t_last, 1e-9)
  host["skipped_total"] = float(c.skipped_total)
  if run.ref_source is not None:
    host["ref_cache_misses"] = float(run.ref_source.misses)
  run.logger.write(step, host)
  c.t_last, c.examples = now, 0


def _finish(run: Run, status: str, step: int, last_eval: dict, skipped: int) -> None:
  if status != "done" or not run.lead:
    return
  if run.cfg.log.plots:
    log_lib.plot_metrics(run.workdir, PLOT_KEYS)
  with open(os.path.join(run.workdir, "final_eval.json"), "w", encoding="utf-8") as f:
    json.dump({"step": step, **last_eval, "skipped_total": skipped}, f, indent=1)


# ----------------------------------------------------------------------------
# The driver.


def run(cfg: Config, workdir: str, *, log: Callable[[str], None] | None = None
        ) -> RunResult:
  """Trains per ``cfg`` in ``workdir`` (resuming from its checkpoints); see module doc."""
  r = setup(cfg, workdir, log)
  c, state, step, status, last_eval = _Counters(), r.state, r.start, "done", {}
  every_eval = cfg.eval.every_steps
  try:
    with hooks.Preemption() as preempt:
      while step < cfg.num_steps:
        state, metrics, batch = train_step(r, state, step)
        step += 1
        c.examples += _valid_examples(batch, cfg.data.batch_size)
        skipped = _check_nonfinite(r, c, metrics, step)
        _log(r, c, step, metrics)
        r.logger.advance()
        if every_eval and step % every_eval == 0:
          last_eval = evaluate(r, step, state)
        if not skipped:
          started = save(r, step, state)
          if r.faults is not None:
            r.faults.after_save(step, started)
        if r.faults is not None:
          r.faults.after_step(step)
        if preempt.requested:
          save(r, step, state, force=True)
          r.ckpt.wait()
          status = "preempted"
          r.say(f"preempted by signal {preempt.signal} at step {step}; checkpoint saved")
          break
    if status == "done":
      if not last_eval or every_eval == 0 or step % every_eval:
        last_eval = evaluate(r, step, state)
      save(r, step, state, force=True)
    r.ckpt.wait()
  finally:
    r.ckpt.close()
    r.logger.close()
  _finish(r, status, step, last_eval, c.skipped_total)
  return RunResult(status=status, step=step, state=state, eval_metrics=last_eval,
                   skipped_steps=c.skipped_total)
