"""KTO (Ethayarajh et al. 2024): unpaired desirable / undesirable examples.

Tiny variant: behaviour responses labelled desirable with probability sigmoid((r -
threshold) / T). hh variant: each pair becomes a desirable (chosen) and an undesirable
(rejected) example.

Launch (variants: tiny = the built-in ground-truth task, hh = an HH-RLHF file):

  python -m jaxalign.main --config experiments/kto.py:tiny --workdir /tmp/kto
  python -m jaxalign.main --config experiments/kto.py:hh,path=/data/hh.jsonl.gz \
      --workdir /tmp/kto-hh
  # start from an HF checkpoint directory: add ,hf_path=/ckpt/dir to the argument
  # local smoke run (runlocal): add ,runlocal (10 steps, small batches)
"""

from experiments import _common
from jaxalign import config as config_lib


def get_config(arg=None):
  a = _common.experiment_arg(arg)
  c = config_lib.base_config()
  c.loss = "kto"
  c.loss_hparams.update(dict(beta=0.1))
  c.reference.kind = "initial"
  # data.buckets stay derived: the KL term pairs a prompt with another example's
  # completion, and with the prompt shared (the auto layout) a row holds the prompt
  # and both completions, up to 1 + 2 x 255 = 511 tokens under max_length 256.
  return _common.apply_variant(c, a, num_steps=300 if a.variant == "tiny" else 2000)
