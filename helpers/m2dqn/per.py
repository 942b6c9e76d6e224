"""Proportional prioritized experience replay (Schaul, Quan, Antonoglou, Silver, arXiv 1511.05952): the control for
M2DQN's implicit prioritisation (taking the max over M minibatch losses trains on the batch with the largest TD
errors).

* priority of transition i: ``p_i = (|delta_i| + PER_EPS) ** alpha``; a new transition gets the largest priority
  seen so far, so it is sampled at least once soon;
* sampling probability ``P(i) = p_i / sum_k p_k`` over the stored transitions;
* importance weight ``w_i = (n P(i)) ** -beta / max_j w_j`` (max over the sampled minibatch, as the paper's
  Algorithm 1), ``beta`` annealed linearly to 1 over training.

Sampling is by inverse CDF of one ``cumsum`` per call (``O(n)``, fine for buffers of <= 100k transitions at the
update rates used here) rather than a sum tree.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PER_EPS", "per_probabilities", "per_weights", "per_beta", "PrioritySampler"]

# Added to |delta| so that a transition with zero TD error keeps a non-zero chance of being replayed (paper: epsilon).
PER_EPS = 1e-6


def per_probabilities(priorities: np.ndarray) -> np.ndarray:
    """``P(i) = p_i / sum_k p_k`` for ``priorities`` ``[n]`` (already raised to ``alpha``), float64 ``[n]``."""
    p = np.asarray(priorities, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or not np.all(p >= 0) or not p.sum() > 0:
        raise ValueError(f"priorities must be a non-empty 1-D array of values >= 0 with a positive sum, got {p!r}")
    return p / p.sum()


def per_weights(probs: np.ndarray, n: int, beta: float) -> np.ndarray:
    """Importance weights ``(n P(i)) ** -beta / max(...)`` for the sampled transitions' ``probs`` (any shape; the
    max runs over all of them) from a buffer of ``n`` transitions; float64, in ``(0, 1]``."""
    probs = np.asarray(probs, dtype=np.float64)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if probs.size == 0 or not np.all(probs > 0):
        raise ValueError("probs must be non-empty and > 0 (a sampled transition has a positive probability)")
    w = (n * probs) ** -beta
    return w / w.max()


def per_beta(beta0: float, step: int, total_steps: int) -> float:
    """The importance-weight exponent at env ``step``: linear from ``beta0`` at step 0 to 1 at ``total_steps``, then 1
    (the paper anneals beta to 1 by the end of learning, when unbiased updates matter most)."""
    if not 0.0 <= beta0 <= 1.0:
        raise ValueError(f"beta0 must be in [0, 1], got {beta0!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
    return beta0 + (1.0 - beta0) * min(1.0, max(step, 0) / total_steps)


class PrioritySampler:
    """Priorities of one run's replay buffer (same ring positions as the buffer) and its sampler.

    Args:
        capacity: buffer capacity (transitions).
        alpha: priority exponent.
        rng: the run's sampling generator (the uniform buffer's, so the random streams stay per run).
    """

    def __init__(self, capacity: int, alpha: float, rng: np.random.Generator) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        self.priorities = np.zeros(capacity, dtype=np.float64)  # p_i, already ** alpha
        self.alpha = float(alpha)
        self.max_priority = 1.0
        self.rng = rng

    def added(self, pos: int) -> None:
        """A transition was written at row ``pos``: give it the largest priority so far."""
        self.priorities[pos] = self.max_priority

    def sample(self, size: int, shape: tuple[int, ...], beta: float) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[*shape]`` (int64) drawn with probability ``P(i)`` from the first ``size`` rows, and their
        importance weights ``[*shape]`` (float32)."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size!r}")
        probs = per_probabilities(self.priorities[:size])
        cdf = np.cumsum(probs)
        idx = np.searchsorted(cdf, self.rng.random(shape) * cdf[-1], side="right")
        idx = np.minimum(idx, size - 1)  # u * cdf[-1] can round to cdf[-1] itself
        return idx.astype(np.int64), per_weights(probs[idx], size, beta).astype(np.float32)

    def update(self, idx: np.ndarray, td_abs: np.ndarray) -> None:
        """New priorities ``(|delta| + PER_EPS) ** alpha`` for rows ``idx`` (a row drawn twice keeps the last)."""
        p = (np.asarray(td_abs, dtype=np.float64) + PER_EPS) ** self.alpha
        self.priorities[np.asarray(idx).ravel()] = p.ravel()
        self.max_priority = max(self.max_priority, float(p.max()))
