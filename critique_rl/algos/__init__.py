"""Pure tensor functions behind string registries: advantage estimators, losses, shaping, distillation.

Nothing here touches models, files or the network; everything takes and returns tensors.
"""

from critique_rl.algos.advantages import ADVANTAGE_ESTIMATORS, compute_advantages, register_advantage
from critique_rl.algos.losses import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    aggregate_loss,
    entropy_from_logits,
    kl_k3,
    ppo_clip_loss,
    register_policy_loss,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "register_policy_loss",
    "aggregate_loss",
    "compute_advantages",
    "entropy_from_logits",
    "kl_k3",
    "ppo_clip_loss",
    "register_advantage",
]
from critique_rl.algos.aggregators import AGGREGATORS, aggregate_rewards, register_aggregator  # noqa: E402
from critique_rl.algos.gates import apply_gates  # noqa: E402

__all__ += ["AGGREGATORS", "aggregate_rewards", "apply_gates", "register_aggregator"]
from critique_rl.algos.distill import DIVERGENCES, sampled_token_advantage, topk_divergence, topk_reverse_kl  # noqa: E402
from critique_rl.algos.shaping import offpolicy_coefficient, offpolicy_token_weights, shaped_offpolicy_loss  # noqa: E402, E501

__all__ += ["DIVERGENCES", "offpolicy_coefficient", "offpolicy_token_weights", "sampled_token_advantage", "shaped_offpolicy_loss",
            "topk_divergence", "topk_reverse_kl"]
from critique_rl.algos.logprobs import (  # noqa: E402
    chunked_entropy,
    linear_selective_log_softmax,
    logsumexp_chunked,
    selective_log_softmax,
    topk_logprobs,
)

__all__ += ["chunked_entropy", "linear_selective_log_softmax", "logsumexp_chunked", "selective_log_softmax", "topk_logprobs"]
from critique_rl.algos.tis import mismatch_stats, tis_weights  # noqa: E402

__all__ += ["mismatch_stats", "tis_weights"]
