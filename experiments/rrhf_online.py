"""Online RRHF (Yuan et al. 2023): sample group_size completions per prompt from the
current policy, score them (oracle or reward model), train with the RRHF loss.

Variants: tiny (the ground-truth task and its oracle reward) and hh (HH-RLHF prompts,
hf_path= policy checkpoint, reward_path= workdir of an experiments/reward.py run).

Launch:

  python -m jaxalign.main --config experiments/rrhf_online.py:tiny --workdir /tmp/rrhf-on
  python -m jaxalign.main --config experiments/rrhf_online.py:hh,path=/data/hh.jsonl.gz,\
hf_path=/ckpt/sft,reward_path=/runs/rm --workdir /tmp/rrhf-on-hh
  # local smoke run: add ,runlocal
"""

from experiments import _common


def get_config(arg=None):
  return _common.rl_config("rrhf", arg)
