"""Rejection sampling for rollout correction: drop tokens or whole sequences from the loss mask.

A rejected token leaves the loss *and its denominator* (unlike IcePop, :func:`~helpers.rl.rollout_correction.
rollout_is_weights`, which zeroes a weight and keeps the token in the denominator). Three families, each under its
source's name:

* **veRL's divergence rejection** (:func:`rollout_rs_mask`; ``rollout_rs`` of ``RolloutCorrectionConfig``, veRL
  ``verl/trainer/ppo/rollout_corr_helper.py`` ``compute_rollout_rejection_mask``, docs ``docs/algo/rollout_corr.md``).
  Per token, with ``log r = logp_train - logp_rollout`` clamped to +-``LOG_RATIO_BOUND``:

      k1 = -log r                  (log pi_rollout / pi_train; bounds "lower_upper" on exp(k1), one value U = [1/U, U])
      k2 = 0.5 (log r)^2           (upper bound only)
      k3 = r - 1 - log r           (upper bound only; >= 0)

  aggregated as ``token_k*`` (each token alone), ``seq_sum_k*``, ``seq_mean_k*`` (over the sequence's tokens, the
  whole sequence kept or dropped) or ``seq_max_k2`` / ``seq_max_k3``. Several options may be chained with commas
  (``"token_k1,seq_mean_k3"``): a token survives only if every option keeps it. veRL's presets: Seq-MIS =
  ``seq_sum_k1`` "0.5_2.0" (with sequence IS, C = 2); Geo-RS = ``seq_mean_k1`` "0.999_1.001"; K3-RS = ``seq_mean_k3``
  0.01. Since veRL PR #4544 its former "veto" is ``seq_max_k2`` / ``seq_max_k3`` (a sequence whose worst token is too
  far off is dropped).
* **slime's veto** (:func:`slime_veto_mask`, THUDM/slime): drop a sequence if *any* token ratio r_t is below a
  threshold (1e-4: a token the trainer considers near-impossible marks the sample as broken).
* **NeMo-RL's per-sequence error mask** (:func:`seq_logprob_error_mask`; ``seq_logprob_error_threshold`` of
  ``nemo_rl/algorithms/grpo.py``): drop a sequence whose mean ``exp|logp_gen - logp_train|`` (its own
  ``token_mult_prob_error``) exceeds a threshold (e.g. 1.5).

Every function returns ``(kept, metrics)``: ``kept`` [batch, seq] float32, the input mask with rejected tokens set to
0, and bare-named float metrics (the caller adds ``"rollout_corr/"``).
"""

from __future__ import annotations

import math

import torch

from helpers.rl.common import LOG_RATIO_BOUND, check_logps, check_positive, masked_mean, masked_sum

__all__ = ["RS_OPTIONS", "parse_rs_thresholds", "rollout_rs_mask", "slime_veto_mask", "seq_logprob_error_mask"]

RS_OPTIONS = frozenset({"token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
                        "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3"})


def _split_options(rollout_rs: str) -> list[str]:
    if not isinstance(rollout_rs, str) or not rollout_rs.strip():
        raise ValueError(f"rollout_rs must be a non-empty string of options from {sorted(RS_OPTIONS)} "
                         f"(comma separated), got {rollout_rs!r}")
    opts: list[str] = []
    for o in (p.strip() for p in rollout_rs.split(",")):
        if o not in RS_OPTIONS:
            raise ValueError(f"rollout_rs option {o!r} is not one of {sorted(RS_OPTIONS)} (got rollout_rs="
                             f"{rollout_rs!r}; veRL's old level names 'token' / 'sequence' / 'geometric' are now "
                             "'token_k1' / 'seq_sum_k1' / 'seq_mean_k1')")
        if o not in opts:
            opts.append(o)
    return opts


def parse_rs_thresholds(rollout_rs: str, rollout_rs_threshold: str | float | None
                        ) -> dict[str, tuple[float | None, float]]:
    """Parse veRL's ``rollout_rs_threshold`` for each option of ``rollout_rs``.

    One entry shared by every option, or one per option (comma separated). A ``*_k1`` entry is ``"lower_upper"``
    (ratio bounds) or one value U meaning [1/U, U]; a k2 / k3 entry is one upper bound. Returns
    ``{option: (lower or None, upper)}``.
    """
    opts = _split_options(rollout_rs)
    if rollout_rs_threshold is None or isinstance(rollout_rs_threshold, bool):
        raise ValueError(f"rollout_rs_threshold must be given with rollout_rs={rollout_rs!r}, got "
                         f"{rollout_rs_threshold!r}")
    if isinstance(rollout_rs_threshold, (int, float)):
        specs = [str(float(rollout_rs_threshold))]
    elif isinstance(rollout_rs_threshold, str):
        specs = [p.strip() for p in rollout_rs_threshold.split(",") if p.strip()]
    else:
        raise ValueError(f"rollout_rs_threshold must be a number or a string, got {type(rollout_rs_threshold).__name__}")
    if len(specs) not in (1, len(opts)):
        raise ValueError(f"rollout_rs_threshold must hold one entry or one per option ({len(opts)} for "
                         f"rollout_rs={rollout_rs!r}), got {rollout_rs_threshold!r}")
    specs = specs * len(opts) if len(specs) == 1 else specs
    out: dict[str, tuple[float | None, float]] = {}
    for o, s in zip(opts, specs):
        name = f"rollout_rs_threshold for {o}"
        if o.endswith("k1"):
            if "_" in s:
                lo_s, hi_s = s.split("_", 1)
                lo, hi = check_positive(name + " (lower)", lo_s), check_positive(name + " (upper)", hi_s)
            else:
                hi = check_positive(name, s)
                lo = 1.0 / hi
            if lo > hi:
                raise ValueError(f"{name} must have lower <= upper, got {s!r}")
            out[o] = (lo, hi)
        else:
            if "_" in s:
                raise ValueError(f"{name} must be one upper bound (k2 / k3 are >= 0), got {s!r}")
            out[o] = (None, check_positive(name, s))
    return out


def _seq_max(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Max over each row's unmasked entries; a row with none gives 0. [batch]."""
    v = torch.where(m > 0, x, torch.full_like(x, -math.inf)).max(-1).values
    return torch.where(torch.isinf(v), torch.zeros_like(v), v)


@torch.no_grad()
def rollout_rs_mask(
    logp_train: torch.Tensor,
    logp_rollout: torch.Tensor,
    mask: torch.Tensor,
    rollout_rs: str,
    rollout_rs_threshold: str | float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """veRL's divergence-based rejection (module docstring): keep what every option of ``rollout_rs`` accepts.

    Args:
        logp_train: [batch, seq] log-probs of the sampled tokens under the trainer (veRL's ``old_log_probs``).
        logp_rollout: [batch, seq] the same under the rollout engine (``rollout_log_probs``).
        mask: [batch, seq] bool or 0/1 (``response_mask``); padding may hold NaN.
        rollout_rs: e.g. ``"seq_mean_k3"`` or ``"token_k1,seq_max_k3"``.
        rollout_rs_threshold: see :func:`parse_rs_thresholds` (e.g. ``"0.999_1.001"``, ``0.01``).

    Returns:
        ``(kept, metrics)``: kept [batch, seq] float32 (subset of ``mask``); metrics
        ``rollout_rs_<option>_mean`` (the statistic's token mean), ``rollout_rs_<option>_masked_fraction`` (tokens),
        ``rollout_rs_<option>_seq_masked_fraction`` (sequences), and ``rollout_rs_masked_fraction`` /
        ``rollout_rs_seq_masked_fraction`` for all options together (sequences with at least one rejected token,
        over sequences with at least one token). NaN for an all-masked batch.
    """
    specs = parse_rs_thresholds(rollout_rs, rollout_rs_threshold)
    m = check_logps(mask, logp_train=logp_train, logp_rollout=logp_rollout)
    zero = torch.zeros_like(m)
    lr = torch.where(m > 0, logp_train.detach().float() - logp_rollout.detach().float(), zero)
    lr = lr.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)  # log r, 0 on padding
    stats = {"k1": -lr, "k2": 0.5 * lr * lr, "k3": torch.exp(lr) - 1.0 - lr}
    has = m.sum(-1) > 0
    empty = not bool(has.any())
    nan = float("nan")
    keep_all = torch.ones_like(m, dtype=torch.bool)
    metrics: dict[str, float] = {}
    for opt, (lo, hi) in specs.items():
        agg, k = opt.rsplit("_", 1)
        s = stats[k]
        if agg == "token":
            stat = s
        elif agg == "seq_sum":
            stat = masked_sum(s, m)[:, None].expand_as(s)
        elif agg == "seq_mean":
            stat = masked_mean(s, m, dim=-1)[:, None].expand_as(s)
        else:  # seq_max
            stat = _seq_max(s, m)[:, None].expand_as(s)
        if k == "k1":  # veRL: k1 in [log lower, log upper]
            keep = (stat >= math.log(lo)) & (stat <= math.log(hi))
        else:
            keep = stat <= hi
        keep = keep | (m == 0)
        keep_all &= keep
        rej_tok = (~keep) & (m > 0)
        metrics[f"rollout_rs_{opt}_mean"] = nan if empty else float(masked_mean(stat, m))
        metrics[f"rollout_rs_{opt}_masked_fraction"] = nan if empty else float(masked_mean(rej_tok.float(), m))
        metrics[f"rollout_rs_{opt}_seq_masked_fraction"] = \
            nan if empty else float((rej_tok.any(-1) & has).float().sum() / has.sum())
    kept = keep_all.float() * m
    rej = (m - kept) > 0
    metrics["rollout_rs_masked_fraction"] = nan if empty else float(masked_mean(rej.float(), m))
    metrics["rollout_rs_seq_masked_fraction"] = nan if empty else float((rej.any(-1) & has).float().sum() / has.sum())
    return kept, metrics


@torch.no_grad()
def slime_veto_mask(
    logp_train: torch.Tensor,
    logp_rollout: torch.Tensor,
    mask: torch.Tensor,
    threshold: float = 1e-4,
) -> tuple[torch.Tensor, dict[str, float]]:
    """slime's veto: drop every sequence in which any token ratio ``r_t = pi_train / pi_rollout`` is below
    ``threshold`` (compared in log space, on the unclamped log-ratio).

    Args:
        logp_train, logp_rollout, mask: as in :func:`rollout_rs_mask`.
        threshold: the ratio below which one token vetoes its sequence (> 0; slime uses 1e-4).

    Returns:
        ``(kept, {"veto_seq_fraction": ...})``: kept [batch, seq] float32; the fraction of sequences (with at least
        one token) that were vetoed, NaN for an all-masked batch.
    """
    v = check_positive("threshold", threshold)
    m = check_logps(mask, logp_train=logp_train, logp_rollout=logp_rollout)
    lr = torch.where(m > 0, logp_train.detach().float() - logp_rollout.detach().float(), torch.zeros_like(m))
    vetoed = ((lr < math.log(v)) & (m > 0)).any(-1, keepdim=True)  # [batch, 1]
    has = m.sum(-1) > 0
    frac = float("nan") if not bool(has.any()) else float((vetoed[:, 0] & has).float().sum() / has.sum())
    return (~vetoed).float() * m, {"veto_seq_fraction": frac}


@torch.no_grad()
def seq_logprob_error_mask(
    logp_train: torch.Tensor,
    logp_rollout: torch.Tensor,
    mask: torch.Tensor,
    threshold: float = 1.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """NeMo-RL's per-sequence error mask (``seq_logprob_error_threshold``): drop a sequence whose mean over its
    tokens of ``exp|logp_rollout - logp_train|`` (|d| clamped to ``LOG_RATIO_BOUND``) exceeds ``threshold``.

    Args:
        logp_train, logp_rollout, mask: as in :func:`rollout_rs_mask`.
        threshold: > 1 to keep anything (1.0 = identical policies); NeMo-RL's example is 1.5.

    Returns:
        ``(kept, metrics)``: kept [batch, seq] float32; ``num_masked_seqs_by_logprob_error`` (NeMo-RL's name, a count)
        and ``seq_logprob_error_max`` (the largest per-sequence error; NaN for an all-masked batch).
    """
    c = check_positive("threshold", threshold)
    m = check_logps(mask, logp_train=logp_train, logp_rollout=logp_rollout)
    d = torch.where(m > 0, logp_train.detach().float() - logp_rollout.detach().float(), torch.zeros_like(m))
    err = masked_mean(torch.exp(d.abs().clamp(max=LOG_RATIO_BOUND)), m, dim=-1)  # [batch]
    has = m.sum(-1) > 0
    drop = (err > c) & has
    err_max = float(err[has].max()) if bool(has.any()) else float("nan")
    return (~drop).float()[:, None] * m, {"num_masked_seqs_by_logprob_error": float(drop.sum()),
                                          "seq_logprob_error_max": err_max}
