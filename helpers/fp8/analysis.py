"""Quantization-error metrics for notebook 01: what blockwise FP8 costs next to coarser scaling schemes.

Weight schemes compared (all float8_e4m3fn, scale ``s = max(amax, eps) / 448`` over the scaling group):

* ``per_tensor``   one scale for the whole [N, K] weight;
* ``per_channel``  one scale per output channel (row of [N, K]);
* ``block_fp32``   128 x 128 blocks with fp32 scales (:func:`helpers.fp8.quant_weight`);
* ``block_ue8m0``  128 x 128 blocks with power-of-two scales (DeepGEMM / DeepSeek-V3.1).

Activation schemes (dynamic, on real activations [tokens, K]): ``per_tensor``, ``per_token`` (one scale per row)
and ``group_fp32`` / ``group_ue8m0`` (1 x 128 groups along K, :func:`helpers.fp8.quant_act`).

The per-tensor and per-channel quantizers here are separate schemes kept for the comparison; the blockwise ones
call the package's quantizer (one source of truth).

Metrics (float64 sums of squares): relative error ``||X - deq(X)||_F / ||X||_F`` and
``SNR_dB = 10 log10(||X||^2 / ||X - deq(X)||^2)`` (= ``-20 log10(rel_err)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from helpers.fp8.format import FP8_DTYPE, FP8_E4M3_MAX, fake_quant
from helpers.fp8.quant import dequant_weight, quant_act, quant_weight

__all__ = [
    "WEIGHT_SCHEMES", "ACT_SCHEMES", "e4m3_values", "error_metrics", "fake_quant_weight",
    "fake_quant_act", "weight_error_table", "act_error_table", "synthetic_outlier_weight", "median_by_scheme",
    "e4m3_relative_error", "outlier_sweep", "adversarial_tensor", "backend_agreement", "gemm_error",
]

WEIGHT_SCHEMES = ("per_tensor", "per_channel", "block_fp32", "block_ue8m0")
ACT_SCHEMES = ("per_tensor", "per_token", "group_fp32", "group_ue8m0")


def e4m3_values() -> torch.Tensor:
    """All finite non-negative float8_e4m3fn values, ascending, as fp32 (0, the subnormals 2^-9..7*2^-9, ..., 448)."""
    codes = torch.arange(128, dtype=torch.uint8).view(FP8_DTYPE).float()  # sign bit 0
    return torch.unique(codes[torch.isfinite(codes)])


def fake_quant_weight(w: torch.Tensor, scheme: str, block_size: Sequence[int] = (128, 128)) -> torch.Tensor:
    """Quantize then dequantize a weight [N, K] under ``scheme`` (see :data:`WEIGHT_SCHEMES`); fp32 [N, K]."""
    if w.ndim != 2:
        raise ValueError(f"w must be [N, K], got shape {tuple(w.shape)}")
    w = w.float()
    if scheme == "per_tensor":
        return fake_quant(w, w.abs().amax())
    if scheme == "per_channel":
        return fake_quant(w, w.abs().amax(dim=1, keepdim=True))
    if scheme in ("block_fp32", "block_ue8m0"):
        q, s = quant_weight(w, tuple(block_size), scale_fmt=scheme.split("_")[1], backend="torch")
        return dequant_weight(q, s, tuple(block_size))
    raise ValueError(f"scheme must be one of {WEIGHT_SCHEMES}, got {scheme!r}")


def fake_quant_act(x: torch.Tensor, scheme: str, group_size: int = 128) -> torch.Tensor:
    """Quantize then dequantize activations [M, K] under ``scheme`` (see :data:`ACT_SCHEMES`); fp32 [M, K]."""
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    x = x.float()
    if scheme == "per_tensor":
        return fake_quant(x, x.abs().amax())
    if scheme == "per_token":
        return fake_quant(x, x.abs().amax(dim=1, keepdim=True))
    if scheme in ("group_fp32", "group_ue8m0"):
        q, s = quant_act(x, group_size, scale_fmt=scheme.split("_")[1], backend="torch")  # s: [M, ceil(K/g)]
        return q.float() * s.repeat_interleave(group_size, dim=1)[:, : x.shape[1]]
    raise ValueError(f"scheme must be one of {ACT_SCHEMES}, got {scheme!r}")


def error_metrics(ref: torch.Tensor, approx: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """``rel_err`` and ``snr_db`` of ``approx`` against ``ref`` (same shape), over the elements where ``mask`` is
    True (all when None). Differences in fp32, sums of squares accumulated in float64.
    A zero reference gives rel_err nan; an exact match gives snr_db inf."""
    ref32 = ref.float()
    err = ref32 - approx.float()  # exact enough: both are fp32 and the error is ~3 % of ref
    if mask is not None:
        ref32, err = ref32[mask], err[mask]
    sig = float(ref32.square().sum(dtype=torch.float64))  # float64 accumulation: no loss on large tensors
    noise = float(err.square().sum(dtype=torch.float64))
    rel = math.sqrt(noise / sig) if sig > 0 else float("nan")
    snr = 10 * math.log10(sig / noise) if noise > 0 and sig > 0 else (float("inf") if sig > 0 else float("nan"))
    return {"rel_err": rel, "snr_db": snr}


def weight_error_table(weights: Mapping[str, torch.Tensor], schemes: Sequence[str] = WEIGHT_SCHEMES,
                       masks: Mapping[str, torch.Tensor] | None = None) -> pd.DataFrame:
    """One row per (layer, scheme): ``layer, n, k, scheme, rel_err, snr_db``; with ``masks`` (name -> bool [N, K])
    also ``rel_err_masked, snr_db_masked`` over the masked elements (e.g. the non-outlier bulk)."""
    rows = []
    for name, w in weights.items():
        for scheme in schemes:
            deq = fake_quant_weight(w, scheme)
            row = {"layer": name, "n": w.shape[0], "k": w.shape[1], "scheme": scheme, **error_metrics(w, deq)}
            if masks is not None and name in masks:
                m = error_metrics(w, deq, masks[name])
                row.update(rel_err_masked=m["rel_err"], snr_db_masked=m["snr_db"])
            rows.append(row)
    return pd.DataFrame(rows)


def act_error_table(acts: Mapping[str, torch.Tensor], schemes: Sequence[str] = ACT_SCHEMES,
                    group_size: int = 128) -> pd.DataFrame:
    """One row per (layer, scheme) for activations ``name -> [tokens, K]``: ``layer, tokens, k, scheme, rel_err,
    snr_db, amax_over_rms`` (the tensor's peak-to-RMS ratio, a measure of its outliers)."""
    rows = []
    for name, x in acts.items():
        x = x.float()
        crest = float(x.abs().amax() / x.pow(2).mean().sqrt().clamp_min(1e-30))
        for scheme in schemes:
            rows.append({"layer": name, "tokens": x.shape[0], "k": x.shape[1], "scheme": scheme,
                         **error_metrics(x, fake_quant_act(x, scheme, group_size)), "amax_over_rms": crest})
    return pd.DataFrame(rows)


def synthetic_outlier_weight(n: int, k: int, *, n_outliers: int = 4, outlier_scale: float = 100.0,
                             axis: str = "input", std: float = 0.02, seed: int = 0
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian weight [N, K] (``std``) with ``n_outliers`` input channels (columns, ``axis="input"``) or output
    channels (rows, ``axis="output"``) multiplied by ``outlier_scale`` - the pattern LLM outlier features leave in
    the weights that read them. Returns ``(w fp32 [N, K], bulk_mask bool [N, K])``, the mask True off the outliers."""
    if axis not in ("input", "output"):
        raise ValueError(f"axis must be 'input' or 'output', got {axis!r}")
    dim = k if axis == "input" else n
    if not 0 <= n_outliers <= dim:
        raise ValueError(f"n_outliers must be in [0, {dim}], got {n_outliers}")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * std
    idx = torch.randperm(dim, generator=g)[:n_outliers]
    bulk = torch.ones(n, k, dtype=torch.bool)
    if axis == "input":
        w[:, idx] *= outlier_scale
        bulk[:, idx] = False
    else:
        w[idx, :] *= outlier_scale
        bulk[idx, :] = False
    return w, bulk


def median_by_scheme(df: pd.DataFrame, value: str = "rel_err", order: Sequence[str] | None = None) -> pd.Series:
    """Median of ``value`` per scheme (in ``order`` when given)."""
    med = df.groupby("scheme")[value].median()
    return med.reindex(list(order)) if order is not None else med



def e4m3_relative_error(ratios: torch.Tensor) -> torch.Tensor:
    """Relative rounding error ``|deq(x) - x| / x`` of values ``x = ratio * amax`` (ratios in (0, 1]) quantized
    with their group's scale ``amax / 448``: flat (<= 2^-4) while ``x`` stays in e4m3's normal range, i.e.
    ``ratio >= 2^-6 / 448``, growing in the subnormals and 1 (flushed to zero) below ``2^-10 / 448``."""
    x = ratios.float()
    deq = fake_quant(x, torch.tensor(1.0))
    return ((deq.double() - x.double()).abs() / x.double()).float()


def outlier_sweep(n: int, k: int, scales: Sequence[float], *, n_outliers: int = 4,
                  axes: Sequence[str] = ("input", "output"), schemes: Sequence[str] = WEIGHT_SCHEMES,
                  seed: int = 0) -> pd.DataFrame:
    """Error of each scheme on :func:`synthetic_outlier_weight` as the outlier magnitude grows.

    Rows: ``axis, outlier_scale, scheme, rel_err, snr_db`` (whole tensor, dominated by the outliers themselves)
    and ``rel_err_bulk, snr_db_bulk`` (the non-outlier elements: what a coarse scale sacrifices)."""
    rows = []
    for axis in axes:
        for scale in scales:
            w, bulk = synthetic_outlier_weight(n, k, n_outliers=n_outliers, outlier_scale=scale, axis=axis, seed=seed)
            for scheme in schemes:
                deq = fake_quant_weight(w, scheme)
                full, part = error_metrics(w, deq), error_metrics(w, deq, bulk)
                rows.append({"axis": axis, "outlier_scale": scale, "scheme": scheme, **full,
                             "rel_err_bulk": part["rel_err"], "snr_db_bulk": part["snr_db"]})
    return pd.DataFrame(rows)


# -- kernel validation (notebook section 2) ----------------------------------------------------------------------
def adversarial_tensor(kind: str, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """fp32 test inputs for the backend comparison.

    * ``random``: N(0, 3^2);
    * ``zero_blocks``: random with the first 128 x 128 block and the first 128 columns of row 0 set to zero
      (an all-zero weight block and an all-zero activation group: zero codes, finite scale);
    * ``pow2_carry``: each element ``m * (2^e)(1 - 2^-6) * amax/448`` with e in 0..8, so that ``x / s`` lands just
      below a power of two and rounds *up* across it (the carry the Triton interpreter's cast gets wrong), plus one
      element at ``amax`` per row (448 exactly, the saturation edge);
    * ``wide_range``: log-uniform magnitudes over 2^-20 .. 2^4 with random signs (subnormals and flush-to-zero).
    """
    g = torch.Generator().manual_seed(seed)
    n, k = shape
    if kind == "random":
        return torch.randn(n, k, generator=g) * 3
    if kind == "zero_blocks":
        x = torch.randn(n, k, generator=g) * 3
        x[:128, :128] = 0
        x[0, :128] = 0
        return x
    if kind == "pow2_carry":
        amax = 5.0
        e = torch.randint(0, 9, (n, k), generator=g).float()
        sign = torch.randint(0, 2, (n, k), generator=g).float() * 2 - 1
        x = sign * (2.0**e) * (1 - 2.0**-6) * (amax / FP8_E4M3_MAX)
        x[:, ::97] = amax  # every row and every 128-group holds its amax at 448 after scaling (97 < 128)
        return x
    if kind == "wide_range":
        mag = 2.0 ** (torch.rand(n, k, generator=g) * 24 - 20)
        return mag * (torch.randint(0, 2, (n, k), generator=g).float() * 2 - 1)
    raise ValueError(f"kind must be one of random, zero_blocks, pow2_carry, wide_range, got {kind!r}")


def backend_agreement(shapes: Sequence[tuple[int, int]] = ((130, 200), (64, 384), (17, 33)),
                      kinds: Sequence[str] = ("random", "zero_blocks", "pow2_carry", "wide_range"),
                      scale_fmts: Sequence[str] = ("fp32", "ue8m0"), backend: str = "triton",
                      seed: int = 0) -> pd.DataFrame:
    """Compare ``backend``'s quantizers to the torch path bit for bit, for weights (128 x 128 blocks) and
    activations (1 x 128 groups), over input kinds (:func:`adversarial_tensor`), shapes and scale formats.

    Rows: ``op, kind, shape, scale_fmt, codes_equal, codes_total, scales_equal, scales_total, bit_exact``; codes
    compare by their bytes. The Triton interpreter's "slow on CPU" warning is silenced here (it is expected)."""
    import warnings

    rows = []
    for shape in shapes:
        for kind in kinds:
            x = adversarial_tensor(kind, shape, seed)
            for fmt in scale_fmts:
                for op in ("quant_weight", "quant_act"):
                    fn = quant_weight if op == "quant_weight" else quant_act
                    arg = (128, 128) if op == "quant_weight" else 128
                    q_ref, s_ref = fn(x, arg, scale_fmt=fmt, backend="torch")
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)
                        q, s = fn(x, arg, scale_fmt=fmt, backend=backend)
                    ce = int((q.view(torch.uint8) == q_ref.view(torch.uint8)).sum())
                    se = int((s.view(torch.int32) == s_ref.view(torch.int32)).sum())
                    rows.append({"op": op, "kind": kind, "shape": f"{shape[0]}x{shape[1]}", "scale_fmt": fmt,
                                 "codes_equal": ce, "codes_total": q.numel(), "scales_equal": se,
                                 "scales_total": s.numel(), "bit_exact": ce == q.numel() and se == s.numel()})
    return pd.DataFrame(rows)


def gemm_error(shapes: Sequence[tuple[int, int, int]] = ((5, 130, 200), (33, 64, 384), (1, 17, 33)),
               backends: Sequence[str] = ("torch", "triton"), scale_fmt: str = "fp32", seed: int = 0) -> pd.DataFrame:
    """``block_fp8_matmul`` (fp32 output) against the float64 product of the dequantized operands, per
    (M, N, K) and backend: ``max_abs_err`` and ``rel_err`` (Frobenius) - the accumulation error alone - and
    ``rel_err_vs_fp32_linear``: the whole W8A8 error against the unquantized fp32 ``x @ w.T``."""
    import warnings

    from helpers.fp8.quant import block_fp8_matmul

    g = torch.Generator().manual_seed(seed)
    rows = []
    for m, n, k in shapes:
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.05
        xq, xs = quant_act(x, 128, scale_fmt=scale_fmt, backend="torch")
        wq, ws = quant_weight(w, (128, 128), scale_fmt=scale_fmt, backend="torch")
        x_deq = xq.double() * xs.double().repeat_interleave(128, dim=1)[:, :k]
        ref = x_deq @ dequant_weight(wq, ws).double().T
        exact = x.double() @ w.double().T
        for backend in backends:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                y = block_fp8_matmul(xq, xs, wq, ws, out_dtype=torch.float32, backend=backend).double()
            rows.append({"m": m, "n": n, "k": k, "backend": backend, "max_abs_err": float((y - ref).abs().max()),
                         "rel_err": float((y - ref).norm() / ref.norm()),
                         "rel_err_vs_fp32_linear": float((y - exact).norm() / exact.norm())})
    return pd.DataFrame(rows)
