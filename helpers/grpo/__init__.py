"""GRPO with an FP8 rollout engine and rollout correction, end to end (notebook 05).

* :mod:`helpers.grpo.task` - the verifiable task (multi-digit addition with the carries written out), tokens,
  exact-match reward;
* :mod:`helpers.grpo.pretrain` - supervised pre-training to a non-trivial success rate, the shipped checkpoint
  ``data/grpo_adder10`` and the command that regenerates it;
* :mod:`helpers.grpo.engine` - the rollout engine (bf16 / FP8 W8A8 linears / FP8 KV cache) with its weight sync
  and KV-scale recalibration;
* :mod:`helpers.grpo.trainer` - the GRPO loop: rollout, trainer log-probs, rollout correction, update, sync;
* :mod:`helpers.grpo.experiment` - the arms, paired-seed runs, summaries, veRL / NeMo-RL equivalents, benchmarks.
"""
