"""Save and load FP8 models in the checkpoint layout vLLM and SGLang load for DeepSeek-V3 / Qwen3-FP8.

A checkpoint is a directory with

* ``model.safetensors``: for every :class:`~helpers.fp8.linear.Fp8Linear` ``L``, ``L.weight`` float8_e4m3fn [N, K]
  and ``L.weight_scale_inv`` float32 [ceil(N/128), ceil(K/128)] (the dequant multiplier per 128x128 block); every
  other tensor of the model's ``state_dict`` (biases, norms, embeddings, lm_head) as it is.
* ``config.json``: the caller's model config (if any) plus
  ``"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
  "weight_block_size": [128, 128]}``; models quantized with power-of-two scales also carry ``"scale_fmt": "ue8m0"``
  (DeepSeek-V3.1's key for DeepGEMM's UE8M0 scales).

FP8 KV-cache scales (optional, ``kv_scales=``: a :class:`helpers.kvcache.KVScales`, or any object with fp32
tensors ``.q``, ``.k``, ``.v``, or a mapping ``{"q": ..., "k": ..., "v": ...}``, each ``[n_layer]`` or
``[n_layer, heads]``): per attention layer ``i`` the fp32 tensors ``layers.{i}.self_attn.k_scale``, ``v_scale`` and
``q_scale`` (shape ``[]`` per tensor, or ``[num_kv_heads]`` / ``[num_heads]`` per head) - the names vLLM's
``BaseKVCacheMethod`` (``vllm/model_executor/layers/quantization/kv_cache.py``) loads into each attention layer when
the engine runs with ``kv_cache_dtype="fp8"``, instead of falling back to 1.0. ``kv_scale_prefix`` places them under
another module path (``"model.layers.{i}.self_attn."`` for an HF-style ``...ForCausalLM`` wrapper). The scales are
checked against the model's layer and head counts (``model.cfg`` of a :class:`helpers.models.Decoder`, or an HF
``model.config``). This module takes the scales as plain tensors and never imports :mod:`helpers.kvcache` (which
imports :mod:`helpers.fp8`); :func:`helpers.kvcache.load_kv_scales` reads them back as a ``KVScales``.

Round trip is bit-exact: the same bytes come back, with the same dtypes and shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from helpers.fp8.linear import Fp8Linear, fp8_linears

__all__ = ["save_fp8_checkpoint", "load_fp8_checkpoint", "read_kv_scale_tensors", "quantization_config"]

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


def _attention_counts(model: nn.Module) -> tuple[int, int, int] | None:
    """(n_layer, n_head, n_kv_head) from ``model.cfg`` (helpers.models.Decoder) or an HF ``model.config``."""
    for attr, names in (("cfg", ("n_layer", "n_head", "n_kv_head")),
                        ("config", ("num_hidden_layers", "num_attention_heads", "num_key_value_heads"))):
        cfg = getattr(model, attr, None)
        vals = [getattr(cfg, n, None) for n in names]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            return tuple(vals)  # type: ignore[return-value]
    return None


def _kv_scale_tensors(kv_scales: object, model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"q", "k", "v"}`` fp32 tensors from ``kv_scales``, checked against the model's layer and head counts."""
    if isinstance(kv_scales, Mapping):
        missing = [n for n in ("q", "k", "v") if n not in kv_scales]
        if missing:
            raise ValueError(f"kv_scales mapping must have keys 'q', 'k', 'v', missing {missing}")
        got = {n: kv_scales[n] for n in ("q", "k", "v")}
    elif all(isinstance(getattr(kv_scales, n, None), torch.Tensor) for n in ("q", "k", "v")):
        got = {n: getattr(kv_scales, n) for n in ("q", "k", "v")}
    else:
        raise ValueError(f"kv_scales must be a helpers.kvcache.KVScales, an object with tensors .q/.k/.v or a "
                         f"mapping of them, got {type(kv_scales).__name__}")
    for n, t in got.items():
        if not isinstance(t, torch.Tensor) or t.ndim not in (1, 2) or not t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"kv_scales.{n} must be a float tensor [n_layer] or [n_layer, heads], got {shape}")
    counts = _attention_counts(model)
    if counts is None:
        raise ValueError(f"cannot check kv_scales against {type(model).__name__}: it has no .cfg (n_layer, n_head, "
                         f"n_kv_head) nor HF .config (num_hidden_layers, num_attention_heads, num_key_value_heads)")
    n_layer, n_head, n_kv_head = counts
    for n, heads in (("q", n_head), ("k", n_kv_head), ("v", n_kv_head)):
        t = got[n]
        if t.shape[0] != n_layer:
            raise ValueError(f"kv_scales.{n} covers {t.shape[0]} layers, the model has {n_layer} attention layers")
        if t.ndim == 2 and t.shape[1] != heads:
            raise ValueError(f"kv_scales.{n} has {t.shape[1]} per-head scales, the model has {heads} "
                             f"{'query' if n == 'q' else 'KV'} heads per layer")
    return {n: t.detach().to("cpu", torch.float32) for n, t in got.items()}


def save_fp8_checkpoint(model: nn.Module, path: str | os.PathLike, *,
                        config: dict[str, Any] | None = None, kv_scales: object | None = None,
                        kv_scale_prefix: str = KV_SCALE_PREFIX) -> Path:
    """Write ``model`` (after :func:`~helpers.fp8.quantize_model`) to the directory ``path`` (created if needed).

    ``config`` (e.g. the original model's ``config.json`` dict) is written with ``quantization_config`` added.
    ``kv_scales``: calibrated FP8 KV-cache scales (a :class:`helpers.kvcache.KVScales`, an object with tensors
    ``.q`` / ``.k`` / ``.v``, or a mapping of them), written as ``<prefix>k_scale`` / ``v_scale`` / ``q_scale`` per
    layer (module docstring); ValueError when their layer or head counts differ from the model's.
    Tensors that share storage (tied embeddings) are saved as separate copies, as safetensors requires.
    Returns the directory.
    """
    from safetensors.torch import save_file

    out = Path(path)
    qcfg = quantization_config(model)
    kv = None if kv_scales is None else _kv_scale_tensors(kv_scales, model)
    if "{i}" not in kv_scale_prefix:
        raise ValueError(f"kv_scale_prefix must contain '{{i}}' (the layer index), got {kv_scale_prefix!r}")
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
    if kv is not None:
        for i in range(kv["k"].shape[0]):
            base = kv_scale_prefix.format(i=i)
            for n in ("k", "v", "q"):
                tensors[f"{base}{n}_scale"] = kv[n][i].clone().contiguous()
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
      module tensors and are skipped here; read them with :func:`helpers.kvcache.load_kv_scales`. Returns ``model``.
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


def read_kv_scale_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every FP8 KV-cache scale tensor (``*.k_scale`` / ``v_scale`` / ``q_scale``) of the checkpoint directory
    ``path``, by its name in the file (empty when it carries none). :func:`helpers.kvcache.load_kv_scales` turns
    them into a ``KVScales``."""
    from safetensors import safe_open

    with safe_open(str(Path(path) / WEIGHTS_FILE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.endswith(KV_SCALE_SUFFIXES)}
