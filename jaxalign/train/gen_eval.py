"""Evaluation by generation inside offline training, and the eval's scoring programs.

An offline run's implicit-reward metrics (`jaxalign.eval`) score *given* responses;
they can rise while the responses the policy itself writes get worse (DPO from a
trained start at a learning rate that suits random init: issue 18). So at each eval
the policy also answers held-out prompts (`GenEval`, ``config.eval.*``, `EvalConfig`):

* ``gen_length``: mean response length in tokens, up to (not counting) the first stop
  token; ``gen_eos_rate``: the fraction of responses that stop within
  ``eval.max_new_tokens``;
* ``gen_oracle_reward`` (built-in task): the mean oracle reward
  (`jaxalign.data.synthetic.oracle_reward`) of the responses;
* ``gen_reward_model`` (``eval.reward_model``): the mean score of a reward-model run's
  scalar head at each response's last token; a reward model with another tokenizer
  (or an HF ``*ForSequenceClassification`` directory) scores the decoded text with its
  own tokenizer instead (`jaxalign.rewards.model`);
* ``gen_win_rate`` (``eval.judge``): the fraction of prompts whose response the judge
  (oracle or reward model) scores above the reference policy's response to the same
  prompt, ties half. The reference is frozen, so its responses and their scores are
  computed once at setup (a resumed run regenerates them: nothing is checkpointed) and
  reported beside as ``gen_reference_<score>``.

Greedy by default (``eval.temperature = 0``); with a temperature every eval draws with
the same key, so successive evals differ by the policy only. Prompts are the first
``eval.generate_prompts`` held-out examples' prompts; responses run up to
``eval.max_new_tokens`` (0: the longest held-out response) with the run's KV-cache
`sampling.Sampler` (its rows over the data-parallel axes, outputs replicated to every
process under jax.distributed; only process 0 logs). A LoRA policy decodes with its
adapters on its frozen base; the reference is the base, run through the same program
with zero adapters (``x A B = 0`` exactly). A reward model (``model.head = "scalar"``)
does not generate.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.data import synthetic
from jaxalign.models import sampling
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import objectives as obj_lib
from jaxalign.train import rl_steps

REWARD_MODEL_KEY = "config.eval.reward_model"


# ----------------------------------------------------------------------------
# The implicit-reward eval's programs (`jaxalign.eval`).


def eval_reference(cfg: Any, model: Any, ref_params: Any) -> Any:
  """The reference eval scores against (implicit rewards, KL), or None: a reward
  model has none; a LoRA run's is its base unless reference.kind='none'."""
  if model.scalar or (model.uses_lora and cfg.reference.kind == "none"
                      and not cfg.loss.needs_reference):
    return None
  return ref_params


def score_fn(forward, cfg: Any, model: Any, mesh, to_device, base=None) -> Callable:
  """``(params, host batch) -> per-sequence scores`` for eval; with LoRA ``params``
  are the adapters (or the base itself, for the reference), run on ``base``."""
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
  if base is not None:
    return lambda params, batch: np.asarray(score({**base, **params}, to_device(batch)))
  return lambda params, batch: np.asarray(score(params, to_device(batch)))


# ----------------------------------------------------------------------------
# Scores of generated responses.


def response_lengths(tokens_BxN: np.ndarray, stop_ids: Sequence[int]
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens before the first stop token [B], whether one was emitted [B])."""
  stop_BxN = np.isin(np.asarray(tokens_BxN), np.asarray(stop_ids))
  stopped_B = stop_BxN.any(axis=1)
  return np.where(stopped_B, stop_BxN.argmax(axis=1), stop_BxN.shape[1]), stopped_B


def win_rate(policy_B: np.ndarray, reference_B: np.ndarray) -> float:
  """Fraction of prompts whose policy response scores above the reference's, ties
  half."""
  p, r = np.asarray(policy_B, np.float64), np.asarray(reference_B, np.float64)
  return float(np.mean((p > r) + 0.5 * (p == r)))


def resolve_reward_model(spec: str) -> str:
  """``eval.reward_model`` as ``/abs/workdir:step``, checked to be a reward-model run
  (one trained on the synthetic task too: it scores this run's token ids)."""
  from jaxalign.rewards import model as rm_lib  # pylint: disable=g-import-not-at-top
  if os.path.isfile(os.path.join(spec, "config.json")):  # an HF reward model
    return rm_lib.resolve(spec, REWARD_MODEL_KEY)
  workdir, step, _ = rm_lib.resolve_run(spec, REWARD_MODEL_KEY)
  return f"{workdir}:{step}"


def reward_model_scorer(spec: str, cfg: Any, mesh) -> Callable:
  """``(prompt_BxP, prompt_len_B, sampler output) -> scores [B]`` of the reward-model
  run ``spec`` (``/abs/workdir:step``), its weights placed like a reference model. A
  reward model with another tokenizer, or an HF ``*ForSequenceClassification``
  directory, scores the responses' text instead (`_text_scorer`)."""
  from jaxalign.models import heads  # pylint: disable=g-import-not-at-top
  from jaxalign.models import transformer  # pylint: disable=g-import-not-at-top
  from jaxalign.train import build  # pylint: disable=g-import-not-at-top
  from jaxalign.train import rundir  # pylint: disable=g-import-not-at-top
  if os.path.isfile(os.path.join(spec, "config.json")):  # an HF reward model
    return _text_scorer(spec, cfg, mesh)
  workdir, step = rundir.split_init_from(spec)
  record = rundir.read_run_record(workdir, REWARD_MODEL_KEY)
  if record.get("fingerprints", {}).get("tokenizer") != rundir.fingerprints(cfg)["tokenizer"]:
    if cfg.data.source != "synthetic":  # text: re-tokenised by the model's tokenizer
      return _text_scorer(spec, cfg, mesh)
    raise ValueError(f"{REWARD_MODEL_KEY}={spec!r}: that reward model was trained with "
                     f"another tokenizer ({record['resolved'].get('tokenizer')!r}); it "
                     "cannot score this run's token ids (the synthetic task has no "
                     "text). Give one trained on this run's tokenizer.")
  lm, head, _ = rundir.run_lm_params(workdir, step, REWARD_MODEL_KEY)
  arch = rundir.arch_from_record(record["resolved"]["arch"])
  params = {"model": lm, "head": head}
  axes = {"model": transformer.logical_axes(arch), "head": heads.head_logical_axes()}
  params = mesh_lib.put(params, mesh_lib.reference_shardings(axes, mesh, cfg.mesh, params))
  forward = obj_lib.model_forward_fn(build.graphdef(arch), params_key="model")
  score = jax.jit(functools.partial(rl_steps.reward_scores, forward),
                  out_shardings=mesh_lib.replicated(mesh))

  def scorer(prompt_BxP, prompt_len_B, out):
    batch = rl_steps.rollout_batch(prompt_BxP, prompt_len_B, out)
    return np.asarray(score(params, {k: batch[k] for k in
                                     ("tokens", "positions", "segment_ids", "mask")}))
  return scorer


def _text_scorer(spec: str, cfg: Any, mesh) -> Callable:
  """A reward model with another tokenizer (or an HF one): the responses' text up to
  the stop token, re-tokenised by the model's own tokenizer (`jaxalign.rewards.model`)."""
  from jaxalign.rewards import model as rm_lib  # pylint: disable=g-import-not-at-top
  from jaxalign.train import build as build_lib  # pylint: disable=g-import-not-at-top
  from jaxalign.train import rl_rewards  # pylint: disable=g-import-not-at-top
  if cfg.data.source == "synthetic":
    raise ValueError(f"{REWARD_MODEL_KEY}={spec!r}: a reward model with its own "
                     "tokenizer scores text; the synthetic task's responses are ids "
                     "without text. Give a reward-model run trained on this task.")
  tok, stops = build_lib.build_tokenizer(cfg), _stops(cfg)
  stop_ids = (stops["eos_id"],) + tuple(stops["extra_eos_ids"])
  rm = rm_lib.load(spec, key=REWARD_MODEL_KEY, mesh=mesh, mesh_cfg=cfg.mesh)

  def scorer(prompt_BxP, prompt_len_B, out):
    texts, _ = rl_rewards.decode_completions(tok, np.asarray(out.tokens), stop_ids)
    prompts = [tok.decode(p[len(p) - int(n):]) for p, n in  # left-padded prompts
               zip(np.asarray(prompt_BxP), np.asarray(prompt_len_B))]
    return rm(prompts, texts)
  return scorer


# ----------------------------------------------------------------------------
# Generation.


@dataclasses.dataclass
class GenEval:
  """Generation-based scores of a policy on held-out prompts (module doc):
  ``gen_eval(params) -> {"gen_...": value}``; ``params`` as the train state holds
  them (a LoRA run's adapters, run on ``base``)."""
  sampler: sampling.Sampler
  prompts: list  # [n] 1-D int32 token arrays
  stop_ids: tuple[int, ...]
  key: Any  # the sampling key (unused by greedy decoding)
  scorers: dict  # name -> (prompt_BxP, prompt_len_B, output) -> scores [B]
  judge: str = ""  # a scorer's name, or "" (no win rate)
  base: Any = None  # a LoRA run's frozen base
  reference: dict = dataclasses.field(default_factory=dict)  # judge's reference scores

  def generate(self, params: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(response tokens [n, N], scores by name [n]) of ``params`` (full params)."""
    rows, toks, scores = self.sampler.batch, [], {k: [] for k in self.scorers}
    for i, start in enumerate(range(0, len(self.prompts), rows)):
      chunk = self.prompts[start:start + rows]
      padded = list(chunk) + [chunk[0]] * (rows - len(chunk))  # static sampler shape
      p_BxP, len_B = rl_steps.left_pad(padded, self.sampler.prompt_len)
      out = self.sampler(params, p_BxP, len_B, jax.random.fold_in(self.key, i))
      toks.append(np.asarray(out.tokens)[:len(chunk)])
      for name, fn in self.scorers.items():
        scores[name].append(np.asarray(fn(p_BxP, len_B, out), np.float64)[:len(chunk)])
    return np.concatenate(toks), {k: np.concatenate(v) for k, v in scores.items()}

  def full_params(self, params: Any) -> Any:
    return params if self.base is None else {**self.base, **params}

  def __call__(self, params: Any) -> dict[str, float]:
    toks, scores = self.generate(self.full_params(params))
    length, stopped = response_lengths(toks, self.stop_ids)
    out = {"gen_length": float(length.mean()), "gen_eos_rate": float(stopped.mean())}
    out.update({f"gen_{k}": float(v.mean()) for k, v in scores.items()})
    if self.judge:
      out["gen_win_rate"] = win_rate(scores[self.judge], self.reference["scores"])
      out[f"gen_reference_{self.judge}"] = float(self.reference["scores"].mean())
    return out


def _stops(cfg: Any) -> dict:
  """The sampler's stop fields: the built-in task's EOS, or the tokenizer's."""
  if cfg.data.source == "synthetic":
    return dict(synthetic.SAMPLING_STOPS)
  from jaxalign import generate as generate_lib  # pylint: disable=g-import-not-at-top
  from jaxalign.train import build  # pylint: disable=g-import-not-at-top
  return generate_lib.stop_tokens(build.build_tokenizer(cfg))


def _scorers(cfg: Any, mesh) -> dict:
  out = {}
  if cfg.data.source == "synthetic":
    task = synthetic.SyntheticTaskConfig(vocab_size=cfg.data.task.vocab_size,
                                         target_len=cfg.data.task.target_len)
    out["oracle_reward"] = lambda p_BxP, len_B, o: synthetic.oracle_reward(
        p_BxP, np.asarray(o.tokens), task)
  if cfg.eval.reward_model:
    out["reward_model"] = reward_model_scorer(cfg.eval.reward_model, cfg, mesh)
  return out


_JUDGE_SCORER = {"oracle": "oracle_reward", "reward_model": "reward_model"}


def build(cfg: Any, model: Any, mesh, examples: Sequence[Any], params: Any, *,
          base: Any = None, reference: Callable[[], Any] | None = None,
          say: Callable[[str], None] = print) -> GenEval | None:
  """The run's `GenEval`, or None (``eval.generate_prompts = 0``, a reward model).

  ``examples``: the held-out examples (``prompt``, and ``chosen`` / ``rejected`` /
  ``completion`` for the default length); ``params``: the state's params (their
  shardings are the sampler's); ``base``: a LoRA run's frozen base; ``reference``:
  returns the reference's full params (called once, only with a judge)."""
  e = cfg.eval
  if not e.enabled or not e.generate_prompts or model.scalar:
    return None
  examples = list(examples)[:e.generate_prompts]
  if len(examples) < e.generate_prompts:
    raise ValueError(f"config.eval.generate_prompts={e.generate_prompts}: the held-out "
                     f"set has {len(examples)} examples (data.eval_path, or the last "
                     "eval.num_examples of data.path); lower it.")
  stops = _stops(cfg)
  new_tokens = e.max_new_tokens or max(
      (len(r) for x in examples for r in _responses(x)), default=0)
  if not new_tokens:
    raise ValueError("config.eval.max_new_tokens=0 takes the longest held-out "
                     "response, and the held-out examples have none; set it.")
  full = params if base is None else {**base, **params}
  sampler = sampling.Sampler(
      model.arch, sampling.SamplingConfig(max_new_tokens=new_tokens, greedy=not e.temperature,
                                          temperature=e.temperature or 1.0, **stops),
      batch=e.batch_size,
      prompt_len=max(len(x.prompt) for x in examples), mesh=mesh,
      param_shardings=jax.tree.map(lambda x: x.sharding, full),
      lora=model.lora if model.uses_lora else None)
  key = mesh_lib.put(jax.random.fold_in(jax.random.key(cfg.seed), 0x6765),
                     mesh_lib.replicated(mesh))
  gen = GenEval(sampler=sampler, prompts=[np.asarray(x.prompt, np.int32) for x in examples],
                stop_ids=tuple(sampling.SamplingConfig(**stops).stop_ids), key=key,
                scorers=_scorers(cfg, mesh), judge=_JUDGE_SCORER.get(e.judge, ""),
                base=base)
  t0 = time.perf_counter()
  if gen.judge:
    ref = _like(None if base is not None else reference(), full, base)
    gen.reference["scores"] = gen.generate(ref)[1][gen.judge]
  say(f"eval by generation: {len(examples)} held-out prompts, up to {new_tokens} new "
      f"tokens, {'greedy' if not e.temperature else f'temperature {e.temperature}'}; "
      f"scores {sorted(gen.scorers) or 'none (lengths only)'}"
      + (f", win rate against the reference ({time.perf_counter() - t0:.1f} s for its "
         "responses, compiling included)" if gen.judge else ""))
  return gen


def _responses(x: Any) -> list:
  """A held-out example's responses (none for a prompt-only record)."""
  return ([getattr(x, k) for k in ("chosen", "rejected", "completion")
           if getattr(x, k, None) is not None] + list(getattr(x, "responses", ())))


def _like(ref: Any, full: Any, base: Any) -> Any:
  """The reference as the sampler's params (the policy's tree and shardings, so one
  compiled sampler serves both): a LoRA run's base with zero adapters, else the
  reference placed like the policy (a transient copy when ``mesh.reference_placement``
  puts it elsewhere)."""
  if base is not None:
    ref = {**base, **jax.tree.map(jnp.zeros_like,
                                  {k: v for k, v in full.items() if k not in base})}
  return jax.device_put(ref, jax.tree.map(lambda x: x.sharding, full))
