"""KV caches for the decoder LM: the cache interface, the high-precision :class:`KVCache` (the reference)."""

from helpers.kvcache.cache import KVCache, KVCacheBase, attention_reference, causal_key_mask

__all__ = ["KVCacheBase", "KVCache", "attention_reference", "causal_key_mask"]
