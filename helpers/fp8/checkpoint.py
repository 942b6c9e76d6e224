"""Save and load FP8 models in the checkpoint layout vLLM and SGLang load for DeepSeek-V3 / Qwen3-FP8.

A checkpoint is a directory with

* ``model.safetensors``: for every :class:`~helpers.fp8.linear.Fp8Linear` ``L``, ``L.weight`` float8_e4m3fn [N, K]
  and ``L.weight_scale_inv`` float32 [ceil(N/128), ceil(K/128)] (the dequant multiplier per 128x128 block); every
  other tensor of the model's ``state_dict`` (biases, norms, embeddings, lm_head) as it is.
* ``config.json``: the caller's model config (if any) plus
  ``"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
  "weight_block_size": [128, 128]}``; models quantized with power-of-two scales also carry ``"scale_fmt": "ue8m0"``
  (DeepSeek-V3.1's key for DeepGEMM's UE8M0 scales).

FP8 KV-cache scales (optional, ``kv_scales=`` a :class:`helpers.kvcache.KVScales`): per attention layer ``i``
the fp32 tensors ``layers.{i}.self_attn.k_scale``, ``v_scale`` and ``q_scale`` (shape ``[]`` per tensor, or
``[num_kv_heads]`` / ``[num_heads]`` per head) - the names vLLM's ``BaseKVCacheMethod``
(``vllm/model_executor/layers/quantization/kv_cache.py``) loads into each attention layer when the engine runs
with ``kv_cache_dtype="fp8"``, instead of falling back to 1.0. ``kv_scale_prefix`` places them under another
module path (``"model.layers.{i}.self_attn."`` for an HF-style ``...ForCausalLM`` wrapper).

Round trip is bit-exact: the same bytes come back, with the same dtypes and shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from helpers.fp8.linear import Fp8Linear, fp8_linears

if TYPE_CHECKING:
    from helpers.kvcache.scales import KVScales

__all__ = ["save_fp8_checkpoint", "load_fp8_checkpoint", "load_kv_scales", "quantization_config"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
KV_SCALE_PREFIX = "layers.{i}.self_attn."  # helpers.models.Decoder's attention modules
KV_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".q_scale")


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` entry for ``model``'s FP8 layers (all must share block size and scale format)."""
    layers = fp8_linears(model)
    if not layers:
        raise ValueError("model has no Fp8Linear layers; run helpers.fp8.quantize_model first")
    blocks = {m.weight_block_size for m in layers.values()}
    fmts = {m.scale_fmt for m in layers.values()}
    if len(blocks) != 1 or len(fmts) != 1:
        raise ValueError(f"all Fp8Linear layers must share one weight_block_size and scale_fmt to be described by one "
                         f"quantization_config, got block sizes {sorted(blocks)} and scale formats {sorted(fmts)}")
    cfg: dict[str, Any] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                           "weight_block_size": list(blocks.pop())}
    if fmts.pop() == "ue8m0":
        cfg["scale_fmt"] = "ue8m0"
    return cfg


def save_fp8_checkpoint(model: nn.Module, path: str | os.PathLike, *,
                        config: dict[str, Any] | None = None, kv_scales: "KVScales | None" = None,
                        kv_scale_prefix: str = KV_SCALE_PREFIX) -> Path:
    """Write ``model`` (after :func:`~helpers.fp8.quantize_model`) to the directory ``path`` (created if needed).

    ``config`` (e.g. the original model's ``config.json`` dict) is written with ``quantization_config`` added.
    ``kv_scales``: calibrated FP8 KV-cache scales, written as ``<prefix>k_scale`` / ``v_scale`` / ``q_scale`` per
    layer (module docstring).
    Tensors that share storage (tied embeddings) are saved as separate copies, as safetensors requires.
    Returns the directory.
    """
    from safetensors.torch import save_file

    out = Path(path)
    qcfg = quantization_config(model)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen_ptrs: set[tuple[int, int]] = set()
    for key, t in model.state_dict().items():
        t = t.detach().to("cpu")
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ptr in seen_ptrs or not t.is_contiguous():
            t = t.contiguous().clone()
        seen_ptrs.add(ptr)
        tensors[key] = t
    if kv_scales is not None:
        tensors.update(kv_scales.state_dict(kv_scale_prefix))
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    full_cfg = dict(config or {})
    full_cfg["quantization_config"] = qcfg
    (out / CONFIG_FILE).write_text(json.dumps(full_cfg, indent=2) + "\n")
    return out


def load_fp8_checkpoint(path: str | os.PathLike, model: nn.Module | None = None, *, backend: str = "auto"
                        ) -> nn.Module | tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_fp8_checkpoint` (or any checkpoint in the same layout).

    * ``model=None``: returns ``(tensors, config)`` - the raw state dict (fp8 codes, fp32 scales, other tensors)
      and the parsed ``config.json``.
    * ``model`` given (a high-precision model of the same architecture, or an FP8 one): every module ``L`` with an
      ``L.weight_scale_inv`` in the file becomes an :class:`Fp8Linear` (block size and scale format from the
      config, ``backend`` as given) unless it already is one, then the tensors are loaded with ``strict=True``
      (copied bit for bit). KV-cache scales in the file (``*.k_scale`` / ``v_scale`` / ``q_scale``) are not
      module tensors and are skipped here; read them with :func:`load_kv_scales`. Returns ``model``.
    """
    from safetensors.torch import load_file

    root = Path(path)
    config = json.loads((root / CONFIG_FILE).read_text())
    qcfg = config.get("quantization_config")
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "fp8":
        raise ValueError(f"{root / CONFIG_FILE}: expected quantization_config with quant_method 'fp8', got {qcfg!r}")
    if qcfg.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"activation_scheme must be 'dynamic', got {qcfg.get('activation_scheme')!r}")
    tensors = load_file(str(root / WEIGHTS_FILE))
    if model is None:
        return tensors, config

    block = tuple(qcfg.get("weight_block_size", (128, 128)))
    scale_fmt = qcfg.get("scale_fmt", "fp32")
    suffix = ".weight_scale_inv"
    for key in [k for k in tensors if k.endswith(suffix) or k == suffix[1:]]:
        name = key[: -len(suffix)] if key != suffix[1:] else ""
        codes = tensors.get(f"{name}.weight" if name else "weight")
        if codes is None or codes.dtype != torch.float8_e4m3fn or codes.ndim != 2:
            raise ValueError(f"layer {name!r}: {key} present but its weight is missing or not float8_e4m3fn [N, K]")
        current = model.get_submodule(name) if name else model
        if isinstance(current, Fp8Linear):
            continue
        if not name:
            raise ValueError("the checkpoint is a single Fp8Linear; pass model=Fp8Linear(...) or model=None")
        n, k = codes.shape
        bias = tensors.get(f"{name}.bias")
        fp8 = Fp8Linear(k, n, bias is not None, block_size=block, scale_fmt=scale_fmt, backend=backend,
                        bias_dtype=bias.dtype if bias is not None else torch.float32,
                        device=next(current.parameters(), torch.empty(0)).device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fp8)
    model.load_state_dict({k: v for k, v in tensors.items() if not k.endswith(KV_SCALE_SUFFIXES)}, strict=True)
    return model


def load_kv_scales(path: str | os.PathLike, *, kv_scale_prefix: str = KV_SCALE_PREFIX) -> "KVScales | None":
    """The FP8 KV-cache scales of a checkpoint written with ``save_fp8_checkpoint(..., kv_scales=...)``, as a
    :class:`~helpers.kvcache.KVScales` (bit-exact), or None when the checkpoint carries none."""
    from safetensors import safe_open

    from helpers.kvcache.scales import KVScales

    with safe_open(str(Path(path) / WEIGHTS_FILE), framework="pt") as f:
        keys = [k for k in f.keys() if k.endswith(KV_SCALE_SUFFIXES)]
        if not keys:
            return None
        return KVScales.from_state_dict({k: f.get_tensor(k) for k in keys}, kv_scale_prefix)
