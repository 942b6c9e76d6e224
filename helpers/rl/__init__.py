"""RL building blocks shared by the rollout-correction study (notebook 03) and the GRPO loop (notebook 05).

Arrows run one way: ``config`` -> ``rollout_correction`` -> ``rejection`` / ``losses`` -> ``common``.

* :mod:`helpers.rl.config` - veRL's ``RolloutCorrectionConfig`` (:class:`RolloutCorrection`), its presets
  (:data:`PRESETS`), the one-call :func:`apply_rollout_correction` (decoupled mode) and :func:`bypass_policy_loss`;
* :mod:`helpers.rl.rollout_correction` - importance weights (TIS, IcePop, batch normalisation), ratio-bound
  rejection (MIS), mismatch metrics (veRL's and NeMo-RL's), the corrected policy loss;
* :mod:`helpers.rl.rejection` - veRL's k1 / k2 / k3 rejection, slime's veto, NeMo-RL's per-sequence error mask;
* :mod:`helpers.rl.advantages` - GRPO's group-normalised outcome advantages and Dr.GRPO's mean-centred variant;
* :mod:`helpers.rl.losses` - the clipped surrogate (symmetric, DAPO's clip-higher, dual clip) and veRL's loss
  aggregation modes (``token-mean``, ``seq-mean-token-sum``, ``seq-mean-token-mean``, ``seq-mean-token-sum-norm``);
* :mod:`helpers.rl.common` - the log-ratio bound, the masked mean and the input checks.

Everything public is re-exported here: ``from helpers.rl import is_weights, apply_rollout_correction``.
"""

from helpers.rl.advantages import GRPO_EPS, grpo_advantages
from helpers.rl.common import LOG_RATIO_BOUND, masked_mean, masked_sum
from helpers.rl.config import (LOSS_TYPES, PRESETS, RolloutCorrection, apply_rollout_correction, bypass_policy_loss,
                               preset)
from helpers.rl.losses import AGG_MODES, CLIP, CLIP_HIGH_DAPO, agg_loss, clipped_surrogate
from helpers.rl.rejection import RS_OPTIONS, parse_rs_thresholds, rollout_rs_mask, seq_logprob_error_mask, slime_veto_mask
from helpers.rl.rollout_correction import (IS_LEVELS, LEVELS, MISMATCH_KEYS, is_weights, level_log_ratio, log_ratio,
                                           mismatch_metrics, parse_is_threshold, policy_loss, rejection_mask,
                                           rejection_metrics, rollout_is_weights)

__all__ = [
    "AGG_MODES", "CLIP", "CLIP_HIGH_DAPO", "GRPO_EPS", "IS_LEVELS", "LEVELS", "LOG_RATIO_BOUND", "LOSS_TYPES",
    "MISMATCH_KEYS", "PRESETS", "RS_OPTIONS", "RolloutCorrection", "agg_loss", "apply_rollout_correction",
    "bypass_policy_loss", "clipped_surrogate", "grpo_advantages", "is_weights", "level_log_ratio", "log_ratio",
    "masked_mean", "masked_sum", "mismatch_metrics", "parse_is_threshold", "parse_rs_thresholds", "policy_loss",
    "preset", "rejection_mask", "rejection_metrics", "rollout_is_weights", "rollout_rs_mask",
    "seq_logprob_error_mask", "slime_veto_mask",
]
