"""RL building blocks shared by the rollout-correction study (notebook 03) and the GRPO loop (notebook 05):
:mod:`helpers.rl.rollout_correction` (importance weights, rejection masks, mismatch metrics, the corrected policy
loss, veRL's conventions)."""
