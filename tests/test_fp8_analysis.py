"""Error metrics, synthetic outliers and the benchmark helpers of notebook 01 (helpers/fp8/analysis.py, bench.py).

Benchmarks are exercised for structure only: no timing is asserted.
"""

from __future__ import annotations

import math

import pytest
import torch

import helpers  # noqa: F401
from helpers.fp8 import dequant_weight, quant_weight
from helpers.fp8.analysis import (ACT_SCHEMES, WEIGHT_SCHEMES, act_error_table, e4m3_values, error_metrics,
                                  fake_quant_act, fake_quant_weight, median_by_scheme, synthetic_outlier_weight,
                                  weight_error_table)
from helpers.fp8.bench import GEMM_METHODS, QWEN3_8B_GEMMS, fp8_peak_tflops, gemm_benchmark, requant_benchmark, wall_clock_bench


def test_e4m3_grid():
    v = e4m3_values()
    assert len(v) == 127  # 0, 7 subnormals, 15 binades x 8 normals minus the NaN code 0x7F
    assert v[0] == 0 and v[1] == 2.0**-9 and v[-1] == 448 and v[-2] == 416
    assert (v[1:] > v[:-1]).all()


def test_error_metrics_definitions():
    ref = torch.tensor([3.0, 4.0])
    m = error_metrics(ref, torch.tensor([3.0, 4.5]))
    assert m["rel_err"] == pytest.approx(0.1)
    assert m["snr_db"] == pytest.approx(20.0)  # = -20 log10(rel_err)
    assert error_metrics(ref, ref)["snr_db"] == math.inf
    assert error_metrics(ref, torch.tensor([0.0, 4.0]), mask=torch.tensor([False, True]))["rel_err"] == 0.0


@pytest.mark.parametrize("n,k", [(7, 300), (200, 130)])
def test_fake_quant_schemes(n, k):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    for scheme in WEIGHT_SCHEMES:
        deq = fake_quant_weight(w, scheme)
        assert deq.shape == w.shape and deq.dtype == torch.float32
        assert error_metrics(w, deq)["rel_err"] < 0.05  # Gaussian data, 3 mantissa bits
    q, s = quant_weight(w, scale_fmt="ue8m0", backend="torch")
    assert torch.equal(fake_quant_weight(w, "block_ue8m0"), dequant_weight(q, s))
    # A single scale is exact on values that are already on the e4m3 grid times one power of two.
    grid = e4m3_values()[-16:].repeat(2, 1) * 2.0**-3
    assert torch.equal(fake_quant_weight(grid, "per_tensor"), grid)
    for scheme in ACT_SCHEMES:
        assert error_metrics(w, fake_quant_act(w, scheme))["rel_err"] < 0.05
    with pytest.raises(ValueError, match="scheme"):
        fake_quant_weight(w, "per_row")


def test_outliers_separate_the_schemes():
    w, bulk = synthetic_outlier_weight(256, 512, n_outliers=3, outlier_scale=1e5, axis="output", seed=0)
    assert int((~bulk).sum()) == 3 * 512 and torch.isfinite(w).all()
    df = weight_error_table({"w": w}, masks={"w": bulk})
    bulk_err = df.set_index("scheme")["rel_err_masked"]
    # 1e5 x outlier rows push the rest of the tensor below e4m3's range under one scale; per-row scales do not.
    assert bulk_err["per_tensor"] > 10 * bulk_err["per_channel"]
    w_in, bulk_in = synthetic_outlier_weight(128, 2048, n_outliers=2, outlier_scale=1e6, axis="input", seed=0)
    assert int((~bulk_in).sum()) == 2 * 128
    err = weight_error_table({"w": w_in}, masks={"w": bulk_in}).set_index("scheme")["rel_err_masked"]
    # Outlier input columns (1e6 x: the rest of their scaling group falls below e4m3's subnormals) hit every row;
    # 128-wide blocks confine the damage to 2 of 16 K blocks (bulk error ~sqrt(2/16)), per-row scales do not (~1).
    assert err["per_channel"] > 2 * err["block_fp32"]
    with pytest.raises(ValueError, match="axis"):
        synthetic_outlier_weight(4, 4, axis="diag")


def test_tables_and_medians():
    g = torch.Generator().manual_seed(1)
    weights = {"a": torch.randn(130, 200, generator=g), "b": torch.randn(64, 64, generator=g)}
    df = weight_error_table(weights)
    assert len(df) == 2 * len(WEIGHT_SCHEMES) and {"layer", "n", "k", "scheme", "rel_err", "snr_db"} <= set(df)
    med = median_by_scheme(df, order=WEIGHT_SCHEMES)
    assert list(med.index) == list(WEIGHT_SCHEMES) and med.notna().all()
    acts = act_error_table({"x": torch.randn(9, 300, generator=g)})
    assert list(acts["scheme"]) == list(ACT_SCHEMES) and (acts["amax_over_rms"] > 1).all()


def test_requant_benchmark_structure():
    df = requant_benchmark([0.0005, 0.001], layer_shape=(256, 512), repeats=1, warmup=0)
    assert list(df["layers"]) == [2, 4]
    assert (df[["requant_s", "copy_s", "requant_gbps", "copy_gbps", "ratio"]] > 0).all().all()


def test_gemm_benchmark_runs_on_cpu():
    df = gemm_benchmark({"tiny": (48, 160)}, ms=(1, 5), bench=wall_clock_bench, backend="torch")
    assert set(df["method"]) == set(GEMM_METHODS)
    timed = df[~df["method"].isin(["scaled_mm_block", "fp8_block_autotuned"])]
    assert (timed["tflops"] > 0).all()
    skipped = df[df["method"].isin(["scaled_mm_block", "fp8_block_autotuned"])]
    assert (skipped["ms"].isna() == (skipped["note"] != "")).all()  # either timed, or a reason is recorded
    assert df.loc[df["method"] == "fp8_block_autotuned", "ms"].isna().all()  # compiled GPU runs only
    assert QWEN3_8B_GEMMS["gate_proj / up_proj (12288x4096)"] == (12288, 4096)
    assert fp8_peak_tflops("NVIDIA H100 80GB HBM3") == 1979.0 and fp8_peak_tflops("NVIDIA H100 PCIe") == 1513.0
    assert fp8_peak_tflops("Some CPU") is None
