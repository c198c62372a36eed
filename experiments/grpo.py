"""GRPO (group baselines: Shao et al. 2024, group-normalised rewards, k3 KL in the loss):
group_size completions per prompt, no value model.

Variants: tiny (the ground-truth task and its oracle reward) and hh (HH-RLHF prompts,
hf_path= policy checkpoint, reward_path= workdir of an experiments/reward.py run).

Launch:

  python -m jaxalign.main --config experiments/grpo.py:tiny --workdir /tmp/grpo
  python -m jaxalign.main --config experiments/grpo.py:hh,path=/data/hh.jsonl.gz,\
hf_path=/ckpt/sft,reward_path=/runs/rm --workdir /tmp/grpo-hh
  # local smoke run: add ,runlocal
"""

from experiments import _common


def get_config(arg=None):
  return _common.rl_config("grpo", arg)
