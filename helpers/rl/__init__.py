"""RL building blocks shared by the rollout-correction study (notebook 03) and the GRPO loop (notebook 05):

* :mod:`helpers.rl.rollout_correction` - importance weights (TIS), rejection masks (MIS), mismatch metrics, the
  corrected policy loss, in veRL's conventions;
* :mod:`helpers.rl.advantages` - GRPO's group-normalised outcome advantages and Dr.GRPO's mean-centred variant;
* :mod:`helpers.rl.losses` - the clipped surrogate (symmetric, DAPO's clip-higher, dual clip) and veRL's loss
  aggregation modes (``token-mean``, ``seq-mean-token-sum``, ``seq-mean-token-mean``, ``seq-mean-token-sum-norm``).
"""
