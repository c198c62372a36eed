"""Tests for jaxalign.data.synthetic: the ground-truth preference task.

Oracles: hand-computed rewards from the formula in the module docstring; the
Bradley-Terry probabilities (statistical tests at a stated number of standard
errors); closed-form expectations of the reward under the uniform behaviour policy.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxalign.data import synthetic as syn
from jaxalign.data.examples import PairExample, RankedExample, SFTExample, UnpairedExample

CFG = syn.SyntheticTaskConfig()


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_oracle_reward_hand_computed():
  # Default: good = {4, 8, 12, ...}; w_good = w_topic = 2, w_length = 1, target 8.
  prompts = [np.array([2, 5, 8, 9]), np.array([2, 6]), np.array([2, 4]), np.array([2, 7])]
  responses = [
      np.array([4, 5, 8, 8, 3, 0]),  # n=4: good 3/4, topic {5,8,8} 3/4, len |4-8|/8
      np.array([3, 6, 6]),  # EOS first: n=0 -> fractions 0, length penalty 1
      np.array([4, 4, 4, 4, 4, 4, 4, 4, 3, 9, 9]),  # n=8: all good, all topic, after EOS ignored
      np.array([5, 6, 9, 10, 11, 13, 14, 15, 17, 18]),  # n=10, no EOS: no good/topic
  ]
  expected = [
      2 * 0.75 + 2 * 0.75 - 0.5,
      -1.0,
      2 + 2 - 0.0,
      0 + 0 - 2 / 8,
  ]
  np.testing.assert_allclose(syn.oracle_reward(prompts, responses), expected, rtol=0,
                             atol=1e-12)
  # A padded [B, T] batch gives the same values as the list form.
  width = max(r.size for r in responses)
  padded = np.zeros((4, width), np.int32)
  for i, r in enumerate(responses):
    padded[i, :r.size] = r
  pwidth = max(p.size for p in prompts)
  ppadded = np.zeros((4, pwidth), np.int32)
  for i, p in enumerate(prompts):
    ppadded[i, :p.size] = p
  np.testing.assert_allclose(syn.oracle_reward(ppadded, padded), expected, atol=1e-12)


def test_deterministic_for_a_seed():
  for make in (syn.make_pairs, syn.make_sft, syn.make_unpaired, syn.make_ranked):
    a = make(np.random.default_rng(123), 20)
    b = make(np.random.default_rng(123), 20)
    c = make(np.random.default_rng(124), 20)
    flat = lambda xs: [np.asarray(v).tobytes() if isinstance(v, np.ndarray) else repr(v)
                       for x in xs for v in vars(x).values()]
    assert flat(a) == flat(b)
    assert flat(a) != flat(c)


def test_examples_are_well_formed():
  rng = np.random.default_rng(0)
  pairs = syn.make_pairs(rng, 50)
  sft = syn.make_sft(rng, 50)
  unpaired = syn.make_unpaired(rng, 50)
  ranked = syn.make_ranked(rng, 50, k=3)
  assert all(isinstance(e, PairExample) for e in pairs)
  assert all(isinstance(e, SFTExample) for e in sft)
  assert all(isinstance(e, UnpairedExample) for e in unpaired)
  assert all(isinstance(e, RankedExample) and len(e.responses) == 3 for e in ranked)
  completions = ([e.chosen for e in pairs] + [e.rejected for e in pairs]
                 + [e.completion for e in sft] + [e.completion for e in unpaired]
                 + [r for e in ranked for r in e.responses])
  prompts = [e.prompt for e in pairs + sft + unpaired + ranked]
  for p in prompts:
    assert p.dtype == np.int32 and p[0] == syn.BOS_ID
    assert np.all((p[1:] >= 4) & (p[1:] < CFG.vocab_size))
  for c in completions:
    assert c.dtype == np.int32 and c[-1] == syn.EOS_ID
    assert np.all((c[:-1] >= 4) & (c[:-1] < CFG.vocab_size))
  # Ranked scores are the oracle rewards of their responses.
  for j in range(3):
    np.testing.assert_allclose(
        [e.scores[j] for e in ranked],
        syn.oracle_reward([e.prompt for e in ranked], [e.responses[j] for e in ranked]),
        rtol=1e-6)


def test_bradley_terry_labels_agree_with_oracle_at_predicted_rate():
  rng = np.random.default_rng(2026)
  n = 20000
  pairs = syn.make_pairs(rng, n)
  prompts = [e.prompt for e in pairs]
  r_c = syn.oracle_reward(prompts, [e.chosen for e in pairs])
  r_r = syn.oracle_reward(prompts, [e.rejected for e in pairs])
  diff = r_c - r_r
  keep = diff != 0  # ties carry no ordering
  agree = (diff[keep] > 0).astype(np.float64)
  # Under BT the chosen side is the oracle-better one with prob sigmoid(|d| / T).
  p = _sigmoid(np.abs(diff[keep]) / CFG.temperature)
  se = np.sqrt(np.sum(p * (1 - p))) / keep.sum()
  # 4 standard errors (~1e-4 false-alarm rate); se is about 0.003 here.
  assert abs(agree.mean() - p.mean()) < 4 * se
  # And the labels are informative but noisy (neither random nor deterministic).
  assert 0.6 < agree.mean() < 0.95


def test_unpaired_labels_follow_their_probability():
  rng = np.random.default_rng(99)
  n = 20000
  ex = syn.make_unpaired(rng, n)
  r = syn.oracle_reward([e.prompt for e in ex], [e.completion for e in ex])
  p = _sigmoid((r - CFG.desirable_threshold) / CFG.temperature)
  labels = np.array([e.label for e in ex], np.float64)
  se = np.sqrt(np.sum(p * (1 - p))) / n
  assert abs(labels.mean() - p.mean()) < 4 * se  # 4 standard errors
  assert labels[r < 0.5].mean() < labels[r > 2].mean()


def test_uniform_policy_reward_matches_closed_form_and_shifting_raises_it():
  # Fixed length = target removes the length term; a fixed prompt with topic
  # {5, 8, 9} (8 is also good). Under uniform tokens over 28 content ids:
  # E[good frac] = 7/28, E[topic frac] = 3/28.
  cfg = syn.SyntheticTaskConfig(response_len_range=(8, 8))
  rng = np.random.default_rng(4)
  n = 20000
  prompts = [np.array([2, 5, 8, 9], np.int32)] * n
  ys = syn.sample_responses(rng, prompts, cfg, quality=np.zeros(n))
  r = syn.oracle_reward(prompts, ys, cfg)
  expected = 2 * 7 / 28 + 2 * 3 / 28
  # Per-response std is < 1; 4 standard errors.
  assert abs(r.mean() - expected) < 4 * r.std() / np.sqrt(n)
  # Quality 1 draws only good-or-topic tokens: favoured set = 7 good + {5, 9}
  # = 9 tokens, of which good 7/9, topic 3/9 (5, 8, 9).
  ys1 = syn.sample_responses(rng, prompts, cfg, quality=np.ones(n))
  r1 = syn.oracle_reward(prompts, ys1, cfg)
  expected1 = 2 * 7 / 9 + 2 * 3 / 9
  assert abs(r1.mean() - expected1) < 4 * r1.std() / np.sqrt(n)
  assert r1.mean() - r.mean() > 1.0  # ample room for alignment to show


def test_sft_responses_beat_behaviour_responses():
  rng = np.random.default_rng(5)
  sft = syn.make_sft(rng, 2000)
  prompts = [e.prompt for e in sft]
  behaviour = syn.sample_responses(rng, prompts)
  r_sft = syn.oracle_reward(prompts, [e.completion for e in sft])
  r_beh = syn.oracle_reward(prompts, behaviour)
  # Best-of-4 vs one draw: the gap is several standard errors of the mean.
  assert r_sft.mean() - r_beh.mean() > 10 * r_beh.std() / np.sqrt(2000)


def test_config_errors():
  with pytest.raises(ValueError, match="vocab_size"):
    syn.SyntheticTaskConfig(vocab_size=4)
  with pytest.raises(ValueError, match="temperature"):
    syn.SyntheticTaskConfig(temperature=0.0)
  with pytest.raises(ValueError, match="response_len_range"):
    syn.SyntheticTaskConfig(response_len_range=(5, 2))
  with pytest.raises(ValueError, match="2 prompts but 1 responses"):
    syn.oracle_reward([np.array([2])] * 2, [np.array([4])])


@pytest.mark.slow
def test_tiny_transformer_learns_the_task_with_sft():
  """100 SFT steps of a 1-layer d=32 transformer raise the sampled oracle reward."""
  import jax
  import jax.numpy as jnp
  import optax

  from jaxalign.data.batching import LayoutConfig, make_batch
  from jaxalign.models import transformer
  from jaxalign.ops.logprobs import sequence_logps

  cfg = transformer.TransformerConfig.tiny(vocab_size=CFG.vocab_size, d_model=32,
                                           n_layers=1, n_heads=2, n_kv_heads=1,
                                           mlp_dim=64)
  graphdef, params = transformer.init(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  data = syn.make_sft(rng, 2048)
  n, width = 32, 24  # 1 + 6 prompt + 15 response tokens fit 24
  layout = LayoutConfig("padded", (width,), n)
  opt = optax.adam(1e-2)
  opt_state = opt.init(params)
  keys = ("tokens", "positions", "segment_ids", "branch_ids", "logit_pos", "targets",
          "seq_ids")

  @jax.jit
  def step(params, opt_state, batch):
    def loss(p):
      hidden, unembed = transformer.forward(graphdef, p, batch["tokens"],
                                            batch["positions"], batch["segment_ids"],
                                            batch["branch_ids"])
      sums, counts = sequence_logps(hidden, unembed, batch, n, chunk_size=256)
      return -sums.sum() / counts.sum()
    grads = jax.grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def next_logits(params, tokens_BxT, cur_B):
    logits_BxTxV = transformer.logits(graphdef, params, tokens_BxT,
                                      jnp.broadcast_to(jnp.arange(width), tokens_BxT.shape))
    return jnp.take_along_axis(logits_BxTxV, (cur_B - 1)[:, None, None], axis=1)[:, 0]

  def sampled_reward(params, prompts, key):
    buf = np.zeros((len(prompts), width), np.int32)
    cur = np.array([p.size for p in prompts])
    for i, p in enumerate(prompts):
      buf[i, :p.size] = p
    start, done = cur.copy(), np.zeros(len(prompts), bool)
    for _ in range(width - start.max()):
      key, sub = jax.random.split(key)
      nxt = np.asarray(jax.random.categorical(
          sub, next_logits(params, jnp.asarray(buf), jnp.asarray(cur))))
      live = ~done
      buf[live, cur[live]] = nxt[live]
      cur[live] += 1
      done |= nxt == syn.EOS_ID
    responses = [buf[i, start[i]:cur[i]] for i in range(len(prompts))]
    return syn.oracle_reward(prompts, responses)

  prompts = syn.make_prompts(np.random.default_rng(1), 256)
  before = sampled_reward(params, prompts, jax.random.key(1))
  for _ in range(100):
    batch = make_batch([data[i] for i in rng.integers(0, len(data), n)], layout)
    params, opt_state = step(params, opt_state, {k: jnp.asarray(batch[k]) for k in keys})
  after = sampled_reward(params, prompts, jax.random.key(1))
  # Measured gap ~0.9 (reward std ~0.8, so the standard error of each mean is ~0.05);
  # 0.5 is ~7 standard errors below it and far above noise.
  assert after.mean() - before.mean() > 0.5
