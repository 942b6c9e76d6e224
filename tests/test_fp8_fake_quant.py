"""The FP8 end-to-end trainer's linear layer: its forward is the engine's block-scaled W8A8 GEMM bit for bit, its
weights quantize to the engine's codes and scales, and its backward is the straight-through estimator."""

import pytest
import torch
from torch import nn

import helpers  # noqa: F401  (sets up the runtime before anything else)
from helpers.fp8 import dequant_weight, quant_act, quant_weight
from helpers.fp8.fake_quant import Fp8FakeQuantLinear, fake_quant_linears, fake_quantize_model
from helpers.fp8.linear import Fp8Linear


def _linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight[:, :7] *= 30  # an outlier column: block scales differ across K
    return lin


@pytest.mark.parametrize("k,block,scale_fmt", [(96, 32, "fp32"), (80, 32, "fp32"), (128, 64, "ue8m0")])
def test_forward_is_the_engines_exact_gemm_bit_for_bit(k, block, scale_fmt):
    lin = _linear(k, 48)
    fq = Fp8FakeQuantLinear.from_linear(lin, block_size=(block, block), scale_fmt=scale_fmt)
    eng = Fp8Linear.from_linear(lin, block_size=(block, block), scale_fmt=scale_fmt, backend="torch", gemm="exact")
    x = torch.randn(3, 5, k) * torch.linspace(0.1, 10, k)
    assert torch.equal(fq(x), eng(x))
    q, s = fq.quantized_weight()
    assert torch.equal(q.view(torch.uint8), eng.weight.view(torch.uint8))
    assert torch.equal(s, eng.weight_scale_inv)


def test_bf16_weight_source_quantizes_the_bf16_rounding():
    lin = _linear(64, 32)
    fq = Fp8FakeQuantLinear.from_linear(lin, block_size=(32, 32), weight_src="bf16")
    q, s = fq.quantized_weight()
    q2, s2 = quant_weight(lin.weight.detach().to(torch.bfloat16), (32, 32), backend="torch")
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    q3, s3 = quant_weight(lin.weight.detach(), (32, 32), backend="torch")
    assert not (torch.equal(q.view(torch.uint8), q3.view(torch.uint8)) and torch.equal(s, s3))  # it matters


def test_straight_through_gradient():
    """dL/dx = g @ Wq, dL/dW = g.T @ Xq (the dequantized FP8 operands), dL/db = sum g: the gradient of the same
    GEMM with the rounding replaced by the identity."""
    lin = _linear(96, 40)
    fq = Fp8FakeQuantLinear.from_linear(lin, block_size=(32, 32))
    x = (torch.randn(4, 6, 96) * 3).requires_grad_(True)
    g = torch.randn(4, 6, 40)
    fq(x).backward(g)
    qx, sx = quant_act(x.detach().reshape(-1, 96), 32, backend="torch")
    x_deq = (qx.float().view(-1, 3, 32) * sx[..., None]).view(-1, 96)
    q, s = quant_weight(lin.weight.detach(), (32, 32), backend="torch")
    w_deq = dequant_weight(q, s, (32, 32))
    g2 = g.reshape(-1, 40)
    torch.testing.assert_close(x.grad.reshape(-1, 96), g2 @ w_deq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lin.weight.grad, g2.T @ x_deq, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lin.bias.grad, g2.sum(0), rtol=1e-6, atol=1e-6)
    # The same as autograd through x + (deq(q(x)) - x).detach(): the straight-through estimator's usual form.
    xs = x.detach().clone().requires_grad_(True)
    w = lin.weight.detach().clone().requires_grad_(True)
    xq = xs + (x_deq.view_as(xs) - xs).detach()
    wq = w + (w_deq - w).detach()
    (xq @ wq.T).backward(g)
    torch.testing.assert_close(x.grad, xs.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lin.weight.grad, w.grad, rtol=1e-6, atol=1e-5)


def test_gradient_reaches_the_fp32_master_and_the_optimizer_moves_it():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the swap: same parameter objects after it
    before = model[0].weight.detach().clone()
    fake_quantize_model(model, skip=(), block_size=(32, 32))
    assert set(fake_quant_linears(model)) == {"0", "2"}
    assert model[0].weight.dtype == torch.float32
    model(torch.randn(5, 64)).square().mean().backward()
    q_before = model[0].quantized_weight()[0].clone()
    opt.step()
    assert not torch.equal(model[0].weight.detach(), before)
    # the cached quantized weight follows the update (the optimizer's in-place step bumps the weight's version)
    q, s = model[0].quantized_weight()
    q2, s2 = quant_weight(model[0].weight.detach(), (32, 32), backend="torch")
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    assert not torch.equal(q.view(torch.uint8), q_before.view(torch.uint8))


def test_skip_rule_and_errors():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    fake_quantize_model(model, skip=(r"^1$",), block_size=(16, 16))
    assert set(fake_quant_linears(model)) == {"0"} and type(model[1]) is nn.Linear
    with pytest.raises(ValueError, match="no nn.Linear"):
        fake_quantize_model(nn.Sequential(nn.ReLU()), block_size=(16, 16))
    with pytest.raises(ValueError, match="weight_src"):
        Fp8FakeQuantLinear(32, 32, weight_src="fp16")
    with pytest.raises(ValueError, match="in_features"):
        Fp8FakeQuantLinear.from_linear(nn.Linear(32, 16), block_size=(16, 16))(torch.randn(2, 31))
