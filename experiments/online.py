"""Online DPO (Guo et al. 2024, OAIF) and on-policy distillation (GKD, Agarwal et al.
2024) on the online-RL sampler (`jaxalign.train.rl_distill`).

``online_dpo`` (the default): 2 completions per prompt from the current policy, ordered
by the reward (the tiny task's oracle; a reward model on hh), DPO against the initial
policy with beta = ``rl.kl_coef`` (0.1); ties masked. ``gkd``: the generalised
JSD(``rl.gkd_beta`` = 0.5) to a frozen teacher on the student's samples; ``teacher=``
is ``WORKDIR[:STEP]`` of a jaxalign run (e.g. an experiments/sft.py or grpo.py run on
the same task and tokenizer) or an HF checkpoint directory with the same vocabulary.

Launch:

  python -m jaxalign.main --config experiments/online.py:online_dpo --workdir /tmp/odpo
  python -m jaxalign.main --config experiments/online.py:gkd,teacher=/tmp/sft \
--workdir /tmp/gkd
  python -m jaxalign.main --config experiments/online.py:online_dpo,hh,\
path=/data/hh.jsonl.gz,hf_path=/ckpt/sft,reward_path=/runs/rm --workdir /tmp/odpo-hh
  # local smoke run: add ,runlocal
"""

from experiments import _common

ALGORITHMS = ("online_dpo", "gkd")


def get_config(arg=None):
  """``arg``: an algorithm word (``online_dpo`` default, ``gkd``), ``teacher=`` (gkd),
  then what `_common.rl_config` reads (tiny / hh, path=, hf_path=, steps=, ...)."""
  words = [w for w in (arg or "").split(",") if w]
  algorithm = words.pop(0) if words and words[0] in ALGORITHMS else "online_dpo"
  teacher = [w.split("=", 1)[1] for w in words if w.startswith("teacher=")]
  c = _common.rl_config(algorithm,
                        ",".join(w for w in words if not w.startswith("teacher=")))
  if teacher:
    c.rl.teacher = teacher[-1]
  return c
