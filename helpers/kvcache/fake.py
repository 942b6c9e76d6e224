"""A KV cache that rounds chosen tensors - K, V and / or Q - through e4m3 and keeps them in high precision: the
attribution tool that tells the FP8 KV cache's mismatch apart by source (notebook 07).

:class:`~helpers.kvcache.Fp8KVCache` stores K and V as FP8 codes, so it cannot quantize one of them alone. This
cache stores ``code * scale`` in its high-precision dtype instead, for the tensors named in ``quantize`` only:
with ``quantize={"k", "v"}`` it holds exactly the values :meth:`Fp8KVCache.read` returns (same codes, same
per-tensor scales, same products in the same dtype), and ``"q"`` rounds the query as ``fp8_query`` does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from helpers.fp8.format import FP8_DTYPE, FP8_E4M3_MAX
from helpers.kvcache.cache import KVCache
from helpers.kvcache.scales import KVScales

__all__ = ["FakeFp8KVCache", "FAKE_QUANT_TENSORS"]

FAKE_QUANT_TENSORS = frozenset({"q", "k", "v"})


class FakeFp8KVCache(KVCache):
    """A :class:`~helpers.kvcache.KVCache` whose ``quantize`` tensors (a subset of {"q", "k", "v"}) go through
    e4m3 with per-tensor scales (:meth:`set_scales`, shapes as :class:`~helpers.kvcache.Fp8KVCache` with
    ``granularity="tensor"``: ``[n_layer]`` each). Other arguments as :class:`~helpers.kvcache.KVCache`; appends
    come in ``dtype``."""

    def __init__(self, n_layer: int, batch: int, max_len: int, n_kv_head: int, head_dim: int, *,
                 quantize: Iterable[str] = ("k", "v"), dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(n_layer, batch, max_len, n_kv_head, head_dim, dtype=dtype, device=device)
        q = frozenset(quantize)
        if not q <= FAKE_QUANT_TENSORS:
            raise ValueError(f"quantize must be a subset of {sorted(FAKE_QUANT_TENSORS)}, got {sorted(q)}")
        self.quantize = q
        self.q_scale = torch.ones(n_layer, device=self.device)
        self.k_scale = torch.ones(n_layer, device=self.device)
        self.v_scale = torch.ones(n_layer, device=self.device)

    @classmethod
    def from_config(cls, cfg, batch: int, max_len: int, **kw) -> "FakeFp8KVCache":
        return cls(cfg.n_layer, batch, max_len, cfg.n_kv_head, cfg.head_dim, **kw)

    def set_scales(self, scales: KVScales) -> None:
        """Install per-tensor ``scales`` (q, k, v ``[n_layer]``); raises ValueError on other shapes."""
        for name in ("q", "k", "v"):
            got = tuple(getattr(scales, name).shape)
            if got != (self.n_layer,):
                raise ValueError(f"scales.{name} must have shape ({self.n_layer},) (per-tensor), got {got}")
        for name in ("q", "k", "v"):
            getattr(self, f"{name}_scale").copy_(getattr(scales, name))

    def _round(self, which: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        s = getattr(self, f"{which}_scale")[layer]
        codes = (x.float() / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
        return codes.to(self.dtype) * s.to(self.dtype)  # Fp8KVCache.read's product, in the same dtype

    def _store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        super()._store(layer, start, self._round("k", layer, k) if "k" in self.quantize else k,
                       self._round("v", layer, v) if "v" in self.quantize else v)

    def prepare_query(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        if "q" not in self.quantize:
            return q
        s = self.q_scale[self._check_layer(layer)]
        codes = (q.float() / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
        return (codes.float() * s).to(q.dtype)  # Fp8KVCache.prepare_query with fp8_query
