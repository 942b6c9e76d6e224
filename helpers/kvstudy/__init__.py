"""The study of notebook 02 (only notebooks import it):

* :mod:`helpers.kvstudy.drift` - FP8-KV mismatch on the engine's own samples (:func:`~helpers.kvstudy.drift.engine_mismatch`),
  scale drift while a trained policy takes RL updates (:func:`~helpers.kvstudy.drift.run_drift`), and a controlled
  K-growth sweep (:func:`~helpers.kvstudy.drift.key_growth_sweep`);
* :mod:`helpers.kvstudy.outliers` - what outliers do to per-tensor / per-head scales: synthetic channels
  (:func:`~helpers.kvstudy.outliers.outlier_sweep`) and heads of realistic size with and without QK-norm
  (:func:`~helpers.kvstudy.outliers.realistic_head_sweep`, :func:`~helpers.kvstudy.outliers.holding_threshold`);
* :mod:`helpers.kvstudy.verdicts` - the notebook's decision rules.

The building blocks they use live in :mod:`helpers.kvcache`, :mod:`helpers.models` and :mod:`helpers.rl`; the
drift study reads notebook 05's task and checkpoints (:mod:`helpers.grpo.task`, :mod:`helpers.grpo.pretrain`).
"""
