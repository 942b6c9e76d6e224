"""The mismatch dose-response study of notebook 07: which arms it trains, and the extra run that trains them.

The arms span the measured per-token mismatch from zero to beyond the FP8 KV cache (:data:`DOSE_ARMS`): the
zero-mismatch fp32 engine, BF16, FP8 end to end, W8A8, W8A8 + FP8 KV cache, and the fp32 engine with Gaussian
logit noise at three levels, each with no correction, token TIS (C = 2) and - where the mismatch is large enough for
it to act - token IcePop (veRL's ``decoupled_token_icepop``). They train on notebook 05's harness
(:func:`helpers.grpo.experiment.run_arms`, same policy, GRPO config and paired seeds; runs shared with notebook 05
are read from its cache). The runs it adds cost about 2.5 core-hours (measured: ~75 min of wall time with 2
workers), more than the full profile allows, so they run as an extra run whose table is committed and read by the
notebook::

    python -m helpers.grpo.dose --out results/07_mismatch_dose_response_runs   # resumable (.cache/grpo_runs)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from helpers.core import runtime
from helpers.core.paired import holm, paired_mde, paired_t, tost
from helpers.grpo.analysis import ALPHA, ANCHORS, MARGIN, PRIMARY, per_run_table
from helpers.grpo.experiment import ENGINES, Arm, run_arms
from helpers.grpo.pretrain import DEFAULT_CHECKPOINT, load_policy
from helpers.grpo.trainer import GRPOConfig

__all__ = ["DOSE_ARMS", "DOSE_SEEDS", "KV_SEEDS", "REFERENCE_ARM", "GATES", "dose_arms", "gate_runs",
           "dose_response", "recovery_limits", "rollout_only", "gate_table", "with_master_eval", "MASTER", "kl_ordering", "ordering_verdicts"]

# (engine, corrections) of the grid; notebook 05's arms first (read from its cache).
DOSE_ARMS: dict[str, tuple[str, ...]] = {
    "fp32": ("none",),  # zero mismatch: the reference; corrections are no-ops there (weights 1 to ~1e-7)
    "bf16": ("none", "token_tis"),
    "fp8 e2e": ("none",),
    "fp8": ("none", "token_tis", "icepop"),
    "noise 0.6": ("none", "token_tis"),
    "noise 1": ("none", "token_tis", "icepop"),
    "noise 2": ("none", "token_tis", "icepop"),
}
DOSE_SEEDS = tuple(range(16))  # notebook 05's 16 paired seeds
# The FP8 KV cache arms: notebook 05's exploratory 4 seeds (their per-token k1 ~0.08 is 40x a real FP8 run's).
KV_ARMS: dict[str, tuple[str, ...]] = {"fp8+kv": ("none", "token_tis")}
KV_SEEDS = (0, 1, 2, 3)
REFERENCE_ARM = "fp32 / none"


@dataclass(frozen=True)
class Gate:
    """A candidate mismatch gate: a per-run statistic (column of :func:`gate_runs`), what it is, and the hand-set
    threshold an anchor uses on it (None if none does)."""

    column: str
    label: str
    anchor: float | None = None
    anchor_source: str = ""


# The candidate gates, per run (over its steps). Larger = more mismatch for every one (ESS enters as 1 - ESS).
GATES = (
    Gate("tmpe_mean", "mean over steps of token_mult_prob_error", 1.05, "a tighter FP8 gate (1.05)"),
    Gate("tmpe_median", "median over steps of token_mult_prob_error", 1.1,
         "NeMo-RL FP8 rollouts (< 1.1); FP8 KV cache < 2.0"),
    Gate("tmpe_max", "max over steps of token_mult_prob_error", 2.0, "NeMo-RL FP8 KV cache level (2.0)"),
    Gate("kl_k1", "k1 per token (mean over steps)", ANCHORS["gen_kl_gate"], "NeMo-RL gen_kl_error gate (0.003)"),
    Gate("kl_k3", "k3 per token (mean over steps)"),
    Gate("chi2_token", "chi2 per token, E[r^2] - 1 (mean over steps)"),
    Gate("ess_deficit", "1 - ESS/N of the TIS weights (mean over steps)"),
    Gate("frac_ratio_above_2", "fraction of tokens with r > 2 (mean over steps)"),
)


# The per-step columns the committed table keeps (what the notebook's decisions read, plus reward and PPO clip), at
# full precision (ESS sits within 1e-9 of 1 on the fp32 engine): the whole per-step log of 200+ runs is ~8 MB, this
# ~2 MB.
KEEP_COLUMNS = ("arm", "engine", "correction", "seed", "step", "eval/acc", "eval/acc_master", "reward/mean",
                "mismatch/kl", "mismatch/k3_kl", "mismatch/token_mult_prob_error", "mismatch/chi2_token", "mismatch/ess",
                "mismatch/fraction_truncated", "actor/clipfrac", "correction/rejected_fraction_token",
                "engine/trainer_code_mismatch")


def dose_arms(grid: dict[str, tuple[str, ...]] = DOSE_ARMS) -> list[Arm]:
    """The arms of ``grid`` (engine -> corrections), in order."""
    return [Arm(e, c) for e, cs in grid.items() for c in cs]


MASTER = "none_master"  # the correction label of the end-to-end arm re-scored on its fp32 master weights


def with_master_eval(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` plus, for every arm that logged ``eval/acc_master`` (an FP8 end-to-end trainer), a copy of its rows
    whose ``eval/acc`` is the master weights' accuracy: arm ``"<engine> / master weights"``, correction
    :data:`MASTER`. Its loss is what training in FP8 costs; the arm's own loss adds what serving in W8A8 costs."""
    if "eval/acc_master" not in df.columns:
        return df
    has = df.groupby("arm")["eval/acc_master"].transform(lambda x: x.notna().any())
    extra = df[has & (df.correction == "none")].copy()
    if extra.empty:
        return df
    extra["eval/acc"] = extra["eval/acc_master"]
    extra["arm"] = extra["engine"] + " / master weights"
    extra["correction"] = MASTER
    return pd.concat([df, extra], ignore_index=True)


def gate_runs(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`helpers.grpo.analysis.per_run_table` of run_arms' long table ``df`` plus the gate statistics it
    lacks: ``tmpe_mean``, ``chi2_token`` (mean over steps) and ``ess_deficit`` (1 - mean ESS/N)."""
    runs = per_run_table(df)
    extra = df.groupby(["arm", "seed"], sort=False).agg(
        tmpe_mean=("mismatch/token_mult_prob_error", "mean"), chi2_token=("mismatch/chi2_token", "mean"),
        ess=("mismatch/ess", "mean")).reset_index()
    extra["ess_deficit"] = 1.0 - extra.pop("ess")
    return runs.merge(extra, on=["arm", "seed"], how="left")


def _losses(runs: pd.DataFrame, reference: str, metric: str) -> pd.DataFrame:
    """``runs`` with ``loss`` = reference - arm on ``metric``, paired by seed (runs without a reference seed are
    dropped): positive = learning lost to the mismatch."""
    ref = runs[runs.arm == reference].set_index("seed")[metric]
    if ref.empty:
        raise ValueError(f"no run of the reference arm {reference!r}")
    out = runs[runs.arm != reference].copy()
    out["loss"] = out["seed"].map(ref) - out[metric]
    return out.dropna(subset=["loss"])


def dose_response(runs: pd.DataFrame, reference: str = REFERENCE_ARM, metric: str = PRIMARY, *,
                  alpha: float = ALPHA, margin: float = MARGIN) -> pd.DataFrame:
    """Per arm of ``runs`` (:func:`gate_runs`): the measured mismatch (``kl_k1``, ``tmpe_median``: means over the
    arm's seeds) and the *loss* of ``metric`` against ``reference`` on the same seeds (``loss`` mean, 95 % paired
    t interval ``low`` / ``high``), tested for a difference (two-sided t, ``p_diff``) and for equivalence (TOST
    against ``margin``, ``p_equiv``), every test of the table in one Holm family (``p_diff_holm``,
    ``p_equiv_holm``); ``verdict`` is "within margin" (equivalence decided: any loss is smaller than ``margin``;
    it takes precedence, so a decided but smaller-than-margin difference reads "within margin", ``diff_decided``
    True), "loss" (difference decided, loss > 0), "gain" or "undecided"; ``mde`` the smallest loss the seeds detect (80 % power, strictest Holm level); and
    ``recovered`` = 1 - loss / (loss of the same engine without correction)."""
    lossy = _losses(runs, reference, metric)
    rows = []
    for (arm, engine, corr), g in lossy.groupby(["arm", "engine", "correction"], sort=False):
        t = paired_t(g["loss"].to_numpy())
        rows.append({"arm": arm, "engine": engine, "correction": corr, "n": t.n, "kl_k1": g["kl_k1"].mean(),
                     "tmpe_median": g["tmpe_median"].mean(), "loss": t.mean, "low": t.low, "high": t.high,
                     "sd": t.sd, "p_diff": t.p, "p_equiv": tost(g["loss"].to_numpy(), margin)})
    out = pd.DataFrame(rows)
    m = 2 * len(out)
    adj = holm(np.r_[out["p_diff"].to_numpy(), out["p_equiv"].to_numpy()])
    out["p_diff_holm"], out["p_equiv_holm"] = adj[:len(out)], adj[len(out):]
    out["diff_decided"] = out.p_diff_holm <= alpha
    out["verdict"] = np.select(
        [out.p_equiv_holm <= alpha, out.diff_decided & (out.loss > 0), out.diff_decided & (out.loss < 0)],
        ["within margin", "loss", "gain"], "undecided")
    out["mde"] = [paired_mde(sd, n, alpha=alpha / m) for sd, n in zip(out.sd, out.n)]
    none = out[out.correction == "none"].set_index("engine")
    base = none["loss"].where(none["verdict"] == "loss")  # a recovery needs a decided loss to recover
    out["recovered"] = (1.0 - out["loss"] / out["engine"].map(base)).where(out.correction != MASTER)
    return out.sort_values(["correction", "kl_k1"]).reset_index(drop=True)


def recovery_limits(dose: pd.DataFrame, engines: Sequence[str] | None = None) -> pd.DataFrame:
    """Per correction of :func:`dose_response`'s table, ordered by measured k1: the largest k1 at which the arm is
    shown to lose less than the margin (``last_no_loss_k1``: equivalence decided), the smallest at which a loss is decided
    (``first_loss_k1``, with its engine) - where the correction stops recovering the loss - and the engines
    tested. ``engines`` restricts the table (the notebook passes the rollout-only engines: an FP8 trainer's loss
    is not the rollout mismatch's)."""
    if engines is not None:
        dose = dose[dose.engine.isin(list(engines))]
    rows = []
    for corr, g in dose.groupby("correction", sort=False):
        g = g.sort_values("kl_k1")
        ok, bad = g[g.verdict == "within margin"], g[g.verdict == "loss"]
        rows.append({"correction": corr, "engines": ", ".join(g.engine),
                     "last_no_loss_k1": ok.kl_k1.max() if len(ok) else np.nan,
                     "last_no_loss_engine": ok.engine.iloc[-1] if len(ok) else "-",
                     "first_loss_k1": bad.kl_k1.min() if len(bad) else np.nan,
                     "first_loss_engine": bad.engine.iloc[0] if len(bad) else "-"})
    return pd.DataFrame(rows)


def rollout_only(engines: Iterable[str]) -> list[str]:
    """The engines of ``engines`` whose trainer is fp32 (:data:`helpers.grpo.experiment.ENGINES`): their loss comes
    from the rollout mismatch alone, not from training in FP8 as well."""
    return [e for e in engines if ENGINES[e].trainer == "fp32"]


def gate_table(runs: pd.DataFrame, dose: pd.DataFrame, reference: str = REFERENCE_ARM, metric: str = PRIMARY, *,
               correction: str = "none", engines: Sequence[str] | None = None, n_boot: int = 2000,
               seed: int = 0) -> pd.DataFrame:
    """How well each candidate gate of :data:`GATES` predicts the learning loss, across the runs with
    ``correction`` of ``engines`` (default: every engine in ``runs``; every seed; loss against ``reference`` on
    the same seed).

    Columns: ``spearman`` (rank correlation of the gate and the loss over runs) with a bootstrap 95 % interval
    (``low`` / ``high``: runs resampled with replacement, ``n_boot`` times); ``threshold_low`` / ``threshold_high``:
    the bracket where the loss becomes detectable - the largest engine-mean gate value among engines shown to lose
    nothing (``dose`` verdict "within margin" or "gain") and the smallest among engines with a decided loss, when
    they are ordered consistently (else NaN: the gate does not separate them; "undecided" engines bound nothing);
    the anchor's hand-set value."""
    keep = runs.correction == correction
    if engines is not None:
        keep &= runs.engine.isin(list(engines)) | (runs.arm == reference)
    lossy = _losses(runs[keep], reference, metric)
    if lossy.empty:
        raise ValueError(f"no run with correction {correction!r} of the engines {engines}")
    verdict = dose[dose.correction == correction].set_index("engine")["verdict"]
    rng = np.random.default_rng(seed)
    n = len(lossy)
    idx = rng.integers(0, n, size=(n_boot, n))
    rows = []
    for gate in GATES:
        x, y = lossy[gate.column].to_numpy(), lossy["loss"].to_numpy()
        rho = stats.spearmanr(x, y).statistic
        boots = np.array([stats.spearmanr(x[i], y[i]).statistic for i in idx])
        lo, hi = np.nanpercentile(boots, [2.5, 97.5])
        per_engine = lossy.groupby("engine")[gate.column].mean()
        detected = per_engine[per_engine.index.map(lambda e: verdict.get(e) == "loss")]
        quiet = per_engine[per_engine.index.map(lambda e: verdict.get(e) in ("within margin", "gain"))]
        t_lo = quiet.max() if len(quiet) else np.nan
        t_hi = detected.min() if len(detected) else np.nan
        if len(quiet) and len(detected) and t_lo >= t_hi:
            t_lo = t_hi = np.nan  # an engine shown to lose nothing sits above one with a loss: the gate misorders them
        rows.append({"gate": gate.column, "what": gate.label, "spearman": rho, "low": lo, "high": hi,
                     "threshold_low": t_lo, "threshold_high": t_hi, "anchor": gate.anchor,
                     "anchor_source": gate.anchor_source, "runs": n})
    return pd.DataFrame(rows).sort_values("spearman", ascending=False).reset_index(drop=True)


# The report's ordering of the mismatch: FP8 rollout-only > FP8 end to end > BF16 (the trainer in full precision).
ORDERING = (("fp8 / none", "fp8 e2e / none"), ("fp8 e2e / none", "bf16 / none"))


def kl_ordering(runs: pd.DataFrame, pairs: tuple[tuple[str, str], ...] = ORDERING, *, alpha: float = ALPHA
                ) -> pd.DataFrame:
    """The ordering claim, tested on the per-run k1 (mean per token over the run) of the uncorrected arms, paired
    by seed: per pair (higher, lower) the log ratio ``log(k1_higher / k1_lower)`` (mean, 95 % interval, two-sided
    p, Holm over the pairs) and the ratio ``exp(mean)``; ``holds`` when decided > 0."""
    table = runs.pivot_table(index="seed", columns="arm", values="kl_k1")
    rows = []
    for hi, lo in pairs:
        if hi not in table or lo not in table:
            continue
        d = np.log(table[hi] / table[lo]).dropna().to_numpy()
        t = paired_t(d)
        rows.append({"higher": hi, "lower": lo, "n": t.n, "k1_higher": table[hi].mean(), "k1_lower": table[lo].mean(),
                     "log_ratio": t.mean, "low": t.low, "high": t.high, "ratio": float(np.exp(t.mean)), "p": t.p})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["p_holm"] = holm(out["p"].to_numpy())
    out["holds"] = (out.p_holm <= alpha) & (out.log_ratio > 0)
    return out


def ordering_verdicts(order: pd.DataFrame, dose: pd.DataFrame, *, e2e: str = "fp8 e2e / none",
                      bf16: str = "bf16 / none") -> list[tuple[str, str, str]]:
    """The report's third claim and the end-to-end arm's learning, as ``(claim, verdict, reason)``:

    1. "The mismatch KL orders FP8 rollout-only > FP8 end to end > BF16": reproduced when both pairs of
       :func:`kl_ordering` hold, partly when one does, not reproduced when a pair is decided the other way,
       inconclusive otherwise.
    2. "FP8 end to end learns like BF16": from :func:`dose_response` (loss against the zero-mismatch reference) of
       the two arms: reproduced when both are "within margin", not reproduced when the end-to-end arm has a
       decided loss and BF16 has not, else inconclusive."""
    why = [f"{r.higher} / {r.lower}: k1 {r.k1_higher:.3g} / {r.k1_lower:.3g}, ratio {r.ratio:.2f}x [{np.exp(r.low):.2f}, "
           f"{np.exp(r.high):.2f}] (n {r.n}, Holm p {r.p_holm:.2g})" for r in order.itertuples()]
    held = int(order.holds.sum()) if len(order) else 0
    wrong = bool(len(order) and ((order.p_holm <= ALPHA) & (order.log_ratio < 0)).any())
    v1 = ("reproduced" if len(order) == 2 and held == 2 else "not reproduced" if wrong
          else "partly" if held else "inconclusive")
    d = dose.set_index("arm")
    if e2e in d.index and bf16 in d.index:
        a, b = d.loc[e2e], d.loc[bf16]
        v2 = ("reproduced" if a.verdict == "within margin" and b.verdict == "within margin"
              else "not reproduced" if a.verdict == "loss" and b.verdict != "loss" else "inconclusive")
        why2 = (f"loss vs the zero-mismatch engine: {e2e} {a.loss:+.4f} [{a.low:+.4f}, {a.high:+.4f}] ({a.verdict}); "
                f"{bf16} {b.loss:+.4f} [{b.low:+.4f}, {b.high:+.4f}] ({b.verdict}); n {int(a.n)}, margin {MARGIN}")
    else:
        v2, why2 = "not testable here", "the end-to-end or BF16 arm did not run"
    out = [("The mismatch KL orders FP8 rollout-only > FP8 end to end > BF16", v1, "; ".join(why)),
           ("FP8 end to end, served in W8A8, learns like the zero-mismatch engine, as BF16 does", v2, why2)]
    master = e2e.split(" / ")[0] + " / master weights"
    if master in d.index and bf16 in d.index:
        a, b = d.loc[master], d.loc[bf16]
        v3 = ("reproduced" if a.verdict == "within margin" and b.verdict == "within margin"
              else "not reproduced" if a.verdict == "loss" and b.verdict != "loss" else "inconclusive")
        out.append(("FP8 end-to-end training (its fp32 master weights, evaluated unquantized) learns like the "
                    "zero-mismatch engine", v3,
                    f"loss vs the zero-mismatch engine: {master} {a.loss:+.4f} [{a.low:+.4f}, {a.high:+.4f}] "
                    f"({a.verdict}); {bf16} {b.loss:+.4f} ({b.verdict}); n {int(a.n)}, margin {MARGIN}"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for runs.csv.gz and run.json")
    ap.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(DOSE_SEEDS))
    ap.add_argument("--steps", type=int, default=150, help="GRPO steps per run (notebook 05's 150)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    policy, meta = load_policy(DEFAULT_CHECKPOINT)
    cfg = GRPOConfig(steps=args.steps, n_digits=meta["pretrain"]["n_digits"])
    cache = runtime.REPO_ROOT / ".cache" / "grpo_runs"
    t0 = time.time()
    kw = dict(block_size=(64, 64), workers=args.workers, cache_dir=cache)
    df = pd.concat([run_arms(policy, dose_arms(), args.seeds, cfg, **kw),
                    run_arms(policy, dose_arms(KV_ARMS), [s for s in KV_SEEDS if s in args.seeds] or args.seeds[:4],
                             cfg, **kw)], ignore_index=True)
    df[[c for c in KEEP_COLUMNS if c in df.columns]].to_csv(out / "runs.csv.gz", index=False)
    (out / "run.json").write_text(json.dumps({
        "command": "python -m helpers.grpo.dose --out " + args.out, "seeds": args.seeds, "steps": args.steps,
        "block": 64, "wall_s_this_call": round(time.time() - t0, 1), "grid": DOSE_ARMS, "kv_grid": KV_ARMS,
        "kv_seeds": list(KV_SEEDS), "environment": runtime.describe_environment()}, indent=1))
    print(f"{df.groupby(['arm', 'seed']).ngroups} runs -> {out / 'runs.csv.gz'}")


if __name__ == "__main__":
    main()
