"""Reward-KL frontier on the built-in ground-truth task (the DPO paper's Fig. 2 study).

For PPO, DPO, IPO, KTO, CPO, ORPO, SimPO and RRHF, each over a small sweep of its main
hyperparameter, all starting from ONE supervised policy (which is also the frozen
reference), the runner reports the oracle reward of *samples* from the trained policy
against the KL to the reference estimated on the same samples:

  KL = mean over held-out prompts of sum_t [log pi(y_t | x, y_<t) - log pi_ref(...)]
       (y ~ pi, temperature 1; the k1 estimator, unbiased for KL(pi || pi_ref)).

Pipeline (one process, every program compiled once and reused across the sweep):

1. SFT: a random tiny Llama (`config.TINY_MODEL`) trained with the ``sft`` loss on the
   task's best-of-4 behaviour responses (`synthetic.make_sft`).
2. Preference data, as in the DPO paper's controlled study: two completions per prompt
   sampled from the SFT policy (`sampling.Sampler`), labelled by the task's
   Bradley-Terry model of the oracle reward. Every offline method trains on the same
   pairs in the same order: KTO on them split into desirable / undesirable examples,
   RRHF on them as rankings of two (`stream.convert_examples`).
3. Offline runs: `steps.train_step` with `objectives.make_objective` and the registry
   loss; the swept hyperparameter is a *traced* argument, so each loss compiles once.
4. PPO: the library's own iteration, `rl.iteration`, over the programs of
   `rl_steps.build_programs` (value model from the SFT policy with a fresh head, the
   task's oracle reward, KL-penalised rewards with the swept coefficient, traced);
   its sampler also draws the preference data and the evaluation samples.
5. Evaluation: one sample per held-out prompt from each policy; oracle reward and KL.

Outputs in ``--out``: ``frontier.png`` and ``results.md`` (the generated table
replaces the text between the ``<!-- frontier:begin -->`` / ``<!-- frontier:end -->``
markers; the rest is kept).

  python experiments/frontier.py --out docs/            # the full sweep
  python experiments/frontier.py --out /tmp/f --quick   # smoke: 2 algorithms x 1 value
  # add --json PATH to keep every point and the run settings as JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign import config as config_lib
from jaxalign import losses
from jaxalign.data import batching
from jaxalign.data import examples as ex_lib
from jaxalign.data import synthetic
from jaxalign.models import heads
from jaxalign.models import sampling
from jaxalign.models import transformer as tfm
from jaxalign.train import build
from jaxalign.train import objectives as obj_lib
from jaxalign.train import rl as rl_lib
from jaxalign.train import rl_steps
from jaxalign.train import state as state_lib
from jaxalign.train import steps as steps_lib
from jaxalign.train import stream

# Run as a script, sys.path[0] is experiments/; the presets are imported as the
# package `experiments`, which lives in the repository root.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from experiments import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

BEGIN, END = "<!-- frontier:begin -->", "<!-- frontier:end -->"
PROMPT_LEN = 8  # left-padded prompt bucket (the task's prompts are <= 7 tokens)
ROW_LEN = 24  # padded training rows: prompt (<= 7) + completion (<= max_new_tokens)


@dataclasses.dataclass(frozen=True)
class Sweep:
  """One algorithm: a registry loss (or "ppo"), its input kind, the swept
  hyperparameter and its values, and the fixed hyperparameters."""
  loss: str
  kind: str  # "pairwise" | "unpaired" | "ranked" | "ppo"
  hparam: str
  values: tuple[float, ...]
  fixed: tuple[tuple[str, float], ...] = ()


SWEEPS = {
    "ppo": Sweep("ppo", "ppo", "kl_coef", (0.01, 0.03, 0.1, 0.3)),
    "dpo": Sweep("dpo", "pairwise", "beta", (0.03, 0.1, 0.3, 1.0)),
    "ipo": Sweep("ipo", "pairwise", "beta", (0.1, 0.3, 1.0)),
    "kto": Sweep("kto", "unpaired", "beta", (0.03, 0.1, 0.3)),
    "cpo": Sweep("cpo", "pairwise", "beta", (0.03, 0.1, 0.3)),
    "orpo": Sweep("orpo", "pairwise", "beta", (0.1, 0.3, 1.0)),
    "simpo": Sweep("simpo", "pairwise", "beta", (0.5, 2.0, 5.0), (("gamma", 0.5),)),
    "rrhf": Sweep("rrhf", "ranked", "rank_weight", (0.3, 1.0, 3.0)),
}
QUICK_SWEEPS = {"ppo": Sweep("ppo", "ppo", "kl_coef", (0.05,)),
                "dpo": Sweep("dpo", "pairwise", "beta", (0.1,))}


@dataclasses.dataclass(frozen=True)
class Budget:
  """Sizes of the run. Offline runs: ``steps`` updates of ``batch`` pairs. PPO:
  ``ppo_iterations`` rollouts of ``rows`` prompts, each followed by ``ppo_epochs`` x
  ``ppo_minibatches`` updates, so it makes ``ppo_iterations * 4`` updates (set equal to
  the offline ``steps`` by default) on half as many sequences each."""
  seed: int = 0
  sft_steps: int = 300
  sft_batch: int = 32
  num_pairs: int = 2048
  steps: int = 200
  batch: int = 32
  ppo_iterations: int = 50
  ppo_epochs: int = 2
  ppo_minibatches: int = 2
  rows: int = 64  # sampler rows per call (PPO prompts per iteration, eval chunk)
  max_new_tokens: int = 12
  eval_prompts: int = 1024
  lr: float = 1e-3
  sft_lr: float = 1e-3


QUICK = Budget(sft_steps=8, sft_batch=16, num_pairs=32, steps=3, batch=8,
               ppo_iterations=1, rows=16, eval_prompts=32)


# ----------------------------------------------------------------------------- model


def make_models(arch: tfm.TransformerConfig, vocab_size: int
                ) -> tuple[build.Model, build.Model]:
  """The policy (also the reference) and the value model (a scalar head on the same
  architecture)."""
  return (build.build_model(config_lib.ModelConfig(arch=arch), vocab_size),
          build.build_model(config_lib.ModelConfig(arch=arch, head="scalar"), vocab_size))


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def fresh_state(params, optimizer, key) -> state_lib.TrainState:
  params = _copy(params)
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=optimizer.init(params), rng=key)


def make_optimizer(lr: float, steps: int) -> optax.GradientTransformation:
  return build.make_optimizer(config_lib.OptimizerConfig(learning_rate=lr), steps)


# ----------------------------------------------------------------------------- offline


@functools.lru_cache(maxsize=None)
def offline_step(loss_name: str, kind: str, fixed: tuple, forward_fn: Callable,
                 optimizer: optax.GradientTransformation) -> Callable:
  """Jitted ``(states, ref_params, batch, hparams) -> (states, metrics)`` for a sweep:
  ``states`` and ``hparams`` carry a leading axis (one entry per swept value, mapped
  with ``jax.vmap``), the batch and reference are shared. The hyperparameters are
  traced, so one program serves the whole sweep of a loss."""
  spec = losses.get_loss(loss_name)

  def step(state, ref_params, batch, hparams):
    loss_fn = functools.partial(spec.fn, **dict(fixed), **hparams)
    objective = obj_lib.make_objective(kind, loss_fn=loss_fn, forward_fn=forward_fn,
                                       needs_reference=spec.needs_reference)
    return steps_lib.train_step(state, ref_params if spec.needs_reference else None,
                                batch, objective=objective, optimizer=optimizer)
  return jax.jit(jax.vmap(step, in_axes=(0, None, None, 0)), donate_argnums=(0,))


def _stack(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: Any, n: int) -> list[Any]:
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def train_offline(step_fn: Callable, init_params, ref_params, batches: Sequence[dict],
                  hparams: Sequence[dict[str, float]], optimizer, key
                  ) -> tuple[list[Any], list[dict]]:
  """Trains one copy of ``init_params`` per entry of ``hparams`` (side by side, on the
  same ``batches``); returns their params and final metrics."""
  n = len(hparams)
  states = _stack([fresh_state(init_params, optimizer, key) for _ in range(n)])
  hp = {k: jnp.asarray([h[k] for h in hparams], jnp.float32) for k in hparams[0]}
  metrics = {}
  for batch in batches:
    states, metrics = step_fn(states, ref_params, batch, hp)
  per_run = [{k: float(np.asarray(v)[i]) for k, v in metrics.items()} for i in range(n)]
  for h, m in zip(hparams, per_run):
    if not np.isfinite(m.get("loss", 0.0)):
      raise FloatingPointError(f"non-finite final loss with {h}: {m}")
  return _unstack(states.params, n), per_run


def layout(n: int, k: int | None = None) -> batching.LayoutConfig:
  return batching.LayoutConfig(kind="padded", buckets=(ROW_LEN,), examples_per_batch=n,
                               responses_per_example=k)


def epoch_batches(examples: Sequence[Any], per_batch: int, steps: int,
                  rng: np.random.Generator, k: int | None = None) -> list[dict]:
  """``steps`` full batches, reshuffling the examples every epoch."""
  out, order = [], []
  while len(out) < steps:
    if len(order) < per_batch:
      order = list(rng.permutation(len(examples)))
    chunk, order = order[:per_batch], order[per_batch:]
    out.append(batching.make_batch([examples[i] for i in chunk], layout(per_batch, k)))
  return out


# ----------------------------------------------------------------------------- sampling


def sample_batch(sampler: sampling.Sampler, params, prompts: Sequence[np.ndarray],
                 key) -> tuple[dict, sampling.SampleOutput]:
  """Samples one completion per prompt; the rollout batch `rl_steps` scores."""
  prompt_BxP, lens_B = rl_steps.left_pad(prompts, sampler.prompt_len)
  out = sampler(params, prompt_BxP, lens_B, key)
  return rl_steps.rollout_batch(prompt_BxP, lens_B, out), out


def completions(out: sampling.SampleOutput) -> list[np.ndarray]:
  toks, mask = np.asarray(out.tokens), np.asarray(out.mask)
  return [t[m > 0].astype(np.int32) for t, m in zip(toks, mask)]


def sample_all(sampler, params, prompts, key) -> list[sampling.SampleOutput]:
  """Samples every prompt in sampler-sized chunks (the last one padded with copies)."""
  rows, outs = sampler.batch, []
  for c, i in enumerate(range(0, len(prompts), rows)):
    chunk = list(prompts[i:i + rows])
    chunk += [chunk[0]] * (rows - len(chunk))
    outs.append((sample_batch(sampler, params, chunk, jax.random.fold_in(key, c)),
                 min(rows, len(prompts) - i)))
  return outs


@dataclasses.dataclass
class Evaluation:
  reward: np.ndarray  # [n] oracle reward of each sample
  kl: np.ndarray  # [n] sum_t log pi - log pi_ref on the sample (full forwards)
  policy_logp: np.ndarray  # [n] sum_t log pi on the sample (full forward)
  sampler_logp: np.ndarray  # [n] the same from the sampler's KV-cache decode
  length: np.ndarray  # [n] completion tokens (EOS included)


def evaluate(sampler, score_fn, params, ref_params, prompts, key,
             task: synthetic.SyntheticTaskConfig) -> Evaluation:
  """One sample per prompt: oracle reward, and the KL estimate on the same sample."""
  parts = []
  for (batch, out), n in sample_all(sampler, params, prompts, key):
    s = score_fn(params, ref_params, None, None, batch)
    old = np.asarray(s["old_logp"], np.float64)
    kl = np.sum(old - np.asarray(s["ref_logp"], np.float64), axis=1)
    parts.append((np.asarray(out.tokens)[:n], kl[:n], old.sum(1)[:n],
                  np.asarray(out.logp, np.float64).sum(1)[:n],
                  np.asarray(out.mask).sum(1)[:n]))
  toks = np.concatenate([p[0] for p in parts])
  reward = synthetic.oracle_reward(list(prompts), toks, task)
  cat = lambda j: np.concatenate([p[j] for p in parts])
  return Evaluation(reward=reward, kl=cat(1), policy_logp=cat(2), sampler_logp=cat(3),
                    length=cat(4))


def preference_pairs(sampler, params, prompts, key, rng: np.random.Generator,
                     task: synthetic.SyntheticTaskConfig) -> list[ex_lib.PairExample]:
  """Two SFT samples per prompt, labelled by Bradley-Terry on the oracle reward."""
  ys = []
  for j in range(2):
    outs = sample_all(sampler, params, prompts, jax.random.fold_in(key, j))
    ys.append([y for (_, out), n in outs for y in completions(out)[:n]])
  ra = synthetic.oracle_reward(prompts, ys[0], task)
  rb = synthetic.oracle_reward(prompts, ys[1], task)
  a_wins = rng.uniform(size=len(prompts)) < synthetic.preference_probability(
      ra, rb, task.temperature)
  return [ex_lib.PairExample(prompt=x, chosen=a if w else b, rejected=b if w else a)
          for x, a, b, w in zip(prompts, ys[0], ys[1], a_wins)]


# ----------------------------------------------------------------------------- PPO


def train_ppo(programs: rl_steps.Programs, rl_cfg: config_lib.RLConfig, d_model: int,
              init_params, ref_params, kl_coef: float, iterations: int, optimizer, key,
              task: synthetic.SyntheticTaskConfig, seed: int) -> tuple[Any, dict]:
  """PPO with the oracle reward from the SFT policy, through `rl.iteration`; returns
  (params, the last iteration's metrics)."""
  k_pol, k_val, k_roll = jax.random.split(key, 3)
  value_params = {"model": _copy(init_params), "head": heads.init_head(d_model, k_val)}
  state = rl_lib.RLState(
      iteration=jnp.zeros((), jnp.int32), policy=fresh_state(init_params, optimizer, k_pol),
      value=fresh_state(value_params, optimizer, k_val), ref_params=ref_params,
      reward_params=None,
      kl=losses.KLControllerState(kl_coef=jnp.asarray(kl_coef, jnp.float32)),
      rollout_key=k_roll)
  rows = programs.sampler.batch
  trainer = rl_lib.Trainer(
      rl=rl_cfg, programs=programs,
      prompts=lambda it: synthetic.make_prompts(np.random.default_rng([seed, 7, it]),
                                                rows, task),
      oracle=functools.partial(synthetic.oracle_reward, config=task))
  metrics = {}
  for it in range(iterations):
    state, metrics = rl_lib.iteration(trainer, state, it)
  return state.policy.params, metrics


# ----------------------------------------------------------------------------- report


def frontier_points(points: list[dict], algo: str) -> list[dict]:
  return sorted((p for p in points if p["algorithm"] == algo), key=lambda p: p["kl"])


def dominated_share(points: list[dict], a: str, b: str) -> tuple[int, int]:
  """How many of b's points some point of a weakly dominates (KL <= and reward >=)."""
  pa, pb = frontier_points(points, a), frontier_points(points, b)
  hits = sum(any(x["kl"] <= y["kl"] and x["reward"] >= y["reward"] for x in pa)
             for y in pb)
  return hits, len(pb)


KL_BUDGETS = (1.0, 2.0, 3.0)


def best_within(points: list[dict], algo: str, kl_budget: float,
                reference: dict) -> float:
  """The highest reward reachable within ``kl_budget`` by ``algo``'s policies and the
  reference, mixed: a mixture choosing policy a with probability lam and b otherwise
  has reward lam r_a + (1 - lam) r_b and, KL being convex, KL at most
  lam KL_a + (1 - lam) KL_b. So this is the upper concave envelope of the points at
  ``kl_budget`` (or the best point, beyond the largest KL): a value the sweep
  guarantees, not an interpolation guess."""
  pts = [(reference["kl"], reference["reward"])] + [
      (p["kl"], p["reward"]) for p in points if p["algorithm"] == algo]
  best = max(r for k, r in pts if k <= kl_budget)
  for ka, ra in pts:
    for kb, rb in pts:
      if ka <= kl_budget < kb:
        lam = (kb - kl_budget) / (kb - ka)
        best = max(best, lam * ra + (1 - lam) * rb)
  return best


def seeds_markdown(results: Sequence[dict]) -> str:
  """Per algorithm and KL budget: the best reward within the budget, per seed and the
  mean over seeds (``results``: the JSON of one run per seed)."""
  seeds = [r["budget"]["seed"] for r in results]
  algos = list(dict.fromkeys(p["algorithm"] for r in results for p in r["points"]))
  head = ["algorithm"] + [f"KL <= {b:g}: " + " / ".join(f"s{s}" for s in seeds)
                          + " (mean)" for b in KL_BUDGETS]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  ref = [r["reference"]["reward"] for r in results]
  lines.append("| SFT (= reference, KL 0) | " + " | ".join(
      " / ".join(f"{x:.2f}" for x in ref) + f" ({np.mean(ref):.2f})"
      for _ in KL_BUDGETS) + " |")
  for algo in algos:
    cells = []
    for b in KL_BUDGETS:
      vals = [best_within(r["points"], algo, b, r["reference"]) for r in results]
      cells.append(" / ".join(f"{v:.2f}" for v in vals) + f" ({np.mean(vals):.2f})")
    lines.append(f"| {algo} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def table_markdown(points: list[dict], reference: dict) -> str:
  lines = ["| algorithm | hyperparameter | oracle reward (± s.e.) | KL to reference "
           "(± s.e.) | mean length | train time (s) |",
           "| --- | --- | --- | --- | --- | --- |",
           f"| SFT (= reference) | - | {reference['reward']:.3f} ± "
           f"{reference['reward_se']:.3f} | {reference['kl']:.3f} ± "
           f"{reference['kl_se']:.3f} | {reference['length']:.2f} | "
           f"{reference['train_s']:.0f} |"]
  for p in points:
    lines.append(f"| {p['algorithm']} | {p['hparam']}={p['value']:g} | "
                 f"{p['reward']:.3f} ± {p['reward_se']:.3f} | {p['kl']:.3f} ± "
                 f"{p['kl_se']:.3f} | {p['length']:.2f} | {p['train_s']:.0f} |")
  return "\n".join(lines)


def plot(points: list[dict], reference: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=90)
  markers = "osD^v<>pPX*h"
  for i, algo in enumerate(dict.fromkeys(p["algorithm"] for p in points)):
    pts = frontier_points(points, algo)
    ax.plot([p["kl"] for p in pts], [p["reward"] for p in pts], marker=markers[i % 12],
            lw=2.0 if algo in ("ppo", "dpo") else 1.0, ms=5, label=algo)
  ax.plot([reference["kl"]], [reference["reward"]], "k*", ms=12, label="SFT (reference)")
  ax.set_xlabel("KL(pi || pi_ref) per sequence, estimated on the samples (nats)")
  ax.set_ylabel("oracle reward of samples")
  ax.set_title("Reward-KL frontier (ground-truth task, tiny model)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_results(path: str, block: str) -> None:
  """Replaces the generated block of ``path`` (or creates the file)."""
  text = ""
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      text = f.read()
  new = f"{BEGIN}\n{block}\n{END}"
  if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    text = head + new + rest.split(END, 1)[1]
  else:
    text = (text or "# Results\n\n") + new + "\n"
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


# ----------------------------------------------------------------------------- the run


def _summary(ev: Evaluation) -> dict:
  n = len(ev.reward)
  return {"reward": float(ev.reward.mean()),
          "reward_se": float(ev.reward.std() / np.sqrt(n)),
          "kl": float(ev.kl.mean()), "kl_se": float(ev.kl.std() / np.sqrt(n)),
          "length": float(ev.length.mean()),
          # Two implementations of the same log-probs (full forward vs KV cache):
          # their gap bounds the numerical error of the KL estimate.
          "logp_cache_gap": float(np.abs(ev.policy_logp - ev.sampler_logp).max())}


def run(out_dir: str, *, quick: bool = False, sweeps: dict[str, Sweep] | None = None,
        budget: Budget | None = None, json_path: str = "",
        log: Callable[[str], None] = print) -> dict:
  """The whole study; returns the JSON-able result (also written to ``json_path``
  when given)."""
  budget = budget or (QUICK if quick else Budget())
  sweeps = sweeps or (QUICK_SWEEPS if quick else SWEEPS)
  for name, sw in sweeps.items():
    if sw.kind != "ppo":
      losses.resolve(sw.loss, {sw.hparam: sw.values[0], **dict(sw.fixed)})  # validates
  os.makedirs(out_dir, exist_ok=True)
  t_start = time.perf_counter()
  task = synthetic.SyntheticTaskConfig()
  arch = tfm.TransformerConfig(**_common.TINY_MODEL)
  policy, value_model = make_models(arch, task.vocab_size)
  forward_fn = build.make_forward(policy)
  key = jax.random.key(budget.seed)
  k_init, k_sft, k_data, k_eval, k_runs = jax.random.split(key, 5)
  rng = np.random.default_rng([budget.seed, 11])

  # 1. SFT -> the starting policy and reference.
  t0 = time.perf_counter()
  init_params = policy.init_params(k_init)
  sft_examples = synthetic.make_sft(rng, 4096 if not quick else 64, task)
  sft_opt = make_optimizer(budget.sft_lr, budget.sft_steps)
  sft_step = offline_step("sft", "sft", (), forward_fn, sft_opt)
  (sft_params,), (sft_metrics,) = train_offline(
      sft_step, init_params, None,
      epoch_batches(sft_examples, budget.sft_batch, budget.sft_steps, rng), [{}],
      sft_opt, k_sft)
  sft_s = time.perf_counter() - t0
  log(f"sft: {budget.sft_steps} steps, loss {sft_metrics['loss']:.3f}, {sft_s:.0f}s")

  rl_cfg = config_lib.RLConfig(algorithm="ppo", group_size=1, prompt_len=PROMPT_LEN,
                               max_new_tokens=budget.max_new_tokens,
                               ppo_epochs=budget.ppo_epochs,
                               num_minibatches=budget.ppo_minibatches)
  opt = make_optimizer(budget.lr, budget.steps)
  # Unsharded programs (no mesh): the study runs on one device.
  ppo = rl_steps.build_programs(policy, value_model, rl_cfg, opt, rows=budget.rows)
  sampler = ppo.sampler
  eval_prompts = synthetic.make_prompts(np.random.default_rng([budget.seed, 99]),
                                        budget.eval_prompts, task)

  def do_eval(params):
    return evaluate(sampler, ppo.score, params, sft_params, eval_prompts, k_eval, task)

  ref_eval = do_eval(sft_params)
  reference = dict(_summary(ref_eval), train_s=sft_s)
  log(f"sft policy: reward {reference['reward']:.3f}, KL {reference['kl']:.2e}")

  # 2. Preference data from the SFT policy.
  t0 = time.perf_counter()
  pair_prompts = synthetic.make_prompts(rng, budget.num_pairs, task)
  pairs = preference_pairs(sampler, sft_params, pair_prompts, k_data, rng, task)
  data = {"pairwise": (pairs, 1, None),
          "unpaired": (stream.convert_examples(pairs, "unpaired"), 2, None),
          "ranked": (stream.convert_examples(pairs, "ranked"), 1, 2)}
  order_seed = int(rng.integers(2**31))
  batches = {}
  log(f"preference data: {len(pairs)} pairs from the SFT policy, "
      f"{time.perf_counter() - t0:.0f}s")

  # 3-4. The sweeps.
  points = []

  def add_point(name, sw, value, params, metrics, train_s):
    ev = do_eval(params)
    point = dict(_summary(ev), algorithm=name, hparam=sw.hparam, value=value,
                 train_s=train_s, final_loss=metrics.get("loss", float("nan")))
    points.append(point)
    log(f"{name} {sw.hparam}={value:g}: reward {point['reward']:.3f}, KL "
        f"{point['kl']:.3f}, length {point['length']:.1f} (train {train_s:.0f}s)")

  for a_idx, (name, sw) in enumerate(sweeps.items()):
    run_key = jax.random.fold_in(k_runs, a_idx)
    if sw.kind == "ppo":
      for v_idx, value in enumerate(sw.values):
        t0 = time.perf_counter()
        params, metrics = train_ppo(ppo, rl_cfg, arch.d_model, sft_params,
                                    sft_params, value, budget.ppo_iterations, opt,
                                    jax.random.fold_in(run_key, v_idx), task, budget.seed)
        add_point(name, sw, value, params, metrics, time.perf_counter() - t0)
      continue
    if sw.kind not in batches:
      examples, per_pair, k = data[sw.kind]
      batches[sw.kind] = aligned_batches(examples, per_pair, budget.batch, budget.steps,
                                         order_seed, k)
    t0 = time.perf_counter()
    step_fn = offline_step(sw.loss, sw.kind, sw.fixed, forward_fn, opt)
    all_params, all_metrics = train_offline(
        step_fn, sft_params, sft_params, batches[sw.kind],
        [{sw.hparam: v} for v in sw.values], opt, run_key)
    # The values train side by side: each is charged an equal share of the time.
    train_s = (time.perf_counter() - t0) / len(sw.values)
    for value, params, metrics in zip(sw.values, all_params, all_metrics):
      add_point(name, sw, value, params, metrics, train_s)

  wall = time.perf_counter() - t_start
  result = {"budget": dataclasses.asdict(budget),
            "sweeps": {k: dataclasses.asdict(v) for k, v in sweeps.items()},
            "reference": reference, "points": points, "wall_s": wall,
            "devices": f"{jax.device_count()} x {jax.devices()[0].platform}"}
  if json_path:
    with open(json_path, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  plot(points, reference, os.path.join(out_dir, "frontier.png"))
  cmd = ("python experiments/frontier.py --out " + out_dir + (" --quick" if quick else "")
         + (f" --seed {budget.seed}" if budget.seed else ""))
  block = [f"Generated by `{cmd}` in {wall / 60:.1f} min "
           f"({result['devices']}; seed {budget.seed}; {budget.eval_prompts} held-out "
           "prompts, one sample each).", "", table_markdown(points, reference)]
  block += ["", "Best reward reachable within a KL budget (nats) by mixing a method's "
            "policies with each other and the reference (the upper concave envelope of "
            "its points; see `best_within`):", "", seeds_markdown([result])]
  names = list(sweeps)
  if "dpo" in names and "ppo" in names:
    hits, n = dominated_share(points, "dpo", "ppo")
    back, m = dominated_share(points, "ppo", "dpo")
    block += ["", f"Dominance: {hits} of {n} PPO points are weakly dominated by a DPO "
              f"point (lower or equal KL and higher or equal reward); {back} of {m} DPO "
              "points are dominated by a PPO point."]
  write_results(os.path.join(out_dir, "results.md"), "\n".join(block))
  log(f"wrote {out_dir}/frontier.png and results.md in {wall:.0f}s")
  return result


def aligned_batches(examples: Sequence[Any], per_pair: int, pairs_per_batch: int,
                    steps: int, seed: int, k: int | None) -> list[dict]:
  """``steps`` batches in one pair order for every kind: converted example lists keep
  pair order (``per_pair`` consecutive examples per pair: 2 for KTO, 1 otherwise), so
  the same permutation of pairs gives the same pairs in step i of every run."""
  n_pairs = len(examples) // per_pair
  pair_rng = np.random.default_rng(seed)
  out, order = [], []
  while len(out) < steps:
    if len(order) < pairs_per_batch:
      order = list(pair_rng.permutation(n_pairs))
    chunk, order = order[:pairs_per_batch], order[pairs_per_batch:]
    idx = [i * per_pair + j for i in chunk for j in range(per_pair)]
    out.append(batching.make_batch([examples[i] for i in idx],
                                   layout(pairs_per_batch * per_pair, k)))
  return out


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="", help="output folder (e.g. docs/)")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: 2 algorithms x 1 value, a few steps")
  parser.add_argument("--json", default="", help="also write every point here")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the SFT init, data, training and evaluation")
  parser.add_argument("--summarize", default="",
                      help="comma-separated --json files of runs with other seeds: "
                      "print the best reward within KL budgets per seed and exit")
  args = parser.parse_args(argv)
  if args.summarize:
    results = []
    for path in args.summarize.split(","):
      with open(path, encoding="utf-8") as f:
        results.append(json.load(f))
    print(seeds_markdown(results))
    return {}
  if not args.out:
    parser.error("--out is required (unless --summarize)")
  budget = dataclasses.replace(QUICK if args.quick else Budget(), seed=args.seed)
  return run(args.out, quick=args.quick, budget=budget, json_path=args.json)


if __name__ == "__main__":
  main(sys.argv[1:])
