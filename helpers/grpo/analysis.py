"""Notebook 05's decisions: the pre-registered metric, the family of comparisons, the verdict rules, and the
mismatch of each engine beside the levels real LLM runs report.

Fixed before the runs (the notebook's first cells repeat it):

* **primary metric** - the area under the trainer's evaluation curve: the mean of its evaluation accuracy over every
  evaluation after the start (steps ``eval_every, 2 eval_every, ...`` and the final one), per run
  (:func:`per_run_table`, column ``auc``); **secondary** - the mean of the last 3 evaluations (``final3``);
* **comparisons** (:data:`COMPARISONS`) - seed-paired differences of the primary metric, decided together under
  Holm's correction at family level ``alpha`` (:func:`decide`): a *difference* is shown when its two-sided paired t
  test is rejected; *equivalence* ("learns like") when the two one-sided tests against ``margin`` are rejected
  (TOST) - never from a non-significant difference;
* **verdict rules** (:func:`verdicts`) - how those decisions answer the report's claims.

Anchor levels (:data:`ANCHORS`), for :func:`mismatch_table`: NeMo-RL's CI gates on the per-step batch mean of
``token_mult_prob_error`` (``tests/test_suites/llm/*fp8*.sh``: FP8 rollouts median < 1.1 over steps and < 10 % of
steps above 1.1; FP8 KV cache median < 2.0) and its measured generation KL (Qwen3.5-9B FP8: mean gen_kl_error 0.0014
over the first 20 steps, 0.0018 over 586 steps; gate < 0.003).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from helpers.core.paired import holm, paired_mde, paired_t, tost

__all__ = ["PRIMARY", "SECONDARY", "MARGIN", "ALPHA", "Comparison", "COMPARISONS", "ANCHORS", "per_run_table",
           "comparisons_for", "decide", "mismatch_table", "verdicts"]

PRIMARY = "auc"
SECONDARY = "final3"
# Equivalence margin on the primary metric (absolute accuracy, averaged over the curve), fixed before the runs:
# a tenth of what the BF16 arm gains over its start in the pilot (~0.1), and below the W8A8 effect the
# re-analysis of the earlier 5-digit runs measured (-0.013).
MARGIN = 0.01
ALPHA = 0.05
FINAL_EVALS = 3

ANCHORS = {
    "tmpe_median_fp8_gate": 1.1,  # NeMo-RL: FP8 rollouts, median over steps of token_mult_prob_error
    "tmpe_steps_above_fp8_gate": 0.10,  # ... and fewer than 10 % of steps above 1.1
    "tmpe_median_kv_gate": 2.0,  # NeMo-RL: FP8 KV cache (Qwen3-8B-Base), median over steps
    "gen_kl_gate": 0.003,  # NeMo-RL Qwen3.5-9B FP8: mean gen_kl_error
    "gen_kl_measured_low": 0.0014,  # ... measured over the first 20 steps
    "gen_kl_measured_high": 0.0018,  # ... and over 586 steps
}


@dataclass(frozen=True)
class Comparison:
    """One pre-registered comparison: ``arm - reference`` on the primary metric, tested for a ``"difference"``
    (two-sided paired t) or for ``"equivalence"`` (TOST against the margin). ``hypothesis`` says what it asks."""

    arm: str
    reference: str
    kind: str
    hypothesis: str

    def __post_init__(self) -> None:
        if self.kind not in ("difference", "equivalence"):
            raise ValueError(f"kind must be 'difference' or 'equivalence', got {self.kind!r}")


def comparisons_for(fp8_engines: list[str], correction: str = "token TIS",
                    extra_corrections: tuple[str, ...] = ()) -> list[Comparison]:
    """The family for ``fp8_engines`` (engine names of :data:`helpers.grpo.experiment.ENGINES`): the BF16 +
    ``correction`` control, then per engine the drop without correction, the recovery with ``correction`` and the
    equivalence of the corrected arm to BF16; then, per engine, each of ``extra_corrections`` (arm labels such as
    "token IcePop") against no correction (difference) and against BF16 (equivalence)."""
    out = [Comparison(f"bf16 / {correction}", "bf16 / none", "equivalence",
                      "the correction alone does not change learning (no FP8 mismatch to correct)")]
    for e in fp8_engines:
        out += [
            Comparison(f"{e} / none", "bf16 / none", "difference", f"{e} rollouts without correction learn differently"),
            Comparison(f"{e} / {correction}", f"{e} / none", "difference", f"{correction} changes what {e} learns"),
            Comparison(f"{e} / {correction}", "bf16 / none", "equivalence", f"{e} + {correction} learns like BF16"),
        ]
    for e in fp8_engines:
        for c in extra_corrections:
            out += [Comparison(f"{e} / {c}", f"{e} / none", "difference", f"{c} changes what {e} learns"),
                    Comparison(f"{e} / {c}", "bf16 / none", "equivalence", f"{e} + {c} learns like BF16")]
    return out


COMPARISONS = comparisons_for(["fp8", "fp8+kv"])


def per_run_table(df: pd.DataFrame, final_evals: int = FINAL_EVALS) -> pd.DataFrame:
    """One row per (arm, seed) from :func:`helpers.grpo.experiment.run_arms`'s long table: ``auc`` (mean
    evaluation accuracy over the evaluations after step 0), ``final3`` (mean of the last ``final_evals``), ``acc0``
    (the start), and the run's mismatch: ``kl_k1`` / ``kl_k3`` (mean over steps of the per-step token means),
    ``tmpe_median`` / ``tmpe_max`` (median / max over steps of the per-step ``token_mult_prob_error``),
    ``tmpe_steps_above_1p1`` (fraction of steps above 1.1), ``frac_ratio_above_2`` (tokens with r > 2: what token
    TIS truncates), ``ppo_clipfrac`` (tokens the PPO clip acts on), ``rejected_fraction_token``."""
    need = {"arm", "seed", "step", "eval/acc", "mismatch/kl", "mismatch/token_mult_prob_error"}
    if missing := need - set(df.columns):
        raise ValueError(f"df lacks columns {sorted(missing)}: pass run_arms' table")
    rows = []
    for (arm, seed), g in df.groupby(["arm", "seed"], sort=False):
        ev = g.dropna(subset=["eval/acc"]).sort_values("step")
        curve = ev["eval/acc"].to_numpy()
        if len(curve) < 2:
            raise ValueError(f"run {arm!r} seed {seed} has {len(curve)} evaluation(s); the curve needs >= 2")
        tmpe = g["mismatch/token_mult_prob_error"]
        rows.append({
            "arm": arm, "engine": g["engine"].iloc[0], "correction": g["correction"].iloc[0], "seed": seed,
            "acc0": float(curve[0]), "auc": float(curve[1:].mean()), "final3": float(curve[-final_evals:].mean()),
            "kl_k1": float(g["mismatch/kl"].mean()), "kl_k3": float(g["mismatch/k3_kl"].mean()),
            "tmpe_median": float(tmpe.median()), "tmpe_max": float(tmpe.max()),
            "tmpe_steps_above_1p1": float((tmpe > 1.1).mean()),
            "frac_ratio_above_2": float(g["mismatch/fraction_truncated"].mean()),
            "ppo_clipfrac": float(g["actor/clipfrac"].mean()),
            "rejected_fraction_token": float(g["correction/rejected_fraction_token"].mean()),
            "reward_mean": float(g["reward/mean"].mean()),
        })
    return pd.DataFrame(rows)


def decide(runs: pd.DataFrame, comparisons: list[Comparison], metric: str = PRIMARY, *, alpha: float = ALPHA,
           margin: float = MARGIN) -> pd.DataFrame:
    """Decide every comparison on ``metric`` of ``runs`` (:func:`per_run_table`), as one Holm family.

    Per comparison (seeds that ran both arms, paired): ``diff`` (mean), ``se``, ``low`` / ``high`` (95 % paired t
    interval), ``ci90_low`` / ``ci90_high`` (the 1 - 2 alpha interval TOST reads), ``p`` (two-sided t for a
    difference, TOST for an equivalence), ``p_holm``, ``decided`` (``p_holm <= alpha``), ``mde`` (the smallest
    true difference the seeds detect with 80 % power at the strictest Holm level alpha / m, from the paired SD),
    ``n``. A comparison whose arms did not both run is dropped."""
    table = runs.pivot_table(index="seed", columns="arm", values=metric)
    rows = []
    for c in comparisons:
        if c.arm not in table.columns or c.reference not in table.columns:
            continue
        d = (table[c.arm] - table[c.reference]).dropna().to_numpy()
        t95, t90 = paired_t(d, 0.95), paired_t(d, 1 - 2 * alpha)
        p = t95.p if c.kind == "difference" else tost(d, margin)
        rows.append({"arm": c.arm, "reference": c.reference, "kind": c.kind, "hypothesis": c.hypothesis,
                     "metric": metric, "n": t95.n, "diff": t95.mean, "se": t95.se, "sd": t95.sd,
                     "low": t95.low, "high": t95.high, "ci90_low": t90.low, "ci90_high": t90.high, "p": p})
    cols = ["arm", "reference", "kind", "hypothesis", "metric", "n", "diff", "se", "sd", "low", "high", "ci90_low",
            "ci90_high", "p", "p_holm", "decided", "mde", "margin"]
    out = pd.DataFrame(rows)
    if out.empty:  # no comparison whose arms both ran (e.g. no FP8 KV arms): the columns, no rows
        return pd.DataFrame(columns=cols)
    m = len(out)
    out["p_holm"] = holm(out["p"].to_numpy())
    out["decided"] = out["p_holm"] <= alpha
    out["mde"] = [paired_mde(sd, n, alpha=alpha / m) for sd, n in zip(out["sd"], out["n"])]
    out["margin"] = np.where(out["kind"] == "equivalence", margin, np.nan)
    return out[cols]


def mismatch_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per engine (over its arms and seeds): k1 / k3 per token, median and max over steps of the per-step
    ``token_mult_prob_error``, the fraction of steps above 1.1, the fractions of tokens TIS truncates (r > 2) and
    PPO clips; beside NeMo-RL's gates (``gate``: the one that applies to the engine, pass / fail) and the
    measured LLM gen_kl (``k1_vs_llm``: k1 / 0.0018)."""
    g = runs.groupby("engine", sort=False)
    out = pd.DataFrame({
        "kl_k1": g["kl_k1"].mean(), "kl_k3": g["kl_k3"].mean(), "tmpe_median": g["tmpe_median"].median(),
        "tmpe_max": g["tmpe_max"].max(), "tmpe_steps_above_1p1": g["tmpe_steps_above_1p1"].mean(),
        "frac_ratio_above_2": g["frac_ratio_above_2"].mean(), "ppo_clipfrac": g["ppo_clipfrac"].mean(),
    }).reset_index()
    gates, passes = [], []
    for _, r in out.iterrows():
        if "kv" in r.engine:
            gates.append(f"NeMo-RL FP8 KV: median < {ANCHORS['tmpe_median_kv_gate']}")
            passes.append(bool(r.tmpe_median < ANCHORS["tmpe_median_kv_gate"]))
        else:
            gates.append(f"NeMo-RL FP8 rollouts: median < {ANCHORS['tmpe_median_fp8_gate']}, "
                         f"< {ANCHORS['tmpe_steps_above_fp8_gate']:.0%} of steps above")
            passes.append(bool(r.tmpe_median < ANCHORS["tmpe_median_fp8_gate"]
                               and r.tmpe_steps_above_1p1 < ANCHORS["tmpe_steps_above_fp8_gate"]))
    out["gate"], out["gate_pass"] = gates, passes
    out["k1_vs_llm"] = out["kl_k1"] / ANCHORS["gen_kl_measured_high"]
    return out


def _row(table: pd.DataFrame, arm: str, reference: str, kind: str) -> pd.Series | None:
    sel = table[(table.arm == arm) & (table.reference == reference) & (table.kind == kind)]
    return None if sel.empty else sel.iloc[0]


def _fmt(r: pd.Series) -> str:
    return (f"{r['diff']:+.4f} [{r.low:+.4f}, {r.high:+.4f}] (n {int(r.n)}, Holm p {r.p_holm:.3g}, "
            f"detectable {r.mde:.4f})")


def verdicts(table: pd.DataFrame, fp8_engines: list[str], mismatch: pd.DataFrame | None = None, *,
             correction: str = "token TIS", margin: float = MARGIN) -> list[tuple[str, str, str]]:
    """The report's two learning claims, decided from :func:`decide`'s ``table``: a list of
    ``(claim, verdict, reason)``.

    Per FP8 engine: *drop* - the uncorrected arm is below BF16 (difference decided, diff < 0); *recovery* - the
    corrected arm is above the uncorrected one; *like BF16* - the corrected arm is equivalent to BF16 (TOST
    decided); *differs* - a decided difference between them.

    1. "Corrected FP8 rollouts learn like BF16": reproduced when every engine is *like BF16*; not reproduced when
       any corrected arm is decided *below* BF16; partly when some engines are and the others undecided;
       inconclusive when none is decided.
    2. "Without the correction accuracy drops": reproduced when every engine shows *drop* and *recovery*; partly
       when some do (or the drop shows without a decided recovery); not reproduced when every engine's uncorrected
       arm is equivalent to BF16 in the sense that its 95 % interval excludes drops larger than the margin;
       inconclusive otherwise.

    An engine outside NeMo-RL's gate in ``mismatch`` (``gate_pass`` False) is named in the reason: its result is
    about a mismatch larger than real LLM runs allow, not the report's regime. The BF16 + correction control is
    reported with claim 2 (a decided difference there means the correction acts without FP8)."""
    outside: dict[str, str] = {}
    if mismatch is not None:
        for r in mismatch[~mismatch.gate_pass].itertuples():
            outside[r.engine] = (f" [outside NeMo-RL's gate ({r.gate}): median token_mult_prob_error "
                                 f"{r.tmpe_median:.3f}, {r.tmpe_steps_above_1p1:.0%} of steps above 1.1; k1 "
                                 f"{r.kl_k1:.2g} per token = {r.k1_vs_llm:.0f}x the FP8 LLM gen_kl]")
    like, below, undecided, why1 = [], [], [], []
    drop, recover, no_drop, why2 = [], [], [], []
    for e in fp8_engines:
        eq = _row(table, f"{e} / {correction}", "bf16 / none", "equivalence")
        if eq is not None:
            if eq.decided:
                like.append(e)
            elif eq.low > 0 or eq.high < 0:
                (below if eq.high < 0 else undecided).append(e)
            else:
                undecided.append(e)
            why1.append(f"{e} + {correction} - BF16 {_fmt(eq)}, margin +-{eq.margin:g}" + outside.get(e, ""))
        d = _row(table, f"{e} / none", "bf16 / none", "difference")
        g = _row(table, f"{e} / {correction}", f"{e} / none", "difference")
        if d is not None:
            dropped = bool(d.decided and d["diff"] < 0)
            if dropped:
                drop.append(e)
            elif d.low > -margin:  # the interval rules out a drop larger than the margin
                no_drop.append(e)
            if g is not None and g.decided and g["diff"] > 0:
                recover.append(e)
            why2.append(f"{e}: none - BF16 {_fmt(d)}"
                        + (f"; {correction} - none {_fmt(g)}" if g is not None else ""))
    n = len(why1)
    if n and len(like) == n:
        v1 = "reproduced"
    elif below:
        v1 = "not reproduced"
    elif like:
        v1 = "partly"
    else:
        v1 = "inconclusive"
    both = [e for e in drop if e in recover]
    m = len(why2)
    if m and len(both) == m:
        v2 = "reproduced"
    elif drop:
        v2 = "partly"
    elif m and len(no_drop) == m:
        v2 = "not reproduced"
    else:
        v2 = "inconclusive"
    ctrl = _row(table, f"bf16 / {correction}", "bf16 / none", "equivalence")
    if ctrl is not None:
        why2.append(f"control BF16 + {correction} - BF16 {_fmt(ctrl)}: "
                    + ("equivalent (the effect is FP8-specific)" if ctrl.decided else "not shown equivalent"))
    return [
        ("FP8 rollouts corrected by importance sampling learn like BF16 rollouts", v1, "; ".join(why1)),
        ("Without the correction accuracy drops", v2, "; ".join(why2)),
    ]
