"""The KV-cache interface the decoder writes to, and its high-precision implementation :class:`KVCache`.

A cache holds, for every layer, keys and values ``[B, H_kv, max_len, D]`` in preallocated storage (no allocation
per decoding step), plus ``key_mask`` bool ``[B, max_len]``: True where a slot holds a real token, False for left
padding and for the padding written after a sequence's EOS (those slots are never attended to).

All rows share one write position per layer (left padding keeps a batch aligned), so "each row's current length"
is ``cache.lengths[layer]`` slots, of which ``key_mask`` says which are real. Protocol, per forward of ``T`` new
tokens (what :class:`helpers.models.decoder.Decoder` does):

1. ``q = cache.prepare_query(layer, q)`` - identity here; the FP8 cache can quantize Q (FlashAttention-3 arm);
2. ``cache.append(layer, k, v, mask)`` - write the ``T`` new slots at ``lengths[layer]`` and advance it;
3. ``out = cache.attention(layer, q)`` - causal attention of the ``T`` queries over the ``lengths[layer]`` slots.

A failed :meth:`append` (past capacity, wrong shape, wrong dtype) raises ValueError naming what was expected and
leaves the cache unchanged. Subclasses change only how slots are stored (:meth:`_store`) and read (:meth:`read`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["KVCacheBase", "KVCache", "causal_key_mask", "attention_reference"]

_HIGH_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def causal_key_mask(key_mask: torch.Tensor, n_query: int) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, T, L]`` for the last ``T = n_query`` of ``L`` slots as queries.

    Query ``t`` (slot ``L - T + t``) sees slot ``j`` iff ``j <= L - T + t`` and ``key_mask[b, j]``; it always
    sees its own slot, so a padding query has a finite (unused) output instead of a softmax over nothing.
    """
    b, length = key_mask.shape
    q_slot = torch.arange(length - n_query, length, device=key_mask.device)  # [T]
    k_slot = torch.arange(length, device=key_mask.device)  # [L]
    causal = k_slot[None, :] <= q_slot[:, None]  # [T, L]
    diag = k_slot[None, :] == q_slot[:, None]
    return (causal[None] & key_mask[:, None, :]) | diag[None]  # [B, T, L]  -> unsqueeze head dim below


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query attention in fp32: the torch reference every path is checked against.

    q ``[B, H, T, D]`` (the last ``T`` slots), k / v ``[B, H_kv, L, D]`` (any float dtype, cast to fp32),
    key_mask bool ``[B, L]``. Returns fp32 ``[B, H, T, D]``; softmax scale ``1 / sqrt(D)``.
    """
    h, hkv = q.shape[1], k.shape[1]
    mask = causal_key_mask(key_mask, q.shape[2])[:, None]  # [B, 1, T, L]
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=h != hkv)


class KVCacheBase:
    """Storage-independent part of a KV cache: shapes, per-layer lengths, the key mask and the checks.

    Args:
        n_layer, n_kv_head, head_dim: the model's shapes (``DecoderConfig`` fields of the same names).
        batch: rows B. max_len: slots per row (prompt + generated tokens).
        device: where the storage lives.
    """

    def __init__(self, n_layer: int, batch: int, max_len: int, n_kv_head: int, head_dim: int, *,
                 device: torch.device | str = "cpu") -> None:
        for name, value in (("n_layer", n_layer), ("batch", batch), ("max_len", max_len),
                            ("n_kv_head", n_kv_head), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.n_layer, self.batch, self.max_len = n_layer, batch, max_len
        self.n_kv_head, self.head_dim = n_kv_head, head_dim
        self.device = torch.device(device)
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=self.device)
        self.lengths = [0] * n_layer

    # -- to be provided by subclasses -------------------------------------------------------------------------
    def _check_input_dtype(self, name: str, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``lengths[layer]`` slots, ``[B, H_kv, L, D]`` each, high precision."""
        raise NotImplementedError

    @property
    def storage_bytes(self) -> int:
        """Bytes of K/V storage (and scales, for a quantized cache) over all layers and slots."""
        raise NotImplementedError

    def bytes_per_token(self) -> float:
        """Storage bytes per cached token over all layers (K, V and any scales): ``storage_bytes / (B * max_len)``."""
        return self.storage_bytes / (self.batch * self.max_len)

    # -- shared -----------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Slots filled in every layer (the lengths agree between forwards)."""
        return min(self.lengths)

    def reset(self) -> None:
        """Forget the contents (lengths 0, mask cleared) and keep the storage, for the next rollout."""
        self.lengths = [0] * self.n_layer
        self.key_mask.zero_()

    def _check_layer(self, layer: object) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layer:
            raise ValueError(f"layer must be an int in [0, {self.n_layer}), got {layer!r}")
        return layer

    def _check_kv(self, name: str, x: object, n_new: int | None) -> torch.Tensor:
        expect = f"[{self.batch}, {self.n_kv_head}, T, {self.head_dim}] (batch, n_kv_head, new tokens, head_dim)"
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor {expect}, got {type(x).__name__}")
        if (x.ndim != 4 or x.shape[0] != self.batch or x.shape[1] != self.n_kv_head or x.shape[3] != self.head_dim
                or x.shape[2] < 1 or (n_new is not None and x.shape[2] != n_new)):
            raise ValueError(f"{name} must have shape {expect}{'' if n_new is None else f' with T={n_new}'}, "
                             f"got {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"{name} must be on the cache's device {self.device}, got {x.device}")
        self._check_input_dtype(name, x)
        return x

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Write ``T`` new slots of ``layer`` at ``lengths[layer]`` and advance it by ``T``.

        k, v: ``[B, H_kv, T, D]``. mask: bool ``[B, T]`` (True = real token; None = all real); it is recorded in
        ``key_mask`` (every layer passes the same mask for a step). Raises ValueError, with the cache unchanged,
        when ``T`` slots do not fit, or on a wrong shape, device or dtype.
        """
        layer = self._check_layer(layer)
        k = self._check_kv("k", k, None)
        n_new = k.shape[2]
        v = self._check_kv("v", v, n_new)
        start = self.lengths[layer]
        if start + n_new > self.max_len:
            raise ValueError(f"append of {n_new} tokens to layer {layer} at length {start} exceeds the cache's "
                             f"max_len={self.max_len}; allocate a cache with max_len >= {start + n_new}")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (self.batch, n_new):
                got = (mask.dtype, tuple(mask.shape)) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"mask must be a bool tensor [{self.batch}, {n_new}], got {got}")
        self._store(layer, start, k, v)
        self.key_mask[:, start:start + n_new] = True if mask is None else mask.to(self.device)
        self.lengths[layer] = start + n_new

    def prepare_query(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """The query as the attention kernel sees it; identity for a high-precision cache. q ``[B, H, T, D]``."""
        return q

    def attention(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Causal attention of the last ``T`` slots' queries ``q`` ``[B, H, T, D]`` over the ``lengths[layer]``
        cached slots; returns ``[B, H, T, D]`` in ``q.dtype`` (computed in fp32)."""
        layer = self._check_layer(layer)
        k, v = self.read(layer)
        out = attention_reference(q, k, v, self.key_mask[:, :self.lengths[layer]])
        return out.to(q.dtype)


class KVCache(KVCacheBase):
    """High-precision cache (bf16 / fp16 / fp32 storage): the reference the FP8 cache is measured against.

    Storage: ``k``, ``v`` ``[n_layer, B, H_kv, max_len, D]`` in ``dtype``. Appends must come in ``dtype``.
    """

    def __init__(self, n_layer: int, batch: int, max_len: int, n_kv_head: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__(n_layer, batch, max_len, n_kv_head, head_dim, device=device)
        if dtype not in _HIGH_PRECISION:
            raise ValueError(f"dtype must be one of {[str(d) for d in _HIGH_PRECISION]}, got {dtype}")
        self.dtype = dtype
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)

    @classmethod
    def from_config(cls, cfg, batch: int, max_len: int, **kw) -> "KVCache":
        """A cache shaped for a :class:`~helpers.models.DecoderConfig`; keyword arguments as the constructor."""
        return cls(cfg.n_layer, batch, max_len, cfg.n_kv_head, cfg.head_dim, **kw)

    def _check_input_dtype(self, name: str, x: torch.Tensor) -> None:
        if x.dtype != self.dtype:
            raise ValueError(f"{name} must have the cache's dtype {self.dtype}, got {x.dtype}")

    def _store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.lengths[self._check_layer(layer)]
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n]

    @property
    def storage_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

