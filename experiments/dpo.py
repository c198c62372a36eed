"""DPO (or any DPO-family loss, or a weighted list of losses) from a frozen reference.

``config.loss`` takes a registry name ("dpo", "ipo", "hinge", "robust", "apo_zero",
...) or a weighted list, e.g. ``[("dpo", 1.0), ("nll", 0.2)]`` (RPO); on the command
line ``--config.loss=dpo:1.0,nll:0.2``. The reference is the initial policy.

Launch (variants: tiny = the built-in ground-truth task, hh = HH-RLHF file):

  python -m jaxalign.main --config experiments/dpo.py:tiny --workdir /tmp/dpo
  python -m jaxalign.main --config experiments/dpo.py:hh,path=/data/hh.jsonl.gz \
      --workdir /tmp/dpo-hh
  # start from an HF checkpoint directory: add hf_path=/ckpt/dir to the argument
  # local smoke run: add ,runlocal (10 steps, small batches)

Batch layout (defaults, data.layout="auto", issue 22): prefix-shared units (prompt
once, chosen and rejected as branches) packed two per row when half the batch splits
over the data-parallel devices, and the log-prob head only on the scored (completion)
slots; every step holds the same pairs and per-sequence sums as one row per pair.
data.layout="prefix_shared" set explicitly keeps one row per pair. Speed against
TRL: experiments/bench/vs_trl.py, docs/benchmarks.md (issue 22).
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
