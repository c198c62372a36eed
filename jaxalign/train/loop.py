"""The training loop: build a run from a validated `Config`, train, checkpoint, evaluate.

``run(cfg, workdir)`` is the whole job (``jaxalign.main`` only parses flags):

1. builds the mesh, the data (train iterator with ``get_state`` / ``set_state``, and a
   held-out eval set), the model, the optimizer, the sharded `TrainState` and the
   reference params, and the jitted train step (``jaxalign.train.steps``);
2. resumes from the latest *complete* checkpoint in ``workdir/checkpoints`` if there
   is one (params, optimizer state, step, PRNG key and data-iterator state), so a
   restarted run continues bit-for-bit where the interrupted one left off;
3. trains for ``cfg.num_steps`` loop steps (one batch each), logging to
   ``metrics.jsonl``, TensorBoard and a tqdm bar, evaluating every
   ``eval.every_steps`` and saving every ``checkpoint.every_steps``;
4. on SIGTERM / SIGINT (preemption) saves a checkpoint at the current step and
   returns ``status="preempted"``;
5. a step whose loss or gradients are non-finite leaves the state unchanged (the step
   function selects the old state) and is counted; ``max_nonfinite_in_a_row`` such
   steps in a row raise `NonFiniteError`, with no checkpoint written after the last
   good one;
6. at the end: a final eval, a final checkpoint, PNG plots of the main curves.

The loop step (batches consumed) is the checkpoint step; the optimizer step
``state.step`` lags behind it by the number of skipped updates.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign import checkpoint as ckpt_lib
from jaxalign import eval as eval_lib
from jaxalign import config as config_lib
from jaxalign.config import Config
from jaxalign.data import batching
from jaxalign.data import examples as ex_lib
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import logging as log_lib
from jaxalign.train import objectives as obj_lib
from jaxalign.train import state as state_lib
from jaxalign.train import steps as steps_lib

# Metrics drawn as PNGs at the end of a run.
PLOT_KEYS = (("train", "loss"), ("train", "grad_norm"), ("eval", "pair_accuracy"),
             ("eval", "pair_margin"), ("eval", "oracle_expected"),
             ("eval", "kl_to_reference"))
DEBUG_NAN_KEY = "debug_nan_gate"


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite steps; the last good checkpoint is intact."""


# ----------------------------------------------------------------------------
# Optimizer.


def make_optimizer(opt_cfg, num_steps: int) -> optax.GradientTransformation:
  """optax chain from `OptimizerConfig`: clip, then adam(w)/sgd with a schedule."""
  peak = opt_cfg.learning_rate
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
# Data.


_KIND_EXAMPLE = {"sft": ex_lib.SFTExample, "pairwise": ex_lib.PairExample,
                 "reward": ex_lib.PairExample, "unpaired": ex_lib.UnpairedExample,
                 "ranked": ex_lib.RankedExample}


def convert_examples(examples: Sequence[Any], kind: str) -> list[Any]:
  """Adapts pairs to the loss's input kind (e.g. HH pairs for SFT, KTO or RRHF).

  pairs -> sft: the chosen response; -> unpaired: chosen desirable, rejected not;
  -> ranked: (chosen, rejected) with scores (1, 0). Other kinds pass through.
  """
  want = _KIND_EXAMPLE[kind]
  out = []
  for e in examples:
    if isinstance(e, want):
      out.append(e)
    elif isinstance(e, ex_lib.PairExample) and want is ex_lib.SFTExample:
      out.append(ex_lib.SFTExample(prompt=e.prompt, completion=e.chosen))
    elif isinstance(e, ex_lib.PairExample) and want is ex_lib.UnpairedExample:
      out.append(ex_lib.UnpairedExample(prompt=e.prompt, completion=e.chosen, label=True))
      out.append(ex_lib.UnpairedExample(prompt=e.prompt, completion=e.rejected,
                                        label=False))
    elif isinstance(e, ex_lib.PairExample) and want is ex_lib.RankedExample:
      out.append(ex_lib.RankedExample(prompt=e.prompt, responses=(e.chosen, e.rejected),
                                      scores=np.asarray([1.0, 0.0], np.float32)))
    else:
      raise ValueError(f"cannot use {type(e).__name__} data for a {kind!r} loss; "
                       "change config.data.format or config.loss.")
  return out


class ExampleBatches:
  """Batches from the checkpointable grain example iterator (`jaxalign.data.pipeline`).

  Examples come shuffled (a new permutation each epoch, repeated forever) and
  sharded by process; each batch lays out the next ``examples_per_batch`` of them.
  ``get_state`` / ``set_state`` are the grain iterator's (a JSON-able dict), taken
  between batches, so a restored iterator yields exactly the batches that followed.
  """

  def __init__(self, examples: Sequence[Any], layout: batching.LayoutConfig,
               seed: int):
    from jaxalign.data import pipeline  # pylint: disable=g-import-not-at-top
    n = layout.examples_per_batch
    if len(examples) < n:
      raise ValueError(f"{len(examples)} training examples cannot fill one batch of "
                       f"{n}; lower config.data.batch_size or add data.")
    self._layout = layout
    self._it = pipeline.make_example_iterator(
        list(examples), lambda e: e, seed=seed, num_epochs=None,
        process_index=jax.process_index(), process_count=jax.process_count())

  def get_state(self) -> dict:
    return self._it.get_state()

  def set_state(self, state: dict) -> None:
    self._it.set_state(state)

  def __iter__(self) -> "ExampleBatches":
    return self

  def __next__(self) -> dict:
    chunk = [next(self._it) for _ in range(self._layout.examples_per_batch)]
    return batching.make_batch(chunk, self._layout)


def layout_config(cfg: Config, examples_per_batch: int, responses: int | None = None,
                  layout: str | None = None) -> batching.LayoutConfig:
  """The batch layout of ``config.data`` (``layout`` overrides its kind)."""
  rows = cfg.data.rows_per_batch or None
  layout = layout or cfg.data.layout
  return batching.LayoutConfig(
      kind=layout, buckets=tuple(cfg.data.buckets),
      examples_per_batch=examples_per_batch,
      rows_per_batch=None if layout == "padded" else rows,
      responses_per_example=responses)


def make_batches(examples: Sequence[Any], layout: batching.LayoutConfig) -> list[dict]:
  """Lays out a finite example list in order; the last batch is padded (invalid slots)."""
  n = layout.examples_per_batch
  return [batching.make_batch(list(examples[i:i + n]), layout)
          for i in range(0, len(examples), n)]


@dataclasses.dataclass
class Data:
  train: Any  # iterator of batch dicts with get_state() / set_state()
  eval_set: eval_lib.EvalSet
  vocab_size: int
  report: Any = None  # formats.DataReport of file data: skipped / truncated, by reason


def build_data(cfg: Config, kind: str) -> Data:
  """Train iterator and held-out eval set for the loss's input kind."""
  d = cfg.data
  k = d.task.num_candidates
  if d.source == "synthetic":
    from jaxalign.data import synthetic  # pylint: disable=g-import-not-at-top
    task = synthetic.SyntheticTaskConfig(vocab_size=d.task.vocab_size,
                                         target_len=d.task.target_len)
    rng = np.random.default_rng([cfg.seed, 1])
    makers = {"sft": synthetic.make_sft, "pairwise": synthetic.make_pairs,
              "reward": synthetic.make_pairs, "unpaired": synthetic.make_unpaired}
    if kind == "ranked":
      train = synthetic.make_ranked(rng, d.task.num_train, k, task)
    else:
      train = makers[kind](rng, d.task.num_train, task)
    eval_rng = np.random.default_rng([cfg.seed, 2])
    eval_pairs = synthetic.make_pairs(eval_rng, cfg.eval.num_examples, task)
    eval_cands = synthetic.make_ranked(eval_rng, cfg.eval.num_examples, k, task)
    vocab = task.vocab_size
  else:
    from jaxalign.data import formats  # pylint: disable=g-import-not-at-top
    tok = _tokenizer(d.tokenizer)
    trunc = formats.Truncation(max_length=d.max_length or None,
                               max_prompt_length=d.max_prompt_length or None)
    report = formats.DataReport()
    load = functools.partial(formats.load_examples, fmt=d.format, tokenizer=tok,
                             on_error=d.on_error, truncation=trunc, report=report)
    examples = load(d.path)
    if d.eval_path:
      held = load(d.eval_path)
    else:
      if len(examples) <= cfg.eval.num_examples:
        raise ValueError(f"config.data.path has {len(examples)} examples, not more than "
                         f"eval.num_examples={cfg.eval.num_examples}; set "
                         "data.eval_path or lower eval.num_examples.")
      examples, held = (examples[:-cfg.eval.num_examples],
                        examples[-cfg.eval.num_examples:])
    train = convert_examples(examples, kind)
    eval_pairs = [e for e in held if isinstance(e, ex_lib.PairExample)]
    eval_cands = []
    vocab = tok.vocab_size
  layout = layout_config(cfg, cfg.data.batch_size,
                         k if kind == "ranked" and d.source == "synthetic" else None)
  train_it = ExampleBatches(train, layout, seed=d.shuffle_seed)
  # Eval batches are always padded: one row per sequence, whatever trains.
  eval_set = eval_lib.EvalSet(
      pair_batches=(make_batches(eval_pairs, layout_config(
          cfg, cfg.eval.batch_size, layout="padded")) if eval_pairs else []),
      candidate_batches=(make_batches(eval_cands, layout_config(
          cfg, cfg.eval.batch_size, k, layout="padded")) if eval_cands else []))
  return Data(train=train_it, eval_set=eval_set, vocab_size=vocab,
              report=report if d.source == "file" else None)


def _tokenizer(spec: str):
  from jaxalign.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  if spec == "byte":
    return tok_lib.ByteTokenizer()
  if not os.path.exists(spec):
    raise ValueError(f"config.data.tokenizer={spec!r}: not 'byte' and no such "
                     "SentencePiece model file.")
  return tok_lib.SentencePieceTokenizer.from_file(spec)


# ----------------------------------------------------------------------------
# Model, state, step.


@dataclasses.dataclass
class Model:
  arch: Any  # TransformerConfig
  graphdef: Any
  init_params: Callable[[jax.Array], Any]  # key -> params pytree
  logical_axes: Any
  loaded_params: Any = None  # host params from model.hf_path


def build_model(cfg: Config, vocab_size: int) -> Model:
  from jaxalign.models import heads  # pylint: disable=g-import-not-at-top
  from jaxalign.models import transformer  # pylint: disable=g-import-not-at-top

  loaded = None
  if cfg.model.hf_path:
    from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
    arch, loaded = hf.load(cfg.model.hf_path)
  else:
    arch = cfg.model.arch
  if arch.vocab_size < vocab_size:
    raise ValueError(f"config.model.vocab_size={arch.vocab_size} is smaller than the "
                     f"data's vocabulary ({vocab_size}); raise it.")
  box = {}

  def init_lm(key):
    graphdef, params = transformer.init(arch, key)
    box["graphdef"] = graphdef
    return params

  if cfg.model.head == "scalar":
    def init_params(key):
      k1, k2 = jax.random.split(key)
      return {"model": init_lm(k1), "head": heads.init_head(arch.d_model, k2)}
    axes = {"model": transformer.logical_axes(arch), "head": heads.head_logical_axes()}
  else:
    init_params = init_lm
    axes = transformer.logical_axes(arch)
  jax.eval_shape(init_params, jax.random.key(0))  # fills box["graphdef"]
  if loaded is not None and cfg.model.head == "scalar":
    loaded = {"model": loaded, "head": None}
  return Model(arch=arch, graphdef=box["graphdef"], init_params=init_params,
               logical_axes=axes, loaded_params=loaded)


def _forward_fn(model: Model, scalar_head: bool):
  from jaxalign.models import transformer  # pylint: disable=g-import-not-at-top

  def forward(params, batch):
    lm = params["model"] if scalar_head else params
    hidden, unembed = transformer.forward(
        model.graphdef, lm, batch["tokens"], batch["positions"],
        batch.get("segment_ids"), batch.get("branch_ids"))
    if DEBUG_NAN_KEY in batch:
      # Fault injection: 1.0 normally, NaN on the steps listed in debug.nonfinite_steps.
      hidden = hidden * batch[DEBUG_NAN_KEY][0].astype(hidden.dtype)
    return hidden, unembed
  return forward


def _loss_fn(cfg: Config):
  """The loss bound to its hyperparameters: ``fn(inputs) -> (losses [N], metrics)``."""
  from jaxalign import losses  # pylint: disable=g-import-not-at-top
  fn, _ = losses.resolve(config_lib.loss_arg(cfg.loss.terms), cfg.loss.hparams_dict())
  return fn


def _objective_kind(cfg: Config) -> str:
  return "reward" if cfg.model.head == "scalar" else cfg.loss.input_kind


def _chunk_size(model: Model) -> int:
  """Tokens per log-prob chunk: bounds the live [chunk, V] logits block."""
  del model  # One size fits the vocabularies used so far; revisit for V >= 128k.
  return 128


# ----------------------------------------------------------------------------
# Preemption.


class Preemption:
  """Turns SIGTERM / SIGINT into a flag the loop polls between steps."""

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}

  def __enter__(self) -> "Preemption":
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal = signum

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  @property
  def requested(self) -> bool:
    return self.signal is not None


# ----------------------------------------------------------------------------
# The run.


def _state_to_tree(state: state_lib.TrainState) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "rng": ckpt_lib.key_to_data(state.rng)}


def _tree_to_state(tree: dict) -> state_lib.TrainState:
  return state_lib.TrainState(step=tree["step"], params=tree["params"],
                              opt_state=tree["opt_state"],
                              rng=ckpt_lib.data_to_key(tree["rng"]))


def _abstract_tree(abstract_state, shardings) -> dict:
  """The checkpoint target: shapes, dtypes and shardings, nothing allocated."""
  placed = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, shardings)
  rng = jax.eval_shape(ckpt_lib.key_to_data, abstract_state.rng)
  return {"step": placed.step, "params": placed.params, "opt_state": placed.opt_state,
          "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=shardings.rng)}


@dataclasses.dataclass
class RunResult:
  status: str  # "done" | "preempted"
  step: int
  state: Any
  eval_metrics: dict
  skipped_steps: int


def run(cfg: Config, workdir: str, *, log: Callable[[str], None] | None = None
        ) -> RunResult:
  """Trains per ``cfg`` in ``workdir`` (resuming from its checkpoints); see module doc."""
  if jax.process_count() > 1:
    # Batches are laid out whole on the host; a multi-host run would need each
    # process's rows assembled with jax.make_array_from_process_local_data and a
    # global sequence numbering, which this loop does not do yet.
    raise ValueError(f"jaxalign.train.loop.run is single-process; got "
                     f"jax.process_count()={jax.process_count()}.")
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  kind = _objective_kind(cfg)
  data = build_data(cfg, kind)
  model = build_model(cfg, data.vocab_size)
  optimizer = make_optimizer(cfg.optimizer, cfg.num_steps)
  loss_fn = _loss_fn(cfg)
  scalar = cfg.model.head == "scalar"
  debug_gate = bool(cfg.debug.nonfinite_steps)
  forward = _forward_fn(model, scalar)
  needs_ref = cfg.loss.needs_reference

  if scalar:
    from jaxalign.models import heads  # pylint: disable=g-import-not-at-top

    def reward_fn(params, batch):
      hidden, _ = forward(params, batch)
      return heads.token_scores(hidden, params["head"])
    objective = obj_lib.make_objective("reward", loss_fn=loss_fn, reward_fn=reward_fn)
  else:
    objective = obj_lib.make_objective(kind, loss_fn=loss_fn, forward_fn=forward,
                                       needs_reference=needs_ref,
                                       chunk_size=_chunk_size(model))

  rules = cfg.mesh.rules
  key = jax.random.key(cfg.seed)
  abstract, shardings = state_lib.state_shardings(model.init_params, optimizer,
                                                  model.logical_axes, mesh, rules)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               save_every=cfg.checkpoint.every_steps,
                               keep=cfg.checkpoint.keep,
                               async_save=cfg.checkpoint.async_save)
  start = 0
  latest = ckpt.latest_step()
  if latest is None:
    state, shardings = _initial_state(model, optimizer, mesh, rules, key)
  else:
    # Straight from the checkpoint into the target shardings: no init is compiled.
    restored = ckpt.restore(_abstract_tree(abstract, shardings), latest)
    state = _tree_to_state(restored.state)
    data.train.set_state(restored.data_state)
    start = restored.step

  # The reference: a frozen copy of the initial policy (a restart recomputes it from
  # the seed, bit-identical) or an HF checkpoint.
  ref_params, ref_shardings = None, None
  want_ref_for_eval = cfg.reference.kind != "none" and not scalar
  if needs_ref or want_ref_for_eval:
    ref_shardings = mesh_lib.reference_shardings(
        model.logical_axes, mesh, cfg.mesh, abstract.params)
    if latest is None and cfg.reference.kind == "initial":
      # A real copy: the train step donates (and so deletes) the state's buffers.
      ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                           out_shardings=ref_shardings)(state.params)
    else:
      ref_params = _reference_params(cfg, model, key, ref_shardings)

  sample = next(iter(_peek(data.train)))
  if debug_gate:
    sample = dict(sample, **{DEBUG_NAN_KEY: np.ones((1,), np.float32)})
  mesh_lib.check_batch_divisible(sample, mesh)
  train_step = steps_lib.make_train_step(
      objective=objective, optimizer=optimizer, mesh=mesh, state_shardings=shardings,
      ref_shardings=ref_shardings if needs_ref else None,
      batch_ndims=steps_lib.batch_signature(sample))

  logger = log_lib.MetricsLogger(workdir, total_steps=cfg.num_steps, start_step=start,
                                 tensorboard=cfg.log.tensorboard,
                                 progress_bar=cfg.log.progress_bar)
  say = log or logger.info
  if latest is not None:
    say(f"resumed from checkpoint step {start} in {ckpt.directory}")
  if data.report is not None:
    say(f"data: {data.report.summary()}")
    with open(os.path.join(workdir, "data_report.json"), "w", encoding="utf-8") as f:
      json.dump(data.report.to_dict(), f, indent=1)

  score_fn = _score_fn(forward, model, scalar, mesh)
  beta = float(cfg.loss.hparams_dict().get("beta", 1.0))

  def do_eval(step, state):
    if not cfg.eval.enabled:
      return {}
    metrics = eval_lib.evaluate(score_fn, state.params,
                                None if scalar else ref_params, data.eval_set,
                                beta=beta, implicit=not scalar)
    logger.write(step, metrics, split="eval")
    return metrics

  def save(step, state, force=False):
    return ckpt.save(step, _state_to_tree(state), data.train.get_state(),
                     {"optimizer_step": int(state.step)}, force=force)

  ref_arg = ref_params if needs_ref else None
  examples_per_step = cfg.data.batch_size
  in_a_row, skipped_total, last_eval = 0, 0, {}
  status = "done"
  t_last, steps_since = time.perf_counter(), 0
  step = start
  try:
    with Preemption() as preempt:
      while step < cfg.num_steps:
        batch = next(data.train)
        if debug_gate:
          gate = np.nan if (step + 1) in cfg.debug.nonfinite_steps else 1.0
          batch = dict(batch, **{DEBUG_NAN_KEY: np.full((1,), gate, np.float32)})
        state, metrics = train_step(state, ref_arg, batch)
        step += 1
        steps_since += 1
        skipped = bool(metrics["skipped"])
        if skipped:
          in_a_row += 1
          skipped_total += 1
          if in_a_row >= cfg.max_nonfinite_in_a_row:
            ckpt.wait()
            raise NonFiniteError(
                f"{in_a_row} consecutive steps (up to step {step}) had a non-finite "
                f"loss or gradient (config.max_nonfinite_in_a_row="
                f"{cfg.max_nonfinite_in_a_row}); stopped without saving. The last good "
                f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}.")
        else:
          in_a_row = 0
        if step % cfg.log.every_steps == 0 or step == cfg.num_steps:
          now = time.perf_counter()
          host = {k: float(np.asarray(v)) for k, v in metrics.items()}
          host["pairs_per_s"] = examples_per_step * steps_since / max(now - t_last, 1e-9)
          host["skipped_total"] = float(skipped_total)
          logger.write(step, host)
          t_last, steps_since = now, 0
        logger.advance()
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
          last_eval = do_eval(step, state)
        if not skipped:
          started = save(step, state)
          if started and step == cfg.debug.sigkill_in_save_at_step:
            # Fault injection: die while the asynchronous save is still being written.
            os.kill(os.getpid(), signal.SIGKILL)
        if step == cfg.debug.sigterm_at_step:
          os.kill(os.getpid(), signal.SIGTERM)
        if preempt.requested:
          save(step, state, force=True)
          ckpt.wait()
          status = "preempted"
          say(f"preempted by signal {preempt.signal} at step {step}; checkpoint saved")
          break
    if status == "done":
      if not last_eval or cfg.eval.every_steps == 0 or step % cfg.eval.every_steps:
        last_eval = do_eval(step, state)
      save(step, state, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
    logger.close()
  if status == "done" and cfg.log.plots:
    log_lib.plot_metrics(workdir, PLOT_KEYS)
  if status == "done":
    with open(os.path.join(workdir, "final_eval.json"), "w", encoding="utf-8") as f:
      json.dump({"step": step, **last_eval, "skipped_total": skipped_total}, f, indent=1)
  return RunResult(status=status, step=step, state=state, eval_metrics=last_eval,
                   skipped_steps=skipped_total)


class _peek:
  """First batch of an iterator without consuming it (state restored afterwards)."""

  def __init__(self, it):
    self._it = it

  def __iter__(self):
    saved = self._it.get_state()
    first = next(self._it)
    self._it.set_state(saved)
    yield first


def _initial_state(model: Model, optimizer, mesh, rules, key):
  if model.loaded_params is None:
    return state_lib.init_train_state(model.init_params, optimizer, model.logical_axes,
                                      mesh, key, rules)
  abstract, shardings = state_lib.state_shardings(model.init_params, optimizer,
                                                  model.logical_axes, mesh, rules)
  fresh = jax.jit(model.init_params, out_shardings=shardings.params)(
      jax.random.split(key)[0])
  params = _merge_loaded(fresh, model.loaded_params)
  params = jax.device_put(
      jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params), shardings.params)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=opt_state, rng=jax.random.split(key)[1])
  return state, shardings


def _merge_loaded(fresh, loaded):
  """Loaded HF weights, keeping freshly initialised leaves where none were loaded
  (a new reward head)."""
  if loaded is None:
    return fresh
  if isinstance(fresh, dict):
    return {k: _merge_loaded(v, loaded.get(k) if isinstance(loaded, dict) else None)
            for k, v in fresh.items()}
  return loaded


def _reference_params(cfg: Config, model: Model, key, ref_shardings):
  if cfg.reference.kind == "hf":
    from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
    _, params = hf.load(cfg.reference.hf_path)
    return jax.device_put(params, ref_shardings)
  if model.loaded_params is not None:
    fresh = jax.jit(model.init_params, out_shardings=ref_shardings)(
        jax.random.split(key)[0])
    return jax.device_put(jax.tree.map(lambda p: jnp.asarray(p, jnp.float32),
                                       _merge_loaded(fresh, model.loaded_params)),
                          ref_shardings)
  # The initial policy: the same key split as TrainState's init.
  return jax.jit(model.init_params, out_shardings=ref_shardings)(
      jax.random.split(key)[0])


def _score_fn(forward, model: Model, scalar: bool, mesh):
  if scalar:
    from jaxalign.models import heads  # pylint: disable=g-import-not-at-top

    @jax.jit
    def score(params, batch):
      hidden, _ = forward(params, batch)
      return obj_lib.gather_last(heads.token_scores(hidden, params["head"]),
                                 batch["seq_last"])
  else:
    @jax.jit
    def score(params, batch):
      return obj_lib.sequence_stats(forward, params, batch,
                                    chunk_size=_chunk_size(model))[0]
  return lambda params, batch: np.asarray(score(params, batch))
