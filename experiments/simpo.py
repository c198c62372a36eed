"""SimPO (Meng et al. 2024): length-normalised, reference-free margin loss.

Launch (variants: tiny = the built-in ground-truth task, hh = an HH-RLHF file):

  python -m jaxalign.main --config experiments/simpo.py:tiny --workdir /tmp/simpo
  python -m jaxalign.main --config experiments/simpo.py:hh,path=/data/hh.jsonl.gz \
      --workdir /tmp/simpo-hh
  # start from an HF checkpoint directory: add ,hf_path=/ckpt/dir to the argument
  # local smoke run (runlocal): add ,runlocal (10 steps, small batches)
"""

from experiments import _common
from jaxalign import config as config_lib


def get_config(arg=None):
  a = _common.experiment_arg(arg)
  c = config_lib.base_config()
  c.loss = "simpo"
  c.loss_hparams.update(dict(beta=2.0, gamma=0.5))
  c.reference.kind = "none"
  return _common.apply_variant(c, a, num_steps=300 if a.variant == "tiny" else 2000)
