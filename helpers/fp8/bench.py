"""Benchmarks for notebook 01 (benchmarks, not tests: nothing here asserts a time).

* :func:`requant_benchmark` - the per-RL-step weight sync on the CPU (notebook 01) or a GPU
  (:mod:`helpers.gpu_bench`): time to re-quantize a model's worth of high-precision linear weights into existing
  FP8 storage (:func:`helpers.fp8.requantize_model_`) beside ``torch.Tensor.copy_`` of the same source bytes in
  the same process - the physical limit of a memory-bound pass.
* :func:`gemm_benchmark` - on a GPU, ``block_fp8_matmul`` vs bf16 ``torch.matmul`` and ``torch._scaled_mm`` with
  block scales, on Qwen3-8B projection shapes, in TFLOP/s beside the device's FP8 peak (:func:`fp8_peak_tflops`).
  The timing function is a parameter (``triton.testing.do_bench`` by default) so the same code runs on the CPU in a
  tiny interpreter-mode test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from helpers.core.runtime import resolve_backend, triton_interpreted
from helpers.core.timing import peak_rss_delta, time_quantiles
from helpers.fp8 import reference
from helpers.fp8.linear import Fp8Linear, requantize_model_
from helpers.fp8.quant import block_fp8_matmul, quant_act, quant_weight

__all__ = ["QWEN3_8B_GEMMS", "FP8_PEAK_TFLOPS", "GEMM_METHODS", "fp8_peak_tflops", "requant_benchmark",
           "gemm_benchmark", "wall_clock_bench"]

GB = 1e9
# gemm_benchmark's methods, in table order.
GEMM_METHODS = ("bf16", "fp8_block", "fp8_block_w8a8", "fp8_block_autotuned", "scaled_mm_block")
# Qwen3-8B (hidden 4096, intermediate 12288, 32 q heads and 8 kv heads of 128): the projections' (N, K).
QWEN3_8B_GEMMS: dict[str, tuple[int, int]] = {
    "q_proj / o_proj (4096x4096)": (4096, 4096),
    "k_proj / v_proj (1024x4096)": (1024, 4096),
    "gate_proj / up_proj (12288x4096)": (12288, 4096),
    "down_proj (4096x12288)": (4096, 12288),
}
# Dense (no 2:4 sparsity) FP8 tensor-core peaks from NVIDIA's datasheets (the "with sparsity" figure halved).
# Matched against torch.cuda.get_device_name() in order: the first key contained in the name wins.
FP8_PEAK_TFLOPS: dict[str, float] = {
    "H100 PCIe": 1513.0,
    "H100 NVL": 1671.0,
    "H100": 1979.0,  # SXM
    "H200": 1979.0,
    "H800": 1979.0,
    "L40S": 733.0,
    "B200": 4500.0,
}


def fp8_peak_tflops(name: str | None = None) -> float | None:
    """Dense FP8 peak TFLOP/s of the GPU called ``name`` (default: CUDA device 0), or None when unknown / no GPU."""
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(0)
    for key, peak in FP8_PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return peak
    return None


# -- weight sync -------------------------------------------------------------------------------------------------
def _peak_extra_bytes(fn: Callable[[], object], dev: torch.device) -> int | None:
    """Bytes by which one call of ``fn`` raises peak memory above what was in use before it: the process's RSS on
    the CPU (:func:`helpers.core.timing.peak_rss_delta`), allocated CUDA memory on a GPU."""
    if dev.type != "cuda":
        return peak_rss_delta(fn)[1]
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return max(0, torch.cuda.max_memory_allocated(dev) - before)


def requant_benchmark(sizes_gb: Sequence[float], *, layer_shape: tuple[int, int] = (4096, 4096),
                      dtype: torch.dtype = torch.bfloat16, scale_fmt: str = "fp32", backend: str = "torch",
                      repeats: int = 3, warmup: int = 1, measure_rss: bool = True, seed: int = 0,
                      device: torch.device | str = "cpu", bench: Callable | None = None,
                      progress: Callable | None = None) -> pd.DataFrame:
    """Weight-sync cost on this machine: re-quantize ``size`` GB of ``dtype`` weights vs copy the same bytes.

    For each size, ``round(size / layer bytes)`` (at least 1) weights of ``layer_shape`` [N, K] are built on
    ``device``, an FP8 model of :class:`Fp8Linear` layers is quantized from them once, and then, median (and 20th /
    80th percentiles) of ``repeats`` after ``warmup``:

    * ``requant_s``: :func:`requantize_model_` from the high-precision state dict (codes and scales written into the
      existing FP8 storage, layer by layer);
    * ``copy_s``: ``dst.copy_(src)`` for every weight into preallocated tensors of the same dtype and shape (the
      memory-bandwidth floor for a pass that reads those bytes; on a GPU, a device-to-device copy).

    ``bench(fn, quantiles=[0.5, 0.2, 0.8]) -> [ms, ms, ms]`` times each pass (default: the host timer
    :func:`helpers.core.timing.time_quantiles` with ``repeats`` / ``warmup``; on a GPU pass
    ``triton.testing.do_bench``).

    Returns one row per size: ``size_gb`` (actual high-precision bytes / 1e9), ``layers``, ``requant_s``,
    ``copy_s`` (medians) and their ``*_p20`` / ``*_p80``, ``requant_gbps`` / ``copy_gbps`` (source GB per second,
    from the medians), ``ratio`` (= requant_s / copy_s), ``peak_extra_mb`` (during one sync: on the CPU, peak RSS
    above the pre-sync RSS; on a GPU, peak allocated CUDA memory above the pre-sync allocation; None if
    unavailable or ``measure_rss=False``), ``layer_mb`` (one layer's high-precision bytes, the bound the streaming
    design aims for), ``threads``, ``quantizer`` (the implementation that ran: ``"native"`` C kernel, ``"torch"``
    fallback, or ``"triton"``), ``device``.
    """
    n, k = layer_shape
    dev = torch.device(device)
    layer_bytes = n * k * torch.empty(0, dtype=dtype).element_size()
    g = torch.Generator(device=dev).manual_seed(seed)
    if bench is None:
        def bench(fn: Callable[[], object], quantiles: Sequence[float]) -> list[float]:
            return [t * 1e3 for t in time_quantiles(fn, repeats=repeats, warmup=warmup, quantiles=quantiles)]
    rows = []
    it = progress(sizes_gb) if progress is not None else sizes_gb
    for size in it:
        n_layers = max(1, round(size * GB / layer_bytes))
        state = {f"layers.{i}.weight": (torch.randn(n, k, generator=g, device=dev) * 0.02).to(dtype)
                 for i in range(n_layers)}
        model = nn.Module()
        model.layers = nn.ModuleList(Fp8Linear(k, n, bias=False, scale_fmt=scale_fmt, backend=backend, device=dev)
                                     for _ in range(n_layers))
        requantize_model_(model, state)  # fills the storage (and warms the allocator) once
        dst = [torch.empty_like(w) for w in state.values()]
        src = list(state.values())

        def sync() -> None:
            requantize_model_(model, state)

        def copy() -> None:
            for d, s in zip(dst, src):
                d.copy_(s)

        requant_s, requant_p20, requant_p80 = (t / 1e3 for t in bench(sync, quantiles=[0.5, 0.2, 0.8]))
        copy_s, copy_p20, copy_p80 = (t / 1e3 for t in bench(copy, quantiles=[0.5, 0.2, 0.8]))
        peak = _peak_extra_bytes(sync, dev) if measure_rss else None
        total = n_layers * layer_bytes
        rows.append({"size_gb": total / GB, "layers": n_layers, "requant_s": requant_s, "copy_s": copy_s,
                     "requant_s_p20": requant_p20, "requant_s_p80": requant_p80,
                     "copy_s_p20": copy_p20, "copy_s_p80": copy_p80,
                     "requant_gbps": total / GB / requant_s, "copy_gbps": total / GB / copy_s,
                     "ratio": requant_s / copy_s,
                     "peak_extra_mb": None if peak is None else peak / 1e6, "layer_mb": layer_bytes / 1e6,
                     "threads": torch.get_num_threads(),
                     "quantizer": reference.quantizer_impl(src[0], (128, 128)) if backend == "torch" else backend,
                     "device": str(dev)})
        del state, model, dst, src
    return pd.DataFrame(rows)


# -- GEMM (GPU) --------------------------------------------------------------------------------------------------
def wall_clock_bench(fn: Callable[[], object], quantiles: Sequence[float] = (0.5, 0.2, 0.8), reps: int = 3
                     ) -> list[float]:
    """A host-timer stand-in for ``triton.testing.do_bench`` (milliseconds at ``quantiles``), for CPU smoke runs."""
    return [t * 1e3 for t in time_quantiles(fn, repeats=reps, warmup=1, quantiles=quantiles)]


def _scaled_mm_blockwise(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor
                         ) -> torch.Tensor:
    """``torch._scaled_mm`` with 1x128 activation and 128x128 weight scales (cuBLAS blockwise, Hopper+, recent
    torch). Layouts per torch's checks: scale_a [M, K/128] outer-dim-major, scale_b [K/128, N/128]."""
    sa = x_scale.t().contiguous().t()  # [M, K/128] with stride (1, M)
    sb = w_scale.t()  # [K/128, N/128] with stride (1, K/128)
    return torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


def gemm_benchmark(shapes: Mapping[str, tuple[int, int]] = QWEN3_8B_GEMMS, ms: Sequence[int] = (1, 16, 128, 1024, 4096),
                   *, device: torch.device | str | None = None, bench: Callable | None = None,
                   backend: str = "auto", check_rtol: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """TFLOP/s of ``y = x @ W.T`` for each shape name -> (N, K) and each M, by method:

    * ``bf16``: ``torch.matmul`` in bf16 (cuBLAS on a GPU);
    * ``fp8_block``: :func:`helpers.fp8.block_fp8_matmul` on pre-quantized operands (the GEMM alone);
    * ``fp8_block_w8a8``: ``quant_act`` + ``block_fp8_matmul`` (what :class:`Fp8Linear` runs per call);
    * ``fp8_block_autotuned``: the same Triton GEMM autotuned over :data:`helpers.fp8.kernels.GEMM_CONFIGS` (the
      default tiles are untuned), compiled GPU runs only (tuning happens in the timer's warm-up call); ``note``
      names the chosen config;
    * ``scaled_mm_block``: ``torch._scaled_mm`` with block scales, only where this torch/GPU accepts them *and*
      its output agrees with ``fp8_block`` (relative Frobenius difference <= ``check_rtol``); otherwise the row
      has ``ms = nan`` and the reason in ``note``.

    ``bench(fn, quantiles=...) -> [median, p20, p80]`` in ms (default ``triton.testing.do_bench``). Returns rows
    ``shape, n, k, m, method, ms, ms_p20, ms_p80, tflops, note`` (FLOPs = 2 M N K).
    """
    if bench is None:
        from triton.testing import do_bench as bench
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    for shape_name, (n, k) in shapes.items():
        w = (torch.randn(n, k, generator=g) * 0.02).to(dev, torch.bfloat16)
        w_fp8, w_s = quant_weight(w, (128, 128), backend=backend)
        for m in ms:
            x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
            x_fp8, x_s = quant_act(x, 128, backend=backend)
            ref = block_fp8_matmul(x_fp8, x_s, w_fp8, w_s, out_dtype=torch.bfloat16, backend=backend)
            methods: dict[str, Callable[[], object]] = {
                "bf16": lambda: torch.matmul(x, w.t()),
                "fp8_block": lambda: block_fp8_matmul(x_fp8, x_s, w_fp8, w_s, out_dtype=torch.bfloat16,
                                                      backend=backend),
                "fp8_block_w8a8": lambda: block_fp8_matmul(*quant_act(x, 128, backend=backend), w_fp8, w_s,
                                                           out_dtype=torch.bfloat16, backend=backend),
            }
            notes = {name: "" for name in methods}
            if dev.type == "cuda" and resolve_backend(backend) == "triton" and not triton_interpreted():
                from helpers.fp8 import kernels

                methods["fp8_block_autotuned"] = lambda: kernels.block_fp8_matmul_triton(
                    x_fp8, x_s, w_fp8, w_s, (128, 128), out_dtype=torch.bfloat16, autotune=True)
            else:
                notes["fp8_block_autotuned"] = "autotuning needs the compiled Triton GEMM on a GPU"
            try:
                y = _scaled_mm_blockwise(x_fp8, x_s, w_fp8, w_s)
                diff = float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
                if diff <= check_rtol:
                    methods["scaled_mm_block"] = lambda: _scaled_mm_blockwise(x_fp8, x_s, w_fp8, w_s)
                    notes["scaled_mm_block"] = ""
                else:
                    notes["scaled_mm_block"] = f"disagrees with fp8_block (rel diff {diff:.3g})"
            except Exception as exc:  # unsupported device / torch build / layout: recorded, not fatal
                notes["scaled_mm_block"] = f"unsupported: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            for name in GEMM_METHODS:
                fn = methods.get(name)
                if fn is None:
                    rows.append({"shape": shape_name, "n": n, "k": k, "m": m, "method": name, "ms": float("nan"),
                                 "ms_p20": float("nan"), "ms_p80": float("nan"), "tflops": float("nan"),
                                 "note": notes[name]})
                    continue
                med, p20, p80 = bench(fn, quantiles=[0.5, 0.2, 0.8])
                if name == "fp8_block_autotuned":
                    notes[name] = f"tuned: {kernels.gemm_autotuned_config(m, n, k)}"
                rows.append({"shape": shape_name, "n": n, "k": k, "m": m, "method": name, "ms": med, "ms_p20": p20,
                             "ms_p80": p80, "tflops": 2.0 * m * n * k / (med * 1e-3) / 1e12, "note": notes[name]})
    return pd.DataFrame(rows)

