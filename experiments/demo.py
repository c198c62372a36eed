"""The README's main job: DPO on the built-in ground-truth task, about a minute on CPU.

A ground-truth task (jaxalign.data.synthetic) stands in for human preferences: its
oracle reward is known, so the run reports how much the policy's (expected) oracle
reward rises, besides DPO's held-out implicit-reward accuracy. The reference is the
initial policy (no SFT warm start, no download). Outputs in the workdir:
metrics.jsonl, tensorboard/, plots/*.png, final_eval.json, checkpoints/.

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
  return _common.apply_variant(c, a, num_steps=300 if a.variant == "tiny" else 2000)
