"""The GRPO / PPO policy loss: the clipped surrogate per token and veRL's loss aggregation modes.

Inputs share the conventions of :mod:`helpers.rl.common`: [batch, seq] tensors of the *sampled*
tokens' log-probs and a 0/1 ``mask`` (1 = response token that enters the loss; padding and tokens rejected by
:func:`~helpers.rl.rollout_correction.rejection_mask` are 0). Masked positions may hold anything, NaN included:
they are replaced before any arithmetic, so neither the loss nor its gradient sees them.

The loss path is free of host synchronisations: shapes are checked (metadata, no sync), values are not - the
trainer checks its inputs once per step, and metrics come back as 0-dim tensors to be gathered once per step.

Clipped surrogate (PPO, Schulman et al. 2017; asymmetric "clip-higher" of DAPO, arXiv 2503.14476; dual clip,
Ye et al. 2020, arXiv 1912.09729; veRL ``core_algos.compute_policy_loss``), with ``rho_t = exp(logp - logp_old)``:

    l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - clip_low, 1 + clip_high))
    l_t = min(l_t, -A_t clip_c)          for A_t < 0 when ``clip_c`` is given (dual clip, c > 1)
    l_t = w_t * l_t                      with w_t the detached rollout-correction weight (TIS), if given

Aggregation (:func:`agg_loss`, veRL ``agg_loss``), with ``n_t`` the tokens of sequence ``i``, ``B'`` the
sequences with at least one token, ``T`` the padded length ``mask.shape[-1]``:

* ``token-mean``:              sum_{i,t} l / sum_{i,t} m            (DAPO; every token weighs the same)
* ``seq-mean-token-sum``:      (1 / B) sum_i sum_t l                 (long answers weigh more)
* ``seq-mean-token-mean``:     (1 / B') sum_i (sum_t l / n_t)        (the original GRPO; every sequence the same)
* ``seq-mean-token-sum-norm``: (1 / B) sum_i sum_t l / T             (Dr.GRPO: a constant normaliser)
"""

from __future__ import annotations

import torch

from helpers.rl.common import LOG_RATIO_BOUND, masked_mean

__all__ = ["AGG_MODES", "CLIP", "CLIP_HIGH_DAPO", "clipped_surrogate", "agg_loss"]

AGG_MODES = frozenset({"token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"})
CLIP = 0.2  # PPO's clip range epsilon (veRL's clip_ratio default; DAPO's clip_ratio_low)
CLIP_HIGH_DAPO = 0.28  # DAPO's clip_ratio_high: more room for low-probability tokens to grow


def _check_shapes(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a [batch, seq] tensor, got {got}")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != mask.shape:
            raise ValueError(f"{name} must have the mask's shape {tuple(mask.shape)}, got {tuple(t.shape)}")


def clipped_surrogate(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = CLIP,
    clip_high: float | None = None,
    clip_c: float | None = None,
    rollout_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate loss (module docstring), 0 on masked positions.

    Args:
        logp: [batch, seq] log-probs under the policy being optimised (carries the gradient).
        logp_old: [batch, seq] the trainer's log-probs at rollout time (the proximal policy; detached here).
        advantages: [batch, seq] per-token, or [batch] per-sequence (broadcast to its tokens); detached.
        mask: [batch, seq] 0/1 loss mask.
        clip_low: epsilon below 1 (> 0). clip_high: epsilon above 1 (None: ``clip_low``; DAPO: 0.28).
        clip_c: dual-clip constant c > 1 bounding the loss of negative-advantage tokens by ``-A c``
            (veRL's ``clip_ratio_c``: 3.0 default, 10.0 in the DAPO recipe), or None.
        rollout_weights: [batch, seq] detached TIS weights, or None.

    Returns:
        ``(loss_mat, metrics)``: loss_mat [batch, seq] (float32, 0 where mask is 0), and 0-dim detached tensors
        ``clipfrac`` (tokens where the clip bound was the active branch), ``clipfrac_dual`` (tokens where the dual
        clip bound was active) and ``ppo_kl`` (mean of logp_old - logp, the k1 KL to the proximal policy).
    """
    if advantages.dim() == 1 and isinstance(mask, torch.Tensor) and mask.dim() == 2 \
            and advantages.shape[0] == mask.shape[0]:
        advantages = advantages[:, None].expand(mask.shape)  # one advantage per sequence, broadcast to its tokens
    _check_shapes(mask, logp=logp, logp_old=logp_old, advantages=advantages)
    if rollout_weights is not None:
        _check_shapes(mask, rollout_weights=rollout_weights)
    lo = float(clip_low)
    hi = lo if clip_high is None else float(clip_high)
    if not lo > 0 or not hi > 0:
        raise ValueError(f"clip_low and clip_high must be > 0, got clip_low={clip_low!r}, clip_high={clip_high!r}")
    if clip_c is not None and not float(clip_c) > 1:
        raise ValueError(f"clip_c must be > 1 (dual clip), got {clip_c!r}")
    keep = mask > 0
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    adv = torch.where(keep, advantages.detach().float(), zero)
    diff = torch.where(keep, logp.float() - logp_old.detach().float(), zero)  # log rho, exactly 0 on padding
    rho = torch.exp(diff.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    unclipped = -adv * rho
    clipped = -adv * rho.clamp(1.0 - lo, 1.0 + hi)
    loss = torch.maximum(unclipped, clipped)
    metrics = {"clipfrac": masked_mean((clipped > unclipped).float(), mask.float()).detach()}
    if clip_c is not None:
        bound = -adv * float(clip_c)
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        metrics["clipfrac_dual"] = masked_mean(dual.float(), mask.float()).detach()
    else:
        metrics["clipfrac_dual"] = zero.clone()
    if rollout_weights is not None:
        loss = loss * torch.where(keep, rollout_weights.detach().float(), zero)
    metrics["ppo_kl"] = masked_mean(-diff.detach(), mask.float())
    return torch.where(keep, loss, zero), metrics


def agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", *,
             loss_scale_factor: float | None = None) -> torch.Tensor:
    """Aggregate a [batch, seq] per-token loss into a scalar with one of veRL's modes (module docstring).

    Args:
        loss_mat: [batch, seq] per-token loss (masked positions are ignored whatever they hold).
        mask: [batch, seq] 0/1 loss mask.
        mode: one of :data:`AGG_MODES`.
        loss_scale_factor: the constant divisor of ``seq-mean-token-sum-norm`` (default ``mask.shape[-1]``; keep
            it fixed across steps, as Dr.GRPO intends). Only that mode accepts it.

    Returns:
        A 0-dim tensor (carries ``loss_mat``'s gradient). An all-masked batch gives 0.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"mode must be one of {sorted(AGG_MODES)}, got {mode!r}")
    _check_shapes(mask, loss_mat=loss_mat)
    if loss_scale_factor is not None and mode != "seq-mean-token-sum-norm":
        raise ValueError(f"loss_scale_factor applies to 'seq-mean-token-sum-norm' only, got mode={mode!r}")
    m = mask.to(loss_mat.dtype)
    lm = torch.where(mask > 0, loss_mat, torch.zeros_like(loss_mat))
    if mode == "token-mean":
        return masked_mean(lm, m)
    seq_sum = (lm * m).sum(-1)  # [batch]
    if mode == "seq-mean-token-sum":
        return seq_sum.mean()
    if mode == "seq-mean-token-sum-norm":
        t = float(mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        if not t > 0:
            raise ValueError(f"loss_scale_factor must be > 0, got {loss_scale_factor!r}")
        return seq_sum.mean() / t
    n_tok = m.sum(-1)
    has = (n_tok > 0).to(loss_mat.dtype)  # sequences with no token (all rejected) leave the mean
    return (seq_sum / n_tok.clamp(min=1.0) * has).sum() / has.sum().clamp(min=1.0)
