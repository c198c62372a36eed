"""Text rewards for online RL (``rl.reward = "functions"``), the SFT warm-up and the
held-out greedy evaluation of a verifiable task.

* `TextReward`: decodes the completions with the run's tokenizer (up to the first
  stop token), calls each configured reward function (`jaxalign.rewards`,
  ``rl.reward_functions = "name:weight,..."``) with the prompt records' other fields
  and ``completion_length``, and returns the weighted sum; each function's raw mean
  is logged as ``reward/<name>`` (and, with ``rl.reward_errors = "zero"``, its failed
  completions as ``reward/<name>/failures``). A function that raises, returns a
  non-finite score or the wrong count stops the run naming it, the iteration, the
  completion and its prompt. The function ``reward_model`` is a reward model that
  re-tokenises the text with its own tokenizer (``rl.reward_model``,
  `jaxalign.rewards.model`), loaded once here.
* `sft_warmup`: ``rl.sft_warmup_steps`` supervised steps on the prompt source's
  reference answers (the built-in task's train split) before the first iteration,
  so that GRPO starts from a briefly SFT'd policy (the reference is that policy).
* `Heldout`: accuracy (the ``accuracy`` reward) of greedy completions of the
  held-out prompts, before the first iteration and after the last, written to
  ``final_eval.json`` as ``accuracy_before`` / ``accuracy_after``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign import rewards as rewards_lib
from jaxalign.models import engine as engine_lib
from jaxalign.models import sampling
from jaxalign.data import synthetic
from jaxalign.train import build
from jaxalign.train import objectives as obj_lib
from jaxalign.train import rl_steps

BEFORE_FILE = "heldout_before.json"  # accuracy_before, kept across resumes
# Extra sampling round r of iteration i (`rl_dynamic`) draws the prompt source's
# "iteration" i + r * ROUND_STRIDE: a prompt stream no real iteration (< 2**32) uses.
ROUND_STRIDE = 2 ** 32


def prompt_draw(it: int, round_: int = 0) -> int:
  """The prompt-source index of sampling round ``round_`` of iteration ``it``."""
  return it + round_ * ROUND_STRIDE


# ----------------------------------------------------------------------------- scoring


def decode_completions(tokenizer: Any, tokens_BxN: np.ndarray, stop_ids: Sequence[int]
                       ) -> tuple[list[str], np.ndarray]:
  """(texts up to the first stop token, tokens generated [B] with the stop token)."""
  tokens_BxN = np.asarray(tokens_BxN)
  stop_BxN = np.isin(tokens_BxN, np.asarray(stop_ids))
  n = tokens_BxN.shape[1]
  first_B = np.where(stop_BxN.any(1), stop_BxN.argmax(1), n)
  texts = [tokenizer.decode(row[:k]) for row, k in zip(tokens_BxN, first_B)]
  return texts, np.minimum(first_B + 1, n)


def columns(rows: Sequence[Mapping[str, Any] | None]) -> dict[str, list[Any]]:
  """Per-record fields -> per-field lists (None where a record lacks the field)."""
  keys = sorted({k for r in rows if r for k in r})
  return {k: [(r or {}).get(k) for r in rows] for k in keys}


def function_settings(rl: Any) -> dict[str, dict[str, Any]]:
  """The built-in functions' keyword settings from the ``rl`` section."""
  return {"format": {"pattern": rl.format_pattern},
          "overlong": {"max_len": rl.max_new_tokens, "cache": rl.overlong_cache},
          "length": {"max_len": rl.max_new_tokens}}


@dataclasses.dataclass(frozen=True)
class TextReward:
  """``(iteration, prompt ids, sampler output) -> (scores [B], metrics)``."""
  tokenizer: Any
  stop_ids: tuple[int, ...]
  parts: tuple[tuple[str, float, Callable], ...]  # (name, weight, bound function)
  fields: Callable[[int], list]  # iteration -> the records' fields, one per prompt
  group_size: int = 1
  on_error: str = "raise"

  def score(self, prompts: Sequence[np.ndarray], tokens_BxN: np.ndarray,
            rows: Sequence[Mapping[str, Any] | None]) -> tuple[np.ndarray, dict]:
    """Weighted scores [B] of completions ``tokens_BxN`` of ``prompts``, ``rows``
    their records' fields; metrics per function."""
    texts, lengths = decode_completions(self.tokenizer, tokens_BxN, self.stop_ids)
    prompt_texts = [self.tokenizer.decode(np.asarray(p)) for p in prompts]
    fields = dict(columns(rows), completion_length=[int(n) for n in lengths])
    total, metrics = np.zeros((len(texts),), np.float64), {}
    for name, weight, fn in self.parts:
      raw, failed = rewards_lib.call_reward(name, fn, prompt_texts, texts, fields,
                                            on_error=self.on_error)
      total += weight * raw
      metrics[f"reward/{name}"] = float(raw.mean())
      if self.on_error == "zero":
        metrics[f"reward/{name}/failures"] = float(failed)
    return total.astype(np.float32), metrics

  def __call__(self, it: int, prompts: Sequence[np.ndarray], out: Any, round_: int = 0
               ) -> tuple[np.ndarray, dict]:
    """``round_``: the sampling round of the iteration (`prompt_draw`)."""
    rows = [r for r in self.fields(prompt_draw(it, round_)) for _ in range(self.group_size)]
    where = f"iteration {it}" + (f", sampling round {round_}" if round_ else "")
    try:
      return self.score(prompts, np.asarray(out.tokens), rows)
    except rewards_lib.RewardError as e:
      if e.index is None:
        raise ValueError(f"{where}: {e}") from e
      text = self.tokenizer.decode(np.asarray(prompts[e.index]))
      batch = "sampling round" if round_ else "iteration"
      raise ValueError(f"{where}: {e} (prompt index {e.index // self.group_size}"
                       f" of the {batch}: {text[:80]!r}); fix the function, or set "
                       "rl.reward_errors='zero' to score such completions 0 and count "
                       "them.") from e


def make_text_reward(rl: Any, source: Any, *, rows: int = 8, mesh: Any = None,
                     mesh_cfg: Any = None) -> TextReward | None:
  """The run's `TextReward` (None unless ``rl.reward == "functions"``); the
  ``reward_model`` function's model (`jaxalign.rewards.model`, loaded here once)
  scores ``rows`` texts per program, its params placed on ``mesh`` like a reference."""
  if rl.reward != "functions":
    return None
  settings = function_settings(rl)
  if rl.reward_model:
    from jaxalign.rewards import model as rm  # pylint: disable=g-import-not-at-top
    settings["reward_model"] = {"model": rm.load(
        rl.reward_model, rows=rows, max_len=rm.max_len_for(rl.prompt_len, rl.max_new_tokens),
        mesh=mesh, mesh_cfg=mesh_cfg)}
  parts = []
  for name, weight in rewards_lib.parse_weights(rl.reward_functions):
    fn = functools.partial(rewards_lib.get_reward(name), **settings.get(name, {}))
    parts.append((name, weight, fn))
  stops = (source.stops["eos_id"],) + tuple(source.stops["extra_eos_ids"])
  return TextReward(tokenizer=source.tokenizer, stop_ids=stops, parts=tuple(parts),
                    fields=source.fields, group_size=rl.group_size,
                    on_error=rl.reward_errors)


# ----------------------------------------------------------------------------- warm-up


def teacher_batch(examples: Sequence[Any], prompt_len: int, max_new_tokens: int
                  ) -> dict[str, np.ndarray]:
  """A rollout-shaped batch (`rl_steps` module doc) whose completions are the
  examples' own (cut to ``max_new_tokens``), for teacher-forced log-probs."""
  prompt_BxP, len_B = rl_steps.left_pad([e.prompt for e in examples], prompt_len)
  toks_BxN = np.zeros((len(examples), max_new_tokens), np.int32)
  mask_BxN = np.zeros_like(toks_BxN)
  for i, e in enumerate(examples):
    c = np.asarray(e.completion, np.int32)[:max_new_tokens]
    toks_BxN[i, :c.size], mask_BxN[i, :c.size] = c, 1
  seq, pos = sampling.assemble(jnp.asarray(prompt_BxP), jnp.asarray(len_B),
                               jnp.asarray(toks_BxN), jnp.asarray(mask_BxN))
  seg = sampling.sequence_segments(jnp.asarray(prompt_BxP), jnp.asarray(len_B),
                                   jnp.asarray(mask_BxN))
  return {"tokens": np.asarray(seq), "positions": np.asarray(pos),
          "segment_ids": np.asarray(seg), "mask": mask_BxN}


def _sft_step(params, opt_state, batch, *, forward, optimizer, rl, softcap):
  """One step of the token-mean NLL of the batch's completions."""
  def loss_fn(p):
    logp, _ = rl_steps.response_logprobs(forward, p, batch, prompt_len=rl.prompt_len,
                                         temperature=1.0,
                                         chunk_size=rl.logprob_chunk_size,
                                         logit_softcap=softcap)
    return -rl_steps.masked_mean(logp, batch["mask"])
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def sft_warmup(params: Any, examples: Sequence[Any], arch: Any, rl: Any,
               opt_cfg: Any, *, rows: int, seed: int, say: Callable[[str], None]) -> Any:
  """``rl.sft_warmup_steps`` steps of SFT on ``examples`` (``rows`` drawn per step,
  deterministic in ``seed``) with a fresh optimizer of ``opt_cfg`` (learning rate
  ``rl.sft_warmup_lr`` when set); returns the params in their original shardings."""
  shardings = jax.tree.map(lambda x: x.sharding, params)
  if rl.sft_warmup_lr:
    opt_cfg = dataclasses.replace(opt_cfg, learning_rate=rl.sft_warmup_lr)
  optimizer = build.make_optimizer(opt_cfg, 0)
  step = jax.jit(functools.partial(
      _sft_step, forward=obj_lib.model_forward_fn(build.graphdef(arch)),
      optimizer=optimizer, rl=rl, softcap=arch.final_logit_softcap))
  params = jax.tree.map(jnp.copy, params)
  opt_state = optimizer.init(params)
  rng, losses = np.random.default_rng([seed, 7]), []
  for _ in range(rl.sft_warmup_steps):
    idx = rng.choice(len(examples), size=rows, replace=len(examples) < rows)
    batch = teacher_batch([examples[i] for i in idx], rl.prompt_len, rl.max_new_tokens)
    params, opt_state, loss = step(params, opt_state, batch)
    losses.append(float(loss))
  say(f"SFT warm-up: {rl.sft_warmup_steps} steps on {len(examples)} examples, loss "
      f"{losses[0]:.3f} -> {losses[-1]:.3f}")
  return jax.device_put(params, shardings)


# ----------------------------------------------------------------------------- held-out


@dataclasses.dataclass
class Heldout:
  """Greedy accuracy on held-out prompts (``fields["answer"]``), ``rows`` at a time."""
  sampler: sampling.Sampler
  examples: list  # PromptExample
  tokenizer: Any
  stop_ids: tuple[int, ...]
  before: float | None = None  # accuracy before RL, when this run measured it

  def accuracy(self, params: Any) -> tuple[float, list[dict]]:
    """(mean accuracy, the samples as {prompt, completion, answer, correct})."""
    rows, samples = self.sampler.batch, []
    for start in range(0, len(self.examples), rows):
      chunk = self.examples[start:start + rows]
      padded = chunk + [chunk[0]] * (rows - len(chunk))  # static sampler shape
      p_BxP, len_B = rl_steps.left_pad([e.prompt for e in padded], self.sampler.prompt_len)
      out = self.sampler(params, p_BxP, len_B, jax.random.key(0))
      texts, _ = decode_completions(self.tokenizer, np.asarray(out.tokens), self.stop_ids)
      answers = [e.fields["answer"] for e in chunk]
      correct, _ = rewards_lib.call_reward("accuracy", rewards_lib.get_reward("accuracy"),
                                           [""] * len(chunk), texts[:len(chunk)],
                                           {"answer": answers})
      samples += [{"prompt": self.tokenizer.decode(e.prompt), "completion": t,
                   "answer": a, "correct": bool(c)}
                  for e, t, a, c in zip(chunk, texts, answers, correct)]
    return float(np.mean([s["correct"] for s in samples])), samples


def make_heldout(source: Any, arch: Any, rl: Any, *, rows: int, mesh: Any,
                 param_shardings: Any) -> Heldout | None:
  """The run's held-out evaluation (None when the prompt source has no held-out split)."""
  if not getattr(source, "heldout", None):
    return None
  scfg = sampling.SamplingConfig(max_new_tokens=rl.max_new_tokens, greedy=True,
                                 **source.stops)
  sampler = engine_lib.for_rl(rl, arch, scfg, rows=rows, group_size=1, mesh=mesh,
                              param_shardings=param_shardings)
  stops = (source.stops["eos_id"],) + tuple(source.stops["extra_eos_ids"])
  return Heldout(sampler=sampler, examples=list(source.heldout), tokenizer=source.tokenizer,
                 stop_ids=stops)


# ----------------------------------------------------------------------------- driver hooks


def check_prompt_lengths(source: Any, prompt_len: int) -> None:
  """A prompt longer than ``rl.prompt_len`` would lose its start (left_pad keeps the
  end): an error before anything compiles."""
  longest = source.longest_prompt()
  if longest > prompt_len:
    raise ValueError(f"config.rl.prompt_len={prompt_len} is shorter than the longest "
                     f"prompt ({longest} tokens); raise it to {longest}.")


def host_rewards(rl: Any, source: Any, **placement) -> tuple[Callable | None,
                                                             TextReward | None]:
  """(the synthetic task's oracle ``(prompts, tokens) -> scores`` for ``rl.reward =
  "oracle"``, the `TextReward` for ``"functions"``); None where not configured.
  ``placement``: `make_text_reward`'s rows / mesh / mesh_cfg."""
  oracle = (functools.partial(synthetic.oracle_reward, config=source.task)
            if rl.reward == "oracle" else None)
  return oracle, make_text_reward(rl, source, **placement)


def host_scores(oracle: Callable | None, text_reward: TextReward | None, it: int,
                prompts: Sequence[np.ndarray], out: Any, round_: int = 0
                ) -> tuple[Any, dict]:
  """Scores [B] computed on the host (None: the reward model scores on device) and
  their metrics; ``round_``: the iteration's sampling round (`rl_dynamic`)."""
  if text_reward is not None:
    return text_reward(it, prompts, out, round_)
  if oracle is not None:
    return oracle(prompts, np.asarray(out.tokens)), {}
  return None, {}


def prepare(run: Any) -> Heldout | None:
  """What `rl.run_rl` adds before the first iteration of a run with a held-out split:
  on a fresh start the SFT warm-up (``run.state``'s policy and reference become the
  warmed policy) and the held-out accuracy before RL (``heldout_before.json``).
  Returns the held-out evaluation (None without a held-out split)."""
  cfg, rl, source, t = run.cfg, run.rl, run.trainer.prompts, run.trainer
  if getattr(source, "tokenizer", None) is not None and rl.reward == "functions":
    check_prompt_lengths(source, rl.prompt_len)
  if not getattr(source, "heldout", None):
    return None
  arch, state = t.programs.sampler.cfg, run.state
  rows = cfg.data.batch_size * rl.group_size
  mesh = None if t.replicated is None else t.replicated.mesh
  heldout = make_heldout(source, arch, rl, rows=rows, mesh=mesh,
                         param_shardings=jax.tree.map(lambda x: x.sharding,
                                                      state.policy.params))
  if run.start:
    return heldout
  if rl.sft_warmup_steps:
    params = sft_warmup(state.policy.params, source.sft_examples, arch, rl,
                        cfg.optimizer, rows=rows, seed=cfg.seed, say=run.say)
    ref = state.ref_params
    if ref is not None:
      ref = build.copy_params(params, jax.tree.map(lambda x: x.sharding, ref))
    run.state = state.replace(policy=state.policy.replace(params=params), ref_params=ref)
  acc, samples = heldout.accuracy(run.state.policy.params)  # every process samples
  heldout.before = acc
  run.say(f"held-out greedy accuracy before RL: {acc:.3f} ({len(samples)} prompts)")
  _write(run.workdir, BEFORE_FILE, {"accuracy_before": acc, "samples": samples})
  return heldout


def _write(workdir: str, name: str, record: dict) -> None:
  """``workdir/name`` as JSON, by process 0 only (jax.distributed: every process
  computed the same record; one writes it)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1)


def finish(heldout: Heldout | None, state: Any, status: str, run: Any
           ) -> dict[str, float]:
  """The held-out accuracy after RL, with the one from before (``final_eval.json``'s
  ``accuracy_before`` / ``accuracy_after``); samples in ``heldout_after.json``.
  Nothing for a preempted run (its final evaluation is the resumed run's)."""
  if heldout is None or status != "done":
    return {}
  acc, samples = heldout.accuracy(state.policy.params)
  _write(run.workdir, "heldout_after.json", {"accuracy_after": acc, "samples": samples})
  out = {"accuracy_after": acc}
  path = os.path.join(run.workdir, BEFORE_FILE)
  if heldout.before is not None:
    out["accuracy_before"] = heldout.before
  elif os.path.exists(path):  # a resumed run: measured before its first iteration
    with open(path, encoding="utf-8") as f:
      out["accuracy_before"] = float(json.load(f)["accuracy_before"])
  run.say("held-out greedy accuracy: " + ", ".join(f"{k}={v:.3f}" for k, v in out.items()))
  return out
