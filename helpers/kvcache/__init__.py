"""KV caches for the decoder LM (:mod:`helpers.models.decoder`) and the FP8 KV-cache study (notebook 02).

Public API
----------
Caches (one interface, :class:`KVCacheBase`; a rollout engine switches by passing another cache object):

* ``KVCache(n_layer, batch, max_len, n_kv_head, head_dim, *, dtype=torch.float32, device="cpu")`` - high
  precision (the reference); ``KVCache.from_config(cfg, batch, max_len, dtype=...)``.
* ``Fp8KVCache(n_layer, batch, max_len, n_kv_head, head_dim, *, n_head, granularity="tensor", scales=None,
  fp8_query=False, dtype=torch.float32, backend="auto", device="cpu")``; ``Fp8KVCache.from_config(cfg, batch,
  max_len, ...)``; ``cache.set_scales(KVScales)``, ``cache.scales()``, ``cache.saturation_metrics()``.
* ``FakeFp8KVCache(..., quantize=("k", "v"), dtype=...)`` - high-precision storage holding ``code * scale`` for the
  chosen tensors of K, V, Q only (the attribution of notebook 07; with ``{"k", "v"}`` it stores what ``Fp8KVCache``
  reads back).
* All: ``append(layer, k, v, mask=None)``, ``read(layer)``, ``attention(layer, q)``, ``prepare_query(layer, q)``,
  ``reset()``, ``lengths``, ``key_mask``, ``storage_bytes``, ``bytes_per_token()``.

Scales (:mod:`helpers.kvcache.scales`):

* ``compute_qkv_scales(q, k, v, *, granularity="tensor" | "head", percentile=100.0, margin=1.0, fp8_max=448.0)
  -> (q_scale, k_scale, v_scale)``: ``margin * percentile(|x|) / fp8_max``.
* ``KVScales(q, k, v)``: fp32 ``[n_layer]`` or ``[n_layer, heads]``; ``scales.k[i]`` is layer i's ``k_scale``;
  ``state_dict()`` / ``from_state_dict()`` under vLLM's names ``layers.{i}.self_attn.{k,v,q}_scale``;
  ``a == b`` / ``a.equal(b)`` compare bit for bit. ``load_kv_scales(checkpoint_dir)`` reads the scales
  ``helpers.fp8.save_fp8_checkpoint(..., kv_scales=scales)`` wrote.
* ``POLICIES`` / ``get_policy(name)``: ``"unit"``, ``"vllm"``, ``"nemo_rl"``, ``"nemo_rl_once"``, ``"p99.9"``,
  ``"p99.99"`` (:class:`KVScalePolicy`, with the ``schedule`` it recalibrates on).

Calibration (:mod:`helpers.kvcache.calibration`): ``calibrate_kv_scales(model, batches, *, policy="nemo_rl",
granularity="tensor") -> KVScales``; ``capture_qkv(model)`` (context manager; q / k / v after QK-norm and RoPE).
Core attention is found by a protocol (``is_core_attention = True`` on the module), so this package never imports
:mod:`helpers.models`: arrows run ``models -> kvcache -> fp8 -> core``.

Decode attention (:mod:`helpers.kvcache.attention`): ``decode_attention(q [B, H, D], cache, layer, *,
backend="auto") -> fp32 [B, H, D]`` (Triton kernel reading the FP8 codes, int64 offsets; torch path on the CPU),
``decode_attention_torch``, ``decode_attention_triton``, ``decode_attention_reference``.
Benchmark: :mod:`helpers.kvcache.bench`. Memory arithmetic for public models: :mod:`helpers.kvcache.memory`.
"""

from helpers.kvcache.attention import (decode_attention, decode_attention_reference, decode_attention_torch,
                                       decode_attention_triton)
from helpers.kvcache.cache import KVCache, KVCacheBase, attention_reference, causal_key_mask
from helpers.kvcache.calibration import calibrate_kv_scales, capture_qkv
from helpers.kvcache.fake import FakeFp8KVCache
from helpers.kvcache.fp8 import Fp8KVCache
from helpers.kvcache.scales import POLICIES, KVScalePolicy, KVScales, compute_qkv_scales, get_policy, load_kv_scales

__all__ = [
    "KVCacheBase", "KVCache", "Fp8KVCache", "FakeFp8KVCache", "attention_reference", "causal_key_mask",
    "KVScales", "KVScalePolicy", "POLICIES", "get_policy", "compute_qkv_scales", "load_kv_scales",
    "calibrate_kv_scales", "capture_qkv",
    "decode_attention", "decode_attention_torch", "decode_attention_triton", "decode_attention_reference",
]
