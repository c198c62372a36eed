"""Objectives: (policy params, reference, batch dict) -> (scalar loss, metrics).

Each objective runs the model forward on the batch layout, reduces token log-probs to
per-sequence sums and counts (``jaxalign.ops.logprobs.sequence_logps``), arranges them
into the loss's input pytree for its input kind (docs/architecture.md sections 2 and 4),
calls the pure loss, and reduces with a masked mean over ``example_valid``.

Bound pieces (all plain callables, so a test can swap in anything):

* ``forward_fn(params, batch) -> (hidden_BxTxD, unembed_DxV)``; see
  :func:`model_forward_fn`.
* ``loss_fn(inputs, **hparams) -> (per_example_losses [N], metrics {name: [N]})``
  with the hyperparameters already bound (``functools.partial``).

The reference is either live params (``ref_params``) or cached per-sequence sums that
travel in the batch under ``REF_LOGPS_KEY`` (``[S]`` float32; see ``refcache.py``).
With a cache, ``ref_params`` is None and no reference forward runs.

Normalisation: the masked mean divides by ``normalizer`` when given (gradient
accumulation passes the valid-example count of the *whole* batch, so summing
micro-batch losses gives exactly the full-batch mean), else by this batch's count.
Token-weighted NLL terms (``nll_reduction="token"``) divide by the completion tokens
of the whole batch: the objective puts that count in the loss inputs
(``nll_tokens``), from this batch, or under accumulation from ``whole_batch``
(`whole_batch_stats` of the stacked batch), so micro-batching and sharding leave
the loss unchanged.

LoRA (`lora_objective`): the trained params are the adapters (``{LORA_KEY: ...}``,
plus a scalar model's head) and the second argument is the frozen base. The policy's
params are the base's tree with the adapters added under ``LORA_KEY``; the reference
is the bare base, i.e. the same weights with the adapters off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

REF_LOGPS_KEY = "ref_logps"
VALID_KEY = "example_valid"
# With LoRA, a params tree holding adapters under LORA_KEY (and a dropout key under
# LORA_RNG_KEY) is the base with its adapters on; see `model_forward_fn`.
LORA_KEY = "lora"
LORA_RNG_KEY = "lora_rng"

ForwardFn = Callable[[Any, dict], tuple[jax.Array, jax.Array]]
LossFn = Callable[..., tuple[jax.Array, dict]]
Objective = Callable[..., tuple[jax.Array, dict]]

KINDS = ("sft", "pairwise", "unpaired", "ranked", "reward")


def model_forward_fn(graphdef: Any, activation_sharding: Any = None, *,
                     params_key: str | None = None,
                     lora_config: Any = None) -> ForwardFn:
  """Binds ``jaxalign.models.transformer.forward`` to a batch dict (the batch
  contract: ``tokens``, ``positions``, optional ``segment_ids`` / ``branch_ids``).

  ``activation_sharding``: a ``transformer.ActivationSharding`` (mesh + rules) that
  pins the residual stream to batch sharding; needed on fsdp meshes, where the
  partitioner otherwise gathers the batch's activations instead of the weights.
  ``params_key``: the transformer's subtree of ``params`` (``"model"`` for a model
  with a scalar head), or None when ``params`` is the transformer's.
  ``lora_config`` (a ``models.lora.LoraConfig``, or None): params may then carry
  adapters under ``LORA_KEY`` (and a dropout key under ``LORA_RNG_KEY``), applied
  as W x + (alpha / r) B A x; params without them are the base's own forward.
  """
  from jaxalign.models import transformer  # pylint: disable=g-import-not-at-top

  def forward(params, batch):
    adapters = None
    if lora_config is not None:
      adapters = _adapters(params, lora_config)
      params = {k: v for k, v in params.items() if k not in (LORA_KEY, LORA_RNG_KEY)}
    if params_key is not None:
      params = params[params_key]
    return transformer.forward(graphdef, params, batch["tokens"],
                               batch["positions"], batch.get("segment_ids"),
                               batch.get("branch_ids"),
                               activation_sharding=activation_sharding, lora=adapters)
  return forward


def _adapters(params: dict, lora_config: Any) -> Any:
  from jaxalign.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  if LORA_KEY not in params:
    return None
  return lora_lib.Adapters(params[LORA_KEY], lora_config, params.get(LORA_RNG_KEY))


def num_sequences(batch: dict) -> int:
  """``S`` is static per batch config: the length of ``seq_last``."""
  return int(batch["seq_last"].shape[-1])


def num_examples(batch: dict, kind: str) -> int:
  """``N`` for the batch, from ``example_valid`` or the sequence numbering."""
  if VALID_KEY in batch:
    return int(batch[VALID_KEY].shape[-1])
  s = num_sequences(batch)
  if kind in ("pairwise", "reward"):
    return s // 2
  if kind == "unpaired":
    return s // 2
  if kind == "ranked":
    return int(batch["scores"].shape[-2])
  return s


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Casts floating leaves to ``dtype`` (the bf16 compute copy of f32 masters)."""
  if dtype is None:
    return tree
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      tree)


def sequence_stats(forward_fn: ForwardFn, params: Any, batch: dict, *,
                   chunk_size: int, activation_sharding: Any = None,
                   logit_softcap: float | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """Per-sequence completion log-prob sums ``[S]`` (f32) and token counts ``[S]``.

  ``logit_softcap``: the model's final-logit soft-cap (Gemma 2:
  ``TransformerConfig.final_logit_softcap``), applied inside the log-prob head.

  ``activation_sharding`` (a ``transformer.ActivationSharding`` or None) pins the
  hidden states handed to the log-prob op to batch sharding, whatever ``forward_fn``
  did inside.
  """
  from jaxalign.ops import logprobs  # pylint: disable=g-import-not-at-top
  hidden_BxTxD, unembed_DxV = forward_fn(params, batch)
  if activation_sharding is not None:
    hidden_BxTxD = activation_sharding.constrain(hidden_BxTxD)
  sums_S, counts_S = logprobs.sequence_logps(
      hidden_BxTxD, unembed_DxV, batch, num_sequences(batch),
      chunk_size=chunk_size, logit_softcap=logit_softcap)
  return sums_S.astype(jnp.float32), counts_S


def reference_sums(forward_fn: ForwardFn, ref_params: Any, batch: dict, *,
                   chunk_size: int, activation_sharding: Any = None,
                   logit_softcap: float | None = None) -> jax.Array:
  """Reference sums ``[S]``: from the cache in the batch, else a live forward."""
  if ref_params is None:
    if REF_LOGPS_KEY not in batch:
      raise ValueError(
          f"objective needs a reference: pass reference params, or attach cached "
          f"reference log-probs to the batch under {REF_LOGPS_KEY!r} "
          "(jaxalign.train.refcache).")
    return batch[REF_LOGPS_KEY].astype(jnp.float32)
  sums_S, _ = sequence_stats(forward_fn, ref_params, batch, chunk_size=chunk_size,
                             activation_sharding=activation_sharding,
                             logit_softcap=logit_softcap)
  return jax.lax.stop_gradient(sums_S)


def masked_mean(per_example_N: jax.Array, metrics: dict, batch: dict, n: int,
                normalizer: jax.Array | None) -> tuple[jax.Array, dict]:
  """Masked mean of the loss and of every metric with ``example_valid``."""
  valid_N = (batch[VALID_KEY].astype(jnp.float32) if VALID_KEY in batch
             else jnp.ones((n,), jnp.float32))
  denom = (jnp.maximum(valid_N.sum(), 1.0) if normalizer is None
           else jnp.asarray(normalizer, jnp.float32))

  def reduce(x):
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 0:
      return x
    # where(), not a product: an invalid (e.g. empty) example may hold inf / nan.
    x = jnp.where(valid_N.reshape((n,) + (1,) * (x.ndim - 1)) > 0, x, 0.0)
    return x.reshape(n, -1).mean(axis=1).sum() / denom

  loss = reduce(per_example_N)
  return loss, {k: reduce(v) for k, v in metrics.items()}


def sequence_token_counts(batch: dict) -> jax.Array:
  """Scored tokens per sequence ``[S]`` from ``seq_ids`` alone (no model run); the
  counts ``sequence_stats`` returns."""
  seq_ids = jnp.asarray(batch["seq_ids"]).astype(jnp.int32).reshape(-1)
  s = num_sequences(batch)
  return jax.ops.segment_sum(jnp.ones_like(seq_ids), jnp.where(seq_ids >= 0, seq_ids, s),
                             num_segments=s + 1)[:s]


def whole_batch_stats(stacked: dict) -> dict:
  """What a micro-batch's objective needs to know of the whole step's batch: the
  valid flags ``[M, N]`` and the per-sequence token counts ``[M, S]``."""
  return {VALID_KEY: stacked[VALID_KEY].astype(jnp.float32),
          "seq_tokens": jax.vmap(sequence_token_counts)(stacked)}


def nll_totals(kind: str, valid_N: jax.Array, counts_S: jax.Array,
               n: int) -> jax.Array:
  """Completion tokens an NLL term averages over: every valid example's sequence
  (sft) or chosen completion (pairwise). Leading axes (micro-batches) are summed."""
  per_example = counts_S[..., :n] if kind == "sft" else counts_S[..., 0::2][..., :n]
  return jnp.sum(jnp.where(valid_N > 0, per_example, 0)).astype(jnp.float32)


def _with_batch_totals(inputs, kind, batch, counts_S, n, normalizer, whole_batch):
  """The loss inputs with ``nll_tokens`` / ``num_examples`` of the whole batch."""
  if kind not in ("sft", "pairwise"):
    return inputs
  if whole_batch is not None:
    valid, counts = whole_batch[VALID_KEY], whole_batch["seq_tokens"]
  else:
    valid = (batch[VALID_KEY].astype(jnp.float32) if VALID_KEY in batch
             else jnp.ones((n,), jnp.float32))
    counts = counts_S
  examples = (jnp.maximum(jnp.sum(valid), 1.0) if normalizer is None
              else jnp.asarray(normalizer, jnp.float32))
  return inputs.replace(nll_tokens=nll_totals(kind, valid, counts, n),
                        num_examples=examples)


# --- loss state carried across steps (TrainState.loss_state) -----------------
# bco_pair's delta is the running mean of the implicit rewards of all past batches
# (Jung et al., 2024): the state holds that mean and how many rewards it covers.

BCO_DELTA = "bco_delta"


def initial_loss_state(terms) -> dict | None:
  """The step-0 loss state of a loss (name, or ``(name, weight)`` terms): a zero
  running mean for ``bco_pair``; None (nothing carried) for every other loss."""
  names = [terms] if isinstance(terms, str) else [t[0] for t in terms]
  if "bco_pair" not in names:
    return None
  return {BCO_DELTA: {"mean": jnp.zeros((), jnp.float32),
                      "count": jnp.zeros((), jnp.int32)}}


def loss_state_kwargs(loss_state: dict | None) -> dict:
  """Loss keyword arguments the state supplies (they override the configured ones)."""
  if not loss_state or BCO_DELTA not in loss_state:
    return {}
  return {"delta": loss_state[BCO_DELTA]["mean"]}


def update_loss_state(loss_state: dict | None, metrics: dict,
                      num_valid: jax.Array) -> dict | None:
  """The state after a step whose (masked-mean) metrics are ``metrics`` over
  ``num_valid`` valid pairs: the running mean takes in their 2 * num_valid implicit
  rewards, whose mean is (rewards/chosen + rewards/rejected) / 2."""
  if not loss_state or BCO_DELTA not in loss_state:
    return loss_state
  from jaxalign.losses import running_mean_update  # pylint: disable=g-import-not-at-top
  prefix = "bco_pair/" if "bco_pair/rewards/chosen" in metrics else ""
  batch_mean = 0.5 * (metrics[prefix + "rewards/chosen"]
                      + metrics[prefix + "rewards/rejected"])
  old = loss_state[BCO_DELTA]
  mean, count = running_mean_update(old["mean"], old["count"], batch_mean,
                                    (2 * num_valid).astype(jnp.int32))
  return {**loss_state, BCO_DELTA: {"mean": mean, "count": count}}


def valid_examples(batch: dict, kind: str) -> jax.Array:
  """Valid examples of a (possibly stacked) batch: the sum of ``example_valid``, else
  every example slot."""
  if VALID_KEY in batch:
    return jnp.sum(batch[VALID_KEY].astype(jnp.int32))
  return jnp.asarray(num_examples(batch, kind), jnp.int32)


# --- input kinds -------------------------------------------------------------


def _losses():
  from jaxalign import losses  # pylint: disable=g-import-not-at-top
  return losses


def _tokens(counts):
  # Absent sequences (empty example slots) count 0 tokens; clamping keeps
  # length-normalised losses finite there, and where() in masked_mean drops them.
  return jnp.maximum(counts, 1).astype(jnp.float32)


def pairwise_inputs(pol_sums_S, pol_counts_S, ref_sums_S):
  """Pair i -> chosen ``2i``, rejected ``2i + 1``."""
  return _losses().PairwiseLogps(
      policy_chosen=pol_sums_S[0::2], policy_rejected=pol_sums_S[1::2],
      chosen_tokens=_tokens(pol_counts_S[0::2]),
      rejected_tokens=_tokens(pol_counts_S[1::2]),
      reference_chosen=None if ref_sums_S is None else ref_sums_S[0::2],
      reference_rejected=None if ref_sums_S is None else ref_sums_S[1::2])


def unpaired_inputs(pol_sums_S, pol_counts_S, ref_sums_S, batch, n):
  """Example i -> ``i``; its mismatched (KL) completion -> ``N + i``."""
  if ref_sums_S is None:
    raise ValueError("unpaired (KTO) objectives need a reference model.")
  return _losses().UnpairedLogps(
      policy=pol_sums_S[:n], reference=ref_sums_S[:n],
      tokens=_tokens(pol_counts_S[:n]),
      desirable=batch["labels"].astype(jnp.float32),
      policy_kl=pol_sums_S[n:2 * n], reference_kl=ref_sums_S[n:2 * n])


def ranked_inputs(pol_sums_S, pol_counts_S, batch, n):
  """Example i, response k -> ``i * K + k``."""
  k = batch["scores"].shape[-1]
  return _losses().RankedLogps(
      logps=pol_sums_S[:n * k].reshape(n, k),
      tokens=_tokens(pol_counts_S[:n * k].reshape(n, k)),
      scores=batch["scores"].astype(jnp.float32))


def preference_objective(params: Any, ref_params: Any, batch: dict, *,
                         kind: str, forward_fn: ForwardFn, loss_fn: LossFn,
                         needs_reference: bool, chunk_size: int,
                         compute_dtype: Any = None,
                         normalizer: jax.Array | None = None,
                         activation_sharding: Any = None,
                         logit_softcap: float | None = None,
                         whole_batch: dict | None = None,
                         loss_state: dict | None = None
                         ) -> tuple[jax.Array, dict]:
  """Pairwise / unpaired / ranked / sft objectives over log-prob sums.

  ``whole_batch``: `whole_batch_stats` of the step's stacked batch when ``batch`` is
  one micro-batch of it (token-weighted NLL terms divide by its token count).
  ``loss_state``: the train state's loss state; it supplies loss arguments
  (`loss_state_kwargs`, e.g. bco_pair's ``delta``), logged as ``loss_state/*``."""
  params = cast_floating(params, compute_dtype)
  pol_sums_S, pol_counts_S = sequence_stats(forward_fn, params, batch,
                                            chunk_size=chunk_size,
                                            activation_sharding=activation_sharding,
                                            logit_softcap=logit_softcap)
  ref_sums_S = None
  if needs_reference:
    ref_sums_S = reference_sums(forward_fn, cast_floating(ref_params, compute_dtype),
                                batch, chunk_size=chunk_size,
                                activation_sharding=activation_sharding,
                                logit_softcap=logit_softcap)
  n = num_examples(batch, kind)
  if kind == "pairwise":
    inputs = pairwise_inputs(pol_sums_S, pol_counts_S, ref_sums_S)
  elif kind == "unpaired":
    inputs = unpaired_inputs(pol_sums_S, pol_counts_S, ref_sums_S, batch, n)
  elif kind == "ranked":
    inputs = ranked_inputs(pol_sums_S, pol_counts_S, batch, n)
  elif kind == "sft":
    inputs = _losses().SequenceLogps(logps=pol_sums_S[:n],
                                     tokens=_tokens(pol_counts_S[:n]))
  else:
    raise ValueError(f"objective kind {kind!r}: expected one of {KINDS}.")
  inputs = _with_batch_totals(inputs, kind, batch, pol_counts_S, n, normalizer,
                              whole_batch)
  state_kwargs = loss_state_kwargs(loss_state)
  per_example_N, metrics = loss_fn(inputs, **state_kwargs)
  loss, metrics = masked_mean(per_example_N, metrics, batch, n, normalizer)
  # Per micro-batch share, so the accumulated sum is the value itself.
  share = 1.0 if whole_batch is None else (
      jnp.sum(batch[VALID_KEY]) / jnp.maximum(jnp.sum(whole_batch[VALID_KEY]), 1.0))
  metrics.update({f"loss_state/{k}": jnp.asarray(v, jnp.float32) * share
                  for k, v in state_kwargs.items()})
  return loss, metrics


def gather_last(values_BxT: jax.Array, seq_last_S: jax.Array) -> jax.Array:
  """``values[seq_last]`` over the flattened rows; 0 for absent (-1) sequences."""
  flat = values_BxT.reshape(-1)
  idx = jnp.clip(seq_last_S, 0, flat.shape[0] - 1)
  return jnp.where(seq_last_S >= 0, flat[idx], 0.0)


def reward_objective(params: Any, ref_params: Any, batch: dict, *,
                     reward_fn: Callable[[Any, dict], jax.Array],
                     loss_fn: LossFn, compute_dtype: Any = None,
                     normalizer: jax.Array | None = None,
                     whole_batch: dict | None = None
                     ) -> tuple[jax.Array, dict]:
  """Reward model on pairs: ``reward_fn(params, batch) -> [R, L]`` scalar per token,
  read at each sequence's last token; chosen ``2i`` vs rejected ``2i + 1``; the
  batch's ``margins`` (when the data carry them) become ``RewardPair.margin``."""
  del ref_params, whole_batch
  params = cast_floating(params, compute_dtype)
  values_BxT = reward_fn(params, batch).astype(jnp.float32)
  rewards_S = gather_last(values_BxT, batch["seq_last"])
  n = num_examples(batch, "reward")
  margin = batch.get("margins")  # Llama 2's margin, from data.margin_field
  inputs = _losses().RewardPair(
      chosen=rewards_S[0::2], rejected=rewards_S[1::2],
      margin=None if margin is None else margin.astype(jnp.float32))
  per_example_N, metrics = loss_fn(inputs)
  return masked_mean(per_example_N, metrics, batch, n, normalizer)


def make_objective(kind: str, *, loss_fn: LossFn, forward_fn: ForwardFn | None = None,
                   reward_fn: Callable | None = None, needs_reference: bool = False,
                   chunk_size: int = 128, compute_dtype: Any = None,
                   activation_sharding: Any = None,
                   logit_softcap: float | None = None) -> Objective:
  """Binds an objective: ``(params, ref_params, batch, normalizer=None) -> (loss,
  metrics)``. ``logit_softcap``: the model's final-logit soft-cap (None = none).

  ``activation_sharding`` (``transformer.ActivationSharding`` or None) pins the hidden
  states handed to the log-prob op; the layers inside the model are pinned only by a
  ``forward_fn`` built with it too (``model_forward_fn(graphdef, sharding)``).
  """
  if kind == "reward":
    if reward_fn is None:
      raise ValueError("objective kind 'reward' needs reward_fn.")
    return functools.partial(reward_objective, reward_fn=reward_fn, loss_fn=loss_fn,
                             compute_dtype=compute_dtype)
  if kind not in KINDS:
    raise ValueError(f"objective kind {kind!r}: expected one of {KINDS}.")
  if forward_fn is None:
    raise ValueError(f"objective kind {kind!r} needs forward_fn.")
  return functools.partial(preference_objective, kind=kind, forward_fn=forward_fn,
                           loss_fn=loss_fn, needs_reference=needs_reference,
                           chunk_size=chunk_size, compute_dtype=compute_dtype,
                           activation_sharding=activation_sharding,
                           logit_softcap=logit_softcap)


def lora_objective(trainable: Any, base: Any, batch: dict,
                   normalizer: jax.Array | None = None, rng: jax.Array | None = None,
                   *, objective: Objective, live_reference: bool, **kwargs
                   ) -> tuple[jax.Array, dict]:
  """A LoRA run's objective: ``(adapters [+ head], frozen base, batch)``.

  The policy is the base with the adapters on, W + (alpha / r) B A on each targeted
  projection; the reference, when computed live, is ``base`` itself (the adapters
  off): the same buffers, no second copy. Only ``trainable`` is differentiated.
  ``rng``: the step's dropout key (None: no dropout). ``kwargs`` (``whole_batch``,
  ``loss_state``) go to ``objective``.
  """
  params = {**base, **trainable}
  if rng is not None:
    params[LORA_RNG_KEY] = rng
  return objective(params, base if live_reference else None, batch,
                   normalizer=normalizer, **kwargs)


def make_lora_objective(objective: Objective, *, live_reference: bool) -> Objective:
  """Wraps a bound objective (`make_objective`) for LoRA: ``(trainable, base, batch,
  normalizer=None, rng=None) -> (loss, metrics)``; see `lora_objective`."""
  return functools.partial(lora_objective, objective=objective,
                           live_reference=live_reference)
