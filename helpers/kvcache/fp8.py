"""The FP8 KV cache: float8_e4m3fn K and V with fp32 scales per tensor or per KV head, optional FP8 query.

Storage (per layer ``i``; what vLLM / SGLang hold with ``kv_cache_dtype="fp8_e4m3"``):

* ``k``, ``v``: float8_e4m3fn ``[n_layer, B, H_kv, max_len, D]`` - the codes ``sat(x / scale)``;
* ``k_scale``, ``v_scale``: fp32 ``[n_layer]`` (per tensor) or ``[n_layer, H_kv]`` (per KV head) - dequant
  multipliers, ``x ~ code * scale``; ``q_scale``: ``[n_layer]`` or ``[n_layer, H]``.

Write: ``code = clamp(x / scale, -448, 448).to(e4m3)`` (round to nearest even) - the engines' ``satfinite`` cast:
a value past the scale's range is clipped to +-448, not turned into NaN. The cache counts the clipped entries
(:meth:`Fp8KVCache.saturation_metrics`), the first symptom of a stale scale (entries with ``|x / scale| >= 464``, which the clamp moves by more than rounding would).

Read: ``code.to(dtype) * scale``. Decode steps (one query token) go through
:func:`helpers.kvcache.attention.decode_attention`, which reads the codes directly (the Triton kernel on a GPU,
the torch path on the CPU); multi-token forwards (prefill) dequantize and use the reference attention.

FP8 query (``fp8_query=True``): vLLM's FlashAttention-3 path also quantizes Q with its static ``q_scale`` (QK^T in
FP8); its Triton path and FlashInfer keep Q in high precision. Here Q is rounded through e4m3 with ``q_scale`` in
:meth:`prepare_query` (a fake quantization: the same numbers an FP8 QK^T sees, accumulated in fp32).

Scales default to 1.0 (what the engines use when a checkpoint has none); :meth:`set_scales` installs a
:class:`~helpers.kvcache.scales.KVScales` (e.g. from :func:`helpers.kvcache.calibrate_kv_scales`) in place. New
scales apply to tokens written afterwards: codes already cached were written with the old ones (call
:meth:`reset`, as :meth:`helpers.models.Decoder.generate` does, before reusing the cache for a new rollout).
"""

from __future__ import annotations

import torch

from helpers.fp8.format import FP8_DTYPE, FP8_E4M3_MAX
from helpers.kvcache.cache import _HIGH_PRECISION, KVCacheBase
from helpers.kvcache.scales import GRANULARITIES, KVScales

__all__ = ["Fp8KVCache", "SATURATION_THRESHOLD"]

# |x / scale| from which the satfinite cast really clips: 464 is the round-to-nearest midpoint between 448 and the
# next e4m3 step (480, which the "fn" format spends on NaN), so values below it round to 448 even without the clamp
# (and an amax scale computed in fp32 can give amax / scale = 448 * (1 + 2**-23) on the largest element).
SATURATION_THRESHOLD = FP8_E4M3_MAX + 16.0


class Fp8KVCache(KVCacheBase):
    """FP8 (e4m3) KV cache with per-tensor or per-KV-head fp32 scales.

    Args:
        n_layer, batch, max_len, n_kv_head, head_dim: as :class:`~helpers.kvcache.KVCacheBase`.
        n_head: query heads (shape of a per-head ``q_scale``).
        granularity: ``"tensor"`` or ``"head"`` - the shape of the scales this cache holds.
        scales: initial :class:`KVScales` (default 1.0 everywhere).
        fp8_query: round Q through e4m3 with ``q_scale`` (FlashAttention-3 arm).
        dtype: the high-precision dtype reads dequantize to and appends may come in (fp32 / bf16 / fp16; appends
            in any of them are accepted).
        backend: decode-attention backend (``"auto"`` | ``"triton"`` | ``"torch"``).
    """

    def __init__(self, n_layer: int, batch: int, max_len: int, n_kv_head: int, head_dim: int, *, n_head: int,
                 granularity: str = "tensor", scales: KVScales | None = None, fp8_query: bool = False,
                 dtype: torch.dtype = torch.float32, backend: str = "auto",
                 device: torch.device | str = "cpu") -> None:
        super().__init__(n_layer, batch, max_len, n_kv_head, head_dim, device=device)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head < 1 or n_head % n_kv_head:
            raise ValueError(f"n_head must be a positive multiple of n_kv_head={n_kv_head}, got {n_head!r}")
        if dtype not in _HIGH_PRECISION:
            raise ValueError(f"dtype must be one of {[str(d) for d in _HIGH_PRECISION]}, got {dtype}")
        self.n_head, self.granularity, self.fp8_query = n_head, granularity, bool(fp8_query)
        self.dtype, self.backend = dtype, backend
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=FP8_DTYPE, device=self.device)
        self.v = torch.zeros(shape, dtype=FP8_DTYPE, device=self.device)
        unit = KVScales.unit(n_layer, n_head=n_head, n_kv_head=n_kv_head, granularity=granularity)
        self.q_scale = unit.q.to(self.device)
        self.k_scale = unit.k.to(self.device)
        self.v_scale = unit.v.to(self.device)
        # Saturated (clipped) and written element counts per layer, for K and V: [n_layer, 2].
        self._saturated = torch.zeros(n_layer, 2, dtype=torch.long, device=self.device)
        self._written = torch.zeros(n_layer, dtype=torch.long, device=self.device)
        if scales is not None:
            self.set_scales(scales)

    @classmethod
    def from_config(cls, cfg, batch: int, max_len: int, **kw) -> "Fp8KVCache":
        """A cache shaped for a :class:`~helpers.models.DecoderConfig` (``n_layer``, ``n_head``, ``n_kv_head``,
        ``head_dim``); keyword arguments as the constructor."""
        return cls(cfg.n_layer, batch, max_len, cfg.n_kv_head, cfg.head_dim, n_head=cfg.n_head, **kw)

    # -- scales -----------------------------------------------------------------------------------------------
    def scales(self) -> KVScales:
        """A copy of the scales in use."""
        return KVScales(self.q_scale.clone(), self.k_scale.clone(), self.v_scale.clone())

    def set_scales(self, scales: KVScales) -> None:
        """Install ``scales`` in place (same tensors). Raises ValueError, changing nothing, if their shapes are
        not this cache's: q ``[n_layer]`` / ``[n_layer, n_head]``, k and v ``[n_layer]`` / ``[n_layer, n_kv_head]``
        for ``granularity`` "tensor" / "head"."""
        if not isinstance(scales, KVScales):
            raise ValueError(f"scales must be a KVScales, got {type(scales).__name__}")
        for name in ("q", "k", "v"):
            want = tuple(getattr(self, f"{name}_scale").shape)
            got = tuple(getattr(scales, name).shape)
            if got != want:
                raise ValueError(f"scales.{name} must have shape {want} (granularity={self.granularity!r}, "
                                 f"n_layer={self.n_layer}), got {got}")
        for name in ("q", "k", "v"):
            getattr(self, f"{name}_scale").copy_(getattr(scales, name))

    def _scale(self, which: str, layer: int) -> torch.Tensor:
        """Layer ``layer``'s scale shaped to broadcast against ``[B, heads, T, D]``: ``[]`` or ``[heads, 1, 1]``."""
        s = getattr(self, f"{which}_scale")[layer]
        return s if s.ndim == 0 else s[:, None, None]

    # -- storage ----------------------------------------------------------------------------------------------
    def _check_input_dtype(self, name: str, x: torch.Tensor) -> None:
        if x.dtype not in _HIGH_PRECISION:
            raise ValueError(f"{name} must be a high-precision float tensor {[str(d) for d in _HIGH_PRECISION]}, "
                             f"got {x.dtype}")

    def _store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = start + k.shape[2]
        for j, (x, dst, which) in enumerate(((k, self.k, "k"), (v, self.v, "v"))):
            y = x.float() / self._scale(which, layer)
            self._saturated[layer, j] += (y.abs() >= SATURATION_THRESHOLD).sum()
            dst[layer, :, :, start:end] = y.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
        self._written[layer] += k.numel()

    def reset(self) -> None:
        super().reset()
        self._saturated.zero_()
        self._written.zero_()

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.lengths[self._check_layer(layer)]
        k = self.k[layer, :, :, :n].to(self.dtype) * self._scale("k", layer).to(self.dtype)
        v = self.v[layer, :, :, :n].to(self.dtype) * self._scale("v", layer).to(self.dtype)
        return k, v

    @property
    def storage_bytes(self) -> int:
        codes = self.k.numel() + self.v.numel()  # one byte each
        scales = 4 * (self.q_scale.numel() + self.k_scale.numel() + self.v_scale.numel())
        return codes + scales

    # -- attention --------------------------------------------------------------------------------------------
    def prepare_query(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Round ``q`` ``[B, H, T, D]`` through e4m3 with ``q_scale`` when ``fp8_query`` (saturating), else ``q``."""
        if not self.fp8_query:
            return q
        s = self._scale("q", self._check_layer(layer))
        codes = (q.float() / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
        return (codes.float() * s).to(q.dtype)

    def attention(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        if q.shape[2] != 1:
            return super().attention(layer, q)
        from helpers.kvcache.attention import decode_attention

        return decode_attention(q[:, :, 0], self, layer, backend=self.backend)[:, :, None].to(q.dtype)

    # -- metrics ----------------------------------------------------------------------------------------------
    def saturation_metrics(self) -> dict[str, float]:
        """Fraction of K and V entries written since the last :meth:`reset` that were clipped
        (``|x / scale| >= SATURATION_THRESHOLD = 464``), over all layers, and the worst layer's fraction. Keys ``k_saturated_fraction``,
        ``v_saturated_fraction``, ``k_saturated_fraction_max_layer``, ``v_saturated_fraction_max_layer``."""
        written = self._written.clamp(min=1).double()
        per_layer = self._saturated.double() / written[:, None]  # [n_layer, 2]
        total = self._saturated.double().sum(0) / written.sum()
        return {
            "k_saturated_fraction": float(total[0]), "v_saturated_fraction": float(total[1]),
            "k_saturated_fraction_max_layer": float(per_layer[:, 0].max()),
            "v_saturated_fraction_max_layer": float(per_layer[:, 1].max()),
        }
