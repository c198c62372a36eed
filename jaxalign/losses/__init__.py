"""Alignment objectives as pure array functions.

``loss(inputs, **hparams) -> (per_example_losses [N], metrics)``; the caller
reduces. See docs/losses.md for the catalogue and how to add a loss.
"""

from jaxalign.losses._grpo import (IMPORTANCE_LEVELS, LOSS_AGGREGATIONS,
                                   POLICY_LOSSES, REWARD_SCALINGS,
                                   aggregate_token_loss, cispo_loss,
                                   clipped_surrogate, group_advantages,
                                   sequence_log_ratio, tis_weights,
                                   truncated_rows)
from jaxalign.losses._kto import kto
from jaxalign.losses._math import log1mexp
from jaxalign.losses._online import best_worst_pairs, generalized_jsd, online_dpo
from jaxalign.losses._ppo import (KL_ESTIMATORS, KLControllerState,
                                  adaptive_kl_init, adaptive_kl_update, gae,
                                  grpo_advantages, kl_k1, kl_k2, kl_k3,
                                  kl_penalized_rewards, last_token_index,
                                  masked_whiten, ppo_policy_loss, ppo_value_loss,
                                  rloo_advantages)
from jaxalign.losses._preference import (F_DIVERGENCES, aot, aot_unpaired,
                                         apo_down, apo_zero, bco_delta_update,
                                         bco_pair, cpo, discopop, dpo, exo_pair,
                                         f_dpo, hinge, ipo, nca_pair, nll, orpo,
                                         robust, running_mean_update, sigmoid_norm,
                                         simpo, sppo_hard)
from jaxalign.losses._ranking import rrhf
from jaxalign.losses._registry import (INPUT_KINDS, LossSpec, get_loss,
                                       list_losses, register_loss, resolve,
                                       unregister_loss)
from jaxalign.losses._reward import bradley_terry
from jaxalign.losses._sft import sft
from jaxalign.losses._types import (PairwiseLogps, RankedLogps, RewardPair,
                                    SequenceLogps, UnpairedLogps,
                                    check_pairwise_inputs, check_ranked_inputs,
                                    check_token_counts, check_unpaired_inputs,
                                    sequence_logps_from_tokens)
