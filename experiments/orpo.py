"""ORPO (Hong et al. 2024): NLL plus an odds-ratio preference term; no reference model.

Launch (variants: tiny = the built-in ground-truth task, hh = an HH-RLHF file):

  python -m jaxalign.main --config experiments/orpo.py:tiny --workdir /tmp/orpo
  python -m jaxalign.main --config experiments/orpo.py:hh,path=/data/hh.jsonl.gz \
      --workdir /tmp/orpo-hh
  # start from an HF checkpoint directory: add ,hf_path=/ckpt/dir to the argument
  # local smoke run (runlocal): add ,runlocal (10 steps, small batches)
"""

from experiments import _common
from jaxalign import config as config_lib


def get_config(arg=None):
  a = _common.experiment_arg(arg)
  c = config_lib.base_config()
  c.loss = "orpo"
  c.loss_hparams.update(dict(beta=0.1))
  c.reference.kind = "none"
  return _common.apply_variant(c, a, num_steps=300 if a.variant == "tiny" else 2000)
