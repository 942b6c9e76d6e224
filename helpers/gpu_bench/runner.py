"""The GPU runner's benchmark: ``python -m helpers.gpu_bench --out results/gpu`` (``make gpu-bench``).

On a CUDA machine it times, with ``triton.testing.do_bench`` (median and 20th / 80th percentiles, in ms):

* ``gemm.csv`` - the block-scaled FP8 GEMM (:func:`helpers.fp8.block_fp8_matmul`, compiled Triton) in TFLOP/s
  beside bf16 ``torch.matmul`` and ``torch._scaled_mm`` with block scales where this build accepts them, on the
  Qwen3-8B projections (:func:`helpers.fp8.bench.gemm_benchmark`); ``bench.json`` holds the device's dense FP8
  peak (:func:`helpers.fp8.bench.fp8_peak_tflops`) to read them against;
* ``requant.csv`` - the per-RL-step weight sync (:func:`helpers.fp8.requantize_model_` with the Triton quantizer)
  in GB/s beside a device-to-device ``copy_`` of the same bytes (:func:`helpers.fp8.bench.requant_benchmark`);
* ``attention.csv`` - decode attention (:func:`helpers.kvcache.decode_attention`, the compiled Triton kernel) over
  the FP8 KV cache vs the BF16 cache at 1k-32k context, one Qwen3-8B attention layer
  (:func:`helpers.kvcache.bench.decode_attention_benchmark`): ms, GB/s of K/V read, FP8 / BF16 time ratio;
* ``decode_layer.csv`` - one Qwen3-8B transformer layer's decode step in BF16, W8A8 and W8A8 + FP8 KV over batch
  {1, 16, 64, 256} x context {1k, 8k, 32k} (:func:`helpers.gpu_bench.decode_layer.decode_layer_benchmark`), beside
  the decode roofline's time for the same device (:func:`helpers.roofline.layer_seconds` on
  ``data/gpu_specs.json``) and the fraction of it reached;

and writes ``bench.json``: the device name, compute capability, driver, CUDA / torch / triton versions and git
commit (:func:`helpers.core.runtime.environment_info` plus the CUDA fields), the parameters, and headline metrics
``gpu_bench/<name>``. (Not ``metrics.json``: the gallery reads that name as a notebook's results.)

Without a CUDA device it writes nothing, prints why, and exits with :data:`NO_GPU_EXIT`: a GPU job on a runner
whose GPU has gone missing fails instead of passing with nothing measured. :func:`run_benchmarks` takes the timing
function and the shapes as arguments, so a CPU test runs the same code under the Triton interpreter with tiny
shapes (``tests/test_fp8_bench.py``, ``tests/test_gpu_bench.py``); only :func:`main` insists on a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import helpers  # noqa: F401  (sets TRITON_INTERPRET on CPU before triton is imported)
import pandas as pd
import torch

from helpers.core import runtime
from helpers.fp8.bench import QWEN3_8B_GEMMS, fp8_peak_tflops, gemm_benchmark, requant_benchmark
from helpers.gpu_bench.decode_layer import BATCHES, CONTEXTS, decode_layer_benchmark
from helpers.kvcache.bench import decode_attention_benchmark
from helpers.roofline import ModelShape, gpu_spec_for_device, model_shape

__all__ = ["NO_GPU_EXIT", "NO_GPU_MESSAGE", "FULL", "QUICK", "cuda_info", "run_benchmarks", "main"]

# Exit status of ``main`` (and so of ``make gpu-test`` / ``make gpu-bench``) without a CUDA device: distinct from
# pytest's 1-5 and make's 2, so a script can tell "no GPU here" from "a check failed".
NO_GPU_EXIT = 7
NO_GPU_MESSAGE = ("no CUDA device: torch.cuda.is_available() is False (no NVIDIA GPU or driver, or a CPU-only torch "
                  "build). The GPU tier and benchmark need one; nothing was run or written.")

# What a run measures. FULL is the GPU runner's job (a few minutes on an H100-class GPU); QUICK is a minute-long
# check of the same code paths. M = 1 and 16 are decode batches, 128-4096 prefill / training micro-batches; 8 GB of
# bf16 weights is about half of Qwen3-8B (16.4 GB), enough to saturate HBM; contexts span the 1k-32k rollouts. The
# decode-layer grid (batch x context) holds at most one 34 GB BF16 cache (256 x 32k) at a time.
FULL: dict[str, Any] = {"ms": (1, 16, 128, 1024, 4096), "requant_sizes_gb": (0.5, 2.0, 8.0),
                        "contexts": (1024, 4096, 16384, 32768), "decode_batch": 16,
                        "layer_batches": BATCHES, "layer_contexts": CONTEXTS}
QUICK: dict[str, Any] = {"ms": (1, 128, 4096), "requant_sizes_gb": (0.5,), "contexts": (1024, 8192),
                         "decode_batch": 4, "layer_batches": (1, 64), "layer_contexts": (1024, 8192)}


def _nvidia_smi(field: str) -> str | None:
    """One ``nvidia-smi --query-gpu`` field of GPU 0 (e.g. ``driver_version``), or None without nvidia-smi."""
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else None


def cuda_info() -> dict[str, Any]:
    """The GPU fields a benchmark figure is meaningless without: name, compute capability, memory, driver, the CUDA
    version torch was built with, and the dense FP8 peak used as the roofline (None where unknown)."""
    if not runtime.has_cuda():
        return {"gpu": None}
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "capability": list(torch.cuda.get_device_capability(0)),
            "memory_gb": props.total_memory / 1e9, "sm_count": props.multi_processor_count,
            "driver": _nvidia_smi("driver_version"), "cuda": torch.version.cuda,
            "fp8_peak_tflops": fp8_peak_tflops(props.name)}


def _headline(gemm: pd.DataFrame, requant: pd.DataFrame, attention: pd.DataFrame,
              peak: float | None, layer: pd.DataFrame | None = None) -> dict[str, float]:
    """``gpu_bench/*`` metrics: best TFLOP/s per method, its fraction of the FP8 peak, the largest sync's GB/s
    and its ratio to the copy, the FP8 / BF16 decode-attention time ratio at the longest context, and per
    decode-layer mode its speedup over BF16 at the grid's two corners and its median fraction of the roofline."""
    m: dict[str, float] = {}
    for method, t in gemm.groupby("method")["tflops"].max().items():
        if pd.notna(t):  # NaN: a method that did not run here (no figure rather than a zero)
            m[f"gpu_bench/gemm_{method}_best_tflops"] = float(t)
    best_fp8 = m.get("gpu_bench/gemm_fp8_block_best_tflops")
    if peak and best_fp8 is not None:
        m["gpu_bench/gemm_fp8_block_best_fraction_of_peak"] = best_fp8 / peak
    last = requant.iloc[-1]
    m["gpu_bench/requant_gbps"] = float(last["requant_gbps"])
    m["gpu_bench/copy_gbps"] = float(last["copy_gbps"])
    m["gpu_bench/requant_over_copy"] = float(last["ratio"])
    longest = attention[attention["context"] == attention["context"].max()].set_index("cache")
    m["gpu_bench/attention_longest_context"] = float(attention["context"].max())
    m["gpu_bench/attention_fp8_over_bf16_longest"] = float(longest.loc["fp8_e4m3", "ratio_vs_hp"])
    m["gpu_bench/attention_fp8_gbps_longest"] = float(longest.loc["fp8_e4m3", "gb_per_s"])
    if layer is not None and len(layer):
        corners = {"small": (layer["batch"].min(), layer["context"].min()),
                   "large": (layer["batch"].max(), layer["context"].max())}
        for mode, rows in layer.groupby("mode", sort=False):
            for label, (b, c) in corners.items():
                cell = rows[(rows["batch"] == b) & (rows["context"] == c)]
                if len(cell) and pd.notna(cell["speedup_vs_bf16"].iloc[0]):
                    key = f"gpu_bench/decode_layer_{mode}_speedup_{label}_b{b}_c{c}"
                    m[key] = float(cell["speedup_vs_bf16"].iloc[0])
            frac = rows["fraction_of_roofline"].dropna()
            if len(frac):
                m[f"gpu_bench/decode_layer_{mode}_median_fraction_of_roofline"] = float(frac.median())
    return m


def run_benchmarks(out: str | Path, *, device: torch.device | str, bench: Callable,
                   shapes: Mapping[str, tuple[int, int]] = QWEN3_8B_GEMMS, ms: Sequence[int] = FULL["ms"],
                   requant_sizes_gb: Sequence[float] = FULL["requant_sizes_gb"],
                   requant_layer: tuple[int, int] = (4096, 4096), contexts: Sequence[int] = FULL["contexts"],
                   decode_batch: int = FULL["decode_batch"], layer_batches: Sequence[int] = FULL["layer_batches"],
                   layer_contexts: Sequence[int] = FULL["layer_contexts"], layer_shape: ModelShape | None = None,
                   backend: str = "triton", seed: int = 0) -> dict[str, Any]:
    """Run every benchmark on ``device`` and write ``gemm.csv``, ``requant.csv``, ``attention.csv``,
    ``decode_layer.csv`` and ``bench.json`` under ``out``; return the ``bench.json`` record. ``decode_batch``
    sequences attend over each of ``contexts`` cached slots. The decode-layer benchmark runs ``layer_shape``
    (default Qwen3-8B) over ``layer_batches`` x ``layer_contexts``, its roofline from the device's entry in
    ``data/gpu_specs.json`` (none on a device it does not list).

    ``bench(fn, quantiles=[0.5, 0.2, 0.8]) -> [ms, ms, ms]``: ``triton.testing.do_bench`` on a GPU,
    :func:`helpers.fp8.bench.wall_clock_bench` for a CPU test. ``backend`` is the FP8 path timed (``"triton"``:
    compiled on a GPU, interpreted on the CPU). Raises ValueError on an empty ``ms`` / ``requant_sizes_gb`` /
    ``contexts`` or a non-positive size, before anything is timed or written.
    """
    for name, values in (("ms", ms), ("requant_sizes_gb", requant_sizes_gb), ("contexts", contexts),
                         ("layer_batches", layer_batches), ("layer_contexts", layer_contexts)):
        if len(values) == 0 or any(v <= 0 for v in values):
            raise ValueError(f"{name} must be a non-empty sequence of positive numbers, got {list(values)!r}")
    if decode_batch < 1:
        raise ValueError(f"decode_batch must be >= 1, got {decode_batch!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    gemm = gemm_benchmark(shapes, ms, device=dev, bench=bench, backend=backend, seed=seed)
    gemm.to_csv(out / "gemm.csv", index=False)
    requant = requant_benchmark(requant_sizes_gb, layer_shape=requant_layer, backend=backend, device=dev,
                                bench=bench, seed=seed)
    requant.to_csv(out / "requant.csv", index=False)
    attention = decode_attention_benchmark(contexts, batch=decode_batch, hp_dtype=torch.bfloat16, backend=backend,
                                           device=dev, timer=bench, seed=seed)
    attention.to_csv(out / "attention.csv", index=False)
    info = {**runtime.environment_info(), **cuda_info()}
    spec = gpu_spec_for_device(info.get("gpu"))
    shape = layer_shape if layer_shape is not None else model_shape("Qwen3-8B")
    layer = decode_layer_benchmark(layer_batches, layer_contexts, device=dev, bench=bench, shape=shape, gpu=spec,
                                   backend=backend, seed=seed)
    layer.to_csv(out / "decode_layer.csv", index=False)
    params = {"shapes": {k: list(v) for k, v in shapes.items()}, "ms": list(ms),
              "requant_sizes_gb": list(requant_sizes_gb), "requant_layer": list(requant_layer),
              "contexts": list(contexts), "decode_batch": decode_batch, "layer_batches": list(layer_batches),
              "layer_contexts": list(layer_contexts), "layer_shape": shape.name,
              "roofline_gpu": spec.name if spec is not None else None, "backend": backend, "seed": seed,
              "timer": getattr(bench, "__module__", "") + "." + getattr(bench, "__name__", repr(bench))}
    record = {"environment": info, "params": params,
              "metrics": _headline(gemm, requant, attention, info.get("fp8_peak_tflops"), layer),
              "files": sorted(p.name for p in out.glob("*.csv"))}
    (out / "bench.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--out DIR`` (default ``results/gpu``), ``--quick``, ``--check`` (only report the GPU)."""
    p = argparse.ArgumentParser(prog="python -m helpers.gpu_bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(runtime.REPO_ROOT / "results" / "gpu"), help="output folder")
    p.add_argument("--quick", action="store_true", help="fewer shapes and sizes (about a minute)")
    p.add_argument("--check", action="store_true", help="only check that a CUDA device is usable, and name it")
    args = p.parse_args(argv)
    if not runtime.has_cuda():
        print(f"gpu_bench: {NO_GPU_MESSAGE}", file=sys.stderr)
        return NO_GPU_EXIT
    if runtime.triton_interpreted():
        print("gpu_bench: TRITON_INTERPRET is set; unset it so the kernels are compiled for the GPU", file=sys.stderr)
        return NO_GPU_EXIT
    info = cuda_info()
    print(f"gpu_bench: {info['gpu']} (sm_{''.join(map(str, info['capability']))}, driver {info['driver']}, "
          f"CUDA {info['cuda']}, torch {torch.__version__})")
    if args.check:
        return 0
    from triton.testing import do_bench

    cfg = QUICK if args.quick else FULL
    record = run_benchmarks(args.out, device="cuda", bench=do_bench, **cfg)
    for name, value in record["metrics"].items():
        print(f"  {name} = {value:.4g}")
    print(f"gpu_bench: wrote {', '.join(record['files'] + ['bench.json'])} under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
