"""RLOO (group baselines: Ahmadian et al. 2024, leave-one-out baseline, KL in the reward):
group_size completions per prompt, no value model.

Variants: tiny (the ground-truth task and its oracle reward) and hh (HH-RLHF prompts,
hf_path= policy checkpoint, reward_path= workdir of an experiments/reward.py run).

Launch:

  python -m jaxalign.main --config experiments/rloo.py:tiny --workdir /tmp/rloo
  python -m jaxalign.main --config experiments/rloo.py:hh,path=/data/hh.jsonl.gz,\
hf_path=/ckpt/sft,reward_path=/runs/rm --workdir /tmp/rloo-hh
  # local smoke run: add ,runlocal
"""

from experiments import _common


def get_config(arg=None):
  return _common.rl_config("rloo", arg)
