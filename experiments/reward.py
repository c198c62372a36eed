"""Reward model: a scalar head on the transformer, Bradley-Terry loss on pairs.

Evaluation reports the held-out pair accuracy of the learned reward and, on the tiny
task, the oracle reward of the candidate each prompt's reward model prefers.

Launch (variants: tiny = the built-in ground-truth task, hh = an HH-RLHF file):

  python -m jaxalign.main --config experiments/reward.py:tiny --workdir /tmp/reward
  python -m jaxalign.main --config experiments/reward.py:hh,path=/data/hh.jsonl.gz \
      --workdir /tmp/reward-hh
  # start from an HF checkpoint directory: add ,hf_path=/ckpt/dir to the argument
  # local smoke run (runlocal): add ,runlocal (10 steps, small batches)
"""

from experiments import _common
from jaxalign import config as config_lib


def get_config(arg=None):
  a = _common.experiment_arg(arg)
  c = config_lib.base_config()
  c.loss = "bradley_terry"
  c.loss_hparams.update({})
  c.reference.kind = "none"
  c.model.head = "scalar"
  return _common.apply_variant(c, a, num_steps=300 if a.variant == "tiny" else 2000)
