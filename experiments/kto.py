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

from jaxalign import config as config_lib


def get_config(arg=None):
  a = config_lib.experiment_arg(arg)
  c = config_lib.base_config()
  c.loss = "kto"
  c.loss_hparams.update(dict(beta=0.1))
  c.reference.kind = "initial"
  c = config_lib.apply_variant(c, a, num_steps=300 if a.variant == "tiny" else 2000)
  if a.variant == "hh":
    # The KL term pairs a prompt (up to max_prompt_length = 192 tokens) with another
    # example's completion (up to max_length - 1 = 255): rows of up to 447 tokens.
    c.data.buckets = (128, 256, 512)
  return c
