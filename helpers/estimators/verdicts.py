"""The decision rules of notebook 03: statistics of the estimator study and the learning toy in, a verdict and its
reason out (the notebook only calls and explains).

Every ``*_verdict`` returns ``(verdict, reason)``, ``verdict`` one of ``"reproduced"``, ``"partly"``,
``"not reproduced"``, ``"not testable here"``; :func:`study_verdicts` and :func:`learning_verdicts` return the
notebook's list of ``{"claim", "verdict", "reason"}``. Thresholds are named constants with their reason. The study
table is :func:`helpers.estimators.markov.estimator_study`'s (columns ``perturbation, scale, T, estimator, rel_bias,
rel_bias_noise, rel_var, kept_fraction, ...``).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

__all__ = ["NOISE_MULT", "BIAS_APPEARS", "BIAS_GROWS", "VAR_GROWTH", "TRAP_DROP", "INVARIANT_BAND", "MIN_KEPT", "VAR_CHANGE",
           "BYPASS_BIAS_MULT", "GAP_REPRODUCED", "GAP_PARTLY", "at", "token_is_bias_verdict", "seq_is_verdict",
           "seq_mis_trade_verdict", "token_rules_bias_verdict", "length_trap_verdict", "batch_norm_verdict",
           "bypass_ppo_clip_verdict", "floor_correction_verdict", "study_verdicts", "learning_verdicts"]

NOISE_MULT = 3.0
"""A relative bias counts as real when it exceeds this many Monte-Carlo standard errors (``rel_bias_noise``)."""
BIAS_APPEARS = 3.0
"""Token IS's bias "appears" at T = 2 when it is this many times its T = 1 value (and above the noise)."""
BIAS_GROWS = 1.5
"""... and "keeps growing" when the largest T's bias is this many times the T = 2 value."""
VAR_GROWTH = 10.0
"""Sequence IS's variance "grows geometrically" when it rises by at least this factor over the T sweep."""
TRAP_DROP = 0.5
"""The length trap: a rejection rule whose kept fraction at the largest T is below this share of its smallest-T value."""
INVARIANT_BAND = 0.2
"""A rule is length-invariant when its kept fraction moves by at most this much (absolute) over the T sweep ..."""
MIN_KEPT = 0.5
"""... and keeps at least this fraction at both ends (one that rejects almost everything escapes no trap)."""
VAR_CHANGE = 0.05
"""Batch normalisation "reduces" variance when it lowers it by more than this relative amount."""
BYPASS_BIAS_MULT = 2.0
"""Bypass PPO-clip corrects "like token IS" when its bias stays within this factor of token TIS's (plus noise)."""
GAP_REPRODUCED, GAP_PARTLY = 0.5, 0.2
"""A correction closes the learning gap (reproduced) at >= 50 % of it, partly at >= 20 %."""


def at(df: pd.DataFrame, kind: str, scale: float, T: int, est: str, col: str) -> float:
    """One cell of the study table: column ``col`` of estimator ``est`` at (``kind``, ``scale``, ``T``)."""
    sel = df[(df.perturbation == kind) & (df.scale == scale) & (df["T"] == T) & (df.estimator == est)]
    if len(sel) != 1:
        raise ValueError(f"expected one row for ({kind!r}, {scale!r}, T={T}, {est!r}), got {len(sel)}")
    return float(sel[col].iloc[0])


def _lengths(df: pd.DataFrame) -> tuple[int, int, int]:
    Ts = sorted(int(t) for t in df["T"].unique())
    if len(Ts) < 2:
        raise ValueError(f"the study needs at least two lengths T, got {Ts}")
    return Ts[0], Ts[1], Ts[-1]


def token_is_bias_verdict(bias: Sequence[float], noise: float, lengths: Sequence[int]) -> tuple[str, str]:
    """Liu et al.: token-level IS is biased, the bias growing like O(T^2 x mismatch). ``bias``: token TIS's relative
    bias at the smallest, second and largest T (``lengths``); ``noise``: its Monte-Carlo floor at the smallest T."""
    b0, b1, b2 = bias
    t0, t1, t2 = lengths
    appears = b1 > max(BIAS_APPEARS * b0, NOISE_MULT * noise)
    grows = b2 > BIAS_GROWS * b1
    verdict = "reproduced" if appears and grows else ("partly" if appears else "not reproduced")
    return verdict, (f"relative bias {b0:.3f} at T={t0} (noise floor {noise:.3f}), {b1:.3f} at T={t1}, {b2:.3f} at "
                     f"T={t2}: the bias {'appears' if appears else 'does not appear'} once T > 1 but "
                     f"{'keeps growing' if grows else 'stays flat from T=' + str(t1) + ' on'} (relative to the "
                     "gradient; O(T^2) bounds the absolute bias and this mixing chain sits inside it)")


def seq_is_verdict(bias: float, noise: float, var: Sequence[float], lengths: Sequence[int]) -> tuple[str, str]:
    """Sequence IS is unbiased, with variance growing geometrically in T. ``bias`` / ``noise`` at the largest T;
    ``var``: its relative variance at the smallest and largest T."""
    unbiased = bias < NOISE_MULT * noise
    v0, v1 = var
    verdict = "reproduced" if unbiased and v1 > VAR_GROWTH * v0 else "partly"
    return verdict, (f"bias {bias:.3f} at T={lengths[-1]} vs noise floor {noise:.3f}; variance {v0:.1f} -> {v1:.1f} "
                     f"({v1 / v0:.0f}x) from T={lengths[0]} to T={lengths[-1]}")


def seq_mis_trade_verdict(mis: tuple[float, float], seq_is: tuple[float, float], T: int) -> tuple[str, str]:
    """Sequence masking trades bias for variance: ``mis`` and ``seq_is`` are (bias, variance) at the largest T."""
    trade = mis[1] < seq_is[1] and mis[0] > seq_is[0]
    return ("reproduced" if trade else "not reproduced",
            f"at T={T}: sequence MIS bias {mis[0]:.3f} / variance {mis[1]:.1f} vs sequence IS {seq_is[0]:.3f} / "
            f"{seq_is[1]:.1f}")


def token_rules_bias_verdict(df: pd.DataFrame, kind: str, scale: float,
                             estimators: Sequence[str] = ("token_icepop", "token_tis_bn", "bypass_ppo_clip")
                             ) -> tuple[str, str]:
    """Liu et al.'s token-level bias applies to the field's newer token-level rules (IcePop, batch-normalised
    token TIS, bypass PPO-clip): each is biased (> NOISE_MULT x noise) at the largest T."""
    t0, _, t2 = _lengths(df)
    parts, biased = [], []
    for e in estimators:
        b, n = at(df, kind, scale, t2, e, "rel_bias"), at(df, kind, scale, t2, e, "rel_bias_noise")
        biased.append(b > NOISE_MULT * n)
        parts.append(f"{e} {at(df, kind, scale, t0, e, 'rel_bias'):.3f} -> {b:.3f} (noise {n:.3f})")
    verdict = "reproduced" if all(biased) else ("partly" if any(biased) else "not reproduced")
    tt = at(df, kind, scale, t2, "token_tis", "rel_bias")
    return verdict, (f"{kind} x{scale:g}, relative bias T={t0} -> T={t2}: " + "; ".join(parts) +
                     f" (token TIS {tt:.3f} at T={t2})")


def length_trap_verdict(df: pd.DataFrame, perturbations: Sequence[tuple[str, float]], *, trap: str = "seq_mis",
                        normalised: Sequence[str] = ("geo_rs", "k3_rs")) -> tuple[str, str]:
    """veRL's rollout-correction docs (and Liu et al.'s part 3): sequence-sum rejection falls into a length trap
    (it rejects more as T grows) while length-normalised rejection (Geo-RS, K3-RS) does not.

    Per perturbation: the trap is present when ``trap``'s kept fraction at the largest T is < TRAP_DROP x its
    smallest-T value; a normalised rule is length-invariant there when its kept fraction moves by <= INVARIANT_BAND
    and stays >= MIN_KEPT at both ends (a rule that rejects almost everything at every T escapes no trap).
    Reproduced when the trap is present and both rules are invariant at every perturbation; partly when the trap
    is present somewhere and some rule is invariant somewhere; otherwise not reproduced."""
    t0, _, t2 = _lengths(df)
    trapped_any, trapped_all, inv_any, inv_all, parts = False, True, False, True, []
    for kind, scale in perturbations:
        k_t0, k_t2 = at(df, kind, scale, t0, trap, "kept_fraction"), at(df, kind, scale, t2, trap, "kept_fraction")
        trapped = k_t2 < TRAP_DROP * k_t0
        trapped_any, trapped_all = trapped_any or trapped, trapped_all and trapped
        k3 = at(df, kind, scale, t2, trap, "k3_kl")
        seg = [f"{kind} x{scale:g} (k3 KL {k3:.4f}/token): {trap} keeps {k_t0:.2f} -> {k_t2:.2f}"]
        for e in normalised:
            a, b = at(df, kind, scale, t0, e, "kept_fraction"), at(df, kind, scale, t2, e, "kept_fraction")
            inv = abs(b - a) <= INVARIANT_BAND and min(a, b) >= MIN_KEPT
            inv_any, inv_all = inv_any or inv, inv_all and inv
            seg.append(f"{e} {a:.2f} -> {b:.2f}")
        parts.append(", ".join(seg))
    verdict = ("reproduced" if trapped_all and inv_all else
               "partly" if trapped_any and inv_any else "not reproduced")
    return verdict, (f"kept fraction T={t0} -> T={t2} at veRL's preset thresholds (Geo-RS 0.999_1.001, K3-RS 0.01): "
                     + "; ".join(parts) + ". A length-normalised statistic concentrates on the per-token mismatch as T "
                     "grows, so it keeps all or nothing depending on that mismatch against its threshold")


def batch_norm_verdict(df: pd.DataFrame, kind: str, scale: float,
                       pairs: Sequence[tuple[str, str]] = (("token_tis_bn", "token_tis"), ("seq_tis_bn", "seq_tis"))
                       ) -> tuple[str, str]:
    """veRL's docs: batch-normalised IS weights (mean 1 over the batch) reduce variance. Compares the relative
    variance of each normalised estimator with its plain twin at the largest T."""
    _, _, t2 = _lengths(df)
    lower, parts = [], []
    for bn, plain in pairs:
        vb, vp = at(df, kind, scale, t2, bn, "rel_var"), at(df, kind, scale, t2, plain, "rel_var")
        bb, bp = at(df, kind, scale, t2, bn, "rel_bias"), at(df, kind, scale, t2, plain, "rel_bias")
        lower.append(vb < (1 - VAR_CHANGE) * vp)
        parts.append(f"{bn} variance {vb:.1f} vs {plain} {vp:.1f} (bias {bb:.3f} vs {bp:.3f})")
    verdict = "reproduced" if all(lower) else ("partly" if any(lower) else "not reproduced")
    return verdict, f"{kind} x{scale:g}, T={t2}: " + "; ".join(parts)


def bypass_ppo_clip_verdict(df: pd.DataFrame, perturbations: Sequence[tuple[str, float]]) -> tuple[str, str]:
    """veRL's bypass mode: with pi_old := pi_rollout the PPO ratio pi_theta / pi_rollout does the IS, so bypass
    PPO-clip corrects the mismatch like token IS. Holds at a perturbation when its bias at the smallest and the
    largest T stays within BYPASS_BIAS_MULT x token TIS's (+ NOISE_MULT x noise)."""
    t0, _, t2 = _lengths(df)
    ok, parts = [], []
    for kind, scale in perturbations:
        seg_ok = True
        for T in (t0, t2):
            b = at(df, kind, scale, T, "bypass_ppo_clip", "rel_bias")
            ref = at(df, kind, scale, T, "token_tis", "rel_bias")
            noise = at(df, kind, scale, T, "bypass_ppo_clip", "rel_bias_noise")
            seg_ok &= b <= BYPASS_BIAS_MULT * ref + NOISE_MULT * noise
        ok.append(seg_ok)
        parts.append(f"{kind} x{scale:g}: bias {at(df, kind, scale, t0, 'bypass_ppo_clip', 'rel_bias'):.3f} / "
                     f"{at(df, kind, scale, t2, 'bypass_ppo_clip', 'rel_bias'):.3f} (token TIS "
                     f"{at(df, kind, scale, t0, 'token_tis', 'rel_bias'):.3f} / "
                     f"{at(df, kind, scale, t2, 'token_tis', 'rel_bias'):.3f}), unclipped tokens "
                     f"{at(df, kind, scale, t0, 'bypass_ppo_clip', 'kept_fraction'):.2f} / "
                     f"{at(df, kind, scale, t2, 'bypass_ppo_clip', 'kept_fraction'):.2f}")
    verdict = "reproduced" if all(ok) else ("partly" if any(ok) else "not reproduced")
    return verdict, (f"at T={t0} / T={t2}: " + "; ".join(parts) + " - the mismatch itself spends PPO's clip range: "
                     "a token whose ratio pi_theta / pi_rollout is already outside [0.8, 1.2] loses its gradient when "
                     "its advantage pushes further out, and that selection correlates with the advantage's sign")


def floor_correction_verdict(gap_closed: float, cost: float, seq_best: str | None, seq_gap: float | None
                             ) -> tuple[str, str]:
    """Token TIS corrects a non-local mismatch (a sampler floor) in learning: reproduced when it closes at least
    GAP_REPRODUCED of the matched-vs-uncorrected gap, partly at GAP_PARTLY."""
    verdict = ("reproduced" if gap_closed >= GAP_REPRODUCED else
               "partly" if gap_closed >= GAP_PARTLY else "not reproduced")
    reason = (f"it closes {gap_closed:+.0%} of the floor's gap and truncates {cost:.1%} of tokens (under a floor the "
              "token ratio never exceeds C = 2)")
    if seq_best is not None and seq_gap is not None:
        reason += f"; {seq_best} closes {seq_gap:+.0%}"
    return verdict, reason


def study_verdicts(df: pd.DataFrame, perturbations: Sequence[tuple[str, float]]) -> list[dict[str, str]]:
    """The estimator-study verdicts of notebook 03. ``perturbations``: the T sweep's (kind, scale); the first is
    the headline one (the classic claims are judged there), the rejection and bypass claims at every one."""
    kind, scale = perturbations[0]
    t0, t1, t2 = _lengths(df)
    out: list[dict[str, str]] = []

    def add(claim: str, vr: tuple[str, str]) -> None:
        out.append({"claim": claim, "verdict": vr[0], "reason": vr[1]})

    add("Token-level IS is biased, and the bias grows with T like O(T^2 x mismatch) (Liu et al.)",
        token_is_bias_verdict([at(df, kind, scale, t, "token_tis", "rel_bias") for t in (t0, t1, t2)],
                              at(df, kind, scale, t0, "token_tis", "rel_bias_noise"), (t0, t1, t2)))
    add("Sequence-level IS is unbiased, with variance growing geometrically in T",
        seq_is_verdict(at(df, kind, scale, t2, "seq_is", "rel_bias"), at(df, kind, scale, t2, "seq_is",
                                                                           "rel_bias_noise"),
                       (at(df, kind, scale, t0, "seq_is", "rel_var"), at(df, kind, scale, t2, "seq_is", "rel_var")),
                       (t0, t2)))
    add("Sequence-level masking (MIS) trades bias for variance",
        seq_mis_trade_verdict((at(df, kind, scale, t2, "seq_mis", "rel_bias"), at(df, kind, scale, t2, "seq_mis",
                                                                                     "rel_var")),
                              (at(df, kind, scale, t2, "seq_is", "rel_bias"), at(df, kind, scale, t2, "seq_is",
                                                                                   "rel_var")), t2))
    names = set(df.estimator.unique())
    if {"token_icepop", "token_tis_bn", "bypass_ppo_clip"} <= names:
        add("The field's newer token-level rules (IcePop, batch-normalised token TIS, bypass PPO-clip) are still "
            "biased once T > 1 (Liu et al.'s token-level bias)", token_rules_bias_verdict(df, kind, scale))
    if {"seq_mis", "geo_rs", "k3_rs"} <= names:
        add("Sequence-sum rejection falls into a length trap; length-normalised rejection (Geo-RS, K3-RS) does not "
            "(veRL rollout-correction docs)", length_trap_verdict(df, perturbations))
    if {"token_tis_bn", "seq_tis_bn"} <= names:
        add("Batch-normalised IS weights (mean 1 over the batch) reduce variance (veRL rollout-correction docs)",
            batch_norm_verdict(df, kind, scale))
    if "bypass_ppo_clip" in names:
        add("Bypass mode: the PPO ratio pi_theta / pi_rollout does the IS, so bypass PPO-clip corrects like token IS "
            "(veRL rollout-correction docs)", bypass_ppo_clip_verdict(df, perturbations))
    return out


def learning_verdicts(summary: pd.DataFrame, summary_fp8: pd.DataFrame) -> list[dict[str, str]]:
    """The learning-toy verdicts of notebook 03 from :func:`helpers.estimators.learning.summarize`'s tables
    (one row per method; the floor runs and the FP8-only runs)."""
    gap = summary.set_index("method")
    gap8 = summary_fp8.set_index("method")
    out: list[dict[str, str]] = []
    fp8_gap = gap8.loc["matched", "final_return"] - gap8.loc["uncorrected", "final_return"]
    out.append({"claim": "FP8 rollouts without TIS lose accuracy; token TIS (C=2) recovers it (FP8-RL)",
                "verdict": "not testable here",
                "reason": f"FP8 rounding of this tabular policy moves nothing (KL {gap8.loc['uncorrected', 'kl']:.1e}; "
                          f"matched {gap8.loc['matched', 'final_return']:.3f} vs uncorrected "
                          f"{gap8.loc['uncorrected', 'final_return']:.3f}, gap {fp8_gap:+.3f}); notebook 05 tests it "
                          "with a transformer policy"})
    corrected = [m for m in gap.index if m not in ("matched", "uncorrected")]
    if "token_tis" in corrected:
        seqs = [m for m in corrected if m.startswith("seq")]
        seq_best = max(seqs, key=lambda m: gap.loc[m, "gap_closed"]) if seqs else None
        v, r = floor_correction_verdict(float(gap.loc["token_tis", "gap_closed"]),
                                        float(gap.loc["token_tis", "cost_fraction"]), seq_best,
                                        float(gap.loc[seq_best, "gap_closed"]) if seq_best else None)
        out.append({"claim": "Token TIS corrects a non-local mismatch (a sampler floor) in learning", "verdict": v,
                    "reason": r})
    return out
