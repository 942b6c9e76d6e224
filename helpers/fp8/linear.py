"""FP8 W8A8 linear layers at the model level: :class:`Fp8Linear`, :func:`quantize_model` and the per-RL-step
weight sync :func:`requantize_model_`.

The math (quantizers, block GEMM) lives in :mod:`helpers.fp8.quant`; this module only decides *which* layers are
quantized, holds their FP8 storage under the names the inference engines use, and refreshes that storage in place.

Storage of one :class:`Fp8Linear` (the layout vLLM / SGLang load for DeepSeek-V3 and Qwen3-FP8 checkpoints):

* ``weight``           float8_e4m3fn [N, K] (buffer): the quantized codes.
* ``weight_scale_inv`` float32 [ceil(N/bn), ceil(K/bk)] (buffer): the per-block dequant multiplier,
  ``W ~ weight * weight_scale_inv`` broadcast over ``weight_block_size = (bn, bk)`` blocks.
* ``bias``             optional [N] parameter, kept in high precision (never quantized).

The forward quantizes activations dynamically in 1 x ``bk`` per-token groups along K (so the activation groups line
up with the weight's K blocks) and multiplies with one of two GEMM paths, chosen per layer by ``gemm`` (an attribute,
so the path that ran is visible; see :data:`GEMM_PATHS`):

* ``"exact"`` - :func:`helpers.fp8.block_fp8_matmul`: the block-scaled GEMM, per K tile
  ``acc += (x_tile @ w_tile.T) * x_scale * w_scale`` in fp32 (what DeepGEMM / vLLM compute).
* ``"bf16"`` - the CPU fast path: the same FP8 codes and scales, dequantized to bf16 (the weight once per sync,
  cached; the activation per call), then one bf16 GEMM with fp32 accumulation inside. An FP8 code has 4
  significant bits, so with ``scale_fmt="ue8m0"`` (power-of-two scales) both dequantized operands are *exact* in
  bf16 and the product differs from ``"exact"`` only by summation order and the final rounding of the output to
  bf16; with fp32 scales each dequantized element is additionally rounded to bf16 (relative error <= 2^-9, far
  below e4m3's own 2^-4 step). Measured costs are in notebook 05. On these CPUs (AVX512-BF16) a bf16 GEMM is
  ~4.5x faster than an fp32 one, and the exact path's per-tile fp32 loop is 8-12x slower than ``nn.Linear``.

Weight sync (veRL issues #4641, #5683, #6112: OOM from materialising a second, fully quantized model at every sync):
:func:`requantize_model_` walks the incoming high-precision tensors one at a time - a ``state_dict`` or a stream of
``(name, tensor)`` pairs - and writes each layer's codes and scales into the *existing* buffers. The extra memory is
bounded by one layer's temporaries; the FP8 storage keeps its ``data_ptr()`` so an engine holding those tensors sees
the new weights without re-wrapping.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from helpers.fp8.format import DEFAULT_BLOCK, FP8_DTYPE, check_block_size, check_scale_fmt
from helpers.fp8.quant import block_fp8_matmul, dequant_weight, quant_act, quant_weight

__all__ = ["DEFAULT_SKIP", "GEMM_PATHS", "Fp8Linear", "quantize_model", "requantize_model_", "fp8_linears"]

# The forward's GEMM paths (module docstring): the exact block-scaled GEMM, or bf16 operands dequantized from the
# same codes (fast on CPUs with bf16 matrix units).
GEMM_PATHS = ("exact", "bf16")


# Module-name patterns (``re.search`` on the qualified name) kept in high precision by :func:`quantize_model`,
# as in veRL's FP8 rollout: embeddings, the output head, norms and MoE routers. Only ``nn.Linear`` modules are
# candidates at all, so "embed"/"norm" matter for linear layers such as ``embed_proj`` or ``norm_out``.
# Routers: Qwen3-MoE, DeepSeek-V3 and Mixtral name them ``...mlp.gate`` / ``...block_sparse_moe.gate`` - a *whole*
# last component "gate" - while dense MLPs have ``gate_proj``, which must be quantized; hence ``(^|\.)gate$``.
DEFAULT_SKIP: tuple[str, ...] = (
    r"(^|\.)lm_head$",
    r"embed",
    r"norm",
    r"router",
    r"(^|\.)gate$",
)


# e4m3 codes -> fp32 on the integer bits (torch's fp8 -> float cast runs ~3 ns per element on the CPU, 3-4x slower
# than these three vectorised integer ops). Shifting the sign-extended code left by 20 = 23 - 3 mantissa bits puts
# its 4 exponent bits at the bottom of fp32's exponent field and its 3 mantissa bits at the top of fp32's mantissa;
# the mask keeps the sign (bit 31) and those 7 bits. The fp32 read of these bits is the e4m3 value times
# 2 ** (7 - 127) for normal *and* subnormal codes (an e4m3 subnormal lands on an fp32 subnormal with the same
# mantissa), so one multiplication by 2 ** 120 restores it exactly (a separate, in-place step: folded into the scale
# it would overflow fp32 for scales >= 2 ** 8). The NaN codes read as
# 480 instead of NaN; their group's scale is NaN or inf (quant_act), which still makes the result non-finite.
_E4M3_TO_F32_SHIFT = 20
_E4M3_F32_MASK = -0x78100000  # 0x87F00000 as a signed int32
_E4M3_F32_UNBIAS = 2.0**120


def _dequant_act_f32(x_fp8: torch.Tensor, x_scale: torch.Tensor, group: int) -> torch.Tensor:
    """fp32 [M, K] = ``x_fp8`` [M, K] (e4m3) times its per-group scale ``x_scale`` [M, ceil(K / group)]."""
    M, K = x_fp8.shape
    kb = x_scale.shape[-1]
    bits = ((x_fp8.view(torch.int8).to(torch.int32) << _E4M3_TO_F32_SHIFT) & _E4M3_F32_MASK).view(torch.float32)
    codes = bits.mul_(_E4M3_F32_UNBIAS)  # the e4m3 values, exactly, in fp32
    if kb * group != K:
        codes = torch.nn.functional.pad(codes, (0, kb * group - K))  # a ragged last group: zero codes fill it
    x = codes.view(M, kb, group) * x_scale[..., None]
    return x.view(M, kb * group)[:, :K]


class Fp8Linear(nn.Module):
    """``y = x @ W.T + b`` with W stored as blockwise-scaled FP8 and x quantized 1 x bk per token on the fly.

    Args:
        in_features: K. out_features: N.
        bias: keep a high-precision bias [N] (``bias_dtype``).
        block_size: ``(bn, bk)`` weight block; activations use groups of ``bk`` along K.
        scale_fmt: ``"fp32"`` scales or ``"ue8m0"`` (power-of-two) scales, for weights and activations alike.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` for the quantizer and the GEMM.
        gemm: ``"exact"`` (block-scaled GEMM) or ``"bf16"`` (dequantized bf16 GEMM, the CPU fast path); see the
            module docstring for what each computes. The attribute ``gemm`` says which path the forward runs.

    A freshly constructed layer holds zero codes and unit scales; fill it with :meth:`from_linear` or
    :func:`requantize_model_`. Forward: ``x`` [..., K] (fp32 / bf16 / fp16) -> ``y`` [..., N] in ``x.dtype``.
    Non-finite activations are not checked (no host sync in the forward path); they propagate as NaN.
    Inference only (the rollout side): the forward runs under ``torch.no_grad()``, no gradient reaches ``x``.
    """

    weight: torch.Tensor
    weight_scale_inv: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 block_size: Sequence[int] = DEFAULT_BLOCK, scale_fmt: str = "fp32", backend: str = "auto",
                 bias_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 gemm: str = "exact") -> None:
        super().__init__()
        if gemm not in GEMM_PATHS:
            raise ValueError(f"gemm must be one of {GEMM_PATHS}, got {gemm!r}")
        self.gemm = gemm
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight_block_size = check_block_size(block_size)
        self.scale_fmt = check_scale_fmt(scale_fmt)
        self.backend = backend
        bn, bk = self.weight_block_size
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale_inv", torch.ones(math.ceil(out_features / bn), math.ceil(in_features / bk),
                                                            dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # The bf16 path's dequantized weight, rebuilt when the FP8 storage changes: requantize_ bumps _syncs (the
        # native quantizer writes through raw pointers, which torch's version counters do not see); copy_ /
        # load_state_dict bump the buffers' _version.
        self._syncs = 0
        self._w_bf16: torch.Tensor | None = None
        self._w_bf16_key: tuple[int, int, int] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: Sequence[int] = DEFAULT_BLOCK, scale_fmt: str = "fp32",
                    backend: str = "auto", gemm: str = "exact") -> "Fp8Linear":
        """Quantize an ``nn.Linear`` (weight [N, K], any float dtype) into a new :class:`Fp8Linear` on the same
        device; the bias is copied in its own dtype. Raises ValueError if a weight block is not finite."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, block_size=block_size,
                    scale_fmt=scale_fmt, backend=backend,
                    bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32, device=w.device,
                    gemm=gemm)
        layer.requantize_(w.detach())
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @torch.no_grad()
    def requantize_(self, w: torch.Tensor, *, name: str = "weight") -> None:
        """Quantize a high-precision ``w`` [N, K] into this layer's existing ``weight`` / ``weight_scale_inv``
        storage (same tensors, same ``data_ptr()``). ``name`` only labels errors.

        Raises ValueError on a wrong shape or a non-float dtype (nothing written), or on a non-finite block: the
        quantizer names the block, and blocks it processed before that one are already overwritten (see
        :func:`helpers.fp8.quant_weight`), so the layer must be re-synced from a good weight before use.
        """
        if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dtype == FP8_DTYPE:
            raise ValueError(f"{name}: expected a high-precision float tensor, got "
                             f"{getattr(w, 'dtype', type(w).__name__)}")
        if tuple(w.shape) != tuple(self.weight.shape):
            raise ValueError(f"{name}: expected shape {tuple(self.weight.shape)} (out_features, in_features), "
                             f"got {tuple(w.shape)}")
        w = w.to(self.weight.device)  # no-op when already there; one layer's copy otherwise
        try:
            quant_weight(w, self.weight_block_size, scale_fmt=self.scale_fmt, backend=self.backend,
                         out=self.weight, scale_out=self.weight_scale_inv)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
        finally:
            self._syncs += 1  # even a failed sync may have written some blocks: the bf16 cache is stale either way

    def dequantized_weight_bf16(self) -> torch.Tensor:
        """The bf16 [N, K] weight the ``"bf16"`` path multiplies with: ``bf16(weight * weight_scale_inv)``, cached
        until the FP8 storage changes (exact for ue8m0 scales, one bf16 rounding per element for fp32 scales)."""
        key = (self._syncs, self.weight._version, self.weight_scale_inv._version)
        if self._w_bf16 is None or self._w_bf16_key != key:
            self._w_bf16 = dequant_weight(self.weight, self.weight_scale_inv, self.weight_block_size).to(torch.bfloat16)
            self._w_bf16_key = key
        return self._w_bf16

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dim in_features={self.in_features}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        bk = self.weight_block_size[1]
        x_fp8, x_scale = quant_act(x2, bk, scale_fmt=self.scale_fmt, backend=self.backend)
        if self.gemm == "exact":
            y = block_fp8_matmul(x_fp8, x_scale, self.weight, self.weight_scale_inv,
                                 block_size=self.weight_block_size, out_dtype=x.dtype, backend=self.backend)  # [M, N]
        else:
            x_deq = _dequant_act_f32(x_fp8, x_scale, bk)  # [M, K] fp32 (exact for ue8m0 scales)
            y = (x_deq.to(torch.bfloat16) @ self.dequantized_weight_bf16().T).to(x.dtype)  # [M, N]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight_block_size={self.weight_block_size}, scale_fmt={self.scale_fmt!r}, backend={self.backend!r}, "
                f"gemm={self.gemm!r}")


def fp8_linears(model: nn.Module) -> dict[str, Fp8Linear]:
    """``qualified name -> Fp8Linear`` for every FP8 layer of ``model`` (``""`` if ``model`` is one itself)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Fp8Linear)}


def _check_skip(skip: object) -> Sequence[re.Pattern[str]] | Callable[[str, nn.Module], bool]:
    """``skip`` as compiled patterns (or the predicate itself); a bare string is rejected, since iterating it would
    give one-character patterns (``skip="lm_head"`` would skip every layer whose name holds an ``l``, ``m``, ...)."""
    if callable(skip):
        return skip  # type: ignore[return-value]
    if isinstance(skip, (str, bytes)):
        raise TypeError(f"skip must be a sequence of regular expressions or a predicate (name, module) -> bool, got "
                        f"the string {skip!r}; wrap it: skip=({skip!r},) (or skip=DEFAULT_SKIP + ({skip!r},))")
    try:
        patterns = list(skip)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"skip must be a sequence of regular expressions or a predicate (name, module) -> bool, got "
                        f"{type(skip).__name__}") from None
    compiled = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"skip must hold regular-expression strings, got {p!r} ({type(p).__name__})")
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"skip pattern {p!r} is not a valid regular expression: {exc}") from None
    return compiled


def _skipped(name: str, module: nn.Module, skip: Sequence[re.Pattern[str]] | Callable[[str, nn.Module], bool]) -> bool:
    if callable(skip):
        return bool(skip(name, module))
    return any(p.search(name) for p in skip)


def quantize_model(model: nn.Module, *, skip: Sequence[str] | Callable[[str, nn.Module], bool] = DEFAULT_SKIP,
                   block_size: Sequence[int] = DEFAULT_BLOCK, scale_fmt: str = "fp32",
                   backend: str = "auto", gemm: str = "exact") -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` whose qualified name matches none of ``skip`` by an
    :class:`Fp8Linear` (see :data:`DEFAULT_SKIP`: embeddings, lm_head, norms, MoE routers stay high precision).

    ``skip`` is a sequence of regular expressions searched in the module's qualified name (a bare string is
    rejected with a TypeError: wrap it, ``skip=("lm_head",)``), or a predicate ``(name, module) -> bool``. A model
    in which no ``nn.Linear`` gets quantized (none at all, or every one skipped) is returned unchanged with a
    ``UserWarning`` saying so. Layers are quantized one at a time and each high-precision weight is released as
    its layer is swapped (peak extra memory: one layer). ``gemm`` picks every layer's forward path
    (:data:`GEMM_PATHS`). Returns ``model``.
    """
    if isinstance(model, nn.Linear):
        raise ValueError("model is itself an nn.Linear and cannot be swapped in place; use Fp8Linear.from_linear")
    block_size = check_block_size(block_size)
    check_scale_fmt(scale_fmt)
    if gemm not in GEMM_PATHS:
        raise ValueError(f"gemm must be one of {GEMM_PATHS}, got {gemm!r}")
    skip_rule = _check_skip(skip)
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    targets = [(name, m) for name, m in linears if not _skipped(name, m, skip_rule)]
    if not linears:
        warnings.warn(f"quantize_model: {type(model).__name__} has no nn.Linear layer; nothing was quantized "
                      f"({len(fp8_linears(model))} Fp8Linear layer(s) already present)", UserWarning, stacklevel=2)
    elif not targets:
        warnings.warn(f"quantize_model: skip matched all {len(linears)} nn.Linear layer(s) of "
                      f"{type(model).__name__}; nothing was quantized", UserWarning, stacklevel=2)
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            fp8 = Fp8Linear.from_linear(lin, block_size=block_size, scale_fmt=scale_fmt, backend=backend, gemm=gemm)
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from exc
        setattr(parent, child, fp8)
    return model


def requantize_model_(fp8_model: nn.Module,
                      state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *,
                      strict: bool = True) -> dict[str, float]:
    """The per-RL-step weight sync: refresh an FP8 model in place from updated high-precision weights.

    Args:
        fp8_model: a model after :func:`quantize_model` (or loaded with :func:`load_fp8_checkpoint`).
        state: the trainer's high-precision tensors, keyed like ``fp8_model``'s high-precision original (for an
            Fp8Linear ``L``: ``"L.weight"`` [N, K] and ``"L.bias"``), either a ``Mapping`` (a state dict) or an
            iterable of ``(name, tensor)`` pairs, so a trainer can stream one tensor at a time (e.g. while
            gathering shards). Any device / float dtype; each tensor is read once.
        strict: raise on names the model does not have, and on model tensors the state does not update. A missing
            FP8 layer weight always raises.

    Every ``L.weight`` is quantized with ``L``'s own block size and scale format straight into ``L.weight`` /
    ``L.weight_scale_inv`` (their ``data_ptr()`` does not change); other tensors (norms, embeddings, biases) are
    ``copy_``-ed into the existing parameters and buffers, with a dtype cast. Nothing model-sized is allocated.

    Raises ValueError naming the layer when a weight is missing, mis-shaped, or not finite (quantizer check;
    other tensors are checked with ``isfinite``). A ``Mapping`` is checked for names and shapes before anything is
    written; with a stream, or on a non-finite block, the tensors before the failing one are already updated -
    treat the error as fatal for that sync (never serve the model) and re-sync with a good state.

    Returns metrics: ``layers`` (FP8 layers re-quantized), ``bytes_read`` (high-precision bytes of their weights),
    ``bytes_written`` (FP8 codes + scales written), ``tensors_copied`` / ``bytes_copied`` (other tensors).
    Timing is the caller's (benchmarks time this call with :func:`helpers.core.timing.median_time`).
    """
    layers = fp8_linears(fp8_model)
    weight_of = {(f"{n}.weight" if n else "weight"): n for n in layers}
    fp8_owned = set(weight_of) | {(f"{n}.weight_scale_inv" if n else "weight_scale_inv") for n in layers}
    others: dict[str, torch.Tensor] = {k: v for k, v in fp8_model.state_dict(keep_vars=True).items()
                                       if k not in fp8_owned}

    def check_known(key: str, value: torch.Tensor) -> bool:
        """Name and shape check; False for an unknown name tolerated by ``strict=False``."""
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state[{key!r}] must be a tensor, got {type(value).__name__}")
        if key in weight_of:
            expect = tuple(layers[weight_of[key]].weight.shape)
        elif key in others:
            expect = tuple(others[key].shape)
        elif strict:
            raise ValueError(f"state has {key!r}, which is not a tensor of the model (strict=True)")
        else:
            return False
        if tuple(value.shape) != expect:
            what = f"layer {weight_of[key]!r}" if key in weight_of else f"tensor {key!r}"
            raise ValueError(f"{what}: expected shape {expect}, got {tuple(value.shape)}")
        return True

    if isinstance(state, Mapping):
        for key, value in state.items():  # names and shapes first: a bad dict changes nothing
            check_known(key, value)
        missing = [weight_of[k] for k in weight_of if k not in state]
        if missing:
            raise ValueError(f"state has no weight for FP8 layer(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if strict and (absent := [k for k in others if k not in state]):
            raise ValueError(f"state does not update {absent[:5]}{' ...' if len(absent) > 5 else ''} (strict=True)")
        items: Iterable[tuple[str, torch.Tensor]] = state.items()
    else:
        items = state

    metrics = {"layers": 0, "bytes_read": 0, "bytes_written": 0, "tensors_copied": 0, "bytes_copied": 0}
    seen: set[str] = set()
    with torch.no_grad():
        for key, value in items:
            if not check_known(key, value):
                del value
                continue
            seen.add(key)
            if key in weight_of:
                layer = layers[weight_of[key]]
                layer.requantize_(value, name=f"layer {weight_of[key]!r}")
                metrics["layers"] += 1
                metrics["bytes_read"] += value.numel() * value.element_size()
                metrics["bytes_written"] += (layer.weight.numel() * layer.weight.element_size()
                                             + layer.weight_scale_inv.numel() * 4)
            else:
                dst = others[key]
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise ValueError(f"tensor {key!r} has non-finite values; refusing to push it into the model")
                dst.data.copy_(value)
                metrics["tensors_copied"] += 1
                metrics["bytes_copied"] += dst.numel() * dst.element_size()
            # Drop the loop's reference before the stream produces the next tensor: one layer alive at a time.
            del value
    missing = [weight_of[k] for k in weight_of if k not in seen]
    if missing:
        raise ValueError(f"state had no weight for FP8 layer(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if strict and (absent := [k for k in others if k not in seen]):
        raise ValueError(f"state did not update {absent[:5]}{' ...' if len(absent) > 5 else ''} (strict=True)")
    return metrics
