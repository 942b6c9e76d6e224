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

Public functions: :func:`is_weights` (TIS), :func:`rollout_is_weights` (veRL's ``rollout_is``: TIS, IcePop,
batch normalisation), :func:`rejection_mask` (MIS on ratio bounds), :func:`mismatch_metrics`,
:func:`rejection_metrics`, :func:`policy_loss`, and the averaging helper :func:`masked_mean`. The divergence-based
rejection family (k1 / k2 / k3, slime's veto, NeMo-RL's error mask) is in :mod:`helpers.rl.rejection`; veRL's config,
presets and the one-call entry point in :mod:`helpers.rl.config`. Metric names are bare ``snake_case``; the caller
adds a namespace prefix such as ``"rollout_corr/"`` once.
"""

from __future__ import annotations

import math

import torch

from helpers.rl.common import (LOG_RATIO_BOUND, check_advantages, check_logps, check_mask, check_positive, masked_mean,
                               masked_sum)
from helpers.rl.losses import agg_loss, clipped_surrogate

__all__ = [
    "LOG_RATIO_BOUND",
    "LEVELS",
    "IS_LEVELS",
    "masked_mean",
    "log_ratio",
    "level_log_ratio",
    "parse_is_threshold",
    "is_weights",
    "rollout_is_weights",
    "rejection_mask",
    "rejection_metrics",
    "mismatch_metrics",
    "MISMATCH_KEYS",
    "policy_loss",
]

LEVELS = frozenset({"token", "sequence", "geometric"})
IS_LEVELS = LEVELS  # the levels ``rollout_is`` accepts (veRL: token, sequence; geometric is this project's addition)

# Kept for the callers of the old private names (the checks now live in helpers.rl.common).
_check_positive = check_positive
_check_mask = check_mask
_check_logps = check_logps


# -- validation ----------------------------------------------------------------------------------------------------
def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")


# -- the quantities ------------------------------------------------------------------------------------------------
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


def parse_is_threshold(rollout_is_threshold: str | float) -> tuple[float | None, float]:
    """veRL's ``rollout_is_threshold``: a number C (or a string holding one) means TIS, ``min(w, C)``; a
    ``"lower_upper"`` string (e.g. ``"0.5_5.0"``) means IcePop, weights outside [lower, upper] set to 0.
    Returns ``(lower or None, upper)``."""
    if isinstance(rollout_is_threshold, bool) or rollout_is_threshold is None:
        raise ValueError(f"rollout_is_threshold must be a number or a 'lower_upper' string, got {rollout_is_threshold!r}")
    if isinstance(rollout_is_threshold, str) and "_" in rollout_is_threshold:
        lo_s, hi_s = rollout_is_threshold.strip().split("_", 1)
        lo = check_positive("rollout_is_threshold (lower)", lo_s)
        hi = check_positive("rollout_is_threshold (upper)", hi_s)
        if lo > hi:
            raise ValueError(f"rollout_is_threshold must have lower <= upper, got {rollout_is_threshold!r}")
        return lo, hi
    return None, check_positive("rollout_is_threshold", rollout_is_threshold)


@torch.no_grad()
def rollout_is_weights(
    logp_train: torch.Tensor,
    logp_rollout: torch.Tensor,
    mask: torch.Tensor,
    rollout_is: str = "token",
    rollout_is_threshold: str | float = 2.0,
    rollout_is_batch_normalize: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """veRL's IS weights (``compute_rollout_correction_weights`` of ``verl/trainer/ppo/rollout_corr_helper.py``):
    TIS, **IcePop** and **batch normalisation** at one aggregation level.

    ``raw = exp(clamp(level log-ratio, +-LOG_RATIO_BOUND))`` (:func:`level_log_ratio`), then

    * TIS (``rollout_is_threshold`` a number C): ``w = min(raw, C)``;
    * IcePop (``"lower_upper"``, veRL's preset ``decoupled_token_icepop``: ``"0.5_5.0"``): ``w = raw`` inside
      [lower, upper], **0 outside** - the token stays in ``mask`` and so in the loss denominator (rejection, in
      :mod:`helpers.rl.rejection`, removes it instead);
    * batch normalisation (``rollout_is_batch_normalize``), after the step above: ``w / mean(w)`` with the mean over
      the batch's tokens (token level) or over its sequences, one weight each (sequence / geometric level), so the
      weights average 1. Skipped when that mean is <= 1e-8 (every weight zeroed).

    Args:
        logp_train: [batch, seq] trainer log-probs of the sampled tokens (veRL's ``old_log_probs``).
        logp_rollout: [batch, seq] rollout-engine log-probs (``rollout_log_probs``).
        mask: [batch, seq] bool or 0/1 (``response_mask``); padding may hold NaN.
        rollout_is: ``"token"``, ``"sequence"`` or ``"geometric"``.
        rollout_is_threshold: C, or ``"lower_upper"`` for IcePop.
        rollout_is_batch_normalize: rescale to mean 1 over the batch.

    Returns:
        ``(weights, metrics)``: weights [batch, seq] float32, detached, 0 on padding; metrics (veRL's names, NaN on
        an all-masked batch): ``rollout_is_mean`` / ``_std`` / ``_min`` / ``_max`` (of the weights before batch
        normalisation), ``rollout_is_eff_sample_size`` ((mean w)^2 / mean w^2), ``rollout_is_ratio_fraction_high`` /
        ``_low`` (raw weights above upper / below lower, lower = 1/C for TIS), ``rollout_is_oob_ratio`` (IcePop
        only: fraction zeroed) and ``rollout_is_batch_norm_factor`` (the divisor; only with batch normalisation).
    """
    if rollout_is not in IS_LEVELS:
        raise ValueError(f"rollout_is must be one of {sorted(IS_LEVELS)}, got {rollout_is!r}")
    lo, hi = parse_is_threshold(rollout_is_threshold)
    m = check_logps(mask, logp_train=logp_train, logp_rollout=logp_rollout)
    lr = level_log_ratio(log_ratio(logp_train.detach().float(), logp_rollout.detach().float(), m), m, rollout_is)
    raw = torch.exp(lr) * m  # level ratio, 0 on padding
    if lo is None:
        w = raw.clamp(max=hi)  # TIS
        oob = None
    else:
        inside = (raw >= lo) & (raw <= hi)
        w = torch.where(inside, raw, torch.zeros_like(raw))  # IcePop: zero weight, token kept in the mask
        oob = (~inside).float()
    empty = not bool((m > 0).any())
    nan = float("nan")
    sel = m > 0
    low = 1.0 / hi if lo is None else lo
    w_mean, w_sq = masked_mean(w, m), masked_mean(w * w, m)
    metrics = {
        "rollout_is_mean": nan if empty else float(w_mean),
        "rollout_is_std": nan if empty else float((w_sq - w_mean**2).clamp(min=0).sqrt()),
        "rollout_is_min": nan if empty else float(w[sel].min()),
        "rollout_is_max": nan if empty else float(w[sel].max()),
        "rollout_is_eff_sample_size": nan if empty or float(w_sq) == 0 else float(w_mean**2 / w_sq),
        "rollout_is_ratio_fraction_high": nan if empty else float(masked_mean((raw > hi).float(), m)),
        "rollout_is_ratio_fraction_low": nan if empty else float(masked_mean((raw < low).float(), m)),
    }
    if oob is not None:
        metrics["rollout_is_oob_ratio"] = nan if empty else float(masked_mean(oob, m))
    if rollout_is_batch_normalize:
        if rollout_is == "token":
            mean = masked_mean(w, m)
        else:  # one weight per sequence: average over the sequences that have tokens
            has = (m.sum(-1) > 0).float()
            mean = (masked_mean(w, m, dim=-1) * has).sum() / has.sum().clamp(min=1.0)
        factor = float(mean)
        if factor > 1e-8:
            w = w / factor
        else:
            factor = 1.0
        metrics["rollout_is_batch_norm_factor"] = nan if empty else factor
    return w, metrics


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
        veto_threshold: when given (e.g. 1e-4), also drop every sequence in which any token ratio is below it -
            *slime's* veto rule (:func:`helpers.rl.rejection.slime_veto_mask`). veRL's current "veto" is a different
            rule, ``seq_max_k2`` / ``seq_max_k3`` rejection (:func:`helpers.rl.rejection.rollout_rs_mask`).

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

    Returns floats (d_t = logp_train - logp_rollout unclamped; log r_t = clamp(d_t, +-LOG_RATIO_BOUND),
    r_t = exp(log r_t); w_t = min(r_t, threshold)). veRL's (``compute_offpolicy_metrics`` of
    ``verl/trainer/ppo/rollout_corr_helper.py``):

    * ``kl``: mean_t (logp_rollout - logp_train) - the k1 estimator of KL(pi_rollout || pi_train) on rollout
      samples, from the *unclamped* d_t (the bound keeps exp finite; k1 has no exp, so clamping would only bias it);
    * ``k3_kl``: mean_t (r_t - 1 - log r_t) - the non-negative k3 estimator of the same KL;
    * ``training_ppl`` / ``rollout_ppl``: mean over sequences of exp(-mean_t logp) under each policy, and
      ``training_log_ppl`` / ``rollout_log_ppl``: mean over sequences of -mean_t logp;
    * ``log_ppl_diff``: mean over sequences of (mean_t logp_rollout - mean_t logp_train), and ``ppl_ratio``: mean
      over sequences of its exp (training / rollout ppl);
    * ``chi2_token``: E_t[r_t^2] - 1, and ``chi2_seq``: E_seq[exp(2 clamp(sum_t log r_t))] - 1 - the chi-square
      divergence per token and per sequence (the variance factor of token / sequence IS), on rollout samples;

    NeMo-RL's (``nemo_rl/algorithms/loss/loss_functions.py``, token means):

    * ``token_mult_prob_error``: mean_t exp(|log r_t|) (1.0 = identical policies);
    * ``gen_kl_error``: mean_t (r_t - 1 - log r_t) - NeMo-RL's k3 form of KL(P_gen || P_train) (equal to ``k3_kl``);
    * ``policy_kl_error``: mean_t (1 / r_t - 1 + log r_t) - the k3 form with the roles swapped (KL(P_train || P_gen)
      in NeMo-RL's naming; computed on the same rollout samples, as NeMo-RL does);

    and the truncated weights' ``is_weight_mean`` / ``_std`` / ``_min`` / ``_max``, ``fraction_truncated``
    (tokens with r_t > threshold) and ``ess`` ((mean w)^2 / mean(w^2), in (0, 1]).

    An all-masked (or empty) batch returns NaN for every metric. All values are computed as tensors and brought to
    the host in one transfer.
    """
    c = _check_positive("threshold", threshold)
    m = _check_logps(mask, logp_train=logp_train, logp_rollout=logp_rollout)
    masked = m > 0
    if not bool(masked.any()):
        return {k: float("nan") for k in MISMATCH_KEYS}
    lt, lro = logp_train.detach().float(), logp_rollout.detach().float()
    d = torch.where(masked, lt - lro, torch.zeros_like(lt))  # unclamped log-ratio, 0 on padding
    lr = log_ratio(lt, lro, m)
    r = torch.exp(lr)
    w = r.clamp(max=c)
    has = m.sum(-1) > 0  # sequences with at least one response token
    mean_lt = masked_mean(lt, m, dim=-1)[has]
    mean_lro = masked_mean(lro, m, dim=-1)[has]
    seq_lr = masked_sum(d, m)[has].clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)  # log of the sequence ratio
    w_mean = masked_mean(w, m)
    w_sq = masked_mean(w * w, m)
    vals = {
        "kl": masked_mean(-d, m),  # k1: E[log pi_rollout - log pi_train], unclamped
        "k3_kl": masked_mean(r - 1.0 - lr, m),  # k3 = r - 1 - log r >= 0
        "token_mult_prob_error": masked_mean(torch.exp(lr.abs()), m),
        "gen_kl_error": masked_mean(r - 1.0 - lr, m),  # NeMo-RL: k3 with log_ratio = logp_train - logp_gen
        "policy_kl_error": masked_mean(torch.exp(-lr) - 1.0 + lr, m),  # NeMo-RL: k3 with the roles swapped
        "training_ppl": torch.exp(-mean_lt).mean(),
        "rollout_ppl": torch.exp(-mean_lro).mean(),
        "training_log_ppl": (-mean_lt).mean(),
        "rollout_log_ppl": (-mean_lro).mean(),
        "log_ppl_diff": (mean_lro - mean_lt).mean(),
        "ppl_ratio": torch.exp(mean_lro - mean_lt).mean(),
        "chi2_token": masked_mean(r * r, m) - 1.0,  # chi2(pi_train || pi_rollout) = E_rollout[r^2] - 1
        "chi2_seq": torch.exp(2.0 * seq_lr).mean() - 1.0,  # E_rollout[(prod_t r_t)^2] - 1
        "is_weight_mean": w_mean,
        "is_weight_std": (w_sq - w_mean**2).clamp(min=0).sqrt(),
        "is_weight_min": w[masked].min(),
        "is_weight_max": w[masked].max(),
        "fraction_truncated": masked_mean((r > c).float(), m),
        "ess": w_mean**2 / w_sq,  # ESS/N = (sum w)^2 / (N sum w^2)
    }
    host = torch.stack([v.float().reshape(()) for v in vals.values()]).tolist()  # one device -> host copy
    return dict(zip(vals, host))


MISMATCH_KEYS = ("kl", "k3_kl", "token_mult_prob_error", "gen_kl_error", "policy_kl_error", "training_ppl",
                 "rollout_ppl", "training_log_ppl", "rollout_log_ppl", "log_ppl_diff", "ppl_ratio", "chi2_token",
                 "chi2_seq", "is_weight_mean", "is_weight_std", "is_weight_min", "is_weight_max", "fraction_truncated",
                 "ess")


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
    eps = _check_positive("clip", clip)
    m = _check_logps(mask, logp=logp, logp_old=logp_old)
    advantages = check_advantages(advantages, logp)
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
