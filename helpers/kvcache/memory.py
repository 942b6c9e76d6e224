"""KV-cache memory arithmetic for public model configs (``data/model_configs.json``): bytes per token, scale
overhead, and how many tokens / concurrent sequences fit in a fixed budget.

Bytes per cached token (vLLM's and NeMo-RL's accounting):

* GQA: ``2 (K and V) * num_hidden_layers * num_key_value_heads * head_dim * bytes_per_element``;
* MLA (DeepSeek-V3): ``num_hidden_layers * (kv_lora_rank + qk_rope_head_dim) * bytes_per_element`` - one latent
  and one shared RoPE key per token and layer.

FP8 (e4m3) stores one byte per element, so its cache is exactly half of BF16's, plus the scales: per tensor, one
fp32 k_scale and v_scale per layer (``2 * 4 * layers`` bytes for the whole cache, not per token); per KV head,
``2 * 4 * layers * kv_heads``. Spread over the cache's tokens that is a few bytes in a hundred million.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from helpers.core.runtime import REPO_ROOT

__all__ = ["MODEL_CONFIGS", "NEMO_RL_QWEN3_8B", "load_model_configs", "kv_bytes_per_token", "scale_bytes",
           "capacity_table"]

MODEL_CONFIGS = REPO_ROOT / "data" / "model_configs.json"
GIB = 2 ** 30
BYTES = {"bf16": 2, "fp8": 1}
# NeMo-RL PR #1212 (Qwen3-8B-Base): KV-cache capacity reported by vLLM at startup, in tokens, and the max
# concurrency it prints (tokens / max_model_len).
NEMO_RL_QWEN3_8B = {"bf16": 249_952, "fp8_linear_only": 299_344, "fp8_linear_and_kv": 598_672,
                    "concurrency_bf16": 11.10, "concurrency_fp8_linear_and_kv": 26.57}


def load_model_configs(path: str | os.PathLike = MODEL_CONFIGS) -> dict[str, dict[str, Any]]:
    """``{model name: config dict}`` from ``data/model_configs.json`` (each entry has its ``source`` URL)."""
    data = json.loads(Path(path).read_text())
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise ValueError(f"{path}: expected a non-empty 'models' object, got {type(models).__name__}")
    return models


def kv_bytes_per_token(cfg: dict[str, Any], dtype: str = "bf16") -> int:
    """Cache bytes per token over all layers for a config entry (module docstring); ``dtype`` "bf16" | "fp8"."""
    if dtype not in BYTES:
        raise ValueError(f"dtype must be one of {sorted(BYTES)}, got {dtype!r}")
    b = BYTES[dtype]
    if cfg.get("attention") == "mla":
        return cfg["num_hidden_layers"] * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * b
    if cfg.get("attention") == "gqa":
        return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * b
    raise ValueError(f"config attention must be 'gqa' or 'mla', got {cfg.get('attention')!r}")


def scale_bytes(cfg: dict[str, Any], granularity: str = "tensor", *, with_q: bool = False) -> int:
    """Bytes of fp32 KV scales for the whole cache: per layer one k and one v scale (``"tensor"``) or one per KV
    head (``"head"``; MLA has one latent "head"); ``with_q`` adds the q scales (FP8-query arm)."""
    if granularity not in ("tensor", "head"):
        raise ValueError(f"granularity must be 'tensor' or 'head', got {granularity!r}")
    layers = cfg["num_hidden_layers"]
    kv_heads = cfg.get("num_key_value_heads", 1) if cfg.get("attention") == "gqa" else 1
    per_layer = 2 * (1 if granularity == "tensor" else kv_heads)
    if with_q:
        per_layer += 1 if granularity == "tensor" else cfg["num_attention_heads"]
    return 4 * layers * per_layer


def capacity_table(configs: dict[str, dict[str, Any]], *, budget_bytes: float, seq_len: int) -> pd.DataFrame:
    """One row per model: bytes per token in BF16 and FP8, the FP8/BF16 ratio with the scale overhead, and the
    tokens and concurrent ``seq_len``-token sequences that fit in ``budget_bytes`` of KV cache."""
    rows = []
    for name, cfg in configs.items():
        bf16, fp8 = kv_bytes_per_token(cfg, "bf16"), kv_bytes_per_token(cfg, "fp8")
        tok_bf16 = int(budget_bytes // bf16)
        sb_tensor, sb_head = scale_bytes(cfg, "tensor"), scale_bytes(cfg, "head")
        tok_fp8 = int((budget_bytes - sb_tensor) // fp8)
        rows.append({
            "model": name, "attention": cfg["attention"], "layers": cfg["num_hidden_layers"],
            "kv_heads": cfg.get("num_key_value_heads"), "head_dim": cfg.get("head_dim"),
            "qk_norm": cfg.get("qk_norm"),
            "bf16_bytes_per_token": bf16, "fp8_bytes_per_token": fp8,
            "scale_bytes_tensor": sb_tensor, "scale_bytes_head": sb_head,
            "fp8_over_bf16_with_scales": (fp8 * tok_fp8 + sb_tensor) / (bf16 * tok_fp8),
            "tokens_bf16": tok_bf16, "tokens_fp8": tok_fp8,
            "concurrent_seqs_bf16": tok_bf16 / seq_len, "concurrent_seqs_fp8": tok_fp8 / seq_len,
            "source": cfg["source"],
        })
    return pd.DataFrame(rows)
