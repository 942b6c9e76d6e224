"""What every module of :mod:`helpers.rl` shares: the log-ratio bound, the masked mean / sum, and the input checks.

It imports nothing from :mod:`helpers.rl`, so the arrows run one way: ``config`` -> ``rollout_correction`` ->
``rejection`` / ``losses`` -> ``common``.

Conventions (veRL ``verl/trainer/ppo/rollout_corr_helper.py``): log-probs are [batch, seq] float tensors of the
*sampled* tokens; ``mask`` is [batch, seq], bool or 0/1 float, 1 for the response tokens that count. Masked positions
may hold anything (NaN, -inf): they are replaced before any arithmetic.
"""

from __future__ import annotations

import math

import torch

__all__ = ["LOG_RATIO_BOUND", "LOGP_POSITIVE_TOL", "masked_mean", "masked_sum", "check_logps", "check_mask",
           "check_advantages", "check_positive"]

# exp(20) ~ 4.9e8: large enough that no meaningful ratio is cut, small enough that exp() and its square (chi-square)
# stay finite in fp32 (exp(40) ~ 2.4e17 < 3.4e38) even when one side assigned a token probability ~0. veRL's
# SAFETY_BOUND has the same value and reason.
LOG_RATIO_BOUND = 20.0
# A log-prob is <= 0. fp32 log_softmax can return a few ulps above 0 for a token of probability ~1, so values up to
# this tolerance pass; anything larger is almost surely a probability passed where a log-probability was expected.
LOGP_POSITIVE_TOL = 1e-4


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (over all positions, or along ``dim``).

    Positions with mask 0 contribute nothing, whatever they hold (NaN included). An empty selection gives 0.
    """
    m = mask.to(x.dtype) if x.is_floating_point() else mask.float()
    xm = torch.where(m > 0, x, torch.zeros_like(x))
    num = (xm * m).sum() if dim is None else (xm * m).sum(dim)
    den = m.sum() if dim is None else m.sum(dim)
    return num / den.clamp(min=1.0)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum of ``x`` along ``dim`` over the positions where ``mask`` is 1 (NaN on masked positions is ignored)."""
    m = mask.to(x.dtype) if x.is_floating_point() else mask.float()
    return (torch.where(m > 0, x, torch.zeros_like(x)) * m).sum(dim)


def check_positive(name: str, value: float) -> float:
    """A threshold must be a real number > 0 (``inf`` is allowed and means "no truncation")."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if math.isnan(v) or v <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return v


def check_mask(mask: torch.Tensor, shape: torch.Size, name: str = "mask") -> torch.Tensor:
    """Return ``mask`` as float32 after checking its shape and that every entry is exactly 0 or 1 (bool is fine)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} like the log-probs, got {tuple(mask.shape)}")
    m = mask.float()
    if not bool(((m == 0) | (m == 1)).all()):
        bad = m[(m != 0) & (m != 1)].flatten()[:3].tolist()
        raise ValueError(f"{name} must contain only 0 and 1, got values such as {bad}")
    return m


def check_logps(mask: torch.Tensor, **logps: torch.Tensor) -> torch.Tensor:
    """Check that the log-prob tensors are [batch, seq], share one shape and one device with ``mask``, are finite
    and <= 0 (up to :data:`LOGP_POSITIVE_TOL`) where ``mask`` is 1. Returns the mask as float32.

    Raises:
        ValueError: naming the argument, the value received and what was expected.
    """
    first_name, first = next(iter(logps.items()))
    for name, x in logps.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be [batch, seq], got shape {tuple(x.shape)}")
        if x.shape != first.shape:
            raise ValueError(f"{name} must have the shape of {first_name} {tuple(first.shape)}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor of log-probs, got dtype {x.dtype}")
        if x.device != first.device:
            raise ValueError(f"{name} is on {x.device} but {first_name} is on {first.device}: put every tensor on "
                             "one device")
    if isinstance(mask, torch.Tensor) and mask.device != first.device:
        raise ValueError(f"mask is on {mask.device} but {first_name} is on {first.device}: put every tensor on "
                         "one device")
    m = check_mask(mask, first.shape)
    for name, x in logps.items():
        bad = (m > 0) & ~torch.isfinite(x)
        if bool(bad.any()):
            idx = tuple(bad.nonzero()[0].tolist())
            raise ValueError(f"{name} must be finite on unmasked tokens, got {x[idx].item()} at {idx}")
        pos = (m > 0) & (x > LOGP_POSITIVE_TOL)
        if bool(pos.any()):
            idx = tuple(pos.nonzero()[0].tolist())
            raise ValueError(f"{name} must hold log-probabilities (<= 0) on unmasked tokens, got {x[idx].item()} at "
                             f"{idx}: were probabilities passed instead of their log?")
    return m


def check_advantages(advantages: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``advantages`` as ``[batch, seq]`` like ``logp``: a ``[batch]`` tensor (one advantage per sequence) is
    broadcast to its tokens; any other shape raises ValueError naming it."""
    if not isinstance(advantages, torch.Tensor):
        raise ValueError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if advantages.dim() == 1 and advantages.shape[0] == logp.shape[0]:
        advantages = advantages[:, None].expand_as(logp)  # one advantage per sequence, broadcast to its tokens
    if advantages.shape != logp.shape:
        raise ValueError(f"advantages must be [batch, seq] {tuple(logp.shape)} or [batch], got {tuple(advantages.shape)}")
    return advantages
