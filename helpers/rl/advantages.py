"""GRPO outcome advantages: group-normalised (GRPO) and mean-centred only (Dr.GRPO).

A prompt is sampled ``group_size`` times; each completion gets one scalar reward ``r_i`` (1 for an exact answer
here). The advantage of completion ``i`` in its group ``g`` (veRL ``core_algos.compute_grpo_outcome_advantage``;
GRPO: Shao et al. 2024, arXiv 2402.03300; Dr.GRPO: Liu et al. 2025, arXiv 2503.20783):

* GRPO:    ``A_i = (r_i - mean_g) / (std_g + GRPO_EPS)`` with the *unbiased* standard deviation (divisor n - 1);
* Dr.GRPO: ``A_i = r_i - mean_g`` (``norm_by_std=False``): no division, so groups whose rewards barely differ are
  not blown up, and the per-question scale bias of the std normalisation is gone.

A group of one has no baseline: veRL takes mean 0 and std 1 there, and so does this module. A group whose
rewards are all equal gets advantage 0 for every member (it carries no learning signal).
"""

from __future__ import annotations

import torch

__all__ = ["GRPO_EPS", "grpo_advantages"]

# veRL's epsilon under the group std: keeps A finite for an all-equal group (std 0 -> A = 0 / 1e-6 = 0).
GRPO_EPS = 1e-6


def grpo_advantages(rewards: torch.Tensor, group_size: int, *, norm_by_std: bool = True,
                    eps: float = GRPO_EPS) -> torch.Tensor:
    """Per-completion advantages from outcome rewards, groups laid out consecutively.

    Args:
        rewards: [B] float, ``B = n_groups * group_size``; rows ``g * group_size ... (g + 1) * group_size - 1``
            are the completions of prompt ``g``.
        group_size: completions per prompt (veRL's ``rollout.n``), >= 1.
        norm_by_std: True for GRPO (divide by the unbiased group std + ``eps``), False for Dr.GRPO (veRL's
            ``norm_adv_by_std_in_grpo``).
        eps: added to the std (``GRPO_EPS``), > 0.

    Returns:
        [B] float32 advantages, one per completion; broadcast to the response tokens with ``adv[:, None]``.
        No host synchronisation (pure tensor ops).
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        got = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a 1-D tensor [B], got {got}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(f"rewards length {rewards.shape[0]} must be a multiple of group_size={group_size}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    r = rewards.float().view(-1, group_size)  # [n_groups, group_size]
    if group_size == 1:
        mean, std = torch.zeros_like(r), torch.ones_like(r)  # veRL: a single sample is its own group, no baseline
    else:
        mean = r.mean(-1, keepdim=True)
        std = r.std(-1, keepdim=True, unbiased=True)
    adv = (r - mean) / (std + eps) if norm_by_std else r - mean
    return adv.reshape(-1)
