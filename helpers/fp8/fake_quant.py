"""The trainer side of FP8 end-to-end RL: :class:`Fp8FakeQuantLinear`, a trainable linear layer whose forward is
the engine's blockwise W8A8 GEMM, and :func:`fake_quantize_model`.

FP8 "end to end" (veRL's ``fp8e2e`` recipes, NeMo-RL's FP8 training, Miles' unified precision) runs the trainer's
linear layers in FP8 too, so the policy the trainer optimises and the policy the engine samples from see the same
FP8 weights. Here the trainer keeps fp32 master weights and an fp32 optimizer; each forward

1. quantizes the weight with :func:`helpers.fp8.quant_weight` - the same function, block size and scale format the
   engine's weight sync uses, on the same fp32 tensor (``weight_src="fp32"``), or on its bf16 rounding
   (``weight_src="bf16"``: xtuner's fix, both sides quantize the bf16 weights a bf16 weight sync carries);
2. quantizes the input in 1 x bk groups with :func:`helpers.fp8.quant_act`;
3. multiplies with :func:`helpers.fp8.block_fp8_matmul` (per K tile ``acc += (x_tile @ w_tile.T) * sx * sw`` in
   fp32): the engine's ``gemm="exact"`` path, bit for bit for the same input.

The backward is the straight-through estimator (the rounding is treated as the identity): ``dL/dx = g @ Wq`` and
``dL/dW = g.T @ Xq``, with ``Wq`` / ``Xq`` the dequantized FP8 operands of the forward, in fp32 (FP8 training
recipes also quantize the gradient GEMMs; this one keeps the gradients in fp32, so it isolates the forward's
mismatch). The gradient reaches the fp32 master weight, which the optimizer updates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from helpers.fp8.format import DEFAULT_BLOCK, check_block_size, check_scale_fmt
from helpers.fp8.linear import DEFAULT_SKIP, _check_skip, _skipped
from helpers.fp8.quant import block_fp8_matmul, dequant_weight, quant_act, quant_weight

__all__ = ["WEIGHT_SOURCES", "Fp8FakeQuantLinear", "fake_quantize_model", "fake_quant_linears"]

# What the weight quantizer reads: the fp32 master weight, or its bf16 rounding (what a bf16 weight sync sends).
WEIGHT_SOURCES = ("fp32", "bf16")


def _weight_source(w: torch.Tensor, weight_src: str) -> torch.Tensor:
    return w.detach().to(torch.bfloat16) if weight_src == "bf16" else w.detach()


class _BlockFp8LinearSTE(torch.autograd.Function):
    """``y = blockFP8(x) @ blockFP8(w).T`` forward; straight-through backward (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                block_size: tuple[int, int], scale_fmt: str, backend: str) -> torch.Tensor:
        bk = block_size[1]
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.detach().reshape(-1, k)
        qx, sx = quant_act(x2, bk, scale_fmt=scale_fmt, backend=backend)
        y = block_fp8_matmul(qx, sx, qw, sw, block_size=block_size, out_dtype=x.dtype, backend=backend)
        ctx.save_for_backward(qx, sx, qw, sw)
        ctx.meta = (block_size, x.dtype, tuple(lead), k)
        return y.reshape(*lead, w.shape[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        qx, sx, qw, sw = ctx.saved_tensors
        block_size, x_dtype, lead, k = ctx.meta
        bk = block_size[1]
        w_deq = dequant_weight(qw, sw, block_size)  # fp32 [N, K]
        m = qx.shape[0]
        kb = sx.shape[-1]
        codes = torch.nn.functional.pad(qx.float(), (0, kb * bk - k)).view(m, kb, bk)
        x_deq = (codes * sx[..., None]).view(m, kb * bk)[:, :k]  # fp32 [M, K]
        g2 = g.reshape(-1, g.shape[-1]).float()  # [M, N]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ w_deq).to(x_dtype).reshape(*lead, k)
        if ctx.needs_input_grad[1]:
            grad_w = g2.T @ x_deq
        return grad_x, grad_w, None, None, None, None, None


class Fp8FakeQuantLinear(nn.Linear):
    """A trainable ``nn.Linear`` whose forward is the engine's blockwise W8A8 GEMM (module docstring).

    The parameters are the ``nn.Linear``'s (``weight`` fp32 [N, K], optional ``bias`` [N]), so the state dict, the
    optimizer and the weight sync see the ordinary fp32 master weights. ``block_size`` / ``scale_fmt`` must be the
    engine's; ``weight_src`` is "fp32" or "bf16" (:data:`WEIGHT_SOURCES`). Forward: ``x`` [..., K] fp32 ->
    [..., N] fp32. The bias is added in fp32 after the GEMM, as :class:`~helpers.fp8.Fp8Linear` does."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 block_size: Sequence[int] = DEFAULT_BLOCK, scale_fmt: str = "fp32", weight_src: str = "fp32",
                 backend: str = "torch", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_block_size = check_block_size(tuple(block_size))
        self.scale_fmt = check_scale_fmt(scale_fmt)
        if weight_src not in WEIGHT_SOURCES:
            raise ValueError(f"weight_src must be one of {WEIGHT_SOURCES}, got {weight_src!r}")
        self.weight_src, self.backend = weight_src, backend
        # The quantized weight, reused until the weight changes (an optimizer step bumps its _version): a decode
        # loop calls the forward once per token with the same weight.
        self._q_cache: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> "Fp8FakeQuantLinear":
        """Wrap ``linear``: the new layer holds the *same* parameter objects (an optimizer built on them keeps
        working); keyword arguments as the constructor."""
        if type(linear) is not nn.Linear:
            raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **kw)
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    @torch.no_grad()
    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The FP8 codes float8_e4m3fn [N, K] and ``weight_scale_inv`` fp32 [ceil(N/bn), ceil(K/bk)] the forward
        multiplies with - what the engine's weight sync writes for the same weight (cached until it changes)."""
        key = (self.weight.data_ptr(), self.weight._version)
        if self._q_cache is None or self._q_cache[0] != key:
            q = quant_weight(_weight_source(self.weight, self.weight_src), self.weight_block_size,
                             scale_fmt=self.scale_fmt, backend=self.backend)
            self._q_cache = (key, q)
        return self._q_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dim in_features={self.in_features}, got shape {tuple(x.shape)}")
        qw, sw = self.quantized_weight()
        y = _BlockFp8LinearSTE.apply(x, self.weight, qw, sw, self.weight_block_size, self.scale_fmt, self.backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight_block_size={self.weight_block_size}, scale_fmt={self.scale_fmt!r}, "
                f"weight_src={self.weight_src!r}")


def fake_quant_linears(model: nn.Module) -> dict[str, Fp8FakeQuantLinear]:
    """``qualified name -> Fp8FakeQuantLinear`` for every fake-quantized layer of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Fp8FakeQuantLinear)}


def fake_quantize_model(model: nn.Module, *, skip: Sequence[str] | Callable[[str, nn.Module], bool] = DEFAULT_SKIP,
                        block_size: Sequence[int] = DEFAULT_BLOCK, scale_fmt: str = "fp32",
                        weight_src: str = "fp32", backend: str = "torch") -> nn.Module:
    """Swap, in place, every ``nn.Linear`` of ``model`` not matched by ``skip`` (the rule of
    :func:`helpers.fp8.quantize_model`, so trainer and engine quantize the same layers) for an
    :class:`Fp8FakeQuantLinear` holding the same parameters. Returns ``model``; raises ValueError if nothing
    would be quantized (an FP8 trainer with no FP8 layer is a configuration error, not a silent fp32 run)."""
    rule = _check_skip(skip)
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not _skipped(n, m, rule)]
    if not targets:
        raise ValueError(f"fake_quantize_model: no nn.Linear of {type(model).__name__} left to quantize")
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8FakeQuantLinear.from_linear(lin, block_size=block_size, scale_fmt=scale_fmt,
                                                              weight_src=weight_src, backend=backend))
    return model
