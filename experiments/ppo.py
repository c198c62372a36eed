"""PPO RLHF (Ziegler et al. 2019; Ouyang et al. 2022) with four models on one mesh:
policy, frozen reference, value model, reward model (or the task's oracle reward).

Variants:
  tiny: the built-in ground-truth task; the synthetic oracle reward scores samples.
  hh:   prompts from an HH-RLHF file, an HF policy checkpoint (hf_path=) and a
        trained reward model (reward_path= the workdir of an experiments/reward.py run
        with the same architecture); the value model starts from the reward model.

Launch:

  python -m jaxalign.main --config experiments/ppo.py:tiny --workdir /tmp/ppo
  python -m jaxalign.main --config experiments/ppo.py:hh,path=/data/hh.jsonl.gz,\
hf_path=/ckpt/sft,reward_path=/runs/rm --workdir /tmp/ppo-hh
  # local smoke run: add ,runlocal

Programmatic: ``jaxalign.train.rl.run_rl(get_config("tiny"), workdir)``.
"""

from experiments import _common


def get_config(arg=None):
  return _common.rl_config("ppo", arg)
