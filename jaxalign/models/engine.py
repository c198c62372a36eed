"""Rollout engine: group-shared prefill and continuous batching in one jitted program.

`sampling.Sampler` decodes B rows in lock step for up to N steps: a row that stops early
idles until the last one stops, and GRPO's G samples of a prompt prefill it G times.
The engine instead runs a fixed number of decode **slots** over a queue of M
completions (M = the rollout's rows), all inside one ``lax.while_loop``:

1. Prefill once per distinct prompt: completions come in groups of ``group_size`` G
   adjacent rows sharing a prompt (the RL layout), so the U = M / G distinct prompts are
   prefilled in one batched pass into a prompt cache ``[L, U, P, G_kv, K]`` with their
   first next-token logits ``[U, V]`` (prefill work / G).
2. Loop until every completion has finished: (a) every free slot takes the next pending
   completion ``c``: its prompt's KV rows are copied from the prompt cache into the
   slot (a copy, no model call), its logits become the slot's; (b) every slot samples a
   token, writes it to ``tokens[c, t]`` and runs the one-token model step at its own
   cache position ``P + t`` (slots are at different steps, so keys / values are
   scattered per row); a slot whose token is a stop id, or whose completion reached N
   tokens, records its finish reason and frees itself.

Static shapes throughout (slots S, prompt bucket P, N, M, U fixed per engine), so the
program compiles once; the slot cache ``[L, S, P + N, G_kv, K]`` is allocated once and
donated to each call, as the Sampler's. The cache layout and masking are the Sampler's
(`sampling` module doc): left-padded prompt in slots [0, P), completion token t at
P + t, ``kpos = -1`` marks empty slots, positions restart at the first real prompt token.

Keys: completion c's token t is drawn with ``fold_in(fold_in(key, c), t)`` -- from the
completion index and its own step, never from the slot or the loop iteration, so for a
fixed key the completions do not depend on the slot count (the Sampler instead draws a
whole [B, V] batch per step from ``fold_in(key, t)``; the two agree under greedy).
Log-probs follow `sampling.sample_token` (temperature-scaled, unfiltered).

Finish reasons per completion: `FINISH_EOS` (a stop id was sampled; the stop token is
part of the completion, mask 1) or `FINISH_LENGTH` (N tokens, no stop id).

The KV cache dtype is an option (``cache_dtype``, e.g. bf16 under an f32 model):
keys / values are cast when written and read back in the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxalign.models import lora as lora_lib
from jaxalign.models import sampling
from jaxalign.models import transformer as tfm

Array = jax.Array
FINISH_EOS, FINISH_LENGTH = 1, 2


class EngineOutput(NamedTuple):
  """Per completion: tokens / mask / logp [M, N] (as `sampling.SampleOutput`), finish
  [M] int32 (`FINISH_EOS` / `FINISH_LENGTH`), sequences / positions [M, P + N]."""
  tokens: Array
  mask: Array
  logp: Array
  finish: Array
  sequences: Array
  positions: Array


def _slot_layer(cfg, p, x_Sx1xD, rope, k_all, v_all, layer, mask_Sx1xT, at_S, lora=None):
  """`sampling._cached_layer` for one token per slot, each written at its own slot."""
  dt = cfg.jnp_dtype
  p = {n: w.astype(dt) for n, w in p.items()}
  q, k, v = tfm.attention_inputs(cfg, p, x_Sx1xD, rope, lora)
  rows = jnp.arange(at_S.shape[0])
  k_all = k_all.at[layer, rows, at_S].set(k[:, 0].astype(k_all.dtype))
  v_all = v_all.at[layer, rows, at_S].set(v[:, 0].astype(v_all.dtype))
  attn = tfm.attend(cfg, q, k_all[layer].astype(dt), v_all[layer].astype(dt), mask_Sx1xT,
                    chunked=False)
  return tfm.attention_output_and_mlp(cfg, p, x_Sx1xD, attn, lora), k_all, v_all


def slot_step(cfg: tfm.TransformerConfig, params: dict, cache: sampling.Cache,
              tok_S: Array, pos_S: Array, live_S: Array, at_S: Array,
              lora: lora_lib.LoraConfig | None = None) -> tuple[Array, sampling.Cache]:
  """One token per slot: slot s holds position id ``pos_S[s]`` written at cache slot
  ``at_S[s]`` (``kpos`` -1 where not ``live_S``); returns next-token logits [S, V] f32
  and the cache. `sampling.model_step` with per-row write slots."""
  s, t = cache.kpos.shape
  rows = jnp.arange(s)
  kpos_SxT = cache.kpos.at[rows, at_S].set(jnp.where(live_S, pos_S, -1).astype(jnp.int32))
  mask_Sx1xT = ((kpos_SxT[:, None, :] >= 0)
                & (jnp.arange(t)[None, None, :] <= at_S[:, None, None])
                & (kpos_SxT[:, None, :] <= pos_S[:, None, None]))
  shared = tfm.layer_inputs(cfg, mask_Sx1xT, pos_S[:, None], kpos_SxT)
  adapters = sampling._adapters(params, lora)  # pylint: disable=protected-access

  def body(carry, xs):
    x, k_all, v_all = carry
    p, i, is_local, ad = xs
    mask, rope = shared.for_layer(is_local)
    x, k_all, v_all = _slot_layer(cfg, p, x, rope, k_all, v_all, i, mask, at_S,
                                  None if adapters is None else adapters.layer(ad))
    return (x, k_all, v_all), None

  x = sampling._embed(cfg, params, tok_S[:, None])  # pylint: disable=protected-access
  (x, k_all, v_all), _ = jax.lax.scan(
      body, (x, cache.k, cache.v),
      (dict(params["layers"]), jnp.arange(cfg.n_layers), tfm.layer_flags(cfg),
       None if adapters is None else adapters.scan_inputs(cfg.n_layers)))
  h_SxD = tfm.rms_norm(x[:, -1], params["final_norm"], cfg.norm_eps, cfg.norm_offset)
  logits = tfm.final_logits(cfg, h_SxD, sampling._unembed(cfg, params))  # pylint: disable=protected-access
  return logits, sampling.Cache(k_all, v_all, kpos_SxT)


def prefill_prompts(cfg: tfm.TransformerConfig, params: dict, prompt_UxP: Array,
                    prompt_len_U: Array, cache_dtype: Any = None,
                    lora: lora_lib.LoraConfig | None = None
                    ) -> tuple[Array, sampling.Cache]:
  """The distinct prompts prefilled once: (first next-token logits [U, V] f32, their
  cache [U, P]), to be copied into decode slots."""
  u, p = prompt_UxP.shape
  cache = sampling.init_cache(cfg, u, p, cache_dtype)
  logits, cache = sampling.prefill(cfg, params, cache, prompt_UxP, prompt_len_U, lora)
  return logits.astype(jnp.float32), cache


class _Loop(NamedTuple):
  cache: sampling.Cache  # [L, S, P + N, ...] slot cache
  logits: Array  # [S, V] f32: the next-token logits of each slot
  cid: Array  # [S] the completion a slot decodes, -1 = free
  t: Array  # [S] that completion's step
  plen: Array  # [S] its prompt length (position ids continue from it)
  nxt: Array  # the next pending completion
  ndone: Array  # finished completions
  toks: Array  # [M, N]
  logp: Array  # [M, N]
  finish: Array  # [M]


def _refill(st: _Loop, prompts: tuple[Array, sampling.Cache, Array], m: int, group: int,
            n: int) -> _Loop:
  """Free slots take the next pending completions (in slot order): their prompt's KV
  and first logits are copied in from the prompt cache."""
  first_UxV, pcache, plen_U = prompts
  s = st.cid.shape[0]
  free_S = st.cid < 0
  c_S = st.nxt + jnp.cumsum(free_S) - 1
  take_S = free_S & (c_S < m)
  u_S = jnp.clip(c_S, 0, m - 1) // group
  p = pcache.kpos.shape[1]
  dst_S = jnp.where(take_S, jnp.arange(s), s)  # s: out of range, dropped
  k = st.cache.k.at[:, dst_S, :p].set(pcache.k[:, u_S], mode="drop")
  v = st.cache.v.at[:, dst_S, :p].set(pcache.v[:, u_S], mode="drop")
  new_kpos = jnp.concatenate([pcache.kpos[u_S], jnp.full((s, n), -1, jnp.int32)], axis=1)
  kpos = jnp.where(take_S[:, None], new_kpos, st.cache.kpos)
  return st._replace(
      cache=sampling.Cache(k, v, kpos),
      logits=jnp.where(take_S[:, None], first_UxV[u_S], st.logits),
      cid=jnp.where(take_S, c_S, st.cid), t=jnp.where(take_S, 0, st.t),
      plen=jnp.where(take_S, plen_U[u_S], st.plen), nxt=st.nxt + jnp.sum(take_S))


def _decode_step(cfg, scfg, params, st: _Loop, key: Array, lora) -> _Loop:
  """Every busy slot samples its completion's next token and steps the model."""
  m, n = st.toks.shape
  busy_S = st.cid >= 0
  keys_S = jax.vmap(lambda c, t: jax.random.fold_in(jax.random.fold_in(key, c), t))(
      jnp.maximum(st.cid, 0), st.t)
  tok_S, lp_S = jax.vmap(lambda k, lg: sampling.sample_token(k, lg[None], scfg))(
      keys_S, st.logits)
  tok_S, lp_S = tok_S[:, 0], lp_S[:, 0]
  row_S = jnp.where(busy_S, st.cid, m)  # m: out of range, dropped
  toks = st.toks.at[row_S, st.t].set(tok_S, mode="drop")
  logp = st.logp.at[row_S, st.t].set(lp_S, mode="drop")
  stop_S = sampling.is_stop(tok_S, scfg)
  end_S = busy_S & (stop_S | (st.t + 1 >= n))
  reason_S = jnp.where(stop_S, FINISH_EOS, FINISH_LENGTH).astype(jnp.int32)
  finish = st.finish.at[jnp.where(end_S, st.cid, m)].set(reason_S, mode="drop")
  live_S = busy_S & jnp.logical_not(end_S)
  p = st.cache.kpos.shape[1] - n
  logits, cache = slot_step(cfg, params, st.cache, tok_S, (st.plen + st.t).astype(jnp.int32),
                            live_S, (p + st.t).astype(jnp.int32), lora)
  return st._replace(cache=cache, logits=logits, cid=jnp.where(end_S, -1, st.cid),
                     t=jnp.where(live_S, st.t + 1, st.t), ndone=st.ndone + jnp.sum(end_S),
                     toks=toks, logp=logp, finish=finish)


def run(cfg: tfm.TransformerConfig, scfg: sampling.SamplingConfig, params: dict,
        cache: sampling.Cache, prompt_MxP: Array, prompt_len_M: Array, key: Array, *,
        group_size: int = 1, lora: lora_lib.LoraConfig | None = None
        ) -> tuple[tuple[Array, Array, Array, Array], sampling.Cache]:
  """All M rows' completions through the slots of ``cache`` (module doc); rows come in
  groups of ``group_size`` adjacent copies of a prompt, each prefilled once. Returns
  ((tokens, mask, logp) [M, N], finish [M]) and the slot cache."""
  m, n = prompt_MxP.shape[0], scfg.max_new_tokens
  s = cache.kpos.shape[0]
  len_U = prompt_len_M[::group_size].astype(jnp.int32)
  first, pcache = prefill_prompts(cfg, params, prompt_MxP[::group_size], len_U,
                                  cache.k.dtype, lora)
  prompts = (first, pcache, len_U)
  refill = functools.partial(_refill, prompts=prompts, m=m, group=group_size, n=n)

  def body(st):
    st = jax.lax.cond(jnp.any(st.cid < 0) & (st.nxt < m), refill, lambda x: x, st)
    return _decode_step(cfg, scfg, params, st, key, lora)

  zeros_S = jnp.zeros((s,), jnp.int32)
  init = _Loop(cache=cache._replace(kpos=jnp.full_like(cache.kpos, -1)),
               logits=jnp.zeros((s, first.shape[1]), jnp.float32),
               cid=zeros_S - 1, t=zeros_S, plen=zeros_S, nxt=jnp.int32(0),
               ndone=jnp.int32(0), toks=jnp.full((m, n), scfg.pad_id, jnp.int32),
               logp=jnp.zeros((m, n), jnp.float32), finish=jnp.zeros((m,), jnp.int32))
  st = jax.lax.while_loop(lambda st: st.ndone < m, body, init)
  mask = sampling.completion_mask(st.toks, scfg)
  return (st.toks, mask, st.logp, st.finish), st.cache


class Engine:
  """Binds configs and static shapes; owns the donated slot cache. A drop-in for
  `sampling.Sampler`: ``engine(params, prompt_BxP, prompt_len_B, key) ->
  sampling.SampleOutput``; `generate` also returns the finish reasons.

  Args:
    cfg, scfg: the policy's `TransformerConfig` and the `SamplingConfig`.
    batch: completions per call (M rows); prompt_len: the prompt bucket (P).
    slots: decode slots S (default: ``batch``); fewer slots than rows is continuous
      batching (a finished slot takes the next completion).
    group_size: G adjacent rows share a prompt (the RL layout; checked on host
      prompts): each distinct prompt is prefilled once.
    cache_dtype: the KV cache's dtype (default: the compute dtype).
    mesh, param_shardings, lora: as `sampling.Sampler` (the slot cache is sharded by
      `sampling.cache_sharding`).
  """

  def __init__(self, cfg: tfm.TransformerConfig, scfg: sampling.SamplingConfig, *,
               batch: int, prompt_len: int, slots: int | None = None, group_size: int = 1,
               cache_dtype: Any = None, mesh: Mesh | None = None,
               param_shardings: Any = None, lora: lora_lib.LoraConfig | None = None):
    slots = batch if slots is None else slots
    if batch % group_size or not 1 <= slots <= batch:
      raise ValueError(f"Engine: batch={batch} must be a multiple of group_size="
                       f"{group_size}, and slots={slots} in [1, batch].")
    self.cfg, self.scfg, self.batch, self.prompt_len = cfg, scfg, batch, prompt_len
    self.slots, self.group_size = slots, group_size
    length = prompt_len + scfg.max_new_tokens
    self._dtype = cfg.jnp_dtype if cache_dtype is None else jnp.dtype(cache_dtype)
    fn = functools.partial(run, cfg, scfg, group_size=group_size, lora=lora)
    make = lambda: sampling.init_cache(cfg, slots, length, self._dtype)
    self._rows, self._gather = None, lambda out: out
    if mesh is None:
      self._run = jax.jit(fn, donate_argnums=(1,))
      self._cache = make()
      return
    from jaxalign.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    c_sh = sampling.cache_sharding(mesh, cfg, slots)
    repl = mesh_lib.replicated(mesh)
    rows = mesh_lib.batch_sharding(mesh) if batch % mesh_lib.data_parallel_size(mesh) == 0 \
        else repl
    self._run = jax.jit(fn, donate_argnums=(1,),
                        in_shardings=(param_shardings, c_sh, rows, rows, repl),
                        out_shardings=((rows,) * 4, c_sh))
    self._cache = jax.jit(make, out_shardings=c_sh)()
    self._rows = rows
    self._gather = functools.partial(mesh_lib.host_readable, sharding=repl)

  def kv_cache_bytes(self) -> int:
    """Bytes of KV cache per device: the slot cache plus the prompt cache the
    program allocates (U = batch / group_size prompts of P slots)."""
    from jaxalign.train import rl_memory  # pylint: disable=g-import-not-at-top
    slot = rl_memory.bytes_per_device(self._cache)
    per_slot_row = slot / (self.slots * (self.prompt_len + self.scfg.max_new_tokens))
    return int(slot + per_slot_row * (self.batch // self.group_size) * self.prompt_len)

  def generate(self, params: dict, prompt_BxP: Any, prompt_len_B: Any, key: Array
               ) -> EngineOutput:
    if not isinstance(prompt_BxP, jax.Array):
      sampling.Sampler.check_prompts(self, prompt_BxP, prompt_len_B)
      sampling.check_groups(prompt_BxP, prompt_len_B, self.group_size, "Engine")
    prompt_BxP = jnp.asarray(prompt_BxP, jnp.int32)
    prompt_len_B = jnp.asarray(prompt_len_B, jnp.int32)
    if self._rows is not None:  # host prompts become global arrays (jax.distributed)
      prompt_BxP, prompt_len_B = jax.device_put((prompt_BxP, prompt_len_B), self._rows)
    (toks, mask, logp, finish), self._cache = self._run(params, self._cache, prompt_BxP,
                                                        prompt_len_B, key)
    seq, pos = sampling.assemble(prompt_BxP, prompt_len_B, toks, mask)
    return EngineOutput(*self._gather((toks, mask, logp, finish, seq, pos)))

  def __call__(self, params: dict, prompt_BxP: Any, prompt_len_B: Any, key: Array
               ) -> sampling.SampleOutput:
    out = self.generate(params, prompt_BxP, prompt_len_B, key)
    return sampling.SampleOutput(out.tokens, out.mask, out.logp, out.sequences,
                                 out.positions)


def for_rl(rl: Any, cfg: tfm.TransformerConfig, scfg: sampling.SamplingConfig, *,
           rows: int, group_size: int | None = None, mesh: Mesh | None = None,
           param_shardings: Any = None, lora: lora_lib.LoraConfig | None = None
           ) -> sampling.Sampler | Engine:
  """The rollout sampler an RL section asks for (``rl.engine``, ``rl.engine_slots``,
  ``rl.kv_cache_dtype``; `jaxalign.config.RLConfig`): a `sampling.Sampler` or an
  `Engine`, both ``(params, prompt_BxP, prompt_len_B, key) -> SampleOutput``.
  ``group_size``: adjacent rows sharing a prompt (default ``rl.group_size``)."""
  dtype = getattr(rl, "kv_cache_dtype", "") or None
  common = dict(batch=rows, prompt_len=rl.prompt_len, mesh=mesh,
                param_shardings=param_shardings, lora=lora, cache_dtype=dtype)
  if getattr(rl, "engine", "static") == "static":
    return sampling.Sampler(cfg, scfg, **common)
  g = rl.group_size if group_size is None else group_size
  return Engine(cfg, scfg, slots=getattr(rl, "engine_slots", 0) or rows, group_size=g,
                **common)
