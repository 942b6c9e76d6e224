"""The GPU benchmark's code on the CPU (helpers/gpu_bench/, helpers/fp8/bench.py): tiny shapes, the Triton kernels
under the interpreter, a host timer in place of ``do_bench``, so the benchmark cannot rot between GPU runs.

Structure and units only: no timing is asserted.
"""

from __future__ import annotations

import json

import helpers  # noqa: F401  (sets TRITON_INTERPRET=1 on CPU before triton is imported)
import pandas as pd
import pytest
import torch

from helpers import gpu_bench
from helpers.core import runtime
from helpers.fp8.bench import GEMM_METHODS, requant_benchmark, wall_clock_bench
from helpers.roofline import ModelShape

needs_no_gpu = pytest.mark.skipif(runtime.has_cuda(), reason="checks the behaviour without a CUDA device")
TINY = {"tiny_a (48x160)": (48, 160), "tiny_b (130x64)": (130, 64)}
TINY_LAYER = ModelShape(name="tiny", n_layers=1, hidden=256, n_heads=2, n_kv_heads=1, head_dim=128,
                        intermediate=384, vocab=1)


@pytest.fixture(autouse=True)
def _quiet_interpreter_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="backend='triton' on CPU")
        warnings.filterwarnings("ignore", message="decode_attention backend='triton' on CPU")
        yield


@pytest.mark.skipif(not runtime.triton_interpreted(), reason="runs the Triton kernels under the CPU interpreter")
def test_run_benchmarks_on_cpu_under_the_interpreter(tmp_path):
    record = gpu_bench.run_benchmarks(tmp_path, device="cpu", bench=wall_clock_bench, shapes=TINY, ms=(1, 7),
                                      requant_sizes_gb=(2e-5, 5e-5), requant_layer=(48, 160), contexts=(64,),
                                      decode_batch=2, layer_batches=(1,), layer_contexts=(64,),
                                      layer_shape=TINY_LAYER, backend="triton")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention.csv", "bench.json", "decode_layer.csv",
                                                          "gemm.csv", "requant.csv"]
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(record, default=str))
    env = record["environment"]
    assert env["gpu"] is None and env["triton_mode"] == "interpreter" and env["versions"]["torch"]
    assert record["params"]["timer"].endswith("wall_clock_bench")

    gemm = pd.read_csv(tmp_path / "gemm.csv")  # NaN (a method that did not run) and an empty note read as NaN
    assert len(gemm) == len(TINY) * 2 * len(GEMM_METHODS)  # shapes x M x methods
    assert list(gemm["method"][: len(GEMM_METHODS)]) == list(GEMM_METHODS)
    timed = gemm[~gemm["method"].isin(["scaled_mm_block", "fp8_block_autotuned"])]
    assert (timed["tflops"] > 0).all() and (timed["ms_p20"] <= timed["ms_p80"]).all()
    # TFLOP/s is 2 M N K over the median time, for every timed row.
    want = 2.0 * timed["m"] * timed["n"] * timed["k"] / (timed["ms"] * 1e-3) / 1e12
    assert ((timed["tflops"] - want).abs() <= 1e-9 * want).all()
    # cuBLAS-only and compiled-GPU-only methods: not on the CPU, with the reason recorded
    untimed = gemm[gemm["method"].isin(["scaled_mm_block", "fp8_block_autotuned"])]
    assert untimed["ms"].isna().all() and untimed["note"].notna().all()

    requant = pd.read_csv(tmp_path / "requant.csv")
    assert list(requant["layers"]) == [1, 3]  # round(size / 15.4 kB of bf16 per layer), at least 1
    assert (requant["quantizer"] == "triton").all() and (requant["device"] == "cpu").all()
    assert (requant[["requant_s", "copy_s", "requant_gbps", "copy_gbps", "ratio"]] > 0).all().all()
    assert (requant["requant_s_p20"] <= requant["requant_s_p80"]).all()
    assert requant["requant_gbps"].iloc[1] == pytest.approx(requant["size_gb"].iloc[1] / requant["requant_s"].iloc[1])

    attention = pd.read_csv(tmp_path / "attention.csv")
    assert list(attention["cache"]) == ["bfloat16", "fp8_e4m3"] and (attention["context"] == 64).all()
    assert (attention["backend"] == "triton").all() and (attention["ms"] > 0).all()
    assert attention["ratio_vs_hp"].iloc[0] == 1.0
    assert attention["kv_bytes"].iloc[0] == 2 * attention["kv_bytes"].iloc[1]  # bf16 is two bytes, e4m3 one
    assert attention["kv_bytes"].iloc[1] == 2 * 2 * 8 * 64 * 128  # K and V, batch 2, 8 KV heads, 64 slots, D 128

    m = record["metrics"]
    assert all(k.startswith("gpu_bench/") for k in m)
    assert m["gpu_bench/gemm_fp8_block_best_tflops"] == pytest.approx(gemm.loc[gemm["method"] == "fp8_block",
                                                                               "tflops"].max())
    assert "gpu_bench/gemm_scaled_mm_block_best_tflops" not in m  # never ran here: no figure, not a zero
    assert "gpu_bench/gemm_fp8_block_best_fraction_of_peak" not in m  # no known peak for a CPU
    assert m["gpu_bench/requant_over_copy"] == pytest.approx(requant["ratio"].iloc[-1])
    assert m["gpu_bench/attention_fp8_over_bf16_longest"] == pytest.approx(attention["ratio_vs_hp"].iloc[1])

    layer = pd.read_csv(tmp_path / "decode_layer.csv")
    assert list(layer["mode"]) == ["bf16", "w8a8", "w8a8_kv8"] and (layer["ms"] > 0).all()
    assert layer["roofline_ms"].isna().all()  # no datasheet for a CPU: no roofline figure, not a zero
    assert record["params"]["layer_shape"] == "tiny" and record["params"]["roofline_gpu"] is None
    assert m["gpu_bench/decode_layer_w8a8_speedup_small_b1_c64"] == pytest.approx(layer["speedup_vs_bf16"].iloc[1])
    assert not any("fraction_of_roofline" in k for k in m)


def test_requant_benchmark_takes_a_timer():
    calls = []

    def fake_bench(fn, quantiles):
        fn()
        calls.append(list(quantiles))
        return [2.0, 1.0, 3.0]  # ms

    df = requant_benchmark([0.0005], layer_shape=(256, 512), bench=fake_bench, measure_rss=False)
    assert calls == [[0.5, 0.2, 0.8]] * 2  # the sync, then the copy
    row = df.iloc[0]
    assert row["requant_s"] == row["copy_s"] == 2e-3 and row["requant_s_p20"] == 1e-3 and row["copy_s_p80"] == 3e-3
    assert row["ratio"] == 1.0 and row["peak_extra_mb"] is None
    assert row["requant_gbps"] == pytest.approx(row["size_gb"] / 2e-3)


@pytest.mark.parametrize("kwargs,match", [
    ({"ms": ()}, "ms must be a non-empty"),
    ({"ms": (0, 4)}, "ms must be a non-empty"),
    ({"requant_sizes_gb": (-1.0,)}, "requant_sizes_gb"),
    ({"contexts": ()}, "contexts"),
    ({"decode_batch": 0}, "decode_batch must be >= 1"),
    ({"layer_contexts": ()}, "layer_contexts must be a non-empty"),
])
def test_run_benchmarks_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gpu_bench.run_benchmarks(tmp_path / "out", device="cpu", bench=wall_clock_bench, **kwargs)
    assert not (tmp_path / "out").exists()  # checked before anything is written


@needs_no_gpu
@pytest.mark.parametrize("argv", [[], ["--quick"], ["--check"]])
def test_main_without_a_gpu_writes_nothing_and_says_so(tmp_path, capsys, argv):
    out = tmp_path / "gpu"
    assert gpu_bench.main(["--out", str(out), *argv]) == gpu_bench.NO_GPU_EXIT
    assert "no CUDA device" in capsys.readouterr().err
    assert not out.exists()


def test_cuda_info():
    info = gpu_bench.cuda_info()
    if runtime.has_cuda():
        assert info["gpu"] == torch.cuda.get_device_name(0) and len(info["capability"]) == 2
    else:
        assert info == {"gpu": None}
    assert gpu_bench.NO_GPU_EXIT not in range(6)  # never mistaken for a pytest status


@pytest.mark.skipif(not runtime.triton_interpreted(), reason="checks the interpreter's fixed GEMM launch")
def test_gemm_autotune_switch_is_ignored_under_the_interpreter(monkeypatch):
    from helpers.fp8 import kernels, quant_act, quant_weight

    # The configs only vary what the wrapper leaves to the tuner (BLOCK_N, warps, stages): the wrapper's own
    # GROUP_N / BLOCK_M / BLOCK_K never conflict with them.
    assert all(set(c.kwargs) == {"BLOCK_N"} for c in kernels.GEMM_CONFIGS)
    assert len({(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kernels.GEMM_CONFIGS}) == 12
    g = torch.Generator().manual_seed(0)
    xq, xs = quant_act(torch.randn(7, 300, generator=g), 128, backend="torch")
    wq, ws = quant_weight(torch.randn(70, 300, generator=g), backend="torch")
    y0 = kernels.block_fp8_matmul_triton(xq, xs, wq, ws, (128, 128), out_dtype=torch.float32, autotune=False)
    monkeypatch.setenv(kernels.GEMM_AUTOTUNE_ENV, "1")
    y1 = kernels.block_fp8_matmul_triton(xq, xs, wq, ws, (128, 128), out_dtype=torch.float32)
    assert torch.equal(y0, y1) and kernels.gemm_autotuned_config(7, 70, 300) is None  # one fixed launch, no tuning
