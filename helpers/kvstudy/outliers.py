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

__all__ = ["OUTLIER_METHODS", "outlier_sweep"]

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
