"""GPU tier (``pytest -m gpu``, ``make gpu-test``): the compiled Triton FP8 kernels against the torch path at
production shapes (the Qwen3-8B projections) and awkward ones (M in 1, 7, 83, 4096; ragged K).

* activation and weight quantization: codes (as bytes) and scales bit-exact, both scale formats, against the
  validated torch path on the CPU (``backend="torch"``: checked bit for bit against a slow reference in
  tests/test_fp8_quant.py);
* the block-scaled GEMM: exactly equal on inputs where every accumulation order is exact, and within a derived
  bound (see :func:`test_gemm_within_derived_bound`) on realistic inputs;
* the in-place weight sync: ``requantize_model_`` on CUDA keeps every FP8 tensor's storage and writes what a fresh
  quantization gives.

Without a CUDA device every test here is collected and skipped with the reason "no CUDA device".
"""

from __future__ import annotations

import math

import helpers  # noqa: F401  (sets TRITON_INTERPRET=1 on CPU before triton is imported)
import pytest
import torch
from torch import nn

from helpers.core import runtime
from helpers.fp8 import Fp8Linear, block_fp8_matmul, dequant_weight, quant_act, quant_weight, requantize_model_
from helpers.fp8.bench import QWEN3_8B_GEMMS
from helpers.fp8.format import FP8_DTYPE, SCALE_FMTS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not runtime.has_cuda(), reason="no CUDA device"),
    pytest.mark.skipif(runtime.has_cuda() and runtime.triton_interpreted(),
                       reason="TRITON_INTERPRET is set: this tier checks the compiled kernels"),
]


def _fp8_dot_ok() -> bool:
    from helpers.fp8 import kernels

    return kernels.supports_fp8_dot()


needs_fp8_dot = pytest.mark.skipif(runtime.has_cuda() and not _fp8_dot_ok(),
                                   reason="needs FP8 tensor cores (compute capability 8.9+)")

CUDA = "cuda"
MS = [1, 7, 83, 4096]
# K of the Qwen3-8B projections (hidden 4096, intermediate 12288) and two ragged ones: 4100 = 32 full groups + 4,
# 1000 = 7 full groups + a 104-wide one.
KS = [4096, 12288, 4100, 1000]
# (N, K): the four Qwen3-8B projections, then ragged edges in both dims (partial weight blocks, a one-column K).
WEIGHT_SHAPES = [*QWEN3_8B_GEMMS.values(), (1000, 4100), (83, 129), (7, 1), (4097, 130)]
GEMM_SHAPES = [*QWEN3_8B_GEMMS.values(), (1000, 4100), (130, 1000)]
BLOCK = (128, 128)


def _bytes(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8).cpu()


def _bits(s: torch.Tensor) -> torch.Tensor:
    """fp32 scales as int32 bit patterns: equality then also holds for NaN scales."""
    return s.contiguous().view(torch.int32).cpu()


def _assert_same_quant(q: torch.Tensor, s: torch.Tensor, q_ref: torch.Tensor, s_ref: torch.Tensor) -> None:
    assert q.dtype == FP8_DTYPE and q.shape == q_ref.shape and s.shape == s_ref.shape
    assert torch.equal(_bytes(q), _bytes(q_ref)), f"{int((_bytes(q) != _bytes(q_ref)).sum())} codes differ"
    assert torch.equal(_bits(s), _bits(s_ref)), f"{int((_bits(s) != _bits(s_ref)).sum())} scales differ"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Quantizers: bit-exact
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale_fmt", SCALE_FMTS)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("M", MS)
def test_quant_act_bit_exact(M, K, scale_fmt):
    # Activations with a per-row spread of magnitudes (e^-8 .. e^8) so scales cover many binades.
    g = _gen(M * 7 + K)
    x = (torch.randn(M, K, generator=g) * torch.exp(torch.empty(M, 1).uniform_(-8, 8, generator=g))).bfloat16()
    q, s = quant_act(x.to(CUDA), 128, scale_fmt=scale_fmt, backend="triton")
    _assert_same_quant(q, s, *quant_act(x, 128, scale_fmt=scale_fmt, backend="torch"))


@pytest.mark.parametrize("scale_fmt", SCALE_FMTS)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_quant_weight_bit_exact(shape, scale_fmt):
    g = _gen(shape[0] + 3 * shape[1])
    w = (torch.randn(*shape, generator=g) * 0.02).bfloat16()
    q, s = quant_weight(w.to(CUDA), BLOCK, scale_fmt=scale_fmt, backend="triton")
    _assert_same_quant(q, s, *quant_weight(w, BLOCK, scale_fmt=scale_fmt, backend="torch"))


@pytest.mark.parametrize("scale_fmt", SCALE_FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantizers_bit_exact_on_adversarial_values(dtype, scale_fmt):
    """Values that stress the exact division and the saturating cast: 20 binades either way of 1 (subnormal codes,
    amax / s landing an ulp above 448), exact multiples of the scale, ties between two codes, zero blocks, and
    (activations) groups holding inf / NaN, whose scale must be inf / NaN on the GPU too (a float max would drop
    the NaN)."""
    g = _gen(11)
    M, K = 83, 1000
    x = torch.randn(M, K, generator=g) * torch.exp(torch.empty(M, 1).uniform_(-20, 20, generator=g))
    x[0] = torch.linspace(-448, 448, K)  # codes at and between grid points, amax exactly 448 (scale 1)
    x[1] = torch.arange(K) % 17 * 0.5 ** 9  # multiples of the smallest subnormal
    x[2, :256] = 0.0  # two all-zero groups
    x = x.to(dtype)
    if dtype == torch.float16:
        x = torch.nan_to_num(x, posinf=65504.0, neginf=-65504.0)  # fp16 overflows where fp32 does not
    w = x.clone()
    _assert_same_quant(*quant_weight(w.to(CUDA), BLOCK, scale_fmt=scale_fmt, backend="triton"),
                       *quant_weight(w, BLOCK, scale_fmt=scale_fmt, backend="torch"))
    x[3, 5], x[4, 130], x[5, 999] = math.inf, math.nan, -math.inf
    _assert_same_quant(*quant_act(x.to(CUDA), 128, scale_fmt=scale_fmt, backend="triton"),
                       *quant_act(x, 128, scale_fmt=scale_fmt, backend="torch"))
    s = quant_act(x.to(CUDA), 128, scale_fmt=scale_fmt, backend="triton")[1].cpu()
    assert s[3, 0] == math.inf and math.isnan(s[4, 1]) and s[5, 7] == math.inf


def test_quant_act_strided_input_bit_exact():
    # A non-contiguous view (every other column of a wider buffer, rows with a padded pitch): the kernel reads
    # through strides instead of copying.
    g = _gen(5)
    base = torch.randn(83, 2 * 4100 + 8, generator=g).bfloat16()
    x = base[:, : 2 * 4100 : 2]
    assert not x.is_contiguous()
    _assert_same_quant(*quant_act(base.to(CUDA)[:, : 2 * 4100 : 2], 128, backend="triton"),
                       *quant_act(x.contiguous(), 128, backend="torch"))


def test_quant_weight_rejects_non_finite_block_on_gpu():
    w = torch.randn(300, 260, device=CUDA)
    w[200, 129] = math.nan
    with pytest.raises(ValueError, match=r"block \(1, 1\)"):
        quant_weight(w, BLOCK, backend="triton")


# ---------------------------------------------------------------------------------------------------------------
# Block-scaled GEMM
# ---------------------------------------------------------------------------------------------------------------

def _dequant_act(x_fp8: torch.Tensor, x_scale: torch.Tensor, bk: int) -> torch.Tensor:
    """fp64 [M, K] = codes times their group's scale."""
    K = x_fp8.shape[1]
    return x_fp8.double() * x_scale.double().repeat_interleave(bk, dim=1)[:, :K]


def _matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp64 ``a @ b.T`` on the GPU (fast at 4096 x 12288 x 4096; fp64's 2^-53 is negligible against the bounds
    below), returned on the CPU."""
    return (a.to(CUDA) @ b.to(CUDA).T).cpu()


@needs_fp8_dot
@pytest.mark.parametrize("autotune", ["0", "1"], ids=["untuned", "autotuned"])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gemm_exact_on_integer_codes(shape, M, autotune, monkeypatch):
    """Bit-exact where every summation order is exact, so any indexing error (a wrong scale, tile, stride or tail
    mask) shows, with the default tiles and with every tile shape the autotuner picks: codes in {-2..2}, scales in
    {1/2, 1, 2}. Each K tile's sum of <= 128 products is an integer of
    magnitude <= 512 (exact even in the tensor cores' reduced-precision FP8 accumulator, 13 mantissa bits), the
    tile scale is a power of two in [1/4, 4], and |y| <= 96 tiles * 512 * 4 < 2^18 in steps of 1/4: 20 significant
    bits, exact in fp32. So the kernel's fp32 output equals the fp64 product, and its bf16 output that value
    rounded once."""
    from helpers.fp8 import kernels

    monkeypatch.setenv(kernels.GEMM_AUTOTUNE_ENV, autotune)
    N, K = shape
    g = _gen(N + K + M)
    kb = -(-K // BLOCK[1])
    x_fp8 = torch.randint(-2, 3, (M, K), generator=g).float().to(FP8_DTYPE)
    w_fp8 = torch.randint(-2, 3, (N, K), generator=g).float().to(FP8_DTYPE)
    x_s = 2.0 ** torch.randint(-1, 2, (M, kb), generator=g).float()
    w_s = 2.0 ** torch.randint(-1, 2, (-(-N // BLOCK[0]), kb), generator=g).float()
    ref = _matmul_t(_dequant_act(x_fp8, x_s, BLOCK[1]), dequant_weight(w_fp8, w_s, BLOCK).double())
    args = [t.to(CUDA) for t in (x_fp8, x_s, w_fp8, w_s)]
    y32 = block_fp8_matmul(*args, block_size=BLOCK, out_dtype=torch.float32, backend="triton")
    assert torch.equal(y32.cpu().double(), ref)
    y16 = block_fp8_matmul(*args, block_size=BLOCK, out_dtype=torch.bfloat16, backend="triton")
    assert torch.equal(y16.cpu(), ref.float().bfloat16())
    assert (kernels.gemm_autotuned_config(M, N, K) is not None) == (autotune == "1")  # the switch took effect


# Unit roundoffs of the derivation below.
U_FP32 = 2.0**-24  # fp32, round to nearest
# FP8 MMA on Ada / Hopper accumulates in a 22-bit format with 13 mantissa bits and truncates (SageAttention2,
# arXiv 2411.10958, sec. 4.4), after aligning the products of each group of 32 to the largest exponent and keeping
# 14 bits of each (DeepSeek-V3, arXiv 2412.19437, sec. 3.5.2): a truncation error below 2^-13 of the magnitude.
# Triton lets a whole tl.dot (one K tile) accumulate this way on sm_90 (max_num_imprecise_acc_default = 2^30).
U_MMA = 2.0**-13
MMA_GROUP = 32


@needs_fp8_dot
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gemm_within_derived_bound(shape, M):
    """Realistic operands (quantized Gaussians) against the exact (fp64) block-scaled product, per output:

    y = sum_kb s_kb D_kb, with D_kb = sum_{k in tile kb} a_k b_k (e4m3 codes) and s_kb = x_scale[m, kb] *
    w_scale[n // bn, kb]. The kernel computes

    1. each product a_k b_k exactly (two 4-significant-bit codes: 8 bits);
    2. D_kb with one tl.dot over the bk-wide tile, in the tensor cores' FP8 accumulator (``U_MMA``): each of the bk
       aligned products loses < U_MMA * max|a b| and each of the bk / 32 group sums added into the register loses
       < U_MMA of the running magnitude, both <= S_kb = sum_k |a_k b_k|: |D^ - D| <= (bk + bk / 32) U_MMA S_kb;
    3. D^ * x_scale * w_scale: two fp32 roundings (2 U_FP32 relative), then acc += over n_kb tiles in fp32
       (n_kb roundings, each <= U_FP32 of the running |acc| <= sum_kb s_kb S_kb (1 + O(U))), one more U_FP32
       covering the second-order terms.

    Since sum_kb s_kb S_kb = sum_k |x~_k| |w~_k| (x~, w~ the dequantized operands):
    |y^ - y| <= ((bk + bk / 32) U_MMA + (n_kb + 3) U_FP32) * (|x~| @ |w~|.T). The bf16 output adds one rounding,
    2^-8 relative. The same bound holds for the torch path (fp32 everywhere, a smaller U), so the two paths
    differ by at most twice it. A worst-case bound is loose (about 1.6% of sum |x~||w~| per output): it checks the
    accumulation precision; indexing errors are what :func:`test_gemm_exact_on_integer_codes` catches."""
    N, K = shape
    g = _gen(3 * N + K + M)
    x = torch.randn(M, K, generator=g) * 3
    w = torch.randn(N, K, generator=g) * 0.02
    x_fp8, x_s = quant_act(x, BLOCK[1], backend="torch")
    w_fp8, w_s = quant_weight(w, BLOCK, backend="torch")
    xd, wd = _dequant_act(x_fp8, x_s, BLOCK[1]), dequant_weight(w_fp8, w_s, BLOCK).double()
    ref = _matmul_t(xd, wd)
    bk, n_kb = BLOCK[1], -(-K // BLOCK[1])
    bound = ((bk + bk / MMA_GROUP) * U_MMA + (n_kb + 3) * U_FP32) * _matmul_t(xd.abs(), wd.abs())
    args = [t.to(CUDA) for t in (x_fp8, x_s, w_fp8, w_s)]
    y = block_fp8_matmul(*args, block_size=BLOCK, out_dtype=torch.float32, backend="triton").cpu().double()
    err = (y - ref).abs()
    assert (err <= bound).all(), f"max err / bound = {float((err / bound).max()):.3g}"
    y_torch = block_fp8_matmul(*args, block_size=BLOCK, out_dtype=torch.float32, backend="torch").cpu().double()
    assert ((y - y_torch).abs() <= 2 * bound).all()
    yb = block_fp8_matmul(*args, block_size=BLOCK, backend="triton").cpu().double()
    assert ((yb - ref).abs() <= bound + ref.abs() * 2.0**-8 * (1 + 1e-6)).all()


@needs_fp8_dot
def test_fp8_linear_forward_on_gpu_matches_its_parts():
    # The layer a rollout engine runs: quant_act + block GEMM on the layer's own storage, bit for bit.
    g = _gen(9)
    lin = nn.Linear(4096, 1024, bias=True).to(CUDA, torch.bfloat16)
    layer = Fp8Linear.from_linear(lin, backend="triton")
    x = torch.randn(2, 41, 4096, generator=g).to(CUDA, torch.bfloat16)
    y = layer(x)
    x_fp8, x_s = quant_act(x, 128, backend="triton")
    want = block_fp8_matmul(x_fp8, x_s, layer.weight, layer.weight_scale_inv, out_dtype=torch.bfloat16,
                            backend="triton") + layer.bias
    assert y.shape == (2, 41, 1024) and y.dtype == torch.bfloat16
    assert torch.equal(y, want.to(y.dtype))


# ---------------------------------------------------------------------------------------------------------------
# In-place weight sync
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale_fmt", SCALE_FMTS)
@pytest.mark.parametrize("stream", [False, True], ids=["state_dict", "stream"])
def test_requantize_model_keeps_storage_on_gpu(scale_fmt, stream):
    """One Fp8Linear per Qwen3-8B projection on the GPU, re-synced from new bf16 weights: every ``weight`` /
    ``weight_scale_inv`` keeps its tensor and ``data_ptr()`` (an engine holding them sees the update), and holds
    exactly what a fresh quantization of the new weight gives."""
    g = torch.Generator(device=CUDA).manual_seed(1)
    shapes = list(QWEN3_8B_GEMMS.values())
    model = nn.Module()
    model.layers = nn.ModuleList(Fp8Linear(k, n, bias=False, scale_fmt=scale_fmt, backend="triton", device=CUDA)
                                 for n, k in shapes)

    def new_state() -> dict[str, torch.Tensor]:
        return {f"layers.{i}.weight": (torch.randn(n, k, generator=g, device=CUDA) * 0.02).bfloat16()
                for i, (n, k) in enumerate(shapes)}

    requantize_model_(model, new_state())
    held = [(m.weight, m.weight_scale_inv, m.weight.data_ptr(), m.weight_scale_inv.data_ptr()) for m in model.layers]
    state = new_state()
    metrics = requantize_model_(model, iter(state.items()) if stream else state)
    assert metrics["layers"] == len(shapes)
    assert metrics["bytes_read"] == sum(2 * n * k for n, k in shapes)
    for i, (layer, (w_t, s_t, w_ptr, s_ptr)) in enumerate(zip(model.layers, held)):
        assert layer.weight is w_t and layer.weight_scale_inv is s_t
        assert layer.weight.data_ptr() == w_ptr and layer.weight_scale_inv.data_ptr() == s_ptr
        fresh = quant_weight(state[f"layers.{i}.weight"].cpu(), BLOCK, scale_fmt=scale_fmt, backend="torch")
        _assert_same_quant(w_t, s_t, *fresh)
