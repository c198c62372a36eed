"""CPO (Xu et al. 2024): reference-free preference loss plus an NLL term on chosen.

Launch (variants: tiny = the built-in ground-truth task, hh = an HH-RLHF file):

  python -m jaxalign.main --config experiments/cpo.py:tiny --workdir /tmp/cpo
  python -m jaxalign.main --config experiments/cpo.py:hh,path=/data/hh.jsonl.gz \
      --workdir /tmp/cpo-hh
  # start from an HF checkpoint directory: add ,hf_path=/ckpt/dir to the argument
  # local smoke run (runlocal): add ,runlocal (10 steps, small batches)
"""

from experiments import _common
from jaxalign import config as config_lib


def get_config(arg=None):
  a = _common.experiment_arg(arg)
  c = config_lib.base_config()
  c.loss = "cpo"
  c.loss_hparams.update(dict(beta=0.1, alpha=1.0))
  c.reference.kind = "none"
  return _common.apply_variant(c, a, num_steps=300 if a.variant == "tiny" else 2000)
