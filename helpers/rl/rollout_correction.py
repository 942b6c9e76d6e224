"""Rollout correction for train-inference mismatch: truncated / masked importance sampling (TIS / MIS).

The inference engine that samples the rollouts (FP8 weights, a different kernel, another sampler) computes a
policy ``pi_rollout`` that differs from the policy ``pi_train`` the trainer differentiates. Every function here
takes the two per-token log-probabilities of the *sampled* tokens:

* ``logp_train``   [batch, seq] float - log pi_train(y_t | y_<t), recomputed by the trainer;
* ``logp_rollout`` [batch, seq] float - log pi_rollout(y_t | y_<t), recorded by the inference engine;
* ``mask``         [batch, seq] 0/1   - 1 for response tokens, 0 for padding. Padding positions are never read
  (they may hold any value, including NaN) and every output is zero there.

The per-token importance ratio is ``r_t = pi_train / pi_rollout = exp(log r_t)`` with ``log r_t`` clamped to
``+-LOG_RATIO_BOUND`` before the exponential. Three levels aggregate it (veRL's rollout correction conventions,
TIS blog by F. Yao et al. 2025, "When Speed Kills Stability" by Liu et al. 2025):

* ``"token"``     - ``r_t`` per token;
* ``"sequence"``  - ``exp(sum_t log r_t)`` over the sequence's response tokens, broadcast to each of them;
* ``"geometric"`` - ``exp(mean_t log r_t)``, broadcast likewise (a length-normalised sequence ratio).

Public functions: :func:`is_weights` (TIS), :func:`rejection_mask` (MIS), :func:`mismatch_metrics`,
:func:`rejection_metrics`, :func:`policy_loss`, and the averaging helper :func:`masked_mean`. Metric names are bare
``snake_case``; the caller adds a namespace prefix such as ``"rollout_corr/"`` once.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "LOG_RATIO_BOUND",
    "LEVELS",
    "masked_mean",
    "log_ratio",
    "level_log_ratio",
    "is_weights",
    "rejection_mask",
    "rejection_metrics",
    "mismatch_metrics",
    "policy_loss",
]

# exp(20) ~ 4.9e8: large enough that no meaningful ratio is cut, small enough that exp() and its square (chi-square)
# stay finite in fp32 (exp(40) ~ 2.4e17 < 3.4e38) even when one side assigned a token probability ~0.
LOG_RATIO_BOUND = 20.0
LEVELS = frozenset({"token", "sequence", "geometric"})


# -- validation ----------------------------------------------------------------------------------------------------
def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")


def _check_positive(name: str, value: float) -> float:
    """A threshold must be a real number > 0 (``inf`` is allowed and means "no truncation")."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if math.isnan(v) or v <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return v


def _check_mask(mask: torch.Tensor, shape: torch.Size, name: str = "mask") -> torch.Tensor:
    """Return ``mask`` as float after checking its shape and that every entry is exactly 0 or 1."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} like the log-probs, got {tuple(mask.shape)}")
    m = mask.float()
    if not bool(((m == 0) | (m == 1)).all()):
        bad = m[(m != 0) & (m != 1)].flatten()[:3].tolist()
        raise ValueError(f"{name} must contain only 0 and 1, got values such as {bad}")
    return m


def _check_logps(mask: torch.Tensor, **logps: torch.Tensor) -> torch.Tensor:
    """Check that the log-prob tensors are [batch, seq], share one shape with ``mask``, and are finite where
    ``mask`` is 1. Returns the mask as float."""
    first_name, first = next(iter(logps.items()))
    for name, x in logps.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be [batch, seq], got shape {tuple(x.shape)}")
        if x.shape != first.shape:
            raise ValueError(f"{name} must have the shape of {first_name} {tuple(first.shape)}, got {tuple(x.shape)}")
    m = _check_mask(mask, first.shape)
    for name, x in logps.items():
        bad = (m > 0) & ~torch.isfinite(x)
        if bool(bad.any()):
            idx = tuple(bad.nonzero()[0].tolist())
            raise ValueError(f"{name} must be finite on unmasked tokens, got {x[idx].item()} at {idx}")
    return m


# -- the quantities ------------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (over all positions, or along ``dim``).

    Positions with mask 0 contribute nothing, whatever they hold (NaN included). An empty selection gives 0.
    """
    m = mask.to(x.dtype) if x.is_floating_point() else mask.float()
    xm = torch.where(m > 0, x, torch.zeros_like(x))
    num = (xm * m).sum() if dim is None else (xm * m).sum(dim)
    den = m.sum() if dim is None else m.sum(dim)
    return num / den.clamp(min=1.0)


def log_ratio(logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token ``log r_t = logp_train - logp_rollout`` clamped to +-LOG_RATIO_BOUND, 0 on padding. [batch, seq]."""
    lr = torch.where(mask > 0, logp_train - logp_rollout, torch.zeros_like(logp_train))
    return lr.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def level_log_ratio(token_log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """Aggregate per-token log-ratios to ``level``, broadcast back to [batch, seq] (0 on padding).

    token: log r_t; sequence: sum_t log r_t (clamped again to +-LOG_RATIO_BOUND: a long sequence of small
    log-ratios can sum past it); geometric: mean_t log r_t over the sequence's unmasked tokens.
    """
    _check_level(level)
    if level == "token":
        out = token_log_ratio
    elif level == "sequence":
        out = (token_log_ratio * mask).sum(-1, keepdim=True).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    else:
        out = masked_mean(token_log_ratio, mask, dim=-1).unsqueeze(-1)
    return out.expand_as(token_log_ratio) * mask


@torch.no_grad()
def is_weights(
    logp_train: torch.Tensor,
    logp_rollout: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    threshold: float = 2.0,
) -> torch.Tensor:
    """Truncated importance-sampling (TIS) weights ``w = min(ratio, threshold)`` at ``level``.

    Args:
        logp_train, logp_rollout: [batch, seq] log-probs of the sampled tokens (see the module docstring).
        mask: [batch, seq] 1 for response tokens, 0 for padding.
        level: ``"token"``, ``"sequence"`` or ``"geometric"`` - which ratio is truncated (module docstring).
        threshold: the truncation C > 0 (2.0 is FP8-RL's / veRL's default); ``float("inf")`` gives plain IS.

    Returns:
        [batch, seq] float32 weights, detached (they scale the loss, no gradient flows through them), 0 on padding.
    """
    _check_level(level)
    c = _check_positive("threshold", threshold)
    m = _check_logps(mask, logp_train=logp_train, logp_rollout=logp_rollout)
    lr = level_log_ratio(log_ratio(logp_train.detach().float(), logp_rollout.detach().float(), m), m, level)
    return torch.exp(lr).clamp(max=c) * m  # w = min(r, C), zero on padding


@torch.no_grad()
def rejection_mask(
    logp_train: torch.Tensor,
    logp_rollout: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    lower: float | None = None,
    upper: float = 2.0,
    veto_threshold: float | None = None,
) -> torch.Tensor:
    """Masked importance sampling (MIS): keep a token (``level="token"``) or a whole sequence (``"sequence"``,
    ``"geometric"``) only when its ratio lies in ``[lower, upper]``.

    Args:
        logp_train, logp_rollout, mask: as in :func:`is_weights`.
        level: which ratio is compared with the bounds.
        lower: the lower bound > 0; ``None`` means ``1 / upper`` (so one value U gives [1/U, U]).
        upper: the upper bound > 0.
        veto_threshold: when given (e.g. 1e-4), also drop every sequence in which any token ratio is below it
            (veRL's "veto": a token the trainer considers near-impossible marks the whole sample as broken).

    Returns:
        [batch, seq] float32 mask: the input mask with rejected tokens set to 0. Pass it as the loss mask so the
        rejected tokens leave the loss denominator too.
    """
    _check_level(level)
    hi = _check_positive("upper", upper)
    lo = 1.0 / hi if lower is None else _check_positive("lower", lower)
    if lo > hi:
        raise ValueError(f"lower must be <= upper, got lower={lower!r} > upper={upper!r}")
    m = _check_logps(mask, logp_train=logp_train, logp_rollout=logp_rollout)
    tok = log_ratio(logp_train.detach().float(), logp_rollout.detach().float(), m)
    lr = level_log_ratio(tok, m, level)
    keep = (lr >= math.log(lo)) & (lr <= math.log(hi))  # compare in log space: lower <= r <= upper
    if veto_threshold is not None:
        v = _check_positive("veto_threshold", veto_threshold)
        vetoed = ((tok < math.log(v)) & (m > 0)).any(-1, keepdim=True)  # any token with r_t < veto_threshold
        keep = keep & ~vetoed
    return keep.float() * m


def rejection_metrics(mask: torch.Tensor, kept: torch.Tensor) -> dict[str, float]:
    """What a rejection removed. ``mask``: the original [batch, seq] 0/1 mask; ``kept``: the one returned by
    :func:`rejection_mask`. Returns ``rejected_fraction_token`` (rejected / response tokens) and
    ``rejected_fraction_sequence`` (sequences with at least one response token of which all were rejected)."""
    m = _check_mask(mask, mask.shape)
    k = _check_mask(kept, mask.shape, name="kept")
    if bool((k > m).any()):
        raise ValueError("kept must be 0 wherever mask is 0 (it is a subset of mask)")
    n_tok = m.sum().clamp(min=1.0)
    has_tokens = m.sum(-1) > 0
    seq_rejected = has_tokens & (k.sum(-1) == 0)
    return {
        "rejected_fraction_token": float((m - k).sum() / n_tok),
        "rejected_fraction_sequence": float(seq_rejected.sum() / has_tokens.sum().clamp(min=1)),
    }


@torch.no_grad()
def mismatch_metrics(
    logp_train: torch.Tensor,
    logp_rollout: torch.Tensor,
    mask: torch.Tensor,
    *,
    threshold: float = 2.0,
) -> dict[str, float]:
    """How far the rollout policy is from the training policy, over unmasked tokens only.

    Returns floats (d_t = logp_train - logp_rollout unclamped; r_t = exp(clamp(d_t, +-LOG_RATIO_BOUND));
    w_t = min(r_t, threshold)):

    * ``kl``: mean_t (logp_rollout - logp_train) - the k1 estimator of KL(pi_rollout || pi_train) on rollout
      samples, from the *unclamped* d_t (the bound keeps exp finite; k1 has no exp, so clamping would only bias it);
    * ``k3_kl``: mean_t (r_t - 1 - log r_t) - the non-negative k3 estimator of the same KL (clamped log r_t);
    * ``token_mult_prob_error``: mean_t exp(|d_t|) (NeMo-RL's metric; 1.0 = identical policies), clamped |d_t|;
    * ``training_ppl`` / ``rollout_ppl``: mean over sequences of exp(-mean_t logp) under each policy;
    * ``ppl_ratio``: mean over sequences of exp(mean_t logp_rollout - mean_t logp_train) (training / rollout ppl);
    * ``chi2_token``: E_t[r_t^2] - 1 - the chi-square divergence estimated on rollout samples;
    * ``is_weight_mean`` / ``_std`` / ``_min`` / ``_max``: of the truncated token weights w_t;
    * ``fraction_truncated``: fraction of tokens with r_t > threshold;
    * ``ess``: normalised effective sample size of w, (mean w)^2 / mean(w^2), in (0, 1].

    All values are computed as tensors and brought to the host in one transfer.
    """
    c = _check_positive("threshold", threshold)
    m = _check_logps(mask, logp_train=logp_train, logp_rollout=logp_rollout)
    lt, lro = logp_train.detach().float(), logp_rollout.detach().float()
    d = torch.where(m > 0, lt - lro, torch.zeros_like(lt))  # unclamped log-ratio, 0 on padding
    lr = log_ratio(lt, lro, m)
    r = torch.exp(lr)
    w = r.clamp(max=c)
    has = m.sum(-1) > 0  # sequences with at least one response token
    mean_lt = masked_mean(lt, m, dim=-1)[has]
    mean_lro = masked_mean(lro, m, dim=-1)[has]
    w_mean = masked_mean(w, m)
    w_sq = masked_mean(w * w, m)
    masked = m > 0
    nan = torch.full((), float("nan"), device=lt.device)
    empty = not bool(masked.any())
    vals = {
        "kl": masked_mean(-d, m),  # k1: E[log pi_rollout - log pi_train], unclamped
        "k3_kl": masked_mean(r - 1.0 - lr, m),  # k3 = r - 1 - log r >= 0
        "token_mult_prob_error": masked_mean(torch.exp(lr.abs()), m) if not empty else nan,
        "training_ppl": torch.exp(-mean_lt).mean() if not empty else nan,
        "rollout_ppl": torch.exp(-mean_lro).mean() if not empty else nan,
        "ppl_ratio": torch.exp(mean_lro - mean_lt).mean() if not empty else nan,
        "chi2_token": masked_mean(r * r, m) - 1.0,  # chi2(pi_train || pi_rollout) = E_rollout[r^2] - 1
        "is_weight_mean": w_mean,
        "is_weight_std": (w_sq - w_mean**2).clamp(min=0).sqrt(),
        "is_weight_min": w[masked].min() if not empty else nan,
        "is_weight_max": w[masked].max() if not empty else nan,
        "fraction_truncated": masked_mean((r > c).float(), m),
        "ess": w_mean**2 / w_sq if not empty else nan,  # ESS/N = (sum w)^2 / (N sum w^2)
    }
    host = torch.stack([v.float().reshape(()) for v in vals.values()]).tolist()  # one device -> host copy
    return dict(zip(vals, host))


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    rollout_weights: torch.Tensor | None = None,
    clip: float = 0.2,
) -> torch.Tensor:
    """The clipped PPO / GRPO token loss, token-mean over ``mask``.

    ``loss_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - clip, 1 + clip)) * w_t`` with ``rho_t = exp(logp - logp_old)``
    (the trainer's own proximal ratio, log clamped to +-LOG_RATIO_BOUND) and ``w_t`` the detached rollout weights
    (1 when ``rollout_weights`` is None). Returns ``sum_t mask_t loss_t / sum_t mask_t`` (a scalar).

    Args:
        logp: [batch, seq] log-probs under the policy being optimised (carries the gradient).
        logp_old: [batch, seq] the trainer's log-probs at rollout time (detached here).
        advantages: [batch, seq] per-token advantages, or [batch] (one per sequence, broadcast to its tokens).
        mask: [batch, seq] 0/1 loss mask: padding and tokens rejected by :func:`rejection_mask` are 0, and they
            leave the denominator.
        rollout_weights: [batch, seq] TIS weights from :func:`is_weights`, or None.
        clip: the PPO clip range epsilon > 0.
    """
    from helpers.rl.losses import agg_loss, clipped_surrogate  # losses imports this module's masked_mean

    eps = _check_positive("clip", clip)
    m = _check_logps(mask, logp=logp, logp_old=logp_old)
    if not isinstance(advantages, torch.Tensor):
        raise ValueError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if advantages.dim() == 1 and advantages.shape[0] == logp.shape[0]:
        advantages = advantages[:, None].expand_as(logp)  # one advantage per sequence, broadcast to its tokens
    if advantages.shape != logp.shape:
        raise ValueError(f"advantages must be [batch, seq] {tuple(logp.shape)} or [batch], got {tuple(advantages.shape)}")
    if not bool(torch.isfinite(torch.where(m > 0, advantages.detach().float(), torch.zeros_like(m))).all()):
        raise ValueError("advantages must be finite on unmasked tokens")
    if rollout_weights is not None:
        if not isinstance(rollout_weights, torch.Tensor) or rollout_weights.shape != logp.shape:
            got = tuple(rollout_weights.shape) if isinstance(rollout_weights, torch.Tensor) else type(rollout_weights)
            raise ValueError(f"rollout_weights must be a [batch, seq] tensor {tuple(logp.shape)}, got {got}")
        rw = torch.where(m > 0, rollout_weights.detach().float(), torch.zeros_like(m))
        if not bool(torch.isfinite(rw).all()) or bool((rw < 0).any()):
            raise ValueError("rollout_weights must be finite and >= 0 on unmasked tokens")
    loss, _ = clipped_surrogate(logp, logp_old, advantages, m, clip_low=eps, rollout_weights=rollout_weights)
    return agg_loss(loss, m, "token-mean")
