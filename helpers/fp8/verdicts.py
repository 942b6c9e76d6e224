"""The decision rules of notebook 01 (blockwise FP8 W8A8): named statistics in, a verdict and its reason out.

Each ``*_verdict`` returns ``(verdict, reason)`` with ``verdict`` one of ``"reproduced"``, ``"partly"``,
``"not reproduced"``, ``"not testable here"`` (:data:`helpers.core.results.VERDICTS`). The thresholds are named
constants with their reason; the notebook computes the statistics, calls these and explains.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

__all__ = ["SCHEME_SPREAD", "GEMM_SPEEDUP_TARGET", "BLOCK_SCHEMES", "scheme_spread", "blockwise_win_onset",
           "kernel_verdict", "blockwise_verdict", "sync_verdict", "gemm_verdict"]

SCHEME_SPREAD = 0.05
"""Scaling schemes whose median relative errors lie within 5 % of each other "give the same error": e4m3's own
rounding error varies by more than that across tensors (2^-4 worst case, ~2-3 % typical), so a smaller spread is no
measurable difference between schemes."""
GEMM_SPEEDUP_TARGET = 1.5
"""Block FP8 GEMM over bf16 cuBLAS at large M that we count as "beats": FP8 tensor cores have 2x bf16's peak; the
per-block scaling costs part of it (our target, the paper gives none for the GEMM alone)."""
BLOCK_SCHEMES = ("block_fp32", "block_ue8m0")
"""The blockwise weight schemes of :data:`helpers.fp8.analysis.WEIGHT_SCHEMES`."""


def scheme_spread(median_rel_err: Mapping[str, float] | pd.Series) -> float:
    """``max / min - 1`` of the schemes' median relative errors (0.012 = the worst is 1.2 % above the best)."""
    values = [float(v) for v in dict(median_rel_err).values()]
    if not values or min(values) <= 0 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"median_rel_err must hold finite positive errors, got {dict(median_rel_err)!r}")
    return max(values) / min(values) - 1.0


def blockwise_win_onset(sweep: pd.DataFrame, *, axis: str = "input", against: str = "per_channel") -> float:
    """The smallest outlier magnitude of ``sweep`` (:func:`helpers.fp8.analysis.outlier_sweep`'s table) at which
    blockwise fp32 scales give a bulk error more than :data:`SCHEME_SPREAD` below ``against``'s for outlier
    ``axis`` channels; NaN when they never do in the sweep."""
    missing = {"axis", "outlier_scale", "scheme", "rel_err_bulk"} - set(sweep.columns)
    if missing:
        raise ValueError(f"sweep is missing columns {sorted(missing)}")
    d = sweep[sweep["axis"] == axis].pivot_table(index="outlier_scale", columns="scheme", values="rel_err_bulk")
    if d.empty or against not in d or "block_fp32" not in d:
        raise ValueError(f"sweep has no {axis!r} rows for both block_fp32 and {against!r}")
    wins = d.index[(d[against] / d["block_fp32"]) > 1.0 + SCHEME_SPREAD]
    return float(wins.min()) if len(wins) else float("nan")


def kernel_verdict(n_exact: int, n_cases: int, *, interpreted: bool, gemm_rel_err_max: float) -> tuple[str, str]:
    """The engines' blockwise format: reproduced when the Triton kernels and the torch path agree bit for bit in
    every case (``n_exact == n_cases``), not reproduced otherwise."""
    if n_cases <= 0 or not 0 <= n_exact <= n_cases:
        raise ValueError(f"need 0 <= n_exact <= n_cases and n_cases > 0, got n_exact={n_exact}, n_cases={n_cases}")
    verdict = "reproduced" if n_exact == n_cases else "not reproduced"
    return verdict, (f"Triton kernels ({'interpreter' if interpreted else 'compiled'}) and the torch path agree bit "
                     f"for bit in {n_exact}/{n_cases} cases; GEMM vs float64 dequantized product: max rel. error "
                     f"{gemm_rel_err_max:.1e}")


def blockwise_verdict(weight_median_rel_err: Mapping[str, float] | pd.Series, *, outlier_gain: float,
                      outlier_scale: float, outlier_onset: float | None = None) -> tuple[str, str]:
    """Blockwise scales keep FP8 error low where coarser scales fail.

    Args:
        weight_median_rel_err: scheme -> median relative error over the real weights (MiniLM).
        outlier_gain: per-channel / blockwise-fp32 bulk error with outlier *input* channels at ``outlier_scale``.
        outlier_scale: the largest outlier magnitude swept (x the bulk's std).
        outlier_onset: the outlier magnitude from which blockwise wins (:func:`blockwise_win_onset`), if any.

    Rule: **reproduced** when the schemes differ on the real weights (spread >= :data:`SCHEME_SPREAD`) and a
    blockwise scheme is the best; otherwise **partly** when blockwise wins under synthetic outliers
    (``outlier_gain > 1``), else **not reproduced**.
    """
    errs = pd.Series(dict(weight_median_rel_err), dtype=float)
    spread = scheme_spread(errs)
    best = str(errs.idxmin())
    if spread >= SCHEME_SPREAD and best in BLOCK_SCHEMES:
        return "reproduced", (f"on real MiniLM weights {best} gives the lowest error, {spread:.1%} below the worst "
                              f"scheme; with outlier input channels at {outlier_scale:g}x blockwise has "
                              f"{outlier_gain:.1f}x lower bulk error than per-channel")
    same = (f"on real MiniLM weights every scheme gives the same error (spread {spread:.1%}: their range fits e4m3 "
            f"under one scale)" if spread < SCHEME_SPREAD else
            f"on real MiniLM weights {best}, not a blockwise scheme, gives the lowest error (spread {spread:.1%})")
    if outlier_gain > 1:
        known = outlier_onset is not None and math.isfinite(outlier_onset)
        onset = f" >= ~{outlier_onset:g}x the bulk" if known else ""
        return "partly", (f"{same}; only with outlier input channels{onset} does blockwise win ({outlier_gain:.1f}x "
                          f"lower bulk error than per-channel at {outlier_scale:g}x), and per-channel still wins for "
                          f"outlier output channels")
    return "not reproduced", (f"{same}; blockwise does not win with outlier input channels either "
                              f"({outlier_gain:.2f}x per-channel's bulk error at {outlier_scale:g}x)")


def sync_verdict(sync: pd.DataFrame, target_ratio: float) -> tuple[str, str]:
    """The per-step weight re-quantization costs at most ``target_ratio`` x a memory copy of the same bytes.

    ``sync``: :func:`helpers.fp8.bench.requant_benchmark`'s table (columns ``size_gb``, ``ratio``,
    ``peak_extra_mb``), smallest size first. **reproduced** when every size meets the target, **partly** when some
    do, **not reproduced** when none does.
    """
    missing = {"size_gb", "ratio", "peak_extra_mb"} - set(sync.columns)
    if missing or sync.empty:
        raise ValueError(f"sync must be a non-empty requant_benchmark table; missing columns {sorted(missing)}")
    if not target_ratio > 0:
        raise ValueError(f"target_ratio must be > 0, got {target_ratio!r}")
    n_met = int((sync["ratio"] <= target_ratio).sum())
    verdict = "reproduced" if n_met == len(sync) else ("partly" if n_met else "not reproduced")
    last = sync.iloc[-1]
    peak = f"{last['peak_extra_mb']:.0f} MB" if pd.notna(last["peak_extra_mb"]) else "not measurable"
    return verdict, (f"{last['ratio']:.2f}x a copy of the same bytes at {last['size_gb']:.2f} GB on this CPU "
                     f"({sync['ratio'].min():.2f}-{sync['ratio'].max():.2f}x over all sizes, target met at "
                     f"{n_met}/{len(sync)}), in place, peak extra memory {peak}")


def gemm_verdict(speedup: float | None, *, m: int, device: str | None) -> tuple[str, str]:
    """The block FP8 GEMM beats bf16 cuBLAS on large shapes: reproduced when the median speed-up at the largest M
    is at least :data:`GEMM_SPEEDUP_TARGET`; not testable here without a GPU (``speedup=None``)."""
    if speedup is None:
        return "not testable here", "no GPU in this run (the section runs on a CUDA machine)"
    verdict = "reproduced" if speedup >= GEMM_SPEEDUP_TARGET else "not reproduced"
    return verdict, f"{speedup:.2f}x bf16 at M = {m} on {device}"
