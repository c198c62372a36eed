"""A ground-truth preference task: a small vocabulary with a known oracle reward.

The task stands in for human preferences in the demo, the integration tests and the
reward-KL experiments: a tiny model learns it on CPU in minutes, and because the reward
is known exactly, alignment quality can be scored without a learned reward model.

Vocabulary (``vocab_size`` ids, at most a few dozen): pad 0, unk 1, bos 2, eos 3 as in
the tokenizer; ids ``4 .. vocab_size-1`` are *content* tokens.

* A **prompt** is BOS followed by ``prompt_len`` content tokens drawn uniformly
  (``prompt_len`` uniform in ``prompt_len_range``). Its distinct content tokens are
  the prompt's *topic*.
* A **response** is ``n`` content tokens followed by EOS. The reward reads the tokens up
  to the first EOS or pad (a response without EOS is scored on all its tokens).
* A content token ``v`` is **good** when ``(v - 4) % good_period == 0`` (a fixed,
  prompt-independent quarter of the vocabulary by default), and **on topic** when it
  occurs in the prompt.

The **oracle reward** of a response with ``n`` tokens before its first EOS / pad is

    r(x, y) = w_good * (#good / n) + w_topic * (#on_topic / n)
              - w_length * |n - target_len| / target_len,

with the fractions taken as 0 when ``n = 0``. It is smooth in the response's token
frequencies, so a policy raises it by shifting probability mass towards good and
prompt tokens (the topic part needs attention to the prompt, the good part does not)
and towards the target length. A uniform policy scores about
``w_good / good_period + w_topic * |topic| / n_content`` minus its length penalty.

**Preferences** follow Bradley-Terry: for two responses ``a``, ``b`` to the same
prompt, ``P(a preferred) = sigmoid((r(x, a) - r(x, b)) / temperature)``.

Responses for the datasets come from a behaviour distribution of mixed quality: each
response draws a quality ``q ~ U(0, 1)``; each of its tokens is, with probability
``q``, a good-or-topic token (uniform over that set) and otherwise uniform over the
content tokens; its length is uniform in ``response_len_range``.

Views of the same task (all deterministic given the ``np.random.Generator`` passed in):

* ``make_pairs``: ``PairExample`` with BT-sampled labels (DPO family, reward models).
* ``make_sft``: ``SFTExample`` with the best of ``sft_best_of`` sampled responses.
* ``make_unpaired``: ``UnpairedExample`` (KTO); desirable with probability
  ``sigmoid((r - desirable_threshold) / temperature)``.
* ``make_ranked``: ``RankedExample`` with ``k`` responses and their oracle rewards as
  scores (RRHF).
* ``make_prompts``: prompts alone, for online RL.
* ``oracle_reward``: scores generated responses (batched, numpy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxalign.data.examples import (
    PairExample,
    RankedExample,
    SFTExample,
    UnpairedExample,
)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# The sampler's stop fields for this task (`sampling.SamplingConfig`).
SAMPLING_STOPS = {"eos_id": EOS_ID, "extra_eos_ids": (), "pad_id": PAD_ID}
FIRST_CONTENT_ID = 4


@dataclasses.dataclass(frozen=True)
class SyntheticTaskConfig:
  """The task's constants; see the module docstring for their meaning."""
  vocab_size: int = 32
  prompt_len_range: tuple[int, int] = (3, 6)  # inclusive
  response_len_range: tuple[int, int] = (2, 14)  # inclusive, content tokens
  target_len: int = 8
  good_period: int = 4
  w_good: float = 2.0
  w_topic: float = 2.0
  w_length: float = 1.0
  temperature: float = 0.5
  desirable_threshold: float = 1.0
  sft_best_of: int = 4

  def __post_init__(self):
    if not FIRST_CONTENT_ID + 2 <= self.vocab_size <= 512:
      raise ValueError(
          f"SyntheticTaskConfig.vocab_size={self.vocab_size} must be in "
          f"[{FIRST_CONTENT_ID + 2}, 512] (ids 0-3 are pad/unk/bos/eos).")
    for name in ("prompt_len_range", "response_len_range"):
      lo, hi = getattr(self, name)
      if not 1 <= lo <= hi:
        raise ValueError(
            f"SyntheticTaskConfig.{name}={getattr(self, name)} must be (lo, hi) with "
            "1 <= lo <= hi.")
    if self.target_len < 1:
      raise ValueError(f"SyntheticTaskConfig.target_len={self.target_len} must be >= 1.")
    if self.good_period < 1:
      raise ValueError(
          f"SyntheticTaskConfig.good_period={self.good_period} must be >= 1.")
    if self.temperature <= 0:
      raise ValueError(
          f"SyntheticTaskConfig.temperature={self.temperature} must be > 0.")
    if self.sft_best_of < 1:
      raise ValueError(
          f"SyntheticTaskConfig.sft_best_of={self.sft_best_of} must be >= 1.")

  @property
  def content_ids(self) -> np.ndarray:
    return np.arange(FIRST_CONTENT_ID, self.vocab_size, dtype=np.int32)

  @property
  def good_ids(self) -> np.ndarray:
    c = self.content_ids
    return c[(c - FIRST_CONTENT_ID) % self.good_period == 0]


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def preference_probability(reward_a, reward_b, temperature: float) -> np.ndarray:
  """Bradley-Terry P(a preferred over b) = sigmoid((r_a - r_b) / temperature)."""
  return _sigmoid((np.asarray(reward_a) - np.asarray(reward_b)) / temperature)


def _to_padded(x, name: str) -> np.ndarray:
  """A [B, T] int array from a 2-D array or a sequence of 1-D arrays (pad 0)."""
  if isinstance(x, np.ndarray) and x.ndim == 2:
    return x.astype(np.int64)
  rows = [np.asarray(r) for r in x]
  if any(r.ndim != 1 for r in rows):
    raise ValueError(
        f"oracle_reward: {name} must be a [B, T] array or a sequence of 1-D token "
        "arrays.")
  out = np.zeros((len(rows), max((r.shape[0] for r in rows), default=0)), np.int64)
  for i, r in enumerate(rows):
    out[i, :r.shape[0]] = r
  return out


def oracle_reward(prompt_tokens, response_tokens,
                  config: SyntheticTaskConfig = SyntheticTaskConfig()) -> np.ndarray:
  """The task's true reward, batched.

  Args:
    prompt_tokens: [B, P] int array (pad 0) or a sequence of B 1-D arrays. BOS, EOS
      and pad are ignored; the content tokens form the topic.
    response_tokens: [B, T] int array or a sequence of B 1-D arrays; read up to the
      first EOS or pad.
    config: the task constants.

  Returns:
    [B] float64 rewards (formula in the module docstring).
  """
  prompts_BxP = _to_padded(prompt_tokens, "prompt_tokens")
  resp_BxT = _to_padded(response_tokens, "response_tokens")
  if prompts_BxP.shape[0] != resp_BxT.shape[0]:
    raise ValueError(
        f"oracle_reward: {prompts_BxP.shape[0]} prompts but {resp_BxT.shape[0]} "
        "responses; pass one prompt per response.")
  b = resp_BxT.shape[0]
  v = config.vocab_size
  # Tokens after the first EOS / pad do not count.
  stop_BxT = (resp_BxT == EOS_ID) | (resp_BxT == PAD_ID)
  live_BxT = np.cumsum(stop_BxT, axis=1) == 0
  content_BxT = live_BxT & (resp_BxT >= FIRST_CONTENT_ID) & (resp_BxT < v)
  n_B = live_BxT.sum(axis=1)
  good_lut = np.zeros((max(v, int(resp_BxT.max(initial=0)) + 1),), bool)
  good_lut[config.good_ids] = True
  good_B = (content_BxT & good_lut[np.clip(resp_BxT, 0, good_lut.size - 1)]).sum(1)
  topic_BxV = np.zeros((b, v), bool)
  rows, cols = np.nonzero((prompts_BxP >= FIRST_CONTENT_ID) & (prompts_BxP < v))
  topic_BxV[rows, prompts_BxP[rows, cols]] = True
  on_topic_BxT = content_BxT & np.take_along_axis(
      topic_BxV, np.clip(resp_BxT, 0, v - 1), axis=1)
  topic_B = on_topic_BxT.sum(1)
  denom_B = np.maximum(n_B, 1)
  return (config.w_good * good_B / denom_B + config.w_topic * topic_B / denom_B
          - config.w_length * np.abs(n_B - config.target_len) / config.target_len)


def make_prompts(rng: np.random.Generator, n: int,
                 config: SyntheticTaskConfig = SyntheticTaskConfig()) -> list[np.ndarray]:
  """`n` prompts: BOS + uniform content tokens."""
  lo, hi = config.prompt_len_range
  lengths = rng.integers(lo, hi + 1, size=n)
  content = config.content_ids
  return [np.concatenate([[BOS_ID], rng.choice(content, size=int(k))]).astype(np.int32)
          for k in lengths]


def sample_responses(rng: np.random.Generator, prompts: Sequence[np.ndarray],
                     config: SyntheticTaskConfig = SyntheticTaskConfig(),
                     quality: np.ndarray | None = None) -> list[np.ndarray]:
  """One behaviour-policy response (content tokens + EOS) per prompt.

  Args:
    rng: the generator.
    prompts: the prompts.
    config: the task constants.
    quality: [B] in [0, 1], the probability that each token is drawn from the
      good-or-topic set; None draws it uniformly per response.
  """
  b = len(prompts)
  q = rng.uniform(size=b) if quality is None else np.broadcast_to(quality, (b,))
  lo, hi = config.response_len_range
  lengths = rng.integers(lo, hi + 1, size=b)
  content = config.content_ids
  good = set(config.good_ids.tolist())
  out = []
  for i, prompt in enumerate(prompts):
    topic = {int(t) for t in prompt if FIRST_CONTENT_ID <= t < config.vocab_size}
    favoured = np.array(sorted(good | topic), np.int32)
    k = int(lengths[i])
    pick = rng.uniform(size=k) < q[i]
    toks = np.where(pick, rng.choice(favoured, size=k), rng.choice(content, size=k))
    out.append(np.concatenate([toks, [EOS_ID]]).astype(np.int32))
  return out


def make_pairs(rng: np.random.Generator, n: int,
               config: SyntheticTaskConfig = SyntheticTaskConfig()) -> list[PairExample]:
  """`n` preference pairs; the chosen side is drawn from the Bradley-Terry model."""
  prompts = make_prompts(rng, n, config)
  a = sample_responses(rng, prompts, config)
  b = sample_responses(rng, prompts, config)
  p_a = preference_probability(oracle_reward(prompts, a, config),
                               oracle_reward(prompts, b, config), config.temperature)
  a_wins = rng.uniform(size=n) < p_a
  return [PairExample(prompt=x, chosen=ya if w else yb, rejected=yb if w else ya)
          for x, ya, yb, w in zip(prompts, a, b, a_wins)]


def make_sft(rng: np.random.Generator, n: int,
             config: SyntheticTaskConfig = SyntheticTaskConfig()) -> list[SFTExample]:
  """`n` SFT examples: the oracle-best of `sft_best_of` behaviour responses."""
  prompts = make_prompts(rng, n, config)
  cands = [sample_responses(rng, prompts, config) for _ in range(config.sft_best_of)]
  scores_KxN = np.stack([oracle_reward(prompts, c, config) for c in cands])
  best = scores_KxN.argmax(axis=0)
  return [SFTExample(prompt=x, completion=cands[k][i])
          for i, (x, k) in enumerate(zip(prompts, best))]


def make_unpaired(rng: np.random.Generator, n: int,
                  config: SyntheticTaskConfig = SyntheticTaskConfig()) -> list[UnpairedExample]:
  """`n` KTO examples; desirable with prob sigmoid((r - threshold) / temperature)."""
  prompts = make_prompts(rng, n, config)
  ys = sample_responses(rng, prompts, config)
  p = _sigmoid((oracle_reward(prompts, ys, config) - config.desirable_threshold)
               / config.temperature)
  labels = rng.uniform(size=n) < p
  return [UnpairedExample(prompt=x, completion=y, label=bool(l))
          for x, y, l in zip(prompts, ys, labels)]


def make_ranked(rng: np.random.Generator, n: int, k: int = 4,
                config: SyntheticTaskConfig = SyntheticTaskConfig()) -> list[RankedExample]:
  """`n` ranked examples with `k` responses each, scored by the oracle reward."""
  if k < 1:
    raise ValueError(f"make_ranked: k={k} must be >= 1.")
  prompts = make_prompts(rng, n, config)
  cands = [sample_responses(rng, prompts, config) for _ in range(k)]
  scores_KxN = np.stack([oracle_reward(prompts, c, config) for c in cands]).astype(np.float32)
  return [RankedExample(prompt=x, responses=tuple(c[i] for c in cands),
                        scores=scores_KxN[:, i].copy())
          for i, x in enumerate(prompts)]
