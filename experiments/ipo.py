"""IPO (Azar et al. 2023): squared-loss preference optimisation against a frozen reference.

Launch (variants: tiny = the built-in ground-truth task, hh = an HH-RLHF file):

  python -m jaxalign.main --config experiments/ipo.py:tiny --workdir /tmp/ipo
  python -m jaxalign.main --config experiments/ipo.py:hh,path=/data/hh.jsonl.gz \
      --workdir /tmp/ipo-hh
  # start from an HF checkpoint directory: add ,hf_path=/ckpt/dir to the argument
  # local smoke run (runlocal): add ,runlocal (10 steps, small batches)
"""

from experiments import _common
from jaxalign import config as config_lib


def get_config(arg=None):
  a = _common.experiment_arg(arg)
  c = config_lib.base_config()
  c.loss = "ipo"
  c.loss_hparams.update(dict(beta=0.1))
  c.reference.kind = "initial"
  return _common.apply_variant(c, a, num_steps=300 if a.variant == "tiny" else 2000)
