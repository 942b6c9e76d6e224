"""Q/K/V scales of an FP8 KV cache: the formula, the named policies, and the per-layer container :class:`KVScales`.

One scale per tensor (``granularity="tensor"``) or per head (``"head"``: q per query head, k / v per KV head):

    scale = margin * percentile_p(|x|) / fp8_max          (fp32; the cache stores x / scale saturated to +-448)

with the percentile over the elements of the tensor (or of one head). Sources of the presets:

* ``"unit"``: 1.0 - what vLLM and SGLang use when a checkpoint carries no scales (vLLM warns "Using KV cache
  scaling factor 1.0 for fp8_e4m3"; SGLang "may cause accuracy issues").
* ``"vllm"``: vLLM ``calculate_kv_scales=True`` (``vllm/attention/layer.py`` ``Attention.calc_kv_scales``,
  constants ``Q_SCALE_CONSTANT = K_SCALE_CONSTANT = 200``, ``V_SCALE_CONSTANT = 100`` in ``vllm/envs.py``):
  ``amax / 200`` for q and k, ``amax / 100`` for v, computed once on the first forward batch, then frozen.
* ``"nemo_rl"``: NeMo-RL PR #1212 (``calibrate_qkv_fp8_scales``): per calibration batch the amax, reduced over
  batches by the 99.9th percentile of the list of batch amaxes, then ``x 1.05 / 448``; recomputed after every
  weight update (FP8-RL, arXiv 2601.18150: "per-step QKV scale recalibration").
* ``"nemo_rl_once"``: the same formula computed at step 0 only (a stale calibration).
* ``"p99.9"`` / ``"p99.99"``: percentile clipping - the 99.9th (99.99th) percentile of |x| instead of the amax,
  x 1.05 / 448, every step: outliers above it saturate at +-448 instead of stretching the scale for everyone.

:class:`KVScalePolicy.schedule` says when a policy recalibrates (``"never"``, ``"once"``, ``"every_step"``); the
engine or experiment decides what a step is.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from helpers.fp8.checkpoint import KV_SCALE_PREFIX, read_kv_scale_tensors
from helpers.fp8.format import FP8_E4M3_MAX, SCALE_EPS

__all__ = ["GRANULARITIES", "SCHEDULES", "KVScalePolicy", "POLICIES", "get_policy", "KVScales",
           "percentile_abs", "compute_qkv_scales", "reduce_over_batches", "load_kv_scales"]

GRANULARITIES = ("tensor", "head")
SCHEDULES = ("never", "once", "every_step")
# vLLM's divisors (vllm/envs.py Q_SCALE_CONSTANT, K_SCALE_CONSTANT, V_SCALE_CONSTANT): headroom of 448/200 = 2.24x
# for q and k and 4.48x for v above the calibration batch's amax.
VLLM_QKV_DIVISORS = (200.0, 200.0, 100.0)
# NeMo-RL's margin on the calibrated amax (5% headroom) and its percentile over the list of batch amaxes.
NEMO_RL_MARGIN = 1.05
NEMO_RL_BATCH_PERCENTILE = 99.9


@dataclass(frozen=True)
class KVScalePolicy:
    """A named way to pick Q/K/V scales (see the module docstring for the sources)."""

    name: str
    schedule: str
    """"never" (constant 1.0), "once" (step 0 / first batch), "every_step" (after every weight update)."""
    percentile: float = 100.0
    """Element percentile of |x| per tensor or head (100 = amax)."""
    margin: float = 1.0
    """Multiplier on the percentile (headroom)."""
    fp8_max: tuple[float, float, float] = (FP8_E4M3_MAX,) * 3
    """The value the calibrated statistic maps to, for (q, k, v)."""
    first_batch_only: bool = False
    """Calibrate on the first batch only (vLLM computes its scales on one forward)."""
    batch_percentile: float = 100.0
    """Percentile over the list of per-batch statistics (NeMo-RL: 99.9; 100 = max over batches)."""


POLICIES: dict[str, KVScalePolicy] = {
    "unit": KVScalePolicy("unit", "never"),
    "vllm": KVScalePolicy("vllm", "once", fp8_max=VLLM_QKV_DIVISORS, first_batch_only=True),
    "nemo_rl": KVScalePolicy("nemo_rl", "every_step", margin=NEMO_RL_MARGIN,
                             batch_percentile=NEMO_RL_BATCH_PERCENTILE),
    "nemo_rl_once": KVScalePolicy("nemo_rl_once", "once", margin=NEMO_RL_MARGIN,
                                  batch_percentile=NEMO_RL_BATCH_PERCENTILE),
    "p99.9": KVScalePolicy("p99.9", "every_step", percentile=99.9, margin=NEMO_RL_MARGIN,
                           batch_percentile=NEMO_RL_BATCH_PERCENTILE),
    "p99.99": KVScalePolicy("p99.99", "every_step", percentile=99.99, margin=NEMO_RL_MARGIN,
                            batch_percentile=NEMO_RL_BATCH_PERCENTILE),
}


def get_policy(policy: str | KVScalePolicy) -> KVScalePolicy:
    """A :class:`KVScalePolicy` from its name in :data:`POLICIES` (or the policy itself)."""
    if isinstance(policy, KVScalePolicy):
        return policy
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)} or a KVScalePolicy, got {policy!r}")
    return POLICIES[policy]


def _check_granularity(granularity: object) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity  # type: ignore[return-value]


def _check_percentile(name: str, p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:
        raise ValueError(f"{name} must be a number in (0, 100], got {p!r}")
    return float(p)


def percentile_abs(x: torch.Tensor, percentile: float, dim: int | None = None) -> torch.Tensor:
    """The ``percentile`` of ``|x|`` (linear interpolation between order statistics, as ``numpy.percentile``).

    ``dim=None``: over all elements, returns fp32 ``[]``; else over every dim except ``dim``, returns ``[x.shape[dim]]``.
    100 is the amax (no sort). NaN in x propagates.
    """
    p = _check_percentile("percentile", percentile)
    a = x.detach().abs().float()
    a = a.reshape(1, -1) if dim is None else a.movedim(dim, 0).reshape(a.shape[dim], -1)  # [G, N]
    if p == 100.0:
        out = a.amax(dim=1)
    else:
        n = a.shape[1]
        pos = p / 100.0 * (n - 1)
        lo, frac = int(math.floor(pos)), pos - math.floor(pos)
        # topk of the upper tail is much cheaper than a full sort for p close to 100.
        k = n - lo
        top = a.topk(k, dim=1, sorted=True).values  # descending: top[:, k - 1] is order statistic lo
        v_lo = top[:, k - 1]
        v_hi = top[:, k - 2] if k >= 2 else v_lo
        out = v_lo + frac * (v_hi - v_lo)
    return out[0] if dim is None else out


def compute_qkv_scales(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, granularity: str = "tensor",
                       percentile: float = 100.0, margin: float = 1.0,
                       fp8_max: float | tuple[float, float, float] = FP8_E4M3_MAX,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V scales of one layer: ``margin * percentile(|x|) / fp8_max`` (fp32).

    q ``[B, H, T, D]``, k / v ``[B, H_kv, T, D]`` (the layout an attention kernel sees: heads on dim 1; padding
    tokens should be dropped by the caller). ``granularity="tensor"`` returns scalars ``[]``; ``"head"`` returns
    ``[H]``, ``[H_kv]``, ``[H_kv]``. ``fp8_max`` is one value or a (q, k, v) triple (vLLM: 200, 200, 100).
    The statistic is floored at ``SCALE_EPS`` so an all-zero tensor gets a tiny positive scale (as
    :func:`helpers.fp8.format.compute_scale`).
    """
    _check_granularity(granularity)
    p = _check_percentile("percentile", percentile)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin > 0 or math.isinf(margin):
        raise ValueError(f"margin must be a finite number > 0, got {margin!r}")
    maxes = (fp8_max,) * 3 if isinstance(fp8_max, (int, float)) else tuple(fp8_max)
    if len(maxes) != 3 or any(isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0 for m in maxes):
        raise ValueError(f"fp8_max must be a number > 0 or a (q, k, v) triple of them, got {fp8_max!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a float tensor [B, heads, T, D], got {got}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    dim = None if granularity == "tensor" else 1
    return tuple(margin * percentile_abs(x, p, dim).clamp_min(SCALE_EPS) / m  # type: ignore[return-value]
                 for x, m in zip((q, k, v), maxes))


def reduce_over_batches(stats: list[torch.Tensor], batch_percentile: float = 100.0) -> torch.Tensor:
    """Combine per-batch statistics (each ``[]`` or ``[heads]``) by a percentile over the list (100 = max),
    element-wise: NeMo-RL takes the 99.9th percentile of its micro-batch amaxes."""
    if not stats:
        raise ValueError("stats must hold at least one batch's statistic, got an empty list")
    p = _check_percentile("batch_percentile", batch_percentile)
    stacked = torch.stack([s.float() for s in stats])  # [n_batches, ...]
    return stacked.amax(0) if p == 100.0 else torch.quantile(stacked, p / 100.0, dim=0)


@dataclass(eq=False)
class KVScales:
    """Per-layer Q/K/V dequantization scales of an FP8 KV cache (``x ~ code * scale``), fp32.

    q: ``[n_layer]`` (per tensor) or ``[n_layer, H]`` (per head); k, v: ``[n_layer]`` or ``[n_layer, H_kv]``.
    ``scales.k[i]`` is layer i's scale, shape ``[]`` or ``[H_kv]`` - the tensor an engine loads as
    ``layers.{i}.self_attn.k_scale``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("q", "k", "v"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.ndim not in (1, 2):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"KVScales.{name} must be a tensor [n_layer] or [n_layer, heads], got {got}")
            if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
                raise ValueError(f"KVScales.{name} must be finite and > 0, got min {float(t.min())}")
            setattr(self, name, t.detach().float())
        if not self.q.shape[0] == self.k.shape[0] == self.v.shape[0]:
            raise ValueError(f"q, k, v scales must cover the same layers, got {self.q.shape[0]}, {self.k.shape[0]}, "
                             f"{self.v.shape[0]}")
        if self.k.shape != self.v.shape:
            raise ValueError(f"k and v scales must have one shape, got {tuple(self.k.shape)}, {tuple(self.v.shape)}")

    @property
    def n_layer(self) -> int:
        return self.k.shape[0]

    def equal(self, other: object) -> bool:
        """True when ``other`` is a :class:`KVScales` with the same q, k, v shapes and values (bit for bit)."""
        return isinstance(other, KVScales) and all(
            torch.equal(getattr(self, n), getattr(other, n)) for n in ("q", "k", "v"))

    def __eq__(self, other: object) -> bool:
        """``==`` is :meth:`equal` (one bool, not an element-wise tensor)."""
        return self.equal(other) if isinstance(other, KVScales) else NotImplemented

    __hash__ = None  # mutable tensors: unhashable, as a dataclass with eq

    @property
    def granularity(self) -> str:
        return "tensor" if self.k.ndim == 1 else "head"

    @classmethod
    def unit(cls, n_layer: int, *, n_head: int | None = None, n_kv_head: int | None = None,
             granularity: str = "tensor") -> "KVScales":
        """Scales of 1.0 (the engines' default). ``"head"`` needs ``n_head`` and ``n_kv_head``."""
        _check_granularity(granularity)
        if granularity == "tensor":
            return cls(torch.ones(n_layer), torch.ones(n_layer), torch.ones(n_layer))
        if not n_head or not n_kv_head:
            raise ValueError(f"granularity='head' needs n_head and n_kv_head, got {n_head!r}, {n_kv_head!r}")
        return cls(torch.ones(n_layer, n_head), torch.ones(n_layer, n_kv_head), torch.ones(n_layer, n_kv_head))

    def state_dict(self, prefix: str = "layers.{i}.self_attn.") -> dict[str, torch.Tensor]:
        """``{prefix.format(i=i) + "q_scale" | "k_scale" | "v_scale": fp32 tensor}`` - vLLM's checkpoint names."""
        out: dict[str, torch.Tensor] = {}
        for i in range(self.n_layer):
            base = prefix.format(i=i)
            for name in ("k", "v", "q"):
                out[f"{base}{name}_scale"] = getattr(self, name)[i].clone().contiguous()
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor],
                        prefix: str = "layers.{i}.self_attn.") -> "KVScales":
        """Inverse of :meth:`state_dict`: reads layers 0, 1, ... until ``k_scale`` of the next layer is absent."""
        q, k, v = [], [], []
        i = 0
        while f"{prefix.format(i=i)}k_scale" in tensors:
            base = prefix.format(i=i)
            for name, acc in (("q", q), ("k", k), ("v", v)):
                key = f"{base}{name}_scale"
                if key not in tensors:
                    raise ValueError(f"tensors has {base}k_scale but no {key}")
                acc.append(tensors[key].float())
            i += 1
        if not k:
            raise ValueError(f"tensors has no {prefix.format(i=0)}k_scale")
        return cls(torch.stack(q), torch.stack(k), torch.stack(v))


def load_kv_scales(path: str | os.PathLike, *, kv_scale_prefix: str = KV_SCALE_PREFIX) -> KVScales | None:
    """The FP8 KV-cache scales of a checkpoint directory written by
    ``helpers.fp8.save_fp8_checkpoint(..., kv_scales=...)``, as a :class:`KVScales` (bit-exact), or None when the
    checkpoint carries none. ``kv_scale_prefix`` as at save time (``"model.layers.{i}.self_attn."`` for an
    HF-style wrapper). The file is read by :func:`helpers.fp8.checkpoint.read_kv_scale_tensors`."""
    tensors = read_kv_scale_tensors(path)
    if not tensors:
        return None
    return KVScales.from_state_dict(tensors, kv_scale_prefix)
