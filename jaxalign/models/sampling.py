"""KV-cache sampling for the transformer in `transformer.py` (online RL rollouts).

Layout: prompts are LEFT-padded to a static bucket length ``P`` (pad id 0) and every
row generates up to a static ``N = max_new_tokens``, so all rows write the same cache
slot at the same step. Position ids restart at 0 at each row's first real prompt
token (``positions = index - num_left_pads``), so a left-padded row computes exactly
what the unpadded prompt would. The cache is

  k, v: [L, B, P + N, G, K]   (layers, rows, slots, kv heads, head dim)
  kpos: [B, P + N]            position id held by each slot, -1 = empty / padding

and a query at position ``q`` (slot ``i``) attends to slot ``j`` iff ``kpos[j] >= 0``,
``j <= i`` and (in a sliding layer) ``q - kpos[j] < window``: the transformer's
attention rule restricted to one row. The cache keeps every slot, also for sliding layers
(no ring buffer): P + N is a rollout's length, and one layout serves all layers.

Two jitted programs per (B, P, N) shape: ``prefill`` (the whole prompt in one pass,
returns the first next-token logits) and ``decode`` (a ``lax.while_loop`` that samples
a token, then runs the single-token step, until every row has emitted EOS or N tokens
are out). The cache is allocated once by `Sampler` and donated to each call, so a
rollout allocates no new cache. Params are passed in on every call (the policy's
current training params, with their training shardings: no copy to another engine).

Per-row stop: after a row samples ``eos_id`` it emits ``pad_id`` with mask 0 and
log-prob 0. The EOS token itself is part of the completion (mask 1).

Logits are soft-capped (``cap * tanh(z / cap)``, ``cfg.final_logit_softcap``, Gemma 2 / 3)
before anything else, as HF's model output is: temperature, filtering and greedy argmax
all see the capped logits.

Returned log-probs are ``log_softmax(logits / temperature)`` of the sampled token
before top-k / top-p filtering (TRL's convention; with temperature 1 they are the
model's log-probs, which PPO needs as "old" log-probs); greedy uses temperature 1.

LoRA: a policy trained with adapters decodes with them, unmerged: the adapters are
sliced per layer in the same scan as the weights and each targeted projection adds
(alpha / r) (x A) B (`transformer.attention_inputs` / `attention_output_and_mlp` with a
`lora.LayerAdapters`). Merging W + (alpha / r) A B before each rollout would hold a
second copy of every targeted weight (about the model's size) for the rollout's
duration; unmerged, the extra work is two rank-r matmuls per projection per token,
small beside x W for r << d.

Layer maths reuse the transformer's pure pieces (`attention_inputs` (norm, projections,
RoPE), `attend`, `attention_output_and_mlp`, `rms_norm`, `layer_inputs` / `layer_flags`
(per-layer masks and RoPE tables), `final_logits`) on its stacked layer params.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign.models import lora as lora_lib
from jaxalign.models import transformer as tfm

Array = jax.Array
# Where a LoRA policy's params carry their adapters (`jaxalign.train.objectives.LORA_KEY`):
# ``{**base params, ADAPTERS_KEY: adapters}``.
ADAPTERS_KEY = "lora"


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are drawn.

  Attributes:
    max_new_tokens: N, the static number of decode steps (completion length).
    temperature: logits are divided by it (> 0); ignored by greedy.
    top_k: keep the k most likely tokens (0 = off).
    top_p: nucleus: keep the smallest set of most likely tokens whose probability
      reaches top_p (1.0 = off).
    greedy: argmax instead of sampling.
    eos_id: the stop token; pad_id: what a stopped row emits.
    extra_eos_ids: more stop tokens (a checkpoint may stop on several, e.g.
      Llama-3's end-of-turn and end-of-text).
  """
  max_new_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  eos_id: int = 3
  pad_id: int = 0
  extra_eos_ids: tuple[int, ...] = ()

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return (self.eos_id,) + tuple(i for i in self.extra_eos_ids if i != self.eos_id)

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens} must be >= 1.")
    if not self.temperature > 0:
      raise ValueError(f"SamplingConfig.temperature={self.temperature} must be > 0 "
                       "(use greedy=True for argmax decoding).")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k={self.top_k} must be >= 0 (0 = off).")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p={self.top_p} must be in (0, 1] (1 = off).")


class Cache(NamedTuple):
  k: Array  # [L, B, S, G, K]
  v: Array  # [L, B, S, G, K]
  kpos: Array  # [B, S] int32, -1 = empty


class SampleOutput(NamedTuple):
  """tokens/mask/logp: [B, N] completion; sequences: [B, P + N] prompt then completion."""
  tokens: Array
  mask: Array  # int32, 1 = completion token (EOS included)
  logp: Array  # f32, 0 where mask is 0
  sequences: Array
  positions: Array  # [B, P + N] position ids of `sequences` (0 on left padding)


# ----------------------------------------------------------------------------- sampling


def filter_logits(logits_BxV: Array, *, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Sets logits outside the top-k / nucleus set to -inf (f32)."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  neg = jnp.asarray(-jnp.inf, jnp.float32)
  if top_k and top_k < logits_BxV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_B1, neg, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep a token while the mass strictly before it is < top_p (the top one always).
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = mass_before_BxV < top_p
    cutoff_B1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_B1, neg, logits_BxV)
  return logits_BxV


def sample_token(key: Array, logits_BxV: Array, cfg: SamplingConfig) -> tuple[Array, Array]:
  """Draws one token per row; returns (tokens [B] int32, log-probs [B] f32).

  The log-prob is of the temperature-scaled, unfiltered distribution (module doc).
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  if cfg.greedy:
    tok_B = jnp.argmax(logits_BxV, axis=-1)
    scaled_BxV = logits_BxV
  else:
    scaled_BxV = logits_BxV / cfg.temperature
    filtered = filter_logits(scaled_BxV, top_k=cfg.top_k, top_p=cfg.top_p)
    tok_B = jax.random.categorical(key, filtered, axis=-1)
  logp_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
  logp_B = jnp.take_along_axis(logp_BxV, tok_B[:, None], axis=-1)[:, 0]
  return tok_B.astype(jnp.int32), logp_B


# ----------------------------------------------------------------------------- model step


def _embed(cfg: tfm.TransformerConfig, params: dict, tokens_BxT: Array) -> Array:
  x = jnp.take(params["embed"], tokens_BxT, axis=0).astype(cfg.jnp_dtype)
  if cfg.embed_multiplier != 1.0:
    x = x * jnp.asarray(cfg.embed_multiplier, cfg.jnp_dtype)
  return x


def _unembed(cfg: tfm.TransformerConfig, params: dict) -> Array:
  w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
  return w.astype(cfg.jnp_dtype)


def _cached_layer(cfg, p, x_BxTxD, rope, k_all, v_all, layer, mask_BxTxS, slot,
                  lora=None):
  """`transformer.decoder_layer` with keys / values written into and read from a cache.

  The transformer's own pieces compute the projections, RoPE, attention and MLP; only
  the T new keys / values are written (in place, at [layer, :, slot]), then the layer's
  whole cache is attended to. ``lora``: this layer's `lora.LayerAdapters` or None.
  """
  dt = cfg.jnp_dtype
  p = {n: w.astype(dt) for n, w in p.items()}
  q, k, v = tfm.attention_inputs(cfg, p, x_BxTxD, rope, lora)
  start = (layer, 0, slot, 0, 0)
  k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], start)
  v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], start)
  attn = tfm.attend(cfg, q, k_all[layer].astype(dt), v_all[layer].astype(dt), mask_BxTxS,
                    chunked=False)
  return tfm.attention_output_and_mlp(cfg, p, x_BxTxD, attn, lora), k_all, v_all


def _adapters(params: dict, lora: lora_lib.LoraConfig | None
              ) -> lora_lib.Adapters | None:
  if lora is None or not lora.enabled or ADAPTERS_KEY not in params:
    return None
  return lora_lib.Adapters(params[ADAPTERS_KEY], lora)  # no rng: no dropout


def model_step(cfg: tfm.TransformerConfig, params: dict, cache: Cache, tokens_BxT: Array,
               positions_BxT: Array, valid_BxT: Array, slot: Array,
               lora: lora_lib.LoraConfig | None = None) -> tuple[Array, Cache]:
  """Runs T new tokens written at cache slots [slot, slot + T); returns the f32 logits
  of the last of them ([B, V], soft-capped as the config says) and the updated cache.

  Sliding layers (`cfg.sliding_layers`) also need `q_pos - kpos < sliding_window`; the
  per-layer choice of mask and RoPE tables is `transformer.layer_inputs`, as in training.
  ``lora``: with it, adapters under ``params[ADAPTERS_KEY]`` are sliced per layer in
  the same scan as the weights and applied unmerged (module doc).
  """
  b, t = tokens_BxT.shape
  s = cache.kpos.shape[1]
  kpos_BxS = jax.lax.dynamic_update_slice(
      cache.kpos, jnp.where(valid_BxT, positions_BxT, -1).astype(jnp.int32), (0, slot))
  q_slot_T = slot + jnp.arange(t)
  mask_BxTxS = ((kpos_BxS[:, None, :] >= 0)
                & (jnp.arange(s)[None, None, :] <= q_slot_T[None, :, None])
                & (kpos_BxS[:, None, :] <= positions_BxT[:, :, None]))
  shared = tfm.layer_inputs(cfg, mask_BxTxS, positions_BxT, kpos_BxS)
  layer_params = {n: w for n, w in params["layers"].items()}
  adapters = _adapters(params, lora)

  def body(carry, xs):
    x, k_all, v_all = carry
    p, i, is_local, ad = xs
    mask, rope = shared.for_layer(is_local)
    x, k_all, v_all = _cached_layer(cfg, p, x, rope, k_all, v_all, i, mask, slot,
                                    None if adapters is None else adapters.layer(ad))
    return (x, k_all, v_all), None

  x = _embed(cfg, params, tokens_BxT)
  (x, k_all, v_all), _ = jax.lax.scan(
      body, (x, cache.k, cache.v),
      (layer_params, jnp.arange(cfg.n_layers), tfm.layer_flags(cfg),
       None if adapters is None else adapters.scan_inputs(cfg.n_layers)))
  h_BxD = tfm.rms_norm(x[:, -1], params["final_norm"], cfg.norm_eps, cfg.norm_offset)
  logits_BxV = tfm.final_logits(cfg, h_BxD, _unembed(cfg, params))
  return logits_BxV, Cache(k_all, v_all, kpos_BxS)


def init_cache(cfg: tfm.TransformerConfig, batch: int, length: int,
               dtype: Any = None) -> Cache:
  """An empty cache for `batch` rows of `length` slots (prompt bucket + new tokens)."""
  dtype = cfg.jnp_dtype if dtype is None else dtype
  shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
  return Cache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.full((batch, length), -1, jnp.int32))


def prompt_positions(prompt_BxP: Array, prompt_len_B: Array) -> tuple[Array, Array]:
  """(positions [B, P], valid [B, P]) of left-padded prompts."""
  p = prompt_BxP.shape[1]
  pads_B1 = (p - prompt_len_B)[:, None]
  idx_P = jnp.arange(p)[None, :]
  valid = idx_P >= pads_B1
  return jnp.where(valid, idx_P - pads_B1, 0).astype(jnp.int32), valid


def prefill(cfg: tfm.TransformerConfig, params: dict, cache: Cache, prompt_BxP: Array,
            prompt_len_B: Array, lora: lora_lib.LoraConfig | None = None
            ) -> tuple[Array, Cache]:
  """Writes the left-padded prompts into a fresh cache; returns next-token logits."""
  cache = cache._replace(kpos=jnp.full_like(cache.kpos, -1))
  positions, valid = prompt_positions(prompt_BxP, prompt_len_B)
  return model_step(cfg, params, cache, prompt_BxP, positions, valid, jnp.int32(0), lora)


def decode(cfg: tfm.TransformerConfig, scfg: SamplingConfig, params: dict, cache: Cache,
           logits_BxV: Array, prompt_len_B: Array, key: Array,
           lora: lora_lib.LoraConfig | None = None
           ) -> tuple[tuple[Array, Array, Array], Cache]:
  """The decode loop; returns ((tokens, mask, logp) each [B, N], cache)."""
  b = logits_BxV.shape[0]
  n = scfg.max_new_tokens
  p = cache.kpos.shape[1] - n

  def cond(st):
    t, done_B = st[0], st[5]
    return (t < n) & jnp.logical_not(jnp.all(done_B))

  def body(st):
    t, cache, logits_BxV, toks_BxN, logp_BxN, done_B = st
    tok_B, lp_B = sample_token(jax.random.fold_in(key, t), logits_BxV, scfg)
    tok_B = jnp.where(done_B, scfg.pad_id, tok_B)
    lp_B = jnp.where(done_B, 0.0, lp_B)
    toks_BxN = jax.lax.dynamic_update_slice(toks_BxN, tok_B[:, None], (0, t))
    logp_BxN = jax.lax.dynamic_update_slice(logp_BxN, lp_B[:, None], (0, t))
    live_B = jnp.logical_not(done_B)
    new_done_B = done_B | is_stop(tok_B, scfg)
    logits_BxV, cache = model_step(
        cfg, params, cache, tok_B[:, None], (prompt_len_B + t)[:, None].astype(jnp.int32),
        live_B[:, None], p + t, lora)
    return t + 1, cache, logits_BxV, toks_BxN, logp_BxN, new_done_B

  init = (jnp.int32(0), cache, logits_BxV.astype(jnp.float32),
          jnp.full((b, n), scfg.pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
          jnp.zeros((b,), bool))
  _, cache, _, toks_BxN, logp_BxN, _ = jax.lax.while_loop(cond, body, init)
  return (toks_BxN, completion_mask(toks_BxN, scfg), logp_BxN), cache


def is_stop(tokens: Array, scfg: SamplingConfig) -> Array:
  """Whether each token is one of the config's stop ids."""
  ids = scfg.stop_ids
  if len(ids) == 1:
    return tokens == ids[0]
  return jnp.isin(tokens, jnp.asarray(ids, tokens.dtype))


def completion_mask(tokens_BxN: Array, scfg: SamplingConfig) -> Array:
  """1 up to and including the first EOS (all N tokens when there is none)."""
  is_eos = is_stop(tokens_BxN, scfg).astype(jnp.int32)
  eos_before = jnp.cumsum(is_eos, axis=1) - is_eos
  return (eos_before == 0).astype(jnp.int32)


def assemble(prompt_BxP: Array, prompt_len_B: Array, tokens_BxN: Array, mask_BxN: Array
             ) -> tuple[Array, Array]:
  """(sequences, positions) [B, P + N] of left-padded prompts plus completions."""
  pos_BxP, _ = prompt_positions(prompt_BxP, prompt_len_B)
  n = tokens_BxN.shape[1]
  pos_BxN = prompt_len_B[:, None] + jnp.arange(n)[None, :]
  seq = jnp.concatenate([prompt_BxP, jnp.where(mask_BxN > 0, tokens_BxN, 0)], axis=1)
  return seq.astype(jnp.int32), jnp.concatenate([pos_BxP, pos_BxN], axis=1).astype(jnp.int32)


def sequence_segments(prompt_BxP: Array, prompt_len_B: Array, mask_BxN: Array) -> Array:
  """[B, P + N] segment ids for a teacher-forced forward: 1 on real tokens, 0 on pads."""
  _, valid_BxP = prompt_positions(prompt_BxP, prompt_len_B)
  return jnp.concatenate([valid_BxP.astype(jnp.int32), mask_BxN.astype(jnp.int32)], axis=1)


def prefill_shared(cfg: tfm.TransformerConfig, params: dict, cache: Cache, prompt_BxP: Array,
                   prompt_len_B: Array, group_size: int,
                   lora: lora_lib.LoraConfig | None = None) -> tuple[Array, Cache]:
  """`prefill` for rows in groups of ``group_size`` adjacent copies of one prompt
  (GRPO's layout): each distinct prompt (rows 0, G, 2G, ...) runs once and its keys,
  values and next-token logits are broadcast to its G rows (prefill work / G). The
  decode that follows is unchanged, so outputs equal `prefill`'s for the same key."""
  p = prompt_BxP.shape[1]
  small = init_cache(cfg, prompt_BxP.shape[0] // group_size, p, cache.k.dtype)
  logits_UxV, small = prefill(cfg, params, small, prompt_BxP[::group_size],
                              prompt_len_B[::group_size], lora)
  rep = functools.partial(jnp.repeat, repeats=group_size, axis=1)
  k = jax.lax.dynamic_update_slice(cache.k, rep(small.k), (0, 0, 0, 0, 0))
  v = jax.lax.dynamic_update_slice(cache.v, rep(small.v), (0, 0, 0, 0, 0))
  kpos = jnp.full_like(cache.kpos, -1).at[:, :p].set(
      jnp.repeat(small.kpos, group_size, axis=0))
  return jnp.repeat(logits_UxV, group_size, axis=0), Cache(k, v, kpos)


def check_groups(prompt_BxP: Any, prompt_len_B: Any, group_size: int, who: str) -> None:
  """Host prompts for a group-shared prefill: each run of ``group_size`` adjacent rows
  must hold one prompt."""
  if group_size == 1:
    return
  b, p = np.shape(prompt_BxP)
  grouped = np.asarray(prompt_BxP).reshape(b // group_size, group_size, p)
  lens = np.asarray(prompt_len_B).reshape(b // group_size, group_size)
  if not ((grouped == grouped[:, :1]).all() and (lens == lens[:, :1]).all()):
    raise ValueError(f"{who}: group_size={group_size} needs each run of {group_size} "
                     "adjacent rows to hold the same prompt (the RL layout).")


# ----------------------------------------------------------------------------- drivers


def cache_sharding(mesh: Mesh, cfg: tfm.TransformerConfig, batch: int) -> Cache:
  """Cache rows over the data-parallel axes, kv heads over `tensor` when it divides."""
  from jaxalign.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  dp = mesh_lib.data_parallel_size(mesh)
  rows = mesh_lib.BATCH_AXES if batch % dp == 0 else None
  tp = mesh.shape["tensor"]
  heads = "tensor" if tp > 1 and cfg.n_kv_heads % tp == 0 else None
  kv = NamedSharding(mesh, PartitionSpec(None, rows, None, heads, None))
  return Cache(kv, kv, NamedSharding(mesh, PartitionSpec(rows)))


class Sampler:
  """Binds a model config, sampling config and static shapes; owns the donated cache.

  Args:
    cfg: the policy's `TransformerConfig`.
    scfg: the `SamplingConfig`.
    batch: rows per call (B); prompt_len: the prompt bucket (P).
    mesh, param_shardings: optional; when given, both programs are jitted with the
      params' training shardings, rows over (data, fsdp) and the cache sharded the same.
    lora: a LoRA policy's `lora.LoraConfig`: params then are ``{**base,
      ADAPTERS_KEY: adapters}`` and decode with the adapters on (params without them
      decode as the base).
    group_size: rows come in groups of G adjacent copies of a prompt: each distinct
      prompt is prefilled once (`prefill_shared`); 1 = every row prefilled.
    cache_dtype: the KV cache's dtype (default: the compute dtype).

  ``sampler(params, prompt_BxP, prompt_len_B, key) -> SampleOutput``.
  """

  def __init__(self, cfg: tfm.TransformerConfig, scfg: SamplingConfig, *, batch: int,
               prompt_len: int, mesh: Mesh | None = None, param_shardings: Any = None,
               lora: lora_lib.LoraConfig | None = None, group_size: int = 1,
               cache_dtype: Any = None):
    self.cfg, self.scfg, self.batch, self.prompt_len = cfg, scfg, batch, prompt_len
    if batch % group_size:
      raise ValueError(f"Sampler: batch={batch} is not a multiple of group_size={group_size}.")
    self.group_size = group_size
    length = prompt_len + scfg.max_new_tokens
    pre = functools.partial(prefill, cfg, lora=lora) if group_size == 1 else \
        functools.partial(prefill_shared, cfg, group_size=group_size, lora=lora)
    new_cache = functools.partial(init_cache, cfg, batch, length, cache_dtype)
    dec = functools.partial(decode, cfg, scfg, lora=lora)
    self._rows, self._gather = None, lambda out: out  # a mesh's rows; host reads
    if mesh is None:
      self._prefill = jax.jit(pre, donate_argnums=(1,))
      self._decode = jax.jit(dec, donate_argnums=(1,))
      self._cache = new_cache()
    else:
      from jaxalign.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
      c_sh = cache_sharding(mesh, cfg, batch)
      rows = mesh_lib.batch_sharding(mesh) if batch % mesh_lib.data_parallel_size(mesh) == 0 \
          else mesh_lib.replicated(mesh)
      repl = mesh_lib.replicated(mesh)
      self._prefill = jax.jit(pre, donate_argnums=(1,),
                              in_shardings=(param_shardings, c_sh, rows, rows),
                              out_shardings=(rows, c_sh))
      self._decode = jax.jit(dec, donate_argnums=(1,),
                             in_shardings=(param_shardings, c_sh, rows, rows, repl),
                             out_shardings=((rows, rows, rows), c_sh))
      self._cache = jax.jit(new_cache, out_shardings=c_sh)()
      self._rows = rows
      # Under jax.distributed the rows span processes: replicated, every host reads
      # the whole output (decoding, host rewards, metrics); a no-op on one process.
      self._gather = functools.partial(mesh_lib.host_readable, sharding=repl)

  def check_prompts(self, prompt_BxP: Any, prompt_len_B: Any) -> None:
    shape = np.shape(prompt_BxP)
    if shape != (self.batch, self.prompt_len):
      raise ValueError(f"Sampler: prompts have shape {shape}; this sampler was built for "
                       f"[batch={self.batch}, prompt_len={self.prompt_len}] (left-padded). "
                       "Pad / bucket the prompts or build a sampler for this shape.")
    lens = np.asarray(prompt_len_B)
    if lens.shape != (self.batch,) or lens.min() < 1 or lens.max() > self.prompt_len:
      raise ValueError(f"Sampler: prompt lengths {lens.tolist()} must be {self.batch} values "
                       f"in [1, {self.prompt_len}].")

  def __call__(self, params: dict, prompt_BxP: Any, prompt_len_B: Any, key: Array
               ) -> SampleOutput:
    if not isinstance(prompt_BxP, jax.Array):
      self.check_prompts(prompt_BxP, prompt_len_B)
      check_groups(prompt_BxP, prompt_len_B, self.group_size, "Sampler")
    prompt_BxP = jnp.asarray(prompt_BxP, jnp.int32)
    prompt_len_B = jnp.asarray(prompt_len_B, jnp.int32)
    if self._rows is not None:  # host prompts become global arrays (jax.distributed)
      prompt_BxP, prompt_len_B = jax.device_put((prompt_BxP, prompt_len_B), self._rows)
    logits, cache = self._prefill(params, self._cache, prompt_BxP, prompt_len_B)
    (toks, mask, logp), self._cache = self._decode(params, cache, logits, prompt_len_B, key)
    seq, pos = assemble(prompt_BxP, prompt_len_B, toks, mask)
    return SampleOutput(*self._gather((toks, mask, logp, seq, pos)))


def generate_uncached(graphdef: Any, params: dict, scfg: SamplingConfig, prompt_BxP: Array,
                      prompt_len_B: Array, key: Array) -> tuple[Array, Array, Array]:
  """Reference sampler: re-runs the full transformer forward over the whole
  [B, P + N] buffer at every step (same sampling rule, same keys). O(N) forwards;
  for tests and the cache-vs-no-cache benchmark. Returns (tokens, mask, logp) [B, N]."""
  b, p = prompt_BxP.shape
  n = scfg.max_new_tokens
  cfg = tfm.config_of(graphdef, params)
  pos_BxP, valid_BxP = prompt_positions(prompt_BxP, prompt_len_B)
  seq = jnp.concatenate([prompt_BxP, jnp.zeros((b, n), jnp.int32)], axis=1).astype(jnp.int32)
  pos = jnp.concatenate([pos_BxP, prompt_len_B[:, None] + jnp.arange(n)[None]], axis=1)
  seg = jnp.concatenate([valid_BxP.astype(jnp.int32), jnp.zeros((b, n), jnp.int32)], axis=1)

  def body(t, st):
    seq, seg, toks, logps, done = st
    hidden, unembed = tfm.forward(graphdef, params, seq, pos.astype(jnp.int32), seg)
    h_BxD = jax.lax.dynamic_index_in_dim(hidden, p - 1 + t, axis=1, keepdims=False)
    logits = tfm.final_logits(cfg, h_BxD, unembed)
    tok, lp = sample_token(jax.random.fold_in(key, t), logits, scfg)
    tok = jnp.where(done, scfg.pad_id, tok)
    lp = jnp.where(done, 0.0, lp)
    seq = jax.lax.dynamic_update_slice(seq, tok[:, None], (0, p + t))
    seg = jax.lax.dynamic_update_slice(seg, (~done).astype(jnp.int32)[:, None], (0, p + t))
    toks = jax.lax.dynamic_update_slice(toks, tok[:, None], (0, t))
    logps = jax.lax.dynamic_update_slice(logps, lp[:, None], (0, t))
    return seq, seg, toks, logps, done | is_stop(tok, scfg)

  init = (seq, seg, jnp.full((b, n), scfg.pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
          jnp.zeros((b,), bool))
  _, _, toks, logps, _ = jax.lax.fori_loop(0, n, body, init)
  return toks, completion_mask(toks, scfg), logps
