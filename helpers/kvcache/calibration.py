"""Calibrate FP8 KV-cache scales on the trainer side: capture q / k / v after QK-norm and RoPE, reduce to scales.

The capture uses forward pre-hooks on every *core-attention module* of the model (the tensors the engine writes to
its cache), as NeMo-RL's ``calibrate_qkv_fp8_scales`` hooks core attention (NeMo-RL PR #1212). A core-attention
module is found by a protocol, not by its class (so this module does not import any model): an ``nn.Module`` with
the class attribute ``is_core_attention = True``, called as ``module(q, k, v, *, layer=i, key_mask=m, ...)`` with
q ``[B, H, T, D]``, k / v ``[B, H_kv, T, D]`` after QK-norm and RoPE and ``m`` bool ``[B, T]`` True on real tokens
(:class:`helpers.models.decoder.CoreAttention`, ``layers.{i}.self_attn.core_attn``, is one). It works on a
high-precision model and on one whose linears were swapped for ``Fp8Linear``.

``calibrate_kv_scales(model, batches, policy=...)`` runs one no-grad forward per batch (no cache), drops padding
tokens, takes the per-batch statistic of |q|, |k|, |v| per tensor or head, reduces it over batches and returns a
:class:`~helpers.kvcache.scales.KVScales`. When to call it (the policy's ``schedule``) is the caller's decision:
``"nemo_rl"`` after every weight update, ``"vllm"`` / ``"nemo_rl_once"`` once, ``"unit"`` never.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from helpers.kvcache.scales import KVScalePolicy, KVScales, compute_qkv_scales, get_policy, reduce_over_batches

__all__ = ["capture_qkv", "calibrate_kv_scales", "is_core_attention", "Batch"]

# A calibration batch: token ids long [B, T], or (ids, mask) with mask [B, T] True / 1.0 on real tokens (bool, or
# the 0/1 float masks of helpers.rl).
Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def is_core_attention(module: object) -> bool:
    """True for a module that follows the core-attention protocol of the module docstring."""
    return isinstance(module, nn.Module) and getattr(type(module), "is_core_attention", False) is True


def _core_attention_modules(model: nn.Module) -> list[nn.Module]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module with core-attention modules, got {type(model).__name__}")
    mods = [m for m in model.modules() if is_core_attention(m)]
    if not mods:
        raise ValueError(f"model has no CoreAttention modules (modules with is_core_attention = True, e.g. "
                         f"layers.{{i}}.self_attn.core_attn of helpers.models.Decoder); got {type(model).__name__}")
    return mods


@contextlib.contextmanager
def capture_qkv(model: nn.Module) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Inside the block, every forward of ``model`` records, per layer index, ``(q, k, v, key_mask)``: q
    ``[B, H, T, D]``, k / v ``[B, H_kv, T, D]`` after QK-norm and RoPE (detached), key_mask bool ``[B, T]``.
    The dict holds the latest forward's tensors; hooks are removed on exit."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        q, k, v = args
        captured[kwargs["layer"]] = (q.detach(), k.detach(), v.detach(), kwargs["key_mask"])

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in _core_attention_modules(model)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def _real_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, heads, T, D]`` -> ``[1, heads, N, D]`` with the N real tokens of the batch (padding dropped)."""
    return x.transpose(1, 2)[mask].transpose(0, 1)[None]  # [B, T, h, D] -> [N, h, D] -> [1, h, N, D]


def _check_batch(batch: object, index: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ids long [B, T], mask bool [B, T] | None)`` from one calibration batch, or a ValueError naming it."""
    ids, mask = batch if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
    name = f"batches[{index}]"
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.ndim != 2:
        got = (ids.dtype, tuple(ids.shape)) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be token ids long [B, T] or (ids, mask), got {got}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{name} has token ids in [{int(ids.min())}, {int(ids.max())}], expected ids in "
                         f"[0, {vocab_size}) (the model's vocab_size)")
    if mask is None:
        return ids, None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} mask must have the ids' shape {tuple(ids.shape)}, got {got}")
    if mask.dtype != torch.bool:
        if not mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} mask must be bool or a 0/1 float mask, got {mask.dtype} with values "
                             f"{mask.unique()[:5].tolist()}")
        mask = mask > 0
    if not bool(mask.any()):
        raise ValueError(f"{name} is all padding (its mask has no real token); drop it or fix the mask")
    return ids, mask


@torch.no_grad()
def calibrate_kv_scales(model: nn.Module, batches: Iterable[Batch], *, policy: str | KVScalePolicy = "nemo_rl",
                        granularity: str = "tensor") -> KVScales:
    """Q/K/V scales of every layer of ``model`` (a :class:`~helpers.models.Decoder`) under ``policy``.

    Args:
        model: the decoder; run in no-grad mode without a cache (trainer-side calibration).
        batches: an iterable (list, generator) of calibration batches, each ids long ``[B, T]`` with ids in
            ``[0, model.cfg.vocab_size)``, or ``(ids, mask)`` with mask ``[B, T]`` bool or 0/1 float (True / 1 on
            real tokens; padding is ignored, and every batch needs at least one real token). A bare tensor is
            rejected (iterating it would treat each row as a batch): pass ``[ids]``.
        policy: a name in :data:`~helpers.kvcache.scales.POLICIES` or a :class:`KVScalePolicy`. ``"unit"`` returns
            1.0 without running the model; ``"vllm"`` uses the first batch only.
        granularity: ``"tensor"`` (scales ``[n_layer]``) or ``"head"`` (``[n_layer, H]`` / ``[n_layer, H_kv]``).

    Per layer and tensor: ``scale = margin * reduce_b(percentile_p(|x_b|)) / fp8_max`` with ``reduce_b`` the
    policy's ``batch_percentile`` over batches (the statistic floored at ``SCALE_EPS``).
    """
    pol = get_policy(policy)
    cfg = getattr(model, "cfg", None)
    if cfg is None or not all(hasattr(cfg, f) for f in ("n_layer", "n_head", "n_kv_head", "vocab_size")):
        raise ValueError(f"model must be a helpers.models.Decoder (with .cfg: n_layer, n_head, n_kv_head, "
                         f"vocab_size), got {type(model).__name__}")
    if isinstance(batches, (torch.Tensor, tuple)):
        what = "a tensor" if isinstance(batches, torch.Tensor) else "a tuple"
        raise ValueError(f"batches must be an iterable of batches (e.g. [ids] or [(ids, mask)]), got {what}; "
                         f"wrap one batch in a list")
    if pol.schedule == "never":
        return KVScales.unit(cfg.n_layer, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, granularity=granularity)
    stats: dict[int, list[list[torch.Tensor]]] = {i: [[], [], []] for i in range(cfg.n_layer)}
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        with capture_qkv(model) as captured:
            for batch in batches:
                ids, mask = _check_batch(batch, n_batches, cfg.vocab_size)
                model(ids, mask=mask)
                for layer, (q, k, v, key_mask) in captured.items():
                    per = compute_qkv_scales(_real_tokens(q, key_mask), _real_tokens(k, key_mask),
                                             _real_tokens(v, key_mask), granularity=granularity,
                                             percentile=pol.percentile, margin=1.0, fp8_max=1.0)
                    for acc, s in zip(stats[layer], per):
                        acc.append(s)
                n_batches += 1
                if pol.first_batch_only:
                    break
    finally:
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("batches must yield at least one calibration batch, got none")
    out = []
    for j, fp8_max in enumerate(pol.fp8_max):
        per_layer = [reduce_over_batches(stats[i][j], pol.batch_percentile) for i in range(cfg.n_layer)]
        out.append(pol.margin * torch.stack(per_layer) / fp8_max)
    return KVScales(*out)
