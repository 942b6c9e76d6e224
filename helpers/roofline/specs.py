"""The inputs of the decode roofline: a GPU's peaks (``data/gpu_specs.json``) and a model's shapes
(``data/model_configs.json``), each copied from a public page named in the file.

* :class:`GpuSpec` - memory bandwidth, dense BF16 and FP8 tensor-core peaks, memory size; :func:`load_gpu_specs`,
  :func:`gpu_spec` (by name), :func:`gpu_spec_for_device` (by ``torch.cuda.get_device_name()``).
* :class:`ModelShape` - the shapes a decode step touches: layers, hidden size, attention heads, the dense MLP or
  the MoE experts, the vocabulary; :func:`model_shape` builds one from a config entry, and its methods count
  parameters and bytes (weights, KV cache per token).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.core.runtime import REPO_ROOT
from helpers.kvcache.memory import load_model_configs

__all__ = ["GPU_SPECS", "GpuSpec", "ModelShape", "load_gpu_specs", "gpu_spec", "gpu_spec_for_device",
           "model_shape", "FP8_WEIGHT_BLOCK"]

GPU_SPECS = REPO_ROOT / "data" / "gpu_specs.json"
# The engines' block-FP8 weight format: one fp32 scale per 128 x 128 block (DeepSeek-V3 / vLLM / veRL).
FP8_WEIGHT_BLOCK = 128


@dataclass(frozen=True)
class GpuSpec:
    """One GPU's datasheet peaks.

    Attributes:
        name: the key in ``data/gpu_specs.json`` (e.g. ``"H100"``).
        hbm_gb_per_s: memory bandwidth, GB/s (1e9 bytes per second).
        bf16_tflops, fp8_tflops: dense tensor-core peaks, TFLOP/s (no 2:4 sparsity).
        memory_gb: device memory, GB as the datasheet names it.
        source: the page the figures come from.
    """

    name: str
    hbm_gb_per_s: float
    bf16_tflops: float
    fp8_tflops: float
    memory_gb: float
    source: str = ""

    def __post_init__(self) -> None:
        for field in ("hbm_gb_per_s", "bf16_tflops", "fp8_tflops", "memory_gb"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"GpuSpec.{field} must be a positive number, got {value!r}")

    @property
    def bytes_per_s(self) -> float:
        return self.hbm_gb_per_s * 1e9

    def flops_per_s(self, precision: str) -> float:
        """Dense peak in FLOP/s for ``precision`` ``"bf16"`` or ``"fp8"``."""
        if precision not in ("bf16", "fp8"):
            raise ValueError(f"precision must be 'bf16' or 'fp8', got {precision!r}")
        return (self.bf16_tflops if precision == "bf16" else self.fp8_tflops) * 1e12


def load_gpu_specs(path: str | os.PathLike = GPU_SPECS) -> dict[str, dict[str, Any]]:
    """``{gpu name: entry}`` from ``data/gpu_specs.json`` (each entry has ``source`` and ``match``)."""
    data = json.loads(Path(path).read_text())
    gpus = data.get("gpus")
    if not isinstance(gpus, dict) or not gpus:
        raise ValueError(f"{path}: expected a non-empty 'gpus' object, got {type(gpus).__name__}")
    return gpus


def _spec(name: str, entry: dict[str, Any]) -> GpuSpec:
    return GpuSpec(name=name, hbm_gb_per_s=float(entry["hbm_gb_per_s"]), bf16_tflops=float(entry["bf16_tflops"]),
                   fp8_tflops=float(entry["fp8_tflops"]), memory_gb=float(entry["memory_gb"]),
                   source=entry.get("source", ""))


def gpu_spec(name: str, path: str | os.PathLike = GPU_SPECS) -> GpuSpec:
    """The :class:`GpuSpec` called ``name`` in ``data/gpu_specs.json``; ValueError naming the known ones."""
    gpus = load_gpu_specs(path)
    if name not in gpus:
        raise ValueError(f"unknown GPU {name!r}; data/gpu_specs.json has {sorted(gpus)}")
    return _spec(name, gpus[name])


def gpu_spec_for_device(device_name: str | None, path: str | os.PathLike = GPU_SPECS) -> GpuSpec | None:
    """The spec whose ``match`` strings occur as whole words in ``device_name`` (``torch.cuda.get_device_name()``),
    trying entries in file order; None for an unknown device or ``None``. "NVIDIA L40S" does not match "L4"."""
    if not device_name:
        return None
    for name, entry in load_gpu_specs(path).items():
        for pattern in entry.get("match", [name]):
            if re.search(rf"(?<![\w]){re.escape(pattern)}(?![\w])", device_name, flags=re.IGNORECASE):
                return _spec(name, entry)
    return None


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a decoder-only transformer that a decode step touches (GQA attention, SwiGLU MLP).

    Attributes:
        name: label.
        n_layers, hidden, n_heads, n_kv_heads, head_dim: attention shapes (q: n_heads * head_dim outputs).
        intermediate: dense SwiGLU width (gate, up: hidden -> intermediate; down: intermediate -> hidden); unused
            when every layer is MoE.
        vocab: vocabulary (lm_head: hidden -> vocab, kept in BF16 by the FP8 engines).
        n_experts, experts_per_token, moe_intermediate: routed experts (0 for a dense model), top-k, one
            expert's SwiGLU width. ``moe_layers``: how many of the layers are MoE (the rest dense).
        tie_embeddings: lm_head shares the embedding matrix (its bytes are still read once per step).
    """

    name: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    n_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    moe_layers: int = 0
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for field in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "vocab"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelShape.{field} must be an int >= 1, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelShape.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.n_experts:
            if not 1 <= self.experts_per_token <= self.n_experts or self.moe_intermediate < 1:
                raise ValueError(f"MoE needs 1 <= experts_per_token <= n_experts and moe_intermediate >= 1, got "
                                 f"experts_per_token={self.experts_per_token}, n_experts={self.n_experts}, "
                                 f"moe_intermediate={self.moe_intermediate}")
            if not 0 < self.moe_layers <= self.n_layers:
                raise ValueError(f"moe_layers must be in (0, n_layers={self.n_layers}], got {self.moe_layers}")
        if self.dense_layers and self.intermediate < 1:
            raise ValueError(f"{self.dense_layers} dense layers need intermediate >= 1, got {self.intermediate}")

    # -- parameter counts (elements) --------------------------------------------------------------------------
    @property
    def dense_layers(self) -> int:
        return self.n_layers - (self.moe_layers if self.n_experts else 0)

    @property
    def attn_params(self) -> int:
        """q, k, v and o projections of one layer: ``hidden * (n_heads + 2 n_kv_heads) * head_dim`` for q/k/v plus
        ``n_heads * head_dim * hidden`` for o."""
        qkv = self.hidden * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        return qkv + self.n_heads * self.head_dim * self.hidden

    @property
    def dense_mlp_params(self) -> int:
        """gate, up, down of one dense layer: ``3 * hidden * intermediate``."""
        return 3 * self.hidden * self.intermediate

    @property
    def expert_params(self) -> int:
        """One routed expert (gate, up, down): ``3 * hidden * moe_intermediate``."""
        return 3 * self.hidden * self.moe_intermediate

    @property
    def router_params(self) -> int:
        """One MoE layer's router (kept in BF16): ``hidden * n_experts``."""
        return self.hidden * self.n_experts

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def quantized_linear_params(self) -> int:
        """The parameters the FP8 engines quantize: every q/k/v/o, dense MLP and expert projection (not the
        embeddings, lm_head, norms or router)."""
        moe = self.moe_layers * self.n_experts * self.expert_params if self.n_experts else 0
        return self.n_layers * self.attn_params + self.dense_layers * self.dense_mlp_params + moe

    @property
    def total_params(self) -> int:
        """All parameters (norms excluded: a few hundred thousand); the embedding counted once if tied."""
        router = self.moe_layers * self.router_params if self.n_experts else 0
        emb = self.lm_head_params * (1 if self.tie_embeddings else 2)
        return self.quantized_linear_params + router + emb

    def kv_bytes_per_token(self, kv_bytes: int) -> int:
        """KV-cache bytes per token over all layers at ``kv_bytes`` per element (2 BF16, 1 FP8)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * kv_bytes

    def weight_bytes(self, fp8_linears: bool) -> float:
        """Bytes of all weights held on the GPU: BF16 (2 bytes) throughout, or with the quantized linears in FP8
        (1 byte plus a 4-byte fp32 scale per 128 x 128 block)."""
        q = self.quantized_linear_params
        per = (1.0 + 4.0 / FP8_WEIGHT_BLOCK ** 2) if fp8_linears else 2.0
        return q * per + 2.0 * (self.total_params - q)


def model_shape(model: str | dict[str, Any], configs: dict[str, dict[str, Any]] | None = None) -> ModelShape:
    """A :class:`ModelShape` from a ``data/model_configs.json`` entry (or its name). Raises ValueError for an MLA
    model (DeepSeek-V3: the roofline models GQA attention only) or an entry without the roofline fields."""
    if isinstance(model, str):
        configs = configs if configs is not None else load_model_configs()
        if model not in configs:
            raise ValueError(f"unknown model {model!r}; data/model_configs.json has {sorted(configs)}")
        name, cfg = model, configs[model]
    else:
        name, cfg = str(model.get("name", "model")), model
    if cfg.get("attention") != "gqa":
        raise ValueError(f"model {name!r}: the roofline models GQA attention only, got attention="
                         f"{cfg.get('attention')!r}")
    missing = [k for k in ("intermediate_size", "vocab_size") if k not in cfg]
    if missing:
        raise ValueError(f"model {name!r} lacks the roofline fields {missing} in data/model_configs.json")
    n_layers = cfg["num_hidden_layers"]
    n_experts = int(cfg.get("num_experts", 0) or 0)
    moe_layers = 0
    if n_experts:
        step = int(cfg.get("decoder_sparse_step", 1))
        dense = set(cfg.get("mlp_only_layers", []))
        moe_layers = sum(1 for i in range(n_layers) if i not in dense and (i + 1) % step == 0)
    return ModelShape(name=name, n_layers=n_layers, hidden=cfg["hidden_size"], n_heads=cfg["num_attention_heads"],
                      n_kv_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"],
                      intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"], n_experts=n_experts,
                      experts_per_token=int(cfg.get("num_experts_per_tok", 0) or 0) if n_experts else 0,
                      moe_intermediate=int(cfg.get("moe_intermediate_size", 0) or 0) if n_experts else 0,
                      moe_layers=moe_layers, tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
