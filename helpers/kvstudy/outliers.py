"""What outlier channels in K do to an FP8 cache's other channels, per scale granularity and clipping (notebook 02).

e4m3 is a floating-point format: below its largest code (448) every normal value keeps the same relative precision
(3 mantissa bits, at most 2**-4 relative rounding error), down to the smallest normal code 2**-6; below that,
subnormal codes have a fixed step of 2**-9 and relative precision is lost. A scale set by an outlier of magnitude
``A`` maps ``A`` to 448, so a channel of typical magnitude ``a`` keeps full precision while
``a / A > 2**-6 / 448`` (about 1 / 28,700) and degrades below it. Unlike int8, where the same outlier costs every
other channel ``log2(A / a)`` of its 7 bits at once, e4m3 only suffers when the outlier-to-typical ratio passes
~10**4 - or when the outliers themselves get clipped (a percentile scale), which matters if they carry signal.

:func:`outlier_sweep` measures it on synthetic keys: ``n_outlier`` channels of KV head 0 set to ``ratio`` times the
typical magnitude, the rest standard normal, for per-tensor / per-head scales from the amax or the 99.9th
percentile (x 1.05).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from helpers.kvcache.fp8 import Fp8KVCache
from helpers.kvcache.scales import NEMO_RL_MARGIN, KVScales, compute_qkv_scales

__all__ = ["OUTLIER_METHODS", "outlier_sweep", "OUTLIER_SHAPES", "HEAD_SWEEP_ARMS", "realistic_head_sweep",
           "holding_threshold"]

# (granularity, percentile) per method; margin NeMo-RL's 1.05.
OUTLIER_METHODS: dict[str, tuple[str, float]] = {
    "per-tensor amax": ("tensor", 100.0),
    "per-head amax": ("head", 100.0),
    "per-tensor p99.9": ("tensor", 99.9),
    "per-head p99.9": ("head", 99.9),
}


@torch.no_grad()
def outlier_sweep(ratios: Sequence[float], *, n_tokens: int = 2048, n_kv_head: int = 2, head_dim: int = 32,
                  n_outlier: int = 2, seed: int = 0) -> pd.DataFrame:
    """Rows ``(ratio, method, rel_err_typical, rel_err_typical_head0, rel_err_outliers, saturated_fraction)``:
    the relative RMS error after an FP8 round trip of the typical channels (all heads, and head 0 that holds the
    outliers) and of the outlier channels, and the fraction of clipped entries."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, n_kv_head, n_tokens, head_dim, generator=g)  # [1, H_kv, T, D]
    outlier = torch.zeros(n_kv_head, head_dim, dtype=torch.bool)
    outlier[0, head_dim - n_outlier:] = True  # the last channels of KV head 0
    mask = outlier[None, :, None, :].expand_as(base)
    typical_h0 = torch.zeros_like(mask)
    typical_h0[:, 0] = ~outlier[0][None, :]
    rows = []
    for ratio in ratios:
        k = torch.where(mask, ratio * (1.0 + 0.1 * base), base)  # outliers: ratio * (1 +- 10%)
        for method, (granularity, percentile) in OUTLIER_METHODS.items():
            _, ks, _ = compute_qkv_scales(k, k, k, granularity=granularity, percentile=percentile,
                                          margin=NEMO_RL_MARGIN)
            scales = KVScales(torch.ones(1, n_kv_head) if granularity == "head" else torch.ones(1),
                              ks[None], ks[None])
            cache = Fp8KVCache(1, 1, n_tokens, n_kv_head, head_dim, n_head=n_kv_head, granularity=granularity,
                               scales=scales)
            cache.append(0, k, k)
            rk, _ = cache.read(0)
            err = rk - k

            def rel(sel: torch.Tensor) -> float:
                return float(err[sel].norm() / k[sel].norm())

            rows.append({"ratio": ratio, "method": method, "rel_err_typical": rel(~mask),
                         "rel_err_typical_head0": rel(typical_h0), "rel_err_outliers": rel(mask),
                         "saturated_fraction": cache.saturation_metrics()["k_saturated_fraction"]})
    return pd.DataFrame(rows)


OUTLIER_SHAPES = ("offset", "spike")
"""``offset``: a few K channels of one KV head carry a large constant offset on every token (the massive K
channels of models without QK-norm, e.g. from Qwen2.5's k_proj bias); ``spike``: a few tokens (an attention-sink
position and a few random ones) carry a large value on every channel of that head."""

# (granularity, percentile, policy note) of the scale arms of the realistic-head sweep; "unit" is scale 1.0.
HEAD_SWEEP_ARMS: dict[str, tuple[str, float] | None] = {
    "unit": None,
    "per-tensor amax": ("tensor", 100.0),
    "per-head amax": ("head", 100.0),
    "per-tensor p99.9": ("tensor", 99.9),
}


def _rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim with unit gain (Qwen3's q_norm / k_norm at init)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """HF rotate-half RoPE of x ``[B, h, T, D]`` at positions 0..T-1 with base ``theta``."""
    d, t = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv  # [T, D/2]
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@torch.no_grad()
def realistic_head_sweep(magnitudes: Sequence[float], *, head_dim: int = 128, n_head: int = 8, n_kv_head: int = 2,
                         n_tokens: int = 512, rope_theta: float = 1e6, n_outlier: int = 2, n_spike: int = 4,
                         seed: int = 0) -> pd.DataFrame:
    """Outliers of the shape real models show, in one synthetic attention layer of realistic size.

    q, k, v ``[1, heads, n_tokens, head_dim]`` are standard normal (a randomly initialised layer's projections of
    a normalised residual stream: unit typical magnitude); then, for each magnitude ``m`` and shape
    (:data:`OUTLIER_SHAPES`), KV head 0's keys get ``m`` added on ``n_outlier`` channels (``offset``: the
    lowest-frequency RoPE pair, every token) or on every channel of ``n_spike`` tokens (``spike``: token 0 and
    random others), before the optional QK-norm (RMSNorm over ``head_dim`` per head, on q and k: Qwen3) and RoPE
    with base ``rope_theta`` (Qwen3: 1e6). The cache stores K and V in e4m3 with fresh scales (each arm of
    :data:`HEAD_SWEEP_ARMS`: computed on this very tensor, i.e. per-step calibration; ``unit``: 1.0).

    Rows ``(qk_norm, shape, magnitude, arm, attn_rel_err, attn_rel_err_head0, attn_rel_err_other,
    k_rel_err_typical, k_saturated_fraction, k_amax)``: causal attention output through the FP8 cache vs the
    high-precision one (relative Frobenius error over all heads, over the query heads reading KV head 0, and the
    others), the relative error of the non-outlier K entries, and the clipped fraction.
    """
    from helpers.kvcache.cache import attention_reference

    if head_dim % 2 or n_head % n_kv_head:
        raise ValueError(f"head_dim must be even and n_head a multiple of n_kv_head, got {head_dim}, {n_head}, "
                         f"{n_kv_head}")
    g = torch.Generator().manual_seed(seed)
    q0 = torch.randn(1, n_head, n_tokens, head_dim, generator=g)
    k0 = torch.randn(1, n_kv_head, n_tokens, head_dim, generator=g)
    v = torch.randn(1, n_kv_head, n_tokens, head_dim, generator=g)
    out_mask = torch.zeros(1, n_kv_head, n_tokens, head_dim, dtype=torch.bool)
    masks = {"offset": out_mask.clone(), "spike": out_mask.clone()}
    masks["offset"][:, 0, :, [head_dim // 2 - 1, head_dim - 1][:n_outlier]] = True
    spike_tok = torch.cat([torch.zeros(1, dtype=torch.long),
                           torch.randperm(n_tokens - 1, generator=g)[:n_spike - 1] + 1])
    masks["spike"][:, 0, spike_tok, :] = True
    key_mask = torch.ones(1, n_tokens, dtype=torch.bool)
    group = n_head // n_kv_head
    rows = []
    for qk_norm in (False, True):
        q = _rope(_rms_norm(q0) if qk_norm else q0, rope_theta)
        for shape, sel in masks.items():
            for m in magnitudes:
                k_raw = k0 + m * sel.float()
                k = _rope(_rms_norm(k_raw) if qk_norm else k_raw, rope_theta)
                o_hp = attention_reference(q, k, v, key_mask)  # [1, H, T, D]
                for arm, spec in HEAD_SWEEP_ARMS.items():
                    if spec is None:
                        scales = KVScales.unit(1)
                        gran = "tensor"
                    else:
                        gran, pct = spec
                        _, ks, vs = compute_qkv_scales(k, k, v, granularity=gran, percentile=pct,
                                                       margin=NEMO_RL_MARGIN)
                        scales = KVScales(torch.ones(1, n_head) if gran == "head" else torch.ones(1), ks[None],
                                          vs[None])
                    cache = Fp8KVCache(1, 1, n_tokens, n_kv_head, head_dim, n_head=n_head, granularity=gran,
                                       scales=scales, backend="torch")
                    cache.append(0, k, v)
                    o = cache.attention(0, q)
                    rk, _ = cache.read(0)
                    err = o - o_hp

                    def rel(e: torch.Tensor, ref: torch.Tensor) -> float:
                        return float(e.norm() / ref.norm().clamp_min(1e-30))

                    typical = ~sel
                    rows.append({
                        "qk_norm": qk_norm, "shape": shape, "magnitude": m, "arm": arm,
                        "attn_rel_err": rel(err, o_hp),
                        "attn_rel_err_head0": rel(err[:, :group], o_hp[:, :group]),
                        "attn_rel_err_other": rel(err[:, group:], o_hp[:, group:]),
                        "k_rel_err_typical": rel((rk - k)[typical], k[typical]),
                        "k_saturated_fraction": cache.saturation_metrics()["k_saturated_fraction"],
                        "k_amax": float(k.abs().max()),
                    })
    return pd.DataFrame(rows)


def holding_threshold(sweep: pd.DataFrame, *, metric: str = "attn_rel_err", factor: float = 2.0
                      ) -> pd.DataFrame:
    """Where a scale stops holding: per ``(qk_norm, shape, arm)`` of :func:`realistic_head_sweep`'s table, the
    smallest swept magnitude at which ``metric`` exceeds ``factor`` x its value at the smallest magnitude (the
    no-outlier level when the sweep starts at 0), NaN when it never does. Columns ``qk_norm, shape, arm,
    baseline, threshold, value_at_threshold``."""
    if not factor > 1:
        raise ValueError(f"factor must be > 1, got {factor!r}")
    missing = {"qk_norm", "shape", "arm", "magnitude", metric} - set(sweep.columns)
    if missing:
        raise ValueError(f"sweep is missing columns {sorted(missing)}")
    rows = []
    for (qk, shape, arm), d in sweep.groupby(["qk_norm", "shape", "arm"], sort=False):
        d = d.sort_values("magnitude")
        base = float(d[metric].iloc[0])
        over = d[d[metric] > factor * base]
        rows.append({"qk_norm": qk, "shape": shape, "arm": arm, "baseline": base,
                     "threshold": float(over["magnitude"].iloc[0]) if len(over) else float("nan"),
                     "value_at_threshold": float(over[metric].iloc[0]) if len(over) else float("nan")})
    return pd.DataFrame(rows)
