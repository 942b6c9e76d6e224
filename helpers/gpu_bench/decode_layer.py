"""One transformer layer's decode step at Qwen3-8B shapes with the project's own kernels, timed beside the decode
roofline's prediction for the same device (``decode_layer.csv`` of ``python -m helpers.gpu_bench``).

The layer (:class:`DecodeLayer`): RMSNorm -> fused q/k/v projection -> decode attention of the ``B`` new queries
over ``context`` cached slots per sequence -> o projection + residual -> RMSNorm -> fused gate/up projection ->
SiLU(gate) * up -> down projection + residual. Per mode:

* ``bf16`` - BF16 ``torch.matmul`` linears (cuBLAS on a GPU), BF16 :class:`~helpers.kvcache.KVCache`;
* ``w8a8`` - block-FP8 linears: :func:`helpers.fp8.quant_act` (1 x 128 groups) + :func:`helpers.fp8.block_fp8_matmul`
  on weights quantized by :func:`helpers.fp8.quant_weight` (128 x 128 blocks), BF16 cache;
* ``w8a8_kv8`` - the same linears, :class:`~helpers.kvcache.Fp8KVCache` (per-tensor scales).

Attention is :func:`helpers.kvcache.decode_attention` (the Triton kernel on a GPU). Left out, and said so: RoPE,
QK-norm and writing the new token's K/V into the cache (elementwise work on ``B x 1024`` values, against reads of
``B x context x 2048`` cached values and 0.4 GB of weights), so that one call can be timed repeatedly.

Beside each time: the roofline time of one layer (:func:`helpers.roofline.layer_seconds`) on the device's
datasheet peaks (``data/gpu_specs.json``; NaN for a device it does not list, e.g. the CPU) and
``fraction_of_roofline = roofline_ms / ms``. The CPU test runs the same code at tiny shapes under the Triton
interpreter (``tests/test_gpu_bench.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pandas as pd
import torch

from helpers.fp8.quant import block_fp8_matmul, quant_act, quant_weight
from helpers.kvcache import Fp8KVCache, KVCache, KVScales, decode_attention
from helpers.roofline import GpuSpec, ModelShape, layer_seconds, model_shape

__all__ = ["LAYER_MODES", "BATCHES", "CONTEXTS", "DecodeLayer", "filled_cache", "decode_layer_benchmark"]

LAYER_MODES = ("bf16", "w8a8", "w8a8_kv8")
BATCHES = (1, 16, 64, 256)
CONTEXTS = (1024, 8192, 32768)
RMS_EPS = 1e-6  # Qwen3's rms_norm_eps
# Elements of random K/V generated per append while filling a cache: bounds the fp32 temporaries (256 MB).
FILL_CHUNK_ELEMENTS = 2 ** 26
# The K/V values are N(0, 1); a per-tensor scale of 6 / 448 keeps them inside e4m3's range bar ~2e-9 of them.
KV_AMAX = 6.0


def _rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """RMSNorm in fp32, back to x's dtype: ``x / sqrt(mean(x^2) + eps) * w``. x ``[B, hidden]``."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS) * w.float()).to(x.dtype)


class DecodeLayer:
    """One decoder layer's weights (random, seeded), in BF16 and block-FP8, and its decode step.

    Weights, ``[N, K]`` BF16 (std 0.02) plus their FP8 codes and ``[ceil(N/128), ceil(K/128)]`` fp32 scales:
    ``qkv`` ``[(H + 2 H_kv) d, hidden]``, ``o`` ``[hidden, H d]``, ``gate_up`` ``[2 I, hidden]``, ``down``
    ``[hidden, I]``. ``backend``: the FP8 path (``"triton"``: compiled on a GPU, interpreted on the CPU).
    """

    def __init__(self, shape: ModelShape, *, device: torch.device | str, backend: str = "triton", seed: int = 0):
        if shape.n_experts:
            raise ValueError(f"DecodeLayer models a dense layer; {shape.name} has {shape.n_experts} experts")
        self.shape, self.backend, self.device = shape, backend, torch.device(device)
        s = shape
        g = torch.Generator(device="cpu").manual_seed(seed)
        dims = {"qkv": ((s.n_heads + 2 * s.n_kv_heads) * s.head_dim, s.hidden), "o": (s.hidden, s.n_heads * s.head_dim),
                "gate_up": (2 * s.intermediate, s.hidden), "down": (s.hidden, s.intermediate)}
        self.w: dict[str, torch.Tensor] = {}
        self.w_fp8: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, (n, k) in dims.items():
            w = (torch.randn(n, k, generator=g) * 0.02).to(self.device, torch.bfloat16)
            self.w[name] = w
            self.w_fp8[name] = quant_weight(w, (128, 128), backend=backend)
        self.norm1 = torch.ones(s.hidden, dtype=torch.bfloat16, device=self.device)
        self.norm2 = torch.ones(s.hidden, dtype=torch.bfloat16, device=self.device)

    def _linear(self, x: torch.Tensor, name: str, fp8: bool) -> torch.Tensor:
        """``x @ W.T`` for x ``[B, K]`` BF16 -> ``[B, N]`` BF16: cuBLAS BF16, or W8A8 (quantize x, block GEMM)."""
        if not fp8:
            return x @ self.w[name].t()
        wq, ws = self.w_fp8[name]
        xq, xs = quant_act(x, 128, backend=self.backend)
        return block_fp8_matmul(xq, xs, wq, ws, out_dtype=torch.bfloat16, backend=self.backend)

    def step(self, x: torch.Tensor, cache: KVCache | Fp8KVCache, *, fp8_linears: bool) -> torch.Tensor:
        """One decode step: x ``[B, hidden]`` BF16 (the new token of each sequence) attending over layer 0 of
        ``cache`` -> ``[B, hidden]`` BF16."""
        s = self.shape
        b = x.shape[0]
        qkv = self._linear(_rms_norm(x, self.norm1), "qkv", fp8_linears)  # [B, (H + 2 H_kv) d]
        q = qkv[:, : s.n_heads * s.head_dim].reshape(b, s.n_heads, s.head_dim)  # [B, H, d]
        attn = decode_attention(q, cache, 0, backend=self.backend)  # fp32 [B, H, d]
        x = x + self._linear(attn.to(torch.bfloat16).reshape(b, s.n_heads * s.head_dim), "o", fp8_linears)
        gu = self._linear(_rms_norm(x, self.norm2), "gate_up", fp8_linears)  # [B, 2 I]
        gate, up = gu.split(s.intermediate, dim=-1)
        return x + self._linear(torch.nn.functional.silu(gate) * up, "down", fp8_linears)


def filled_cache(shape: ModelShape, batch: int, context: int, *, fp8: bool, device: torch.device | str,
                 backend: str = "triton", seed: int = 0) -> KVCache | Fp8KVCache:
    """A one-layer cache of ``batch`` sequences with ``context`` slots each, every slot written with N(0, 1)
    K and V (in chunks of :data:`FILL_CHUNK_ELEMENTS`): BF16 :class:`KVCache`, or :class:`Fp8KVCache` with
    per-tensor scales ``KV_AMAX / 448``."""
    s = shape
    dev = torch.device(device)
    if fp8:
        unit = torch.full((1,), KV_AMAX / 448.0)
        cache = Fp8KVCache(1, batch, context, s.n_kv_heads, s.head_dim, n_head=s.n_heads, dtype=torch.bfloat16,
                           backend=backend, device=dev, scales=KVScales(unit, unit, unit))
    else:
        cache = KVCache(1, batch, context, s.n_kv_heads, s.head_dim, dtype=torch.bfloat16, device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    chunk = max(1, FILL_CHUNK_ELEMENTS // (batch * s.n_kv_heads * s.head_dim))
    for start in range(0, context, chunk):
        n = min(chunk, context - start)
        k = torch.randn(batch, s.n_kv_heads, n, s.head_dim, generator=g, device=dev, dtype=torch.bfloat16)
        v = torch.randn(batch, s.n_kv_heads, n, s.head_dim, generator=g, device=dev, dtype=torch.bfloat16)
        cache.append(0, k, v)
    return cache


def decode_layer_benchmark(batches: Sequence[int] = BATCHES, contexts: Sequence[int] = CONTEXTS, *,
                           device: torch.device | str, bench: Callable[..., list[float]],
                           shape: ModelShape | None = None, gpu: GpuSpec | None = None,
                           modes: Sequence[str] = LAYER_MODES, backend: str = "triton",
                           seed: int = 0) -> pd.DataFrame:
    """Time :meth:`DecodeLayer.step` for every batch x context x mode (default: Qwen3-8B's layer shapes) and put
    the roofline beside it. ``bench(fn, quantiles=[0.5, 0.2, 0.8]) -> [ms, ms, ms]`` (``triton.testing.do_bench``
    on a GPU). ``gpu``: the datasheet the roofline uses (None: no roofline column figures).

    Rows ``batch, context, mode, ms, ms_p20, ms_p80, weight_bytes, kv_bytes, gb_per_s, roofline_ms,
    fraction_of_roofline, speedup_vs_bf16, predicted_speedup_vs_bf16, device, backend``; ``gb_per_s`` is
    (weights + K/V bytes) over the median time. One cache at a time is held (the BF16 one serves bf16 and w8a8).
    """
    for name, values in (("batches", batches), ("contexts", contexts)):
        if len(values) == 0 or any(isinstance(v, bool) or int(v) != v or v < 1 for v in values):
            raise ValueError(f"{name} must be a non-empty sequence of ints >= 1, got {list(values)!r}")
    unknown = [m for m in modes if m not in LAYER_MODES]
    if unknown or not modes:
        raise ValueError(f"modes must be a non-empty subset of {LAYER_MODES}, got {list(modes)!r}")
    shape = shape if shape is not None else model_shape("Qwen3-8B")
    dev = torch.device(device)
    layer = DecodeLayer(shape, device=dev, backend=backend, seed=seed)
    lin_params = shape.attn_params + shape.dense_mlp_params
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    rows = []
    for b in batches:
        x = torch.randn(b, shape.hidden, generator=g).to(dev, torch.bfloat16)
        for c in contexts:
            by_mode: dict[str, float] = {}
            for fp8_kv in (False, True):
                run_modes = [m for m in modes if (m == "w8a8_kv8") == fp8_kv]
                if not run_modes:
                    continue
                cache = filled_cache(shape, b, c, fp8=fp8_kv, device=dev, backend=backend, seed=seed)
                for m in run_modes:
                    fp8_lin = m != "bf16"
                    med, p20, p80 = bench(lambda: layer.step(x, cache, fp8_linears=fp8_lin), quantiles=[0.5, 0.2, 0.8])
                    by_mode[m] = med
                    wbytes = lin_params * ((1 + 4 / 128 ** 2) if fp8_lin else 2)
                    kvbytes = 2 * b * c * shape.n_kv_heads * shape.head_dim * (1 if fp8_kv else 2)
                    roof = layer_seconds(shape, gpu, m, b, c) * 1e3 if gpu is not None else math.nan
                    rows.append({"batch": b, "context": c, "mode": m, "ms": med, "ms_p20": p20, "ms_p80": p80,
                                 "weight_bytes": wbytes, "kv_bytes": kvbytes,
                                 "gb_per_s": (wbytes + kvbytes) / (med * 1e-3) / 1e9,
                                 "roofline_ms": roof, "fraction_of_roofline": roof / med,
                                 "device": str(dev), "backend": backend})
                del cache
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            bf16_roof = layer_seconds(shape, gpu, "bf16", b, c) if gpu is not None else math.nan
            for row in rows[-len(by_mode):]:
                row["speedup_vs_bf16"] = by_mode["bf16"] / row["ms"] if "bf16" in by_mode else math.nan
                row["predicted_speedup_vs_bf16"] = (bf16_roof / layer_seconds(shape, gpu, row["mode"], b, c)
                                                    if gpu is not None else math.nan)
    return pd.DataFrame(rows)
