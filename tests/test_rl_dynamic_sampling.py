"""DAPO's dynamic sampling (`jaxalign.train.rl_dynamic`, ``rl.dynamic_sampling``).

The oracle is NumPy on what the reward returned: a hand-made reward records every
call (prompts, completions, scores); the groups whose recorded scores have variance
> 0 (in sampling order, the first ``batch_size`` of them) must be exactly the rows
the update step receives, padded with the earliest filtered groups at ``keep = 0``
when too few are found; the update's loss must equal the DAPO loss recomputed in
NumPy (f64) on the kept rows only; and the compiled programs must not grow when the
number of rounds changes between iterations.
"""

import dataclasses
import importlib.util
import os

import jax
import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign.train import rl
from jaxalign.models import sampling
from jaxalign.train import rl_dynamic
from jaxalign.train import rl_rewards
from jaxalign.train import stream

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


def _grpo_config(arg):
  spec = importlib.util.spec_from_file_location(
      "grpo", os.path.join(EXPERIMENTS, "grpo.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


# ----------------------------------------------------------------------------- pure parts


def test_informative_and_choose_match_numpy():
  rng = np.random.default_rng(0)
  rounds = [rng.integers(0, 2, size=(6, 3)).astype(np.float32) for _ in range(3)]
  rounds[0][0] = 1.0  # an all-alike group, surely
  kept = [rl_dynamic.informative(r.reshape(-1), 3) for r in rounds]
  for r, k in zip(rounds, kept):
    np.testing.assert_array_equal(k, np.var(r.astype(np.float64), axis=1) > 0)
  good = [(i, g) for i, r in enumerate(rounds) for g in range(6) if np.var(r[g]) > 0]
  bad = [(i, g) for i, r in enumerate(rounds) for g in range(6) if np.var(r[g]) == 0]
  for n in (2, len(good), len(good) + 2):
    chosen, pad = rl_dynamic.choose(kept, n)
    want = good[:n] + bad[:max(0, n - len(good))]
    assert [(int(a), int(b)) for a, b in chosen] == want
    assert pad == max(0, n - len(good))


@pytest.mark.parametrize("overrides, match", [
    (dict(algorithm="ppo", group_size=1), "rl.dynamic_sampling"),
    (dict(max_sampling_rounds=0), "rl.max_sampling_rounds"),
    (dict(dynamic_sampling=False, max_sampling_rounds=2), "rl.max_sampling_rounds"),
])
def test_config_errors_name_the_key(overrides, match):
  c = _grpo_config("dapo")
  c.rl.update(overrides)
  with pytest.raises(ValueError, match=match):
    config_lib.validate_rl(c, jax.device_count())


def test_dapo_recipe_uses_it():
  _, r = config_lib.validate_rl(_grpo_config("dapo"), jax.device_count())
  assert r.dynamic_sampling and r.max_sampling_rounds >= 2


def test_extra_round_scores_its_own_prompts_answers():
  """Round r of iteration i reads the answers of the prompts it sampled (prompt_draw):
  completions that are the right answers (computed from the prompt text here) score
  accuracy 1 with the round's fields, and not with iteration i's own."""
  spec = importlib.util.spec_from_file_location(
      "gv", os.path.join(EXPERIMENTS, "grpo_verifiable.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("dapo,runlocal")
  c.rl.reward_functions = "accuracy:1.0"
  cfg, rlc = config_lib.validate_rl(c, jax.device_count())
  src = stream.PromptSource(cfg)
  _, text_reward = rl_rewards.host_rewards(rlc, src)
  it, r, g = 5, 2, rlc.group_size
  prompts = [p for p in src(rl_rewards.prompt_draw(it, r)) for _ in range(g)]
  tokens = np.full((len(prompts), 8), src.tokenizer.eos_id, np.int32)
  for i, p in enumerate(prompts):
    text = src.tokenizer.decode(p).rstrip("=")
    a, op, b = text.partition("+") if "+" in text else text.partition("-")
    answer = src.tokenizer.encode(str(int(a) + int(b) if op == "+" else int(a) - int(b)))
    tokens[i, :len(answer)] = answer
  out = sampling.SampleOutput(tokens, None, None, None, None)
  scores, _ = rl_rewards.host_scores(None, text_reward, it, prompts, out, round_=r)
  np.testing.assert_array_equal(scores, 1.0)
  scores0, _ = rl_rewards.host_scores(None, text_reward, it, prompts, out)
  assert scores0.mean() < 0.5


# ----------------------------------------------------------------------------- a run


class HandReward:
  """Scores by mode, recording every call. ``scarce``: the first call's group 0 gets
  (1, 0, 0, 0), everything else 0 (one informative group in all rounds). ``half``:
  prompts with an even token sum score their completion's first token parity, the
  others 0.5 (about half the groups informative)."""

  def __init__(self, group_size):
    self.g, self.mode, self.calls = group_size, "half", []

  def __call__(self, prompts, tokens_BxN):
    tokens_BxN = np.asarray(tokens_BxN)
    if self.mode == "scarce":
      s = np.zeros(len(prompts))
      if not self.calls:
        s[0] = 1.0
    else:
      even = np.array([int(np.sum(p)) % 2 == 0 for p in prompts])
      s = np.where(even, tokens_BxN[:, 0] % 2, 0.5).astype(np.float64)
    self.calls.append(([np.asarray(p) for p in prompts], tokens_BxN, s))
    return s


def _expected(calls, g, n_groups):
  """NumPy oracle: (rows as (prompt, completion, score, keep), padded groups)."""
  good, bad = [], []
  for prompts, toks, s in calls:
    for grp in range(len(prompts) // g):
      rows = [(tuple(prompts[i]), tuple(toks[i]), float(s[i]))
              for i in range(grp * g, (grp + 1) * g)]
      (good if np.var(s[grp * g:(grp + 1) * g]) > 0 else bad).append(rows)
  chosen, pad = good[:n_groups], max(0, n_groups - len(good))
  rows = [r + (1.0,) for grp in chosen for r in grp]
  rows += [r + (0.0,) for grp in bad[:pad] for r in grp]
  return sorted(rows), pad


def _mb_rows(mb, prompt_len):
  out = []
  for tok, seg, score, keep in zip(mb["tokens"], mb["segment_ids"], mb["scores"],
                                   mb["keep"]):
    prompt = tuple(int(t) for t, s in zip(tok[:prompt_len], seg[:prompt_len]) if s)
    out.append((prompt, tuple(int(t) for t in tok[prompt_len:]), float(score),
                float(keep)))
  return sorted(out)


def test_filters_groups_pads_masks_and_compiles_once(tmp_path, request):
  c = _grpo_config("dapo,runlocal")
  c.model.update(d_model=32, n_layers=1, mlp_dim=64)
  c.rl.update(max_sampling_rounds=3, max_new_tokens=6)
  cfg, rlc = config_lib.validate_rl(c, jax.device_count())
  assert rlc.ppo_epochs == 1 and rlc.num_minibatches == 1 and rlc.kl_coef == 0
  run = rl.setup(cfg, rlc, str(tmp_path), log=lambda m: None)
  g, n_groups = rlc.group_size, cfg.data.batch_size
  reward, seen, rollouts = HandReward(g), [], []
  programs = run.trainer.programs

  def spy_update(policy, value, mb, *rest):
    seen.append(jax.tree.map(np.asarray, mb))
    return programs.update(policy, value, mb, *rest)

  def spy_advantages(rollout, scores, kl_coef):
    out = programs.advantages(rollout, scores, kl_coef)
    rollouts.append(jax.tree.map(np.asarray, dict(rollout, **out)))
    return out

  trainer = dataclasses.replace(run.trainer, oracle=reward, programs=dataclasses.replace(
      programs, update=spy_update, advantages=spy_advantages))
  state, lowered, events = run.state, [], []

  def on_event(event, _secs, **_):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":  # one per program
      events.append(event)
  jax.monitoring.register_event_duration_secs_listener(on_event)
  request.addfinalizer(lambda: jax.monitoring.unregister_event_duration_listener(on_event))
  for it, mode in enumerate(("scarce", "half", "half")):
    reward.mode, reward.calls = mode, []
    state, metrics = rl.iteration(trainer, state, it)
    want_rows, pad = _expected(reward.calls, g, n_groups)
    mb, ro = seen[-1], rollouts[-1]
    assert _mb_rows(mb, rlc.prompt_len) == want_rows, it
    assert metrics["sampling/rounds"] == len(reward.calls)
    assert metrics["sampling/padded_groups"] == pad
    n_bad = sum(np.var(s[i:i + g]) == 0 for _, _, s in reward.calls
                for i in range(0, len(s), g))
    assert metrics["sampling/filtered_groups"] == n_bad
    assert metrics["sampling/kept_fraction"] == pytest.approx(
        1 - n_bad / (n_groups * len(reward.calls)))
    if mode == "scarce":  # one informative group in 3 rounds: 7 masked groups
      assert len(reward.calls) == 3 and pad == n_groups - 1
    # The loss oracle, on the unshuffled rollout (groups adjacent), f64.
    s = ro["scores"].astype(np.float64).reshape(-1, g)
    adv = (s - s.mean(1, keepdims=True)) / (s.std(1, ddof=1, keepdims=True) + 1e-4)
    m = ro["mask"].astype(np.float64) * ro["keep"][:, None]
    want = -np.sum(adv.reshape(-1, 1) * m) / np.sum(m)
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5, abs=1e-6), it
    assert np.sum(ro["keep"]) == g * (n_groups - pad)
    lowered.append(len(events))
  # Iteration 0 ran every path (3 rounds, padding); 1 and 2 (other round counts)
  # lower no new program: shapes are static.
  assert lowered[0] > 0 and lowered[2] == lowered[0], lowered
