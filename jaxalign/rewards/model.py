"""A reward model that scores text, with its own tokenizer: the ``reward_model``
reward function (``rl.reward_functions = "reward_model:1.0"``, ``rl.reward_model =
PATH``).

PATH is ``WORKDIR[:STEP]`` of a jaxalign reward-model run (``model.head = "scalar"``:
its saved tokenizer, recorded architecture and scalar head) or an HF directory with a
``XForSequenceClassification`` of one label (`jaxalign.models.hf.load_hf_reward`;
``python -m jaxalign.export`` writes a reward-model run so). The policy's tokenizer
need not be the reward model's: completions arrive as text
(`jaxalign.train.rl_rewards.TextReward`) and are re-tokenised here, as
`jaxalign.data.formats.encode_record` encodes a record for reward-model training:

* a tokenizer with a chat template: the conversation user = prompt, assistant =
  completion (``encode_chat_split``);
* otherwise: BOS + prompt, then completion + EOS, each tokenised separately.

The score is the scalar head at the sequence's last token (a jaxalign run: where its
training read it) or, for an HF directory whose config has a ``pad_token_id``, at the
rightmost token that is not that id: transformers' rule for *ForSequenceClassification
(with pad = eos, the token before a trailing EOS).

Shapes are static: rows are scored ``rows`` at a time (a short chunk padded with empty
rows) and lengths padded to power-of-two buckets from `MIN_BUCKET` up to ``max_len``,
so at most log2(max_len / MIN_BUCKET) + 1 programs compile, each once. A text longer
than ``max_len`` tokens is an error (`call_reward` names its completion).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models import heads
from jaxalign.models import hf
from jaxalign.models import transformer

KEY = "config.rl.reward_model"
MIN_BUCKET = 32


def _is_hf(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json"))


def resolve_run(spec: str, key: str = KEY) -> tuple[str, int, dict]:
  """``WORKDIR[:STEP]`` of a reward-model run as (absolute workdir, step, run record);
  a ValueError naming ``key`` when it is not a directory or the run trains a policy."""
  from jaxalign.train import rundir  # pylint: disable=g-import-not-at-top
  workdir, step = rundir.split_init_from(spec)
  if not os.path.isdir(workdir):
    raise ValueError(f"{key}={spec!r}: not a directory; give WORKDIR[:STEP] of a "
                     "reward-model run or an HF *ForSequenceClassification directory.")
  workdir = os.path.abspath(workdir)
  step = rundir.resolve_step(workdir, step, key)
  record = rundir.read_run_record(workdir, key)
  if record["config"].get("model", {}).get("head") != "scalar":
    raise ValueError(f"{key}={spec!r}: that run trains a policy (model.head='lm'), not "
                     "a reward model; give a reward-model run (model.head='scalar') or "
                     "an HF *ForSequenceClassification directory.")
  return workdir, step, record


def resolve(spec: str, key: str = KEY) -> str:
  """``spec`` as an absolute HF directory, or ``/abs/workdir:step`` of a reward-model
  run (the latest step when none is given). Reads file headers only (no weights):
  a ValueError naming ``key`` when it is no reward model with a text tokenizer."""
  from jaxalign.train import rundir  # pylint: disable=g-import-not-at-top
  if _is_hf(spec):
    try:
      hf.check_reward_dir(spec)
      rundir.load_tokenizer_dir(spec)
    except ValueError as e:
      raise ValueError(f"{key}={spec!r}: {e}") from None
    return os.path.abspath(spec)
  workdir, step, record = resolve_run(spec, key)
  if record["resolved"].get("tokenizer") == "synthetic":
    raise ValueError(f"{key}={spec!r}: that reward model was trained on the synthetic "
                     "task's token ids and has no text tokenizer; give one trained on "
                     "text (data.source='file').")
  return f"{workdir}:{step}"


@dataclasses.dataclass(frozen=True)
class Source:
  """A loaded reward model on the host: architecture, trunk params, head ``{"w", "b"}``,
  its tokenizer, the pad id transformers' rule stops at (None: the last token)."""
  arch: Any
  trunk: Any
  head: dict
  tokenizer: Any
  pad_id: int | None
  name: str


def load_source(spec: str, key: str = KEY) -> Source:
  """The reward model ``spec`` (see `resolve`), weights and tokenizer read."""
  from jaxalign.train import rundir  # pylint: disable=g-import-not-at-top
  spec = resolve(spec, key)
  if _is_hf(spec):
    arch, trunk, head, pad = hf.load_hf_reward(spec)
    return Source(arch, trunk, head, rundir.load_tokenizer_dir(spec), pad, spec)
  workdir, step = rundir.split_init_from(spec)
  trunk, head, record = rundir.run_lm_params(workdir, step, key)
  tok = rundir.load_tokenizer_dir(os.path.join(workdir, rundir.TOKENIZER_DIR))
  return Source(rundir.arch_from_record(record["resolved"]["arch"]), trunk, head, tok,
                None, spec)


def encode(tokenizer: Any, prompt: str, completion: str) -> np.ndarray:
  """int32 ids of (prompt, completion) as reward-model training encodes them
  (module doc)."""
  from jaxalign.data import formats  # pylint: disable=g-import-not-at-top
  record = formats.TextRecord(
      kind="sft", prompt=prompt, completions=(completion,),
      prompt_messages=({"role": "user", "content": prompt},),
      completion_messages=(({"role": "assistant", "content": completion},),))
  enc = formats.encode_record(record, tokenizer)
  return np.concatenate([enc.prompt, enc.completions[0]]).astype(np.int32)


def score_index(ids: np.ndarray, pad_id: int | None) -> int:
  """Where the head is read: the last token, or transformers' rightmost non-pad one
  (0 when every token is the pad id, as its argmax gives)."""
  if pad_id is None:
    return len(ids) - 1
  keep = np.flatnonzero(np.asarray(ids) != pad_id)
  return int(keep[-1]) if keep.size else 0


def _scores(graphdef, params, tokens_BxT, last_B):
  b, t = tokens_BxT.shape
  pos_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  # Right padding: causal attention keeps it out of every real position.
  hidden_BxTxD, _ = transformer.forward(graphdef, params["model"], tokens_BxT, pos_BxT)
  return heads.sequence_scores(hidden_BxTxD, params["head"], jnp.arange(b) * t + last_B)


def buckets(max_len: int) -> tuple[int, ...]:
  """Power-of-two lengths from `MIN_BUCKET`, the last one ``max_len``."""
  out, b = [], MIN_BUCKET
  while b < max_len:
    out.append(b)
    b *= 2
  return tuple(out) + (max_len,)


class TextRewardModel:
  """``model(prompts, completions) -> scores [B] float32`` (module doc)."""

  def __init__(self, source: Source, *, rows: int = 8, max_len: int = 1024,
               mesh: Any = None, mesh_cfg: Any = None):
    from jaxalign.train import build  # pylint: disable=g-import-not-at-top
    self.source, self.rows, self.buckets = source, rows, buckets(max_len)
    self.traces = 0  # programs traced (a test counts them)
    params = {"model": source.trunk, "head": source.head}
    self._put = lambda x: x  # host inputs; on a mesh, placed replicated (multi-host)
    if mesh is None:
      params, kw = jax.device_put(params), {}
    else:
      from jaxalign.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
      axes = {"model": transformer.logical_axes(source.arch),
              "head": heads.head_logical_axes()}
      sh = mesh_lib.reference_shardings(axes, mesh, mesh_cfg, params)
      params, repl = mesh_lib.put(params, sh), mesh_lib.replicated(mesh)
      kw = dict(in_shardings=(sh, repl, repl), out_shardings=repl)
      self._put = lambda x: mesh_lib.put(x, repl)
    self.params = params
    graphdef = build.graphdef(source.arch)

    def scores(p, tokens_BxT, last_B):
      self.traces += 1
      return _scores(graphdef, p, tokens_BxT, last_B)
    self._score = jax.jit(scores, **kw)

  def _batch(self, seqs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Static-shape [rows, bucket] tokens and [rows] read positions of <= rows seqs."""
    longest = max(len(s) for s in seqs)
    t = next(b for b in self.buckets if b >= longest)
    tokens = np.zeros((self.rows, t), np.int32)
    last = np.zeros((self.rows,), np.int32)
    for i, s in enumerate(seqs):
      tokens[i, :len(s)] = s
      last[i] = score_index(s, self.source.pad_id)
    return tokens, last

  def encode_all(self, prompts: Sequence[str], completions: Sequence[str]
                 ) -> list[np.ndarray]:
    """The re-tokenised texts; a ValueError naming the first too long or out of the
    model's vocabulary."""
    tok, arch = self.source.tokenizer, self.source.arch
    seqs = [encode(tok, p, c) for p, c in zip(prompts, completions)]
    for i, s in enumerate(seqs):
      if len(s) > self.buckets[-1]:
        raise ValueError(f"completion {i} re-tokenised by the reward model's tokenizer "
                         f"is {len(s)} tokens, over its limit {self.buckets[-1]}.")
      if s.size and (s.max() >= arch.vocab_size or s.min() < 0):
        raise ValueError(f"completion {i}: token id {int(s.max())} is outside the "
                         f"reward model's vocabulary ({arch.vocab_size}); its tokenizer "
                         "and weights do not match.")
    return seqs

  def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    if len(prompts) != len(completions):
      raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions.")
    seqs = self.encode_all(prompts, completions)
    out = []
    for start in range(0, len(seqs), self.rows):
      chunk = seqs[start:start + self.rows]
      tokens, last = self._batch(chunk)
      scores = self._score(self.params, self._put(tokens), self._put(last))
      out.append(np.asarray(scores)[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def load(spec: str, *, key: str = KEY, **kwargs) -> TextRewardModel:
  """`TextRewardModel` of ``spec`` (`resolve`); ``kwargs`` as its constructor's."""
  return TextRewardModel(load_source(spec, key), **kwargs)


def max_len_for(prompt_len: int, max_new_tokens: int) -> int:
  """The RL scorer's length cap: room for a tokenizer 4x finer than the policy's and a
  chat template's markup (the cap compiles nothing until a text needs it)."""
  need = 4 * (prompt_len + max_new_tokens) + 128
  return max(512, 1 << (need - 1).bit_length())


def reward_model(prompts: Sequence[str], completions: Sequence[str], *,
                 model: TextRewardModel | None = None, **fields) -> np.ndarray:
  """The reward model's score of each (prompt, completion) (module doc); ``model`` is
  bound from ``rl.reward_model`` (`jaxalign.train.rl_rewards`)."""
  del fields
  if model is None:
    raise ValueError("the 'reward_model' reward needs config.rl.reward_model=PATH "
                     "(WORKDIR[:STEP] of a reward-model run, or an HF "
                     "*ForSequenceClassification directory).")
  return model(prompts, completions)

