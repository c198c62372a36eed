"""GRPO (group baselines: Shao et al. 2024, group-normalised rewards, k3 KL in the loss):
group_size completions per prompt, no value model.

Variants: tiny (the ground-truth task and its oracle reward) and hh (HH-RLHF prompts,
hf_path= policy checkpoint, reward_path= workdir of an experiments/reward.py run).

Loss recipes of the GRPO family (`RECIPES`; rl options in docs/losses.md, "Online RL
options"), on the tiny task as the variant word or on any variant as ``recipe=``:

* ``dapo`` (Yu et al. 2025): token-mean loss over the batch, clip-higher (0.2 / 0.28),
  no KL (so no reference model). Overlong handling is left to the task: add
  ``rl.mask_truncated=True`` (overlong filtering) or the ``overlong`` reward function
  (soft punishment). Filtering is off here because on the tiny task ~70% of the first
  completions run into max_new_tokens: with it, 12 iterations left the oracle score
  flat (0.24 -> 0.24), without it 0.24 -> 0.53. Dynamic sampling on: only groups whose
  scores differ are trained on, up to 3 generation rounds per iteration fill the
  batch (`jaxalign.train.rl_dynamic`).
* ``dr_grpo`` (Liu et al. 2025): loss sum / (rows * max_new_tokens), no std scaling,
  no KL.
* ``gspo`` (Zheng et al. 2025): sequence-level ratio, per-sequence mean, the paper's
  clip range 3e-4 / 4e-4, no KL.
* ``cispo`` (MiniMax-M1, 2025): clipped stop-gradient IS weight times log-prob, no
  lower bound (epsilon_low = 1), epsilon_high = 0.28, token-mean loss, no KL.

Launch:

  python -m jaxalign.main --config experiments/grpo.py:tiny --workdir /tmp/grpo
  python -m jaxalign.main --config experiments/grpo.py:dapo --workdir /tmp/grpo-dapo
  python -m jaxalign.main --config experiments/grpo.py:hh,path=/data/hh.jsonl.gz,\
hf_path=/ckpt/sft,reward_path=/runs/rm,recipe=gspo --workdir /tmp/grpo-hh
  # local smoke run: add ,runlocal
"""

from experiments import _common

RECIPES = {
    "dapo": dict(loss_agg="dapo", epsilon_low=0.2, epsilon_high=0.28, kl_coef=0.0,
                 dynamic_sampling=True, max_sampling_rounds=3),
    "dr_grpo": dict(loss_agg="dr_grpo", scale_rewards="none", kl_coef=0.0),
    "gspo": dict(importance_level="sequence", loss_agg="grpo", epsilon_low=3e-4,
                 epsilon_high=4e-4, kl_coef=0.0),
    "cispo": dict(policy_loss="cispo", epsilon_low=1.0, epsilon_high=0.28,
                  loss_agg="dapo", kl_coef=0.0),
}


def get_config(arg=None):
  return _common.rl_config("grpo", arg, RECIPES)
