"""The time of one decode step (and of a prefill) from bytes moved and FLOPs, per component, on a GPU's datasheet
peaks: a roofline, ``time = max(bytes / bandwidth, flops / peak)`` for each component, summed over components
(they run one after the other).

Components of a decode step for ``batch`` sequences holding ``ctx_tokens`` cached tokens in all (the sum of their
context lengths), on one of ``tp`` tensor-parallel GPUs (weights, heads and KV split ``tp`` ways, no
communication cost):

* ``linear`` - q/k/v/o and the dense MLP of every layer: the weights are read once per step (2 bytes in BF16;
  1 byte plus one fp32 scale per 128 x 128 block in W8A8), activations in and out in BF16;
  ``2 * batch * params`` FLOPs at the BF16 or the FP8 tensor-core peak;
* ``moe`` - routed experts: at batch ``B`` a layer touches ``E (1 - (1 - k/E)^B)`` distinct experts on average
  (each token picks ``k`` of ``E``, independently and uniformly: :func:`expected_experts_touched`) and reads only
  their weights; FLOPs ``2 * B * k * expert_params``; the router stays BF16;
* ``attention`` - the K and V of every cached token, every layer (2 bytes BF16, 1 byte FP8), and
  ``4 * n_heads * head_dim`` FLOPs per cached token and layer (QK^T and PV) at the BF16 peak (the engines'
  decode kernels dequantize FP8 K/V on load);
* ``lm_head`` - BF16 in every mode (veRL and NeMo-RL keep it BF16), plus the fp32 logits written;
* ``overhead`` - :attr:`Efficiency.step_overhead_s`, a fixed cost per step (kernel launches, sampling,
  scheduling) that a pure roofline sets to 0.

Modes (:data:`MODES`): ``bf16``; ``w8a8`` (block-FP8 linears and experts); ``kv8`` (FP8 KV cache only);
``w8a8_kv8`` (both).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from helpers.roofline.specs import FP8_WEIGHT_BLOCK, GpuSpec, ModelShape

__all__ = ["MODES", "COMPONENTS", "Efficiency", "PURE_ROOFLINE", "expected_experts_touched", "decode_step",
           "decode_step_seconds", "layer_seconds", "prefill_seconds", "kv_capacity_tokens"]

# mode -> (FP8 linears, FP8 KV cache)
MODES: dict[str, tuple[bool, bool]] = {"bf16": (False, False), "w8a8": (True, False), "kv8": (False, True),
                                       "w8a8_kv8": (True, True)}
COMPONENTS = ("linear", "moe", "attention", "lm_head", "overhead")
BF16_BYTES = 2.0
FP8_WEIGHT_BYTES = 1.0 + 4.0 / FP8_WEIGHT_BLOCK ** 2  # one byte per weight plus its share of the block's fp32 scale
LOGIT_BYTES = 4.0  # fp32 logits written for sampling


@dataclass(frozen=True)
class Efficiency:
    """What a real engine reaches of the datasheet: ``bandwidth`` and ``compute`` are fractions of the peak
    bandwidth and FLOP/s (1.0 = the pure roofline), ``step_overhead_s`` a fixed cost per decode step in seconds."""

    bandwidth: float = 1.0
    compute: float = 1.0
    step_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        for field in ("bandwidth", "compute"):
            value = getattr(self, field)
            if not 0 < value <= 1:
                raise ValueError(f"Efficiency.{field} must be in (0, 1], got {value!r}")
        if self.step_overhead_s < 0:
            raise ValueError(f"Efficiency.step_overhead_s must be >= 0, got {self.step_overhead_s!r}")


PURE_ROOFLINE = Efficiency()


def _check_mode(mode: str) -> tuple[bool, bool]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    return MODES[mode]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def expected_experts_touched(n_experts: int, experts_per_token: int, tokens: int | np.ndarray) -> np.ndarray | float:
    """Expected number of distinct experts that ``tokens`` tokens route to when each picks ``experts_per_token``
    of ``n_experts`` uniformly at random: ``E * (1 - (1 - k / E) ** tokens)`` (each expert is missed by one token
    with probability ``1 - k/E``). 1 token -> k; many tokens -> E."""
    e, k = float(n_experts), float(experts_per_token)
    return e * (1.0 - (1.0 - k / e) ** np.asarray(tokens, dtype=float))


def _components(shape: ModelShape, gpu: GpuSpec, mode: str, batch: int, ctx_tokens: np.ndarray | float, tp: int,
                eff: Efficiency) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{component: (bytes, flops, seconds)}`` of one decode step; ``ctx_tokens`` may be an array (one step each)."""
    fp8_lin, fp8_kv = _check_mode(mode)
    ctx = np.asarray(ctx_tokens, dtype=float)
    bw = gpu.bytes_per_s * eff.bandwidth
    peak_lin = gpu.flops_per_s("fp8" if fp8_lin else "bf16") * eff.compute
    peak_bf16 = gpu.flops_per_s("bf16") * eff.compute
    wb = FP8_WEIGHT_BYTES if fp8_lin else BF16_BYTES
    s, b = shape, float(batch)
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def add(name: str, nbytes: np.ndarray | float, flops: np.ndarray | float, peak: float) -> None:
        nbytes = np.broadcast_to(np.asarray(nbytes, dtype=float), ctx.shape)
        flops = np.broadcast_to(np.asarray(flops, dtype=float), ctx.shape)
        out[name] = (nbytes, flops, np.maximum(nbytes / bw, flops / peak))

    # linear: per layer qkv (K=hidden, N=(H + 2 Hkv) d), o (K=H d, N=hidden); per dense layer gate+up, down
    p_lin = s.n_layers * s.attn_params + s.dense_layers * s.dense_mlp_params
    qkv_n = (s.n_heads + 2 * s.n_kv_heads) * s.head_dim
    act = s.n_layers * (s.hidden + qkv_n + s.n_heads * s.head_dim + s.hidden)
    act += s.dense_layers * (s.hidden + 2 * s.intermediate + s.intermediate + s.hidden)
    add("linear", p_lin * wb / tp + b * act * BF16_BYTES, 2.0 * b * p_lin / tp, peak_lin)
    # moe: the experts the batch touches, plus the BF16 router
    if s.n_experts:
        touched = float(expected_experts_touched(s.n_experts, s.experts_per_token, batch))
        moe_bytes = s.moe_layers * (touched * s.expert_params * wb / tp + s.router_params * BF16_BYTES)
        moe_bytes += s.moe_layers * b * s.experts_per_token * (2 * s.hidden + 3 * s.moe_intermediate) * BF16_BYTES
        moe_flops = s.moe_layers * 2.0 * b * (s.experts_per_token * s.expert_params / tp + s.router_params)
        add("moe", moe_bytes, moe_flops, peak_lin)
    else:
        add("moe", 0.0, 0.0, peak_lin)
    # attention: every cached K and V element once
    kv_b = 1 if fp8_kv else 2
    add("attention", ctx * s.kv_bytes_per_token(kv_b) / tp,
        4.0 * ctx * s.n_heads * s.head_dim * s.n_layers / tp, peak_bf16)
    # lm_head: BF16 weights, fp32 logits
    add("lm_head", s.lm_head_params * BF16_BYTES / tp + b * s.vocab * LOGIT_BYTES,
        2.0 * b * s.lm_head_params / tp, peak_bf16)
    zero = np.zeros(ctx.shape)
    out["overhead"] = (zero, zero, zero + eff.step_overhead_s)
    return out


def decode_step_seconds(shape: ModelShape, gpu: GpuSpec, mode: str, batch: int, ctx_tokens: np.ndarray | float, *,
                        tp: int = 1, eff: Efficiency = PURE_ROOFLINE) -> np.ndarray | float:
    """Seconds of one decode step of ``batch`` sequences holding ``ctx_tokens`` cached tokens in all (a scalar,
    or an array: one step per entry). ``tp``: tensor-parallel degree (per-GPU share, no communication)."""
    _check_positive_int("batch", batch)
    _check_positive_int("tp", tp)
    if np.any(np.asarray(ctx_tokens) < 0):
        raise ValueError(f"ctx_tokens must be >= 0, got {ctx_tokens!r}")
    comps = _components(shape, gpu, mode, batch, ctx_tokens, tp, eff)
    total = sum(t for _, _, t in comps.values())
    return float(total) if np.ndim(total) == 0 else total


def decode_step(shape: ModelShape, gpu: GpuSpec, mode: str, batch: int, context: float, *, tp: int = 1,
                eff: Efficiency = PURE_ROOFLINE) -> pd.DataFrame:
    """One decode step of ``batch`` sequences of ``context`` cached tokens each, per component: rows
    ``component, bytes, flops, seconds, bound`` (``"memory"`` / ``"compute"`` / ``"fixed"``) plus a ``total``
    row; ``seconds`` sums to :func:`decode_step_seconds`."""
    _check_positive_int("batch", batch)
    _check_positive_int("tp", tp)
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context!r}")
    comps = _components(shape, gpu, mode, batch, float(batch) * context, tp, eff)
    rows = []
    for name in COMPONENTS:
        nbytes, flops, secs = (float(x) for x in comps[name])
        bw_time = nbytes / (gpu.bytes_per_s * eff.bandwidth)
        bound = "fixed" if name == "overhead" else ("memory" if secs <= bw_time else "compute")
        rows.append({"component": name, "bytes": nbytes, "flops": flops, "seconds": secs, "bound": bound})
    rows.append({"component": "total", "bytes": sum(r["bytes"] for r in rows),
                 "flops": sum(r["flops"] for r in rows), "seconds": sum(r["seconds"] for r in rows), "bound": ""})
    return pd.DataFrame(rows)


def layer_seconds(shape: ModelShape, gpu: GpuSpec, mode: str, batch: int, context: float, *,
                  eff: Efficiency = PURE_ROOFLINE) -> float:
    """The roofline time of ONE transformer layer's decode step (its linears, experts and attention; no lm_head,
    no overhead): the figure :mod:`helpers.gpu_bench.decode_layer` measures against."""
    comps = _components(shape, gpu, mode, batch, float(batch) * context, 1, eff)
    return float(sum(comps[c][2] for c in ("linear", "moe", "attention"))) / shape.n_layers


def prefill_seconds(shape: ModelShape, gpu: GpuSpec, mode: str, n_seqs: int, prompt_len: int, *, tp: int = 1,
                    eff: Efficiency = PURE_ROOFLINE) -> float:
    """Seconds to prefill ``n_seqs`` prompts of ``prompt_len`` tokens in one batch: linears and experts at
    ``2 * tokens * params`` FLOPs (FP8 or BF16 peak; all weights read once), causal attention at
    ``2 * n_heads * head_dim * prompt_len`` FLOPs per token and layer (BF16 peak), the KV written; each part
    ``max(bytes / bandwidth, flops / peak)``. 0 for no sequences."""
    if n_seqs == 0 or prompt_len == 0:
        return 0.0
    _check_positive_int("n_seqs", n_seqs)
    _check_positive_int("prompt_len", prompt_len)
    fp8_lin, fp8_kv = _check_mode(mode)
    s = shape
    tokens = float(n_seqs) * prompt_len
    bw = gpu.bytes_per_s * eff.bandwidth
    peak_lin = gpu.flops_per_s("fp8" if fp8_lin else "bf16") * eff.compute
    peak_bf16 = gpu.flops_per_s("bf16") * eff.compute
    wb = FP8_WEIGHT_BYTES if fp8_lin else BF16_BYTES
    p_lin = s.n_layers * s.attn_params + s.dense_layers * s.dense_mlp_params
    t = max(p_lin * wb / tp / bw, 2.0 * tokens * p_lin / tp / peak_lin)
    if s.n_experts:
        moe_bytes = s.moe_layers * s.n_experts * s.expert_params * wb / tp
        moe_flops = s.moe_layers * 2.0 * tokens * s.experts_per_token * s.expert_params / tp
        t += max(moe_bytes / bw, moe_flops / peak_lin)
    attn_flops = 2.0 * s.n_heads * s.head_dim * prompt_len * tokens * s.n_layers / tp  # causal: half of 4 L^2
    kv_write = tokens * s.kv_bytes_per_token(1 if fp8_kv else 2) / tp
    t += max(kv_write / bw, attn_flops / peak_bf16)
    t += max(s.lm_head_params * BF16_BYTES / tp / bw, 2.0 * n_seqs * s.lm_head_params / tp / peak_bf16)
    return float(t)


def kv_capacity_tokens(shape: ModelShape, gpu: GpuSpec, mode: str, *, tp: int = 1,
                       gpu_memory_utilization: float = 0.9, reserve_gb: float = 0.0) -> int:
    """KV-cache tokens that fit on each of ``tp`` GPUs: ``(memory * gpu_memory_utilization - weights / tp -
    reserve) / (kv bytes per token / tp)`` (vLLM's accounting: the engine takes ``gpu_memory_utilization`` of the
    device, the weights and activation workspace (``reserve_gb``) come off the top, the rest is KV cache). W8A8
    frees about half the linear weights' bytes for cache; FP8 KV halves the bytes per token. ValueError when the
    weights do not fit."""
    fp8_lin, fp8_kv = _check_mode(mode)
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    budget = gpu.memory_gb * 1e9 * gpu_memory_utilization - shape.weight_bytes(fp8_lin) / tp - reserve_gb * 1e9
    if budget <= 0:
        raise ValueError(f"{shape.name} weights ({shape.weight_bytes(fp8_lin) / tp / 1e9:.1f} GB per GPU at tp={tp}) "
                         f"leave no KV cache in {gpu.memory_gb} GB x {gpu_memory_utilization} on {gpu.name}")
    return int(budget // (shape.kv_bytes_per_token(1 if fp8_kv else 2) / tp))
