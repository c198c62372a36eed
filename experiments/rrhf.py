"""RRHF (Yuan et al. 2023): ranking loss over K scored responses plus SFT on the best.

Tiny variant: data.task.num_candidates responses per prompt scored by the oracle.
hh variant: each pair becomes a ranked example (chosen, rejected) with scores (1, 0).

Launch (variants: tiny = the built-in ground-truth task, hh = an HH-RLHF file):

  python -m jaxalign.main --config experiments/rrhf.py:tiny --workdir /tmp/rrhf
  python -m jaxalign.main --config experiments/rrhf.py:hh,path=/data/hh.jsonl.gz \
      --workdir /tmp/rrhf-hh
  # start from an HF checkpoint directory: add ,hf_path=/ckpt/dir to the argument
  # local smoke run (runlocal): add ,runlocal (10 steps, small batches)
"""

from experiments import _common
from jaxalign import config as config_lib


def get_config(arg=None):
  a = _common.experiment_arg(arg)
  c = config_lib.base_config()
  c.loss = "rrhf"
  c.loss_hparams.update({})
  c.reference.kind = "none"
  return _common.apply_variant(c, a, num_steps=300 if a.variant == "tiny" else 2000)
