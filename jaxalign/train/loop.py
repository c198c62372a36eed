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

Options: ``data.micro_batches = M`` lays each step's examples out as ``M`` stacked
micro-batches and accumulates their gradients (`steps.grad_step`);
``model.logprob_chunk`` is the log-prob chunk; ``reference.cache_dir`` replaces the
live reference forward by cached log-probs (`_CachedReference`). Under
``jax.distributed`` (``main.py --distributed``) every process runs this same code:
each feeds its devices its rows of the global batch (`_global_batch`), all save
checkpoints together (Orbax), and only process 0 writes metrics and plots.
"""

from __future__ import annotations

import copy
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
from jaxalign.train import build
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

  Examples come shuffled (a new permutation each epoch, repeated forever); each batch
  lays out the next ``examples_per_batch`` of them, or, with a packed layout, the
  longest run of them that fits its rows: the rest are carried, in stream order, to
  the front of the next batch (`batching.fill_batch`), so every example of the stream
  is laid out exactly once and a packed batch may hold fewer valid examples
  (``example_valid``). With ``micro_batches > 1`` a batch is that many micro-batches,
  each filled that way from the stream in turn and stacked ``[M, ...]``
  (`steps.stack_microbatches`), all laid out at the longest one's bucket.

  ``get_state`` / ``set_state`` are a grain iterator state (a JSON-able dict), taken
  between batches: the state from before the first carried example, so a restored
  iterator draws the carried examples again and yields exactly the batches that
  followed.

  The constructor checks every example against the layout before anything compiles
  (`check_examples_fit`): one that no batch could hold is an error naming it and the
  bucket it needs, not a crash at the step that first draws it.

  Every process iterates the same global stream (the per-sequence arrays of a batch
  carry global indices, so every process needs them whole); each then feeds only its
  own rows to the devices (`jaxalign.parallel.mesh.local_row_slice`).
  """

  def __init__(self, examples: Sequence[Any], layout: batching.LayoutConfig,
               seed: int, micro_batches: int = 1, *, check: bool = True):
    from jaxalign.data import pipeline  # pylint: disable=g-import-not-at-top
    n = layout.examples_per_batch * micro_batches
    if len(examples) < n:
      raise ValueError(f"{len(examples)} training examples cannot fill one batch of "
                       f"{n}; lower config.data.batch_size or add data.")
    self._examples = list(examples)
    self._layout = layout
    self._seed = seed
    self.micro_batches = micro_batches
    if check:
      check_examples_fit(self._examples, layout)
    self._it = pipeline.make_example_iterator(
        self._examples, lambda e: e, seed=seed, num_epochs=None,
        process_index=0, process_count=1)
    # Drawn from the iterator but not yet laid out, oldest first, each with the
    # iterator state from just before it was drawn.
    self._pending: list[tuple[dict, Any]] = []

  def fresh(self) -> "ExampleBatches":
    """A new iterator over the same stream, from its start."""
    return ExampleBatches(self._examples, self._layout, self._seed, self.micro_batches,
                          check=False)

  def get_state(self) -> dict:
    return self._pending[0][0] if self._pending else self._it.get_state()

  def set_state(self, state: dict) -> None:
    self._it.set_state(state)
    self._pending = []

  def __iter__(self) -> "ExampleBatches":
    return self

  def _fill(self, start: int) -> tuple[dict, int]:
    """Lays out pending examples from ``start`` on; returns (batch, examples taken)."""
    n = self._layout.examples_per_batch
    while len(self._pending) < start + n:
      state = copy.deepcopy(self._it.get_state())
      self._pending.append((state, next(self._it)))
    return batching.fill_batch([e for _, e in self._pending[start:start + n]],
                               self._layout)

  def __next__(self) -> dict:
    micro, chunks, pos = [], [], 0
    for _ in range(self.micro_batches):
      batch, taken = self._fill(pos)
      micro.append(batch)
      chunks.append([e for _, e in self._pending[pos:pos + taken]])
      pos += taken
    if self.micro_batches > 1:
      micro = self._one_length(micro, chunks)
    del self._pending[:pos]
    return micro[0] if self.micro_batches == 1 else steps_lib.stack_microbatches(micro)

  def _one_length(self, micro: list[dict], chunks: list[list[Any]]) -> list[dict]:
    """The micro-batches laid out again at one row length (the longest one's)."""
    longest = max(np.shape(b["tokens"])[-1] for b in micro)
    if all(np.shape(b["tokens"])[-1] == longest for b in micro):
      return micro
    # First-fit-decreasing into longer rows practically always fits what fitted the
    # shorter ones, but it is not guaranteed to: then try the next bucket up.
    for length in (b for b in self._layout.buckets if b >= longest):
      same = dataclasses.replace(self._layout, buckets=(length,))
      out = [batching.fill_batch(c, same) for c in chunks]
      if all(taken == len(c) for (_, taken), c in zip(out, chunks)):
        return [b for b, _ in out]
    raise ValueError(
        f"the {len(chunks)} micro-batches of a step fit their rows at their own row "
        f"lengths but not all at one of {self._layout.buckets}; raise "
        "config.data.rows_per_batch or use one bucket.")


def check_examples_fit(examples: Sequence[Any], layout: batching.LayoutConfig) -> None:
  """Raises a ValueError naming the first example no batch of ``layout`` can hold.

  What one row must hold (as `jaxalign.data.batching` lays it out): padded and packed,
  each prompt + completion; prefix_shared, the prompt and all completions. KTO's KL
  sequence pairs a prompt with another example's completion, any of them over the
  epochs, so the longest other completion is assumed. Packed: an example's sequences
  must also fit ``rows_per_batch`` rows together (the rest of a batch is carried).
  This is the load-time check for what the config cannot bound
  (`jaxalign.config.layout_need`: ``data.max_length = 0``, synthetic data, ranked
  files).
  """
  largest, kind = layout.buckets[-1], layout.kind
  top = sorted((len(e.completion) for e in examples
                if isinstance(e, ex_lib.UnpairedExample)), reverse=True)[:2]
  too_long, worst, first_long, first_rows, n_rows = 0, 0, None, None, 0
  for i, e in enumerate(examples):
    p = len(e.prompt)
    if isinstance(e, ex_lib.SFTExample):
      comps = [len(e.completion)]
    elif isinstance(e, ex_lib.PairExample):
      comps = [len(e.chosen), len(e.rejected)]
    elif isinstance(e, ex_lib.UnpairedExample):
      c = len(e.completion)
      comps = [c, c if len(top) == 1 else top[1] if top[0] == c else top[0]]
    elif isinstance(e, ex_lib.RankedExample):
      comps = [len(r) for r in e.responses]
    else:
      continue  # make_batch names unsupported kinds
    seqs = [p + c for c in comps]
    need = p + sum(comps) if kind == "prefix_shared" else max(seqs)
    if need > largest:
      too_long += 1
      worst = max(worst, need)
      first_long = first_long or (i, p, comps, need)
    elif kind == "packed" and batching.first_fit_decreasing(
        seqs, layout.rows_per_batch, largest) is None:
      n_rows += 1
      first_rows = first_rows or (i, p, comps, seqs)
  kl = lambda i: (" (the second: KTO's KL term, the longest other completion)"
                  if isinstance(examples[i], ex_lib.UnpairedExample) else "")
  if first_long is not None:
    i, p, comps, need = first_long
    what = ("its prompt and all its completions share one row"
            if kind == "prefix_shared" else "each prompt + completion takes a row")
    raise ValueError(
        f"config.data.buckets: training example {i} (prompt {p} tokens, completions "
        f"{comps}{kl(i)}) needs a row of {need} tokens with data.layout={kind!r} "
        f"({what}), more than the largest bucket {largest} of data.buckets="
        f"{layout.buckets}; {too_long} of {len(examples)} training examples do not "
        f"fit, the longest needs {worst}. Add a bucket >= {worst} to data.buckets, or "
        "truncate the data (data.max_length / data.max_prompt_length; with "
        "data.max_length set, the config check bounds the buckets before loading).")
  if first_rows is not None:
    i, p, comps, seqs = first_rows
    raise ValueError(
        f"config.data.rows_per_batch: training example {i} (prompt {p} tokens, "
        f"completions {comps}{kl(i)}) has sequences of {seqs} tokens that do not fit "
        f"data.rows_per_batch={layout.rows_per_batch} rows of the largest bucket "
        f"{largest} together ({n_rows} of {len(examples)} training examples do not); "
        "raise data.rows_per_batch or add a larger bucket to data.buckets.")


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
    tok = build.build_tokenizer(cfg)
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
  layout = layout_config(cfg, cfg.data.batch_size // d.micro_batches,
                         k if kind == "ranked" and d.source == "synthetic" else None)
  train_it = ExampleBatches(train, layout, seed=d.shuffle_seed,
                            micro_batches=d.micro_batches)
  # Eval batches are always padded: one row per sequence, whatever trains.
  eval_set = eval_lib.EvalSet(
      pair_batches=(make_batches(eval_pairs, layout_config(
          cfg, cfg.eval.batch_size, layout="padded")) if eval_pairs else []),
      candidate_batches=(make_batches(eval_cands, layout_config(
          cfg, cfg.eval.batch_size, k, layout="padded")) if eval_cands else []))
  return Data(train=train_it, eval_set=eval_set, vocab_size=vocab,
              report=report if d.source == "file" else None)


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


def _forward_fn(model: Model, scalar_head: bool, activation_sharding=None):
  """The model forward; ``activation_sharding`` pins the residual stream to the batch
  sharding, so under fsdp the weights are all-gathered, not the activations
  (docs/scale_out.md section 8)."""
  from jaxalign.models import transformer  # pylint: disable=g-import-not-at-top

  def forward(params, batch):
    lm = params["model"] if scalar_head else params
    hidden, unembed = transformer.forward(
        model.graphdef, lm, batch["tokens"], batch["positions"],
        batch.get("segment_ids"), batch.get("branch_ids"),
        activation_sharding=activation_sharding)
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


def _chunk_size(cfg: Config) -> int:
  """Tokens per log-prob chunk (``model.logprob_chunk``): bounds the live
  ``[chunk, V]`` logits block."""
  return cfg.model.logprob_chunk


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
  multi = jax.process_count() > 1
  lead = jax.process_index() == 0
  if multi and cfg.reference.cache_dir:
    raise ValueError("config.reference.cache_dir: the reference cache is built by one "
                     f"process; this run has jax.process_count()={jax.process_count()}. "
                     "Build it with a single-process run, or set "
                     "reference.cache_dir='' (live reference).")
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  micro = cfg.data.micro_batches > 1
  kind = _objective_kind(cfg)
  data = build_data(cfg, kind)
  model = build_model(cfg, data.vocab_size)
  optimizer = make_optimizer(cfg.optimizer, cfg.num_steps)
  loss_fn = _loss_fn(cfg)
  scalar = cfg.model.head == "scalar"
  debug_gate = bool(cfg.debug.nonfinite_steps)
  from jaxalign.models import transformer  # pylint: disable=g-import-not-at-top
  forward = _forward_fn(model, scalar,
                        transformer.ActivationSharding(mesh, cfg.mesh.rules))
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
                                       chunk_size=_chunk_size(cfg),
                                       logit_softcap=model.arch.final_logit_softcap)

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
  use_cache = needs_ref and bool(cfg.reference.cache_dir)
  # With a cache the reference is never loaded up front (only on a cache miss), so
  # evaluation runs without one (no implicit reward, no KL to the reference).
  want_ref_for_eval = cfg.reference.kind != "none" and not scalar and not use_cache
  if needs_ref or want_ref_for_eval:
    ref_shardings = mesh_lib.reference_shardings(
        model.logical_axes, mesh, cfg.mesh, abstract.params)
  if (needs_ref or want_ref_for_eval) and not use_cache:
    if latest is None and cfg.reference.kind == "initial":
      # A real copy: the train step donates (and so deletes) the state's buffers.
      ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                           out_shardings=ref_shardings)(state.params)
    else:
      ref_params = _reference_params(cfg, model, key, ref_shardings)

  sample = next(iter(_peek(data.train)))
  if debug_gate:
    sample = dict(sample, **{DEBUG_NAN_KEY: np.ones((1,), np.float32)})
  if use_cache:
    sample = dict(sample, **{obj_lib.REF_LOGPS_KEY: np.zeros(
        np.shape(sample["seq_last"]), np.float32)})
  mesh_lib.check_batch_divisible(sample, mesh, microbatched=micro)
  train_step = steps_lib.make_train_step(
      objective=objective, optimizer=optimizer, mesh=mesh, state_shardings=shardings,
      ref_shardings=ref_shardings if needs_ref and not use_cache else None,
      batch_ndims=steps_lib.batch_signature(sample), microbatched=micro)

  if lead:
    logger = log_lib.MetricsLogger(workdir, total_steps=cfg.num_steps,
                                   start_step=start, tensorboard=cfg.log.tensorboard,
                                   progress_bar=cfg.log.progress_bar)
  else:  # only process 0 writes metrics, TensorBoard and plots
    logger = _NullLogger()
  say = log or logger.info
  if latest is not None:
    say(f"resumed from checkpoint step {start} in {ckpt.directory}")
  if data.report is not None:
    say(f"data: {data.report.summary()}")
    if lead:
      with open(os.path.join(workdir, "data_report.json"), "w", encoding="utf-8") as f:
        json.dump(data.report.to_dict(), f, indent=1)

  def to_device(batch, microbatched=micro):
    return _global_batch(batch, mesh, microbatched) if multi else batch

  ref_source = None
  if use_cache:
    ref_source = _CachedReference(cfg, model, forward, mesh, key, ref_shardings,
                                  data.train, say)

  score_fn = _score_fn(forward, _chunk_size(cfg), scalar, mesh,
                       model.arch.final_logit_softcap,
                       lambda b: to_device(b, False))
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
        if ref_source is not None:
          batch = ref_source.attach(batch)
        if debug_gate:
          gate = np.nan if (step + 1) in cfg.debug.nonfinite_steps else 1.0
          batch = dict(batch, **{DEBUG_NAN_KEY: np.full((1,), gate, np.float32)})
        state, metrics = train_step(state, ref_arg, to_device(batch))
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
          if ref_source is not None:
            host["ref_cache_misses"] = float(ref_source.misses)
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
  if status == "done" and cfg.log.plots and lead:
    log_lib.plot_metrics(workdir, PLOT_KEYS)
  if status == "done" and lead:
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


def _score_fn(forward, chunk_size: int, scalar: bool, mesh, logit_softcap, to_device):
  repl = mesh_lib.replicated(mesh)
  if scalar:
    from jaxalign.models import heads  # pylint: disable=g-import-not-at-top

    @functools.partial(jax.jit, out_shardings=repl)
    def score(params, batch):
      hidden, _ = forward(params, batch)
      return obj_lib.gather_last(heads.token_scores(hidden, params["head"]),
                                 batch["seq_last"])
  else:
    @functools.partial(jax.jit, out_shardings=repl)
    def score(params, batch):
      return obj_lib.sequence_stats(forward, params, batch, chunk_size=chunk_size,
                                    logit_softcap=logit_softcap)[0]
  return lambda params, batch: np.asarray(score(params, to_device(batch)))


class _NullLogger:
  """The metrics logger of processes other than 0: writes nothing."""

  def write(self, *args, **kwargs) -> None:
    del args, kwargs

  def advance(self, n: int = 1) -> None:
    del n

  def info(self, message: str) -> None:
    del message

  def close(self) -> None:
    pass


def _global_batch(batch: dict, mesh, microbatched: bool) -> dict:
  """This process's rows of a host batch, assembled into global device arrays."""
  row_dim = 1 if microbatched else 0
  rows = mesh_lib.local_row_slice(mesh, np.shape(batch["tokens"])[row_dim],
                                  microbatched)
  index = (slice(None), rows) if microbatched else rows
  local = {k: (np.asarray(v)[index]
               if k in mesh_lib.ROW_KEYS and np.ndim(v) == 2 + row_dim else v)
           for k, v in batch.items()}
  return mesh_lib.make_global_batch(local, mesh, microbatched)


# ----------------------------------------------------------------------------
# Reference log-prob cache (``reference.cache_dir``).


def _reference_fingerprint(cfg: Config) -> dict:
  """What determines the reference weights, without loading them."""
  from jaxalign.train import refcache  # pylint: disable=g-import-not-at-top
  if cfg.reference.kind == "hf":
    return {"hf": refcache.fingerprint_files([cfg.reference.hf_path])}
  if cfg.model.hf_path:
    return {"initial_from_hf": refcache.fingerprint_files([cfg.model.hf_path]),
            "head": cfg.model.head}
  # The initial policy is a pure function of the architecture and the seed
  # (`_reference_params` recomputes it bit-identically from them).
  return {"initial": {"arch": cfg.model.arch, "seed": cfg.seed,
                      "head": cfg.model.head}}


def _data_fingerprint(cfg: Config) -> dict:
  from jaxalign.train import refcache  # pylint: disable=g-import-not-at-top
  d = cfg.data
  files = {}
  if d.source == "file":
    files["path"] = refcache.fingerprint_files([d.path])
  else:
    files["synthetic_seed"] = cfg.seed
  # The cached pass is the first num_steps batches of the seeded stream.
  return {"files": files, "data": d, "num_steps": cfg.num_steps,
          "input_kind": cfg.loss.input_kind}


def _tokenizer_fingerprint(cfg: Config) -> str:
  from jaxalign.train import refcache  # pylint: disable=g-import-not-at-top
  if cfg.data.source == "synthetic":
    return f"synthetic-vocab-{cfg.data.task.vocab_size}"
  return refcache.fingerprint_tokenizer(build.build_tokenizer(cfg))


class _CachedReference:
  """Reference log-probs for the train batches from ``reference.cache_dir``.

  The cache covers one deterministic pass: the first ``num_steps`` batches of the
  seeded train stream, in order (a resumed run replays the same batches, so it hits).
  Its key covers the reference weights' fingerprint, the tokenizer, the data (file
  bytes and every ``data.*`` option, the step count) and the layout, and each batch
  is looked up by a digest of its arrays, so a stale entry is never used. A batch
  that is not in the cache (it should not happen) is computed live with the
  reference loaded then, and counted in ``misses`` (logged as
  ``ref_cache_misses``) with a warning.
  """

  def __init__(self, cfg: Config, model: Model, forward, mesh, key, ref_shardings,
               train_batches: ExampleBatches, say: Callable[[str], None]):
    from jaxalign.train import refcache  # pylint: disable=g-import-not-at-top
    self._say = say
    self._params = None
    self.misses = 0
    self.loaded_reference = False

    def load():
      self.loaded_reference = True
      self._params = _reference_params(cfg, model, key, ref_shardings)
      return self._params

    self._load = load
    sample = next(iter(_peek(train_batches)))
    micro_sample = (jax.tree.map(lambda x: x[0], sample)
                    if train_batches.micro_batches > 1 else sample)
    step = steps_lib.make_logprob_step(
        forward_fn=forward, mesh=mesh, param_shardings=ref_shardings,
        batch_ndims=steps_lib.batch_signature(micro_sample),
        chunk_size=_chunk_size(cfg), logit_softcap=model.arch.final_logit_softcap)
    m = train_batches.micro_batches

    def logprob(params, batch):
      if m == 1:
        return np.asarray(step(params, batch)[0])
      return np.stack([np.asarray(step(params, jax.tree.map(lambda x: x[i], batch))[0])
                       for i in range(m)])

    self._logprob = logprob

    def batches():
      it = train_batches.fresh()
      for _ in range(cfg.num_steps):
        yield next(it)

    cache_key = refcache.cache_key(
        reference=_reference_fingerprint(cfg), tokenizer=_tokenizer_fingerprint(cfg),
        data=_data_fingerprint(cfg),
        layout={"micro_batches": m, "logprob_chunk": _chunk_size(cfg),
                "layout": cfg.data.layout, "buckets": cfg.data.buckets,
                "rows_per_batch": cfg.data.rows_per_batch, "mesh": repr(cfg.mesh)})
    self.cache, self.computed = refcache.build_or_load(
        cfg.reference.cache_dir, cache_key, batches, load, logprob)
    say(f"reference cache {cache_key} in {cfg.reference.cache_dir}: "
        f"{'computed' if self.computed else 'loaded'} ({len(self.cache)} batches)")

  def attach(self, batch: dict) -> dict:
    try:
      return self.cache.attach(batch)
    except KeyError as e:
      self.misses += 1
      if self.misses == 1:
        self._say(f"WARNING: {e.args[0]} Computing the reference live for such "
                  "batches (counted as ref_cache_misses).")
      params = self._params if self._params is not None else self._load()
      return {**batch, obj_lib.REF_LOGPS_KEY: self._logprob(params, batch)}
