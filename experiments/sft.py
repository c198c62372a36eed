"""Supervised fine-tuning on the preferred (chosen) responses.

Tiny variant: the oracle-best of several behaviour responses per prompt (data.synthetic
make_sft). hh variant: the chosen side of each HH-RLHF pair. No reference model.

Launch (variants: tiny = the built-in ground-truth task, hh = an HH-RLHF file):

  python -m jaxalign.main --config experiments/sft.py:tiny --workdir /tmp/sft
  python -m jaxalign.main --config experiments/sft.py:hh,path=/data/hh.jsonl.gz \
      --workdir /tmp/sft-hh
  # start from an HF checkpoint directory: add ,hf_path=/ckpt/dir to the argument
  # local smoke run (runlocal): add ,runlocal (10 steps, small batches)
"""

from experiments import _common
from jaxalign import config as config_lib


def get_config(arg=None):
  a = _common.experiment_arg(arg)
  c = config_lib.base_config()
  c.loss = "sft"
  c.loss_hparams.update({})
  c.reference.kind = "none"
  return _common.apply_variant(c, a, num_steps=300 if a.variant == "tiny" else 2000)
