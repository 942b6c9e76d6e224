"""Notebook 01's decision rules (helpers.fp8.verdicts): every branch, on hand-made statistics."""

import math

import pandas as pd
import pytest

from helpers.core.results import VERDICTS
from helpers.fp8 import verdicts as v

SAME = {"per_tensor": 0.0265, "per_channel": 0.0266, "block_fp32": 0.0264, "block_ue8m0": 0.0268}


def test_scheme_spread():
    assert v.scheme_spread({"a": 0.02, "b": 0.03}) == pytest.approx(0.5)
    assert v.scheme_spread(pd.Series(SAME)) == pytest.approx(0.0268 / 0.0264 - 1)
    for bad in ({}, {"a": 0.0, "b": 1.0}, {"a": float("nan")}):
        with pytest.raises(ValueError, match="finite positive"):
            v.scheme_spread(bad)


def test_kernel_verdict():
    assert v.kernel_verdict(48, 48, interpreted=True, gemm_rel_err_max=1e-7)[0] == "reproduced"
    verdict, reason = v.kernel_verdict(47, 48, interpreted=False, gemm_rel_err_max=2e-7)
    assert verdict == "not reproduced" and "(compiled)" in reason and "47/48" in reason and "2.0e-07" in reason
    with pytest.raises(ValueError, match="n_exact=5, n_cases=4"):
        v.kernel_verdict(5, 4, interpreted=True, gemm_rel_err_max=0.0)


def test_blockwise_verdict_branches():
    # the schemes coincide on real weights but blockwise wins under outliers: partly
    verdict, reason = v.blockwise_verdict(SAME, outlier_gain=3.1, outlier_scale=1e6, outlier_onset=1e4)
    assert verdict == "partly" and "spread 1.5%" in reason and ">= ~10000x the bulk" in reason and "3.1x" in reason
    # the schemes differ and a blockwise scheme is best: reproduced
    differ = {**SAME, "per_tensor": 0.04}
    assert v.blockwise_verdict(differ, outlier_gain=3.0, outlier_scale=1e6)[0] == "reproduced"
    # the schemes differ but per-channel is best, and blockwise never wins: not reproduced
    worse = {**SAME, "block_fp32": 0.04, "block_ue8m0": 0.041, "per_channel": 0.02}
    verdict, reason = v.blockwise_verdict(worse, outlier_gain=0.9, outlier_scale=1e6)
    assert verdict == "not reproduced" and "per_channel, not a blockwise scheme" in reason
    # no onset known: the reason does not invent one
    assert ">=" not in v.blockwise_verdict(SAME, outlier_gain=2.0, outlier_scale=1e5, outlier_onset=math.nan)[1]


def test_blockwise_win_onset():
    rows = []
    for scale, pc, bl in [(1, 0.0265, 0.0265), (1e3, 0.0266, 0.0265), (1e4, 0.0294, 0.0277), (1e5, 0.20, 0.11)]:
        rows += [{"axis": "input", "outlier_scale": scale, "scheme": "per_channel", "rel_err_bulk": pc},
                 {"axis": "input", "outlier_scale": scale, "scheme": "block_fp32", "rel_err_bulk": bl}]
    sweep = pd.DataFrame(rows)
    assert v.blockwise_win_onset(sweep) == 1e4  # 0.0294 / 0.0277 = 1.06 > 1.05; 1e3 is within 5 %
    flat = sweep.assign(rel_err_bulk=0.0265)
    assert math.isnan(v.blockwise_win_onset(flat))
    with pytest.raises(ValueError, match="no 'output' rows"):
        v.blockwise_win_onset(sweep, axis="output")


@pytest.mark.parametrize("ratios, verdict", [([1.0, 2.9], "reproduced"), ([2.0, 3.4], "partly"),
                                             ([3.1, 5.0], "not reproduced")])
def test_sync_verdict(ratios, verdict):
    sync = pd.DataFrame({"size_gb": [0.064, 1.0], "ratio": ratios, "peak_extra_mb": [10.0, float("nan")]})
    got, reason = v.sync_verdict(sync, 3.0)
    assert got == verdict
    assert f"{ratios[-1]:.2f}x a copy of the same bytes at 1.00 GB" in reason
    assert "peak extra memory not measurable" in reason
    with pytest.raises(ValueError, match="missing columns"):
        v.sync_verdict(sync.drop(columns="ratio"), 3.0)
    with pytest.raises(ValueError, match="target_ratio must be > 0"):
        v.sync_verdict(sync, 0)


def test_gemm_verdict():
    assert v.gemm_verdict(None, m=4096, device=None)[0] == "not testable here"
    assert v.gemm_verdict(1.6, m=4096, device="H100")[0] == "reproduced"
    assert v.gemm_verdict(1.2, m=4096, device="H100") == ("not reproduced", "1.20x bf16 at M = 4096 on H100")


def test_every_verdict_is_a_known_word():
    outs = [v.kernel_verdict(1, 1, interpreted=True, gemm_rel_err_max=0.0),
            v.blockwise_verdict(SAME, outlier_gain=2.0, outlier_scale=1e6), v.gemm_verdict(None, m=1, device=None)]
    assert all(verdict in VERDICTS for verdict, _ in outs)
