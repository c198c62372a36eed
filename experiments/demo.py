"""The README's main job: DPO on the built-in ground-truth task, about a minute on CPU.

A ground-truth task (jaxalign.data.synthetic) stands in for human preferences: its
oracle reward is known, so the run reports how much the policy's (expected) oracle
reward rises, besides DPO's held-out implicit-reward accuracy. The reference is the
initial policy (no SFT warm start, no download). Each eval also lets the policy answer
every held-out prompt greedily (`jaxalign.train.gen_eval`): ``gen_oracle_reward`` (the
oracle reward of its own responses), ``gen_win_rate`` (against the reference's
responses, ties half), ``gen_length`` and ``gen_eos_rate``, beside the implicit-reward
metrics. Outputs in the workdir: metrics.jsonl, tensorboard/, plots/*.png,
final_eval.json, checkpoints/.

  python -m jaxalign.main --config experiments/demo.py --workdir /tmp/jaxalign-demo
  # runlocal (a 10-step smoke run):
  python -m jaxalign.main --config experiments/demo.py:runlocal --workdir /tmp/demo-smoke
"""

from experiments import _common
from jaxalign import config as config_lib


def get_config(arg=None):
  a = _common.experiment_arg(arg)
  c = config_lib.base_config()
  c.loss = "dpo"
  c.loss_hparams.beta = 0.1
  c.reference.kind = "initial"
  c.optimizer.learning_rate = config_lib.AUTO_LR  # 1e-3 here; hf_path: 1e-6
  # Evaluation by generation: every held-out prompt, greedy, oracle-scored, win rate
  # against the reference (the built-in task's default, "auto"; spelled out here).
  c.eval.generate_prompts, c.eval.judge = -1, "auto"
  return _common.apply_variant(c, a, num_steps=300 if a.variant == "tiny" else 2000)
