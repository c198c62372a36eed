"""Reward functions for online RL as a registry, like the losses.

``fn(prompts: list[str], completions: list[str], **fields) -> scores [B]`` over a
batch of decoded text; ``fields`` are the prompt records' other columns (e.g.
``answer``) as lists, plus ``completion_length``. Built in: ``accuracy``
(math-verify), ``exact_match``, ``format`` (a regex), ``overlong`` (DAPO's soft
overlong punishment), ``length`` (see `jaxalign.rewards._builtin`). Add one with
``register_reward(name, fn)`` and list it in ``rl.reward_functions``. ``reward_model``:
a reward model's score of the text, re-tokenised with its own tokenizer
(`jaxalign.rewards.model`, ``rl.reward_model = PATH``).
"""

from jaxalign.rewards._builtin import (BUILTIN, accuracy, answers_equal, exact_match,
                                       format_match, last_number, length, overlong)
from jaxalign.rewards._registry import (ON_ERROR, RewardError, RewardFn, call_reward,
                                        get_reward, list_rewards, parse_weights,
                                        register_reward, unregister_reward)

from jaxalign.rewards.model import reward_model

for _name, _fn in BUILTIN.items():
  register_reward(_name, _fn)
register_reward("reward_model", reward_model)
del _name, _fn
