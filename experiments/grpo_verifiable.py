"""GRPO with verifiable rewards on the built-in arithmetic task
(`jaxalign.data.verifiable`: "23+19=" -> "42", byte tokenizer): reward functions
``accuracy`` (math-verify) and ``format`` (`jaxalign.rewards`), from a briefly SFT'd
policy (``rl.sft_warmup_steps`` supervised steps on the train split's answers, inside
the run), with the held-out split's greedy accuracy before and after RL in
final_eval.json (``accuracy_before`` / ``accuracy_after``).

Variants: ``full`` (the default: the measured run, docs/results.md), ``tiny`` (a
smoke run of a few iterations), ``dapo`` and ``dr_grpo`` (the GRPO family's loss
aggregations and DAPO's clip-higher / overlong shaping).

Launch:

  python -m jaxalign.main --config experiments/grpo_verifiable.py --workdir /tmp/gv
  python -m jaxalign.main --config experiments/grpo_verifiable.py:dapo --workdir /tmp/gv-dapo
  # a few iterations: experiments/grpo_verifiable.py:tiny (or add ,runlocal)
"""

from experiments import _common

VARIANTS = ("full", "tiny", "dapo", "dr_grpo")
# The byte tokenizer's 260 ids; a small Llama learns the task's digits in minutes.
MODEL = dict(vocab_size=260, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=256,
             tie_embeddings=True)


def get_config(arg=None):
  a = _common.parse_arg(arg, variant="full", steps=0, runlocal=False)
  if a.variant not in VARIANTS:
    raise ValueError(f"config argument variant {a.variant!r}: expected one of "
                     f"{VARIANTS}.")
  c = _common.rl_config("grpo", "tiny")
  c.model.update(MODEL)
  c.data.source = "arithmetic"
  c.data.tokenizer = "byte"
  c.data.task.max_operand = 9  # 155 distinct questions (a + b, and a - b with a >= b)
  c.data.task.operations = "+-"
  c.eval.num_examples = 32  # the held-out split
  c.eval.batch_size = 8  # (unused: held-out prompts go through the sampler's rows)
  c.data.batch_size = 16
  c.optimizer.learning_rate = 1e-3
  # The warm-up leaves the policy at ~0.2 held-out accuracy; the KL term to that
  # policy (the reference) keeps GRPO from collapsing onto memorised train answers
  # (held-out 0.19 -> 0.06-0.28 with kl_coef=0, 0.34-0.38 with 0.05; docs/results.md).
  c.rl.update(reward="functions", reward_functions="accuracy:1.0,format:0.2",
              format_pattern="-?[0-9]+", prompt_len=8, max_new_tokens=4,
              group_size=8, kl_coef=0.1, temperature=1.0, ppo_epochs=1,
              num_minibatches=2, sft_warmup_steps=80, sft_warmup_lr=3e-3)
  c.num_steps = 300
  if a.variant == "dapo":
    # overlong_cache=1: only a completion that fills all 4 slots (no EOS) is punished;
    # "12" + EOS is 3 tokens.
    c.rl.update(loss_agg="dapo", epsilon_low=0.2, epsilon_high=0.28, overlong_cache=1,
                reward_functions="accuracy:1.0,format:0.2,overlong:1.0", dynamic_sampling=True)
  elif a.variant == "dr_grpo":
    c.rl.update(loss_agg="dr_grpo", scale_rewards="none")
  if a.variant == "tiny" or a.runlocal:
    c.num_steps = 2
    c.rl.sft_warmup_steps = 5
    c.data.batch_size = 8
    c.rl.group_size = 2
    c.rl.num_minibatches = 1
    c.eval.num_examples = 16
  c.num_steps = a.steps or c.num_steps
  c.checkpoint.every_steps = max(c.num_steps // 2, 1)
  c.log.every_steps = 1 if c.num_steps <= 20 else 5
  return c
