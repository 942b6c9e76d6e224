"""Fp8Linear, quantize_model and the in-place weight sync requantize_model_ (helpers/fp8/linear.py)."""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
from torch import nn

import helpers  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
from helpers.fp8 import (Fp8Linear, block_fp8_matmul, dequant_weight, quant_act, quant_weight, quantize_model,
                         requantize_model_)
from helpers.core.timing import peak_rss_delta
from helpers.fp8.linear import DEFAULT_SKIP, fp8_linears

FP8 = torch.float8_e4m3fn


def bits(t: torch.Tensor) -> torch.Tensor:
    """A view for exact comparison (fp8 tensors compare by their bytes, so NaN codes compare too)."""
    return t.view(torch.uint8) if t.dtype == FP8 else t


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def make_linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin


# Awkward shapes: smaller than a block, ragged on N and/or K, exact multiples.
SHAPES = [(17, 33), (200, 72), (384, 384), (256, 130)]


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_forward_matches_dequantized_reference(k, n, lead, scale_fmt):
    lin = make_linear(k, n)
    layer = Fp8Linear.from_linear(lin, scale_fmt=scale_fmt, backend="torch")
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    assert y.shape == (*lead, n) and y.dtype == x.dtype
    # Reference: the same quantized operands, dequantized, multiplied in float64.
    xq, xs = quant_act(x.reshape(-1, k), 128, scale_fmt=scale_fmt, backend="torch")
    x_deq = xq.double() * xs.double().repeat_interleave(128, dim=1)[:, :k]
    w_deq = dequant_weight(layer.weight, layer.weight_scale_inv).double()
    ref = (x_deq @ w_deq.T + lin.bias.double()).reshape(*lead, n)
    # Only the fp32 accumulation order differs from the float64 reference.
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,n", SHAPES)
def test_forward_close_to_nn_linear(k, n):
    lin = make_linear(k, n, bias=False)
    layer = Fp8Linear.from_linear(lin, backend="torch")
    x = torch.randn(64, k, generator=torch.Generator().manual_seed(2))
    y, ref = layer(x), lin(x).detach()
    # Two e4m3 roundings (3 mantissa bits: relative rms error ~2.5% each) -> ~3.5% on the product; allow 6%.
    rel = float((y - ref).norm() / ref.norm())
    assert rel < 0.06, rel


def test_from_linear_storage_layout_and_bf16():
    lin = make_linear(300, 200).to(torch.bfloat16)
    layer = Fp8Linear.from_linear(lin, backend="torch")
    assert layer.weight.dtype == FP8 and layer.weight.shape == (200, 300)
    assert layer.weight_scale_inv.dtype == torch.float32 and layer.weight_scale_inv.shape == (2, 3)
    assert layer.weight_block_size == (128, 128)
    assert layer.bias.dtype == torch.bfloat16 and not layer.bias.requires_grad
    q, s = quant_weight(lin.weight.detach(), backend="torch")
    assert_same_bits(layer.weight, q)
    assert_same_bits(layer.weight_scale_inv, s)
    assert set(layer.state_dict()) == {"weight", "weight_scale_inv", "bias"}
    y = layer(torch.randn(4, 300, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize("bad", [dict(block_size=(100, 128)), dict(block_size=(8, 8)), dict(scale_fmt="e8m0")])
def test_constructor_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        Fp8Linear(64, 64, **bad)


def test_from_linear_rejects_non_finite():
    lin = make_linear(256, 256)
    with torch.no_grad():
        lin.weight[130, 5] = float("inf")
    with pytest.raises(ValueError, match=r"block \(1, 0\)"):
        Fp8Linear.from_linear(lin, backend="torch")


# -- quantize_model ----------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, d: int, f: int, experts: int = 4) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(d, experts, bias=False)  # MoE router: stays high precision
        self.mlp.gate_proj = nn.Linear(d, f, bias=False)  # dense projection: quantized
        self.mlp.down_proj = nn.Linear(f, d, bias=False)
        self.mlp.router_logits = nn.Linear(d, experts)  # another router spelling


class _Toy(nn.Module):
    def __init__(self, d: int = 96, f: int = 160, vocab: int = 50) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.embed_proj = nn.Linear(d, d)  # a linear named like an embedding: kept
        self.layers = nn.ModuleList(_Block(d, f) for _ in range(2))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_proj(self.embed_tokens(ids))
        for b in self.layers:
            h = h + b.q_proj(b.input_layernorm(h))
            h = h + b.mlp.down_proj(torch.relu(b.mlp.gate_proj(h))) + 0 * b.mlp.gate(h).sum(-1, keepdim=True)
        return self.lm_head(self.norm(h))


def _toy(seed: int = 0) -> _Toy:
    torch.manual_seed(seed)
    return _Toy()


def test_quantize_model_default_skip():
    model = quantize_model(_toy(), backend="torch")
    quantized = set(fp8_linears(model))
    assert quantized == {f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "mlp.gate_proj", "mlp.down_proj")}
    kept = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    routers = {f"layers.{i}.mlp.{p}" for i in range(2) for p in ("gate", "router_logits")}
    assert kept == {"embed_proj", "lm_head"} | routers
    assert isinstance(model.norm, nn.LayerNorm) and isinstance(model.embed_tokens, nn.Embedding)
    assert r"(^|\.)lm_head$" in DEFAULT_SKIP
    ids = torch.randint(0, 50, (3, 7))
    ref = _toy()(ids).detach()
    rel = float((model(ids).detach() - ref).norm() / ref.norm())
    assert rel < 0.1, rel  # a few FP8 layers deep; loose on purpose, exactness is tested per layer above


def test_quantize_model_custom_skip_and_errors():
    model = quantize_model(_toy(), skip=(), backend="torch")
    assert len(fp8_linears(model)) == 2 * 5 + 2  # every nn.Linear
    model = quantize_model(_toy(), skip=lambda name, m: m.out_features != 96, backend="torch")
    assert set(fp8_linears(model)) == {"embed_proj"} | {f"layers.{i}.{p}" for i in range(2)
                                                          for p in ("q_proj", "mlp.down_proj")}
    with pytest.raises(ValueError, match="from_linear"):
        quantize_model(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="block_size"):
        quantize_model(_toy(), block_size=(96, 128))


# -- requantize_model_ (the weight sync) -------------------------------------------------------------------------
def _updated_state(seed: int) -> dict[str, torch.Tensor]:
    """A 'trainer step later' state dict: a differently seeded model, weights in bf16 as a trainer holds them."""
    state = _toy(seed).state_dict()
    return {k: v.detach().to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
@pytest.mark.parametrize("stream", [False, True])
def test_requantize_in_place_bit_identical_to_fresh(scale_fmt, stream):
    model = quantize_model(_toy(0), scale_fmt=scale_fmt, backend="torch")
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    new = _updated_state(1)
    metrics = requantize_model_(model, iter(list(new.items())) if stream else new)
    # A fresh quantization of the same high-precision values.
    fresh = _toy(0)
    fresh.load_state_dict(new)
    quantize_model(fresh, scale_fmt=scale_fmt, backend="torch")
    for key, value in fresh.state_dict().items():
        assert_same_bits(model.state_dict()[key], value)
        assert model.state_dict()[key].data_ptr() == ptrs[key], f"{key} was re-allocated"
    assert metrics["layers"] == 6
    assert metrics["bytes_read"] == sum(new[f"{n}.weight"].numel() * 2 for n in fp8_linears(model))
    assert metrics["bytes_written"] == sum(m.weight.numel() + 4 * m.weight_scale_inv.numel()
                                           for m in fp8_linears(model).values())
    assert metrics["tensors_copied"] == len(new) - 6


def test_requantize_streams_without_holding_consumed_tensors():
    """The sync must not keep references to tensors it has consumed: peak extra memory stays ~one layer."""
    model = quantize_model(_toy(0), backend="torch")
    names = list(_updated_state(1))
    refs: list[weakref.ref] = []

    def stream():
        src = _toy(1).state_dict()
        for name in names:
            for r in refs:  # every tensor handed out before must already be garbage
                assert r() is None, "requantize_model_ kept a consumed tensor alive"
            t = src.pop(name).detach().clone()
            refs.append(weakref.ref(t))
            yield name, t
            del t  # tensors have no reference cycles: refcounting frees them at once, no gc.collect needed

    assert requantize_model_(model, stream())["layers"] == 6


def test_requantize_peak_memory_is_about_one_layer():
    n_layers, shape = 4, (1024, 2048)  # 4 MiB of bf16 per layer, 16 MiB in all
    model = nn.Module()
    model.layers = nn.ModuleList(Fp8Linear(shape[1], shape[0], bias=False, backend="torch") for _ in range(n_layers))
    g = torch.Generator().manual_seed(0)
    state = {f"layers.{i}.weight": torch.randn(*shape, generator=g).to(torch.bfloat16) for i in range(n_layers)}
    requantize_model_(model, state)  # warm the allocator
    _, extra = peak_rss_delta(lambda: requantize_model_(model, state))
    if extra is None:
        pytest.skip("peak RSS reset (/proc/self/clear_refs) not available on this OS")
    layer_bytes = shape[0] * shape[1] * 2
    # A second full copy would be >= 8 MiB (the fp8 codes) or 16 MiB (bf16); the streaming path stays under 2 layers.
    assert extra < 2 * layer_bytes, (extra, layer_bytes)


def test_requantize_rejects_bad_states_naming_the_layer():
    model = quantize_model(_toy(0), backend="torch")
    before = {k: bits(v).clone() for k, v in model.state_dict().items()}
    good = _updated_state(1)
    layer = "layers.1.mlp.gate_proj"

    missing = {k: v for k, v in good.items() if k != f"{layer}.weight"}
    with pytest.raises(ValueError, match=layer):
        requantize_model_(model, missing)
    with pytest.raises(ValueError, match=layer):
        requantize_model_(model, missing, strict=False)

    wrong = dict(good, **{f"{layer}.weight": good[f"{layer}.weight"].T.contiguous()})
    with pytest.raises(ValueError, match=rf"{layer}.*expected shape \(160, 96\)"):
        requantize_model_(model, wrong)

    unknown = dict(good, extra=torch.zeros(3))
    with pytest.raises(ValueError, match="'extra'"):
        requantize_model_(model, unknown)
    # A Mapping is validated (names, shapes) before anything is written.
    for k, v in model.state_dict().items():
        assert torch.equal(bits(v), before[k]), k

    w = good[f"{layer}.weight"].clone()
    w[3, 7] = float("nan")
    with pytest.raises(ValueError, match=rf"{layer}.*non-finite"):
        requantize_model_(model, dict(good, **{f"{layer}.weight": w}))
    norm = good["norm.weight"].clone()
    norm[0] = float("inf")
    with pytest.raises(ValueError, match="norm.weight"):
        requantize_model_(model, dict(good, **{"norm.weight": norm}))

    # Streams: a missing layer is only known at the end, and is still reported by name.
    with pytest.raises(ValueError, match=layer):
        requantize_model_(model, iter(missing.items()))
    # strict=False ignores unknown names but still needs every FP8 weight.
    assert requantize_model_(model, unknown, strict=False)["layers"] == 6


def test_triton_interpreter_backend_matches_torch():
    """One small case through the Triton kernels (interpreted on the CPU): same codes, scales and outputs."""
    lin = make_linear(160, 48, seed=3)
    x = torch.randn(3, 160, generator=torch.Generator().manual_seed(4))
    a = Fp8Linear.from_linear(lin, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the interpreter is slow": expected here
        b = Fp8Linear.from_linear(lin, backend="triton")
        y_b = b(x)
    assert_same_bits(a.weight, b.weight)
    assert_same_bits(a.weight_scale_inv, b.weight_scale_inv)
    # Same quantized operands; the interpreter's tl.dot and torch's matmul may sum in different orders.
    torch.testing.assert_close(y_b, a(x), rtol=1e-5, atol=1e-5)


# -- the bf16 fast path --------------------------------------------------------------------------------------------
def test_dequant_act_bits_equal_torch_cast_including_subnormals_and_ragged_k():
    from helpers.fp8.linear import _dequant_act_f32

    g = torch.Generator().manual_seed(4)
    # Magnitudes over 12 decades so that many groups hold e4m3 subnormal codes; K = 200 leaves a ragged group.
    x = torch.randn(9, 200, generator=g) * torch.logspace(-6, 6, 200)[None, :]
    for scale_fmt in ("fp32", "ue8m0"):
        q, s = quant_act(x, 128, scale_fmt=scale_fmt, backend="torch")
        ref = q.float() * s.repeat_interleave(128, dim=1)[:, :200]
        assert torch.equal(_dequant_act_f32(q, s, 128), ref)
    every_code = torch.arange(256, dtype=torch.uint8).view(FP8).reshape(2, 128)
    finite = ~torch.isnan(every_code.float())
    got = _dequant_act_f32(every_code, torch.ones(2, 1), 128)
    assert torch.equal(got[finite], every_code.float()[finite])


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_bf16_path_against_exact_block_gemm(k, n, scale_fmt, x_dtype):
    lin = make_linear(k, n, bias=False)
    exact = Fp8Linear.from_linear(lin, scale_fmt=scale_fmt, backend="torch")
    fast = Fp8Linear.from_linear(lin, scale_fmt=scale_fmt, backend="torch", gemm="bf16")
    assert (exact.gemm, fast.gemm) == ("exact", "bf16") and "gemm='bf16'" in repr(fast)
    assert_same_bits(exact.weight, fast.weight)
    x = torch.randn(37, k, generator=torch.Generator().manual_seed(5)).to(x_dtype)
    xq, xs = quant_act(x, 128, scale_fmt=scale_fmt, backend="torch")
    y_exact = block_fp8_matmul(xq, xs, exact.weight, exact.weight_scale_inv, out_dtype=torch.float32, backend="torch")
    y_fast = fast(x)
    assert y_fast.dtype == x_dtype
    x_deq = xq.double() * xs.double().repeat_interleave(128, dim=1)[:, :k]
    w_deq = dequant_weight(exact.weight, exact.weight_scale_inv).double()
    mag = x_deq.abs() @ w_deq.abs().T  # bound on every partial sum
    u = 2.0**-8  # bf16 unit roundoff (8 significant bits)
    # Derived bound: the output's rounding to bf16 (u |y|), fp32 accumulation in either GEMM (K 2^-24 each), and
    # with fp32 scales the rounding of both dequantized operands to bf16 (2u + u^2 of sum |x||w|); ue8m0 operands
    # are exact in bf16.
    operand = (2 * u + u * u) if scale_fmt == "fp32" else 0.0
    bound = u * y_exact.double().abs() + (operand + 2 * k * 2.0**-24) * mag + 1e-30
    err = (y_fast.double() - y_exact.double()).abs()
    assert bool((err <= bound * 1.0001).all()), float((err / bound).max())


def test_bf16_path_follows_every_weight_update():
    lin = make_linear(64, 48)
    fast = Fp8Linear.from_linear(lin, backend="torch", gemm="bf16")
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(6))
    y0 = fast(x)
    new = make_linear(64, 48, seed=9)
    fast.requantize_(new.weight.detach())  # native in-place write: no version bump, the sync counter catches it
    ref = Fp8Linear.from_linear(new, backend="torch", gemm="bf16")
    ref.bias.data.copy_(fast.bias)
    assert not torch.equal(fast(x), y0) and torch.equal(fast(x), ref(x))
    fast.load_state_dict(Fp8Linear.from_linear(lin, backend="torch").state_dict())  # copy_: a version bump
    assert torch.equal(fast(x), y0)


def test_gemm_path_validated():
    with pytest.raises(ValueError, match="gemm"):
        Fp8Linear(64, 64, gemm="fp16")
    with pytest.raises(ValueError, match="gemm"):
        quantize_model(_toy(0), gemm="fast")
    model = quantize_model(_toy(0), backend="torch", gemm="bf16")
    assert {m.gemm for m in fp8_linears(model).values()} == {"bf16"}


def test_quantize_model_rejects_a_bare_string_skip():
    # iterating "lm_head" would give seven one-character patterns: a layer named "down" would stay fp32 silently
    with pytest.raises(TypeError, match=r"got the string 'lm_head'; wrap it: skip=\('lm_head',\)"):
        quantize_model(_toy(), skip="lm_head", backend="torch")
    with pytest.raises(ValueError, match=r"skip pattern '\(' is not a valid regular expression"):
        quantize_model(_toy(), skip=("(",), backend="torch")
    with pytest.raises(TypeError, match="regular-expression strings, got 3"):
        quantize_model(_toy(), skip=("lm_head", 3), backend="torch")
    # the wrapped string skips exactly lm_head: every other nn.Linear (embed_proj and the routers included) is FP8
    model = quantize_model(_toy(), skip=("lm_head",), backend="torch")
    assert {n for n, m in model.named_modules() if type(m) is nn.Linear} == {"lm_head"}
    assert len(fp8_linears(model)) == 2 * 5 + 1


def test_quantize_model_warns_when_nothing_is_quantized():
    no_linear = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8))
    with pytest.warns(UserWarning, match="has no nn.Linear layer; nothing was quantized"):
        assert quantize_model(no_linear, backend="torch") is no_linear
    with pytest.warns(UserWarning, match=r"skip matched all 12 nn.Linear layer\(s\)"):
        quantize_model(_toy(), skip=lambda name, m: True, backend="torch")
    once = quantize_model(nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 128)), skip=(), backend="torch")
    with pytest.warns(UserWarning, match=r"nothing was quantized \(2 Fp8Linear layer\(s\) already present\)"):
        quantize_model(once, skip=(), backend="torch")


def test_default_skip_is_exported_from_the_package():
    import helpers.fp8 as fp8

    assert fp8.DEFAULT_SKIP is DEFAULT_SKIP and "DEFAULT_SKIP" in fp8.__all__
