"""Blockwise FP8 quantization and the block-scaled GEMM: both backends against an obviously-correct slow reference.

Codes are compared as raw bytes (``.view(torch.uint8)``) and scales exactly. The Triton backend runs under the
interpreter on a CPU (slow), so its shapes are small.
"""

import helpers  # noqa: F401  (sets TRITON_INTERPRET=1 on CPU before triton is imported)

import math
import warnings

import numpy as np
import pytest
import torch

from helpers.core import runtime
from helpers.fp8 import (
    SCALE_EPS,
    block_fp8_matmul,
    compute_scale,
    dequant_weight,
    quant_act,
    quant_weight,
    ue8m0_round_up,
)
from helpers.fp8 import native
from helpers.fp8 import quant as quant_mod
from helpers.fp8 import reference as ref

FP8 = torch.float8_e4m3fn
FMTS = ["fp32", "ue8m0"]
CAN_TRITON = runtime.has_cuda() or runtime.triton_interpreted()
needs_triton = pytest.mark.skipif(not CAN_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture(params=["native", "pure"])
def torch_impl(request, monkeypatch):
    """Run a torch-backend test on both implementations: the compiled CPU kernel and the pure-torch loop."""
    if request.param == "native":
        if not native.available():
            pytest.fail(f"the compiled CPU quantizer did not build: {native.unavailable_reason()}")
        monkeypatch.setenv(native.NATIVE_ENV, "1")
    else:
        monkeypatch.setenv(native.NATIVE_ENV, "0")
    return request.param


@pytest.fixture(autouse=True)
def _quiet_interpreter_warning():
    # The "triton on CPU" warning is tested on its own below; elsewhere it is expected noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="backend='triton' on CPU")
        # numpy (inside the interpreter) warns on inf / inf; the NaN it produces is the documented result.
        warnings.filterwarnings("ignore", message="invalid value encountered", category=RuntimeWarning)
        yield


# ---------------------------------------------------------------------------------------------------------------
# The slow reference: a loop over blocks, numpy fp32 arithmetic, and round-to-nearest-even onto an explicit
# e4m3 grid decoded from the format's definition (no torch fp8 cast involved).
# ---------------------------------------------------------------------------------------------------------------

def _e4m3_grid() -> np.ndarray:
    """The 127 non-negative finite float8_e4m3fn values, indexed by their code (0x00 .. 0x7E)."""
    codes = np.arange(127)
    exp, man = codes >> 3, codes & 7
    return np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7))


GRID = _e4m3_grid()


def _rne_e4m3(y: np.ndarray) -> np.ndarray:
    """Codes (uint8) of fp32 values already clamped to [-448, 448], rounded to nearest, ties to the even code."""
    a = np.abs(y.astype(np.float64))
    hi = np.clip(np.searchsorted(GRID, a, side="left"), 1, 126)  # GRID[hi - 1] <= a <= GRID[hi]
    lo = hi - 1
    d_lo, d_hi = a - GRID[lo], GRID[hi] - a
    code = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return (code | (np.signbit(y) << 7)).astype(np.uint8)


def _slow_scale(amax: float, scale_fmt: str) -> np.float32:
    s = np.float32(max(np.float32(amax), np.float32(SCALE_EPS))) / np.float32(448.0)  # fp32 IEEE division
    if scale_fmt == "ue8m0":
        m, e = math.frexp(float(s))  # s = m * 2**e, m in [0.5, 1): ceil(log2 s) = e - 1 iff m == 0.5
        s = np.float32(s if m == 0.5 else math.ldexp(1.0, e))
    return s


def slow_quant(x: torch.Tensor, block: tuple[int, int], scale_fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [N, K], scales fp32 [nb, kb]) block by block; x is [N, K]."""
    xf = x.float().numpy()
    N, K = xf.shape
    bn, bk = block
    codes = np.zeros((N, K), np.uint8)
    scales = np.zeros((-(-N // bn), -(-K // bk)), np.float32)
    for i in range(0, N, bn):
        for j in range(0, K, bk):
            blk = xf[i : i + bn, j : j + bk]
            s = _slow_scale(float(np.abs(blk).max()), scale_fmt)
            scales[i // bn, j // bk] = s
            y = np.clip(blk / s, np.float32(-448.0), np.float32(448.0)).astype(np.float32)
            codes[i : i + bn, j : j + bk] = _rne_e4m3(y)
    return codes, scales


def _bytes(q: torch.Tensor) -> np.ndarray:
    return q.view(torch.uint8).numpy()


def _make(shape, dtype, seed, *, outliers=True):
    """Random values with per-row magnitudes spanning 1e-3 .. 1e3 and a few large outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.empty(shape[0], 1).uniform_(-7, 7, generator=g))
    if outliers and x.numel() > 4:
        idx = torch.randint(0, x.numel(), (3,), generator=g)
        x.view(-1)[idx] *= 50.0
    return x.to(dtype)


def _adversarial(shape, dtype):
    """Blocks whose scale is exactly 1 (amax 448), holding values that round across a power of two, ties,
    subnormals, signed zeros and near-saturation values; one all-zero column block."""
    vals = torch.tensor([448.0, 124.07, 7.84, -7.84, 136.0, 0.0017, -0.0, 15.5, 447.9, -3.75, 0.5, 1e-6])
    x = vals.repeat(-(-shape[0] * shape[1] // vals.numel()))[: shape[0] * shape[1]].view(shape).clone()
    x[:, : min(16, shape[1])] = 0.0  # an all-zero first column block (for block widths <= 16)
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Scales
# ---------------------------------------------------------------------------------------------------------------

def test_ue8m0_round_up_is_exact_at_powers_of_two():
    k = torch.arange(-120, 120, dtype=torch.float32)
    pow2 = torch.pow(2.0, k)
    assert torch.equal(ue8m0_round_up(pow2), pow2)  # exact powers of two stay
    above = torch.nextafter(pow2, torch.full_like(pow2, math.inf))
    assert torch.equal(ue8m0_round_up(above), pow2 * 2)  # one ulp above goes to the next power
    below = torch.nextafter(pow2, torch.zeros_like(pow2))
    assert torch.equal(ue8m0_round_up(below), pow2)
    rnd = torch.exp(torch.empty(10000).uniform_(-60, 60, generator=torch.Generator().manual_seed(0)))
    want = torch.tensor([math.ldexp(1.0, math.frexp(v)[1] - (math.frexp(v)[0] == 0.5)) for v in rnd.tolist()])
    assert torch.equal(ue8m0_round_up(rnd), want.float())
    special = torch.tensor([math.inf, math.nan])
    out = ue8m0_round_up(special)
    assert out[0] == math.inf and torch.isnan(out[1])


@pytest.mark.parametrize("scale_fmt", FMTS)
def test_compute_scale_matches_definition(scale_fmt):
    amax = torch.cat([torch.tensor([0.0, 1e-12, SCALE_EPS, 448.0, 448.0 * 2**-20, 1.0]),
                      torch.exp(torch.empty(500).uniform_(-30, 30, generator=torch.Generator().manual_seed(1)))])
    got = compute_scale(amax.float(), scale_fmt).numpy()
    want = np.array([_slow_scale(float(a), scale_fmt) for a in amax.float().tolist()], np.float32)
    assert np.array_equal(got, want)
    assert (got > 0).all() and np.isfinite(got).all()


# ---------------------------------------------------------------------------------------------------------------
# Torch backend against the slow reference (fast: larger and more shapes)
# ---------------------------------------------------------------------------------------------------------------

WEIGHT_SHAPES = [(1, 7), (7, 83), (83, 129), (129, 300), (300, 257)]


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("block", [(128, 128), (16, 32)])
@pytest.mark.parametrize("scale_fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quant_weight_torch_matches_slow_reference(shape, block, scale_fmt, dtype, torch_impl):
    w = _make(shape, dtype, seed=hash((shape, block)) % 1000)
    q, s = quant_weight(w, block, scale_fmt=scale_fmt, backend="torch")
    codes, scales = slow_quant(w, block, scale_fmt)
    assert q.dtype == FP8 and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == scales.shape
    assert np.array_equal(_bytes(q), codes)
    assert np.array_equal(s.numpy(), scales)


@pytest.mark.parametrize("shape", [(1, 7), (5, 129), (3, 4, 300)])
@pytest.mark.parametrize("group", [16, 128])
@pytest.mark.parametrize("scale_fmt", FMTS)
def test_quant_act_torch_matches_slow_reference(shape, group, scale_fmt, torch_impl):
    x = _make((math.prod(shape[:-1]), shape[-1]), torch.bfloat16, seed=7).view(shape)
    q, s = quant_act(x, group, scale_fmt=scale_fmt, backend="torch")
    assert q.shape == x.shape and s.shape == (*shape[:-1], -(-shape[-1] // group))
    codes, scales = slow_quant(x.reshape(-1, shape[-1]), (1, group), scale_fmt)
    assert np.array_equal(_bytes(q).reshape(codes.shape), codes)
    assert np.array_equal(s.reshape(scales.shape).numpy(), scales)


@pytest.mark.parametrize("scale_fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_adversarial_values_torch(scale_fmt, dtype, torch_impl):
    w = _adversarial((40, 70), dtype)
    q, s = quant_weight(w, (16, 16), scale_fmt=scale_fmt, backend="torch")
    codes, scales = slow_quant(w, (16, 16), scale_fmt)
    assert np.array_equal(_bytes(q), codes) and np.array_equal(s.numpy(), scales)
    if dtype == torch.float32:
        # Spot checks with scale 1 (a block whose amax is 448): 124.07 -> 128 and 7.84 -> 8, not halved.
        s1 = torch.tensor([[448.0, 124.07, 7.84, 136.0, 0.0017, -0.0] + [0.0] * 10] * 16)
        q1, sc1 = quant_weight(s1, (16, 16), scale_fmt=scale_fmt, backend="torch")
        assert sc1.item() == 1.0
        assert q1[0, :6].float().tolist() == [448.0, 128.0, 8.0, 128.0, 0.001953125, -0.0]


def test_all_zero_blocks_give_zero_codes_and_finite_scale(torch_impl):
    w = torch.zeros(40, 70, dtype=torch.bfloat16)
    for scale_fmt in FMTS:
        q, s = quant_weight(w, (32, 32), scale_fmt=scale_fmt, backend="torch")
        assert not _bytes(q).any()
        assert torch.isfinite(s).all() and (s > 0).all()
        assert torch.equal(s, torch.full_like(s, compute_scale(torch.zeros(()), scale_fmt).item()))
        xq, xs = quant_act(w, 32, scale_fmt=scale_fmt, backend="torch")
        assert not _bytes(xq).any() and torch.isfinite(xs).all() and (xs > 0).all()


@pytest.mark.parametrize("scale_fmt", FMTS)
def test_block_max_never_overflows(scale_fmt, torch_impl):
    # s = RN(amax / 448) can round down, so amax / s can exceed 448 by an ulp: the clamp keeps it at 448 (0x7E).
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 32, generator=g) * torch.exp(torch.empty(2000, 1).uniform_(-20, 20, generator=g))
    q, s = quant_act(x, 32, scale_fmt=scale_fmt, backend="torch")
    mag = _bytes(q) & 0x7F
    assert mag.max() <= 0x7E  # no NaN code
    if scale_fmt == "fp32":
        assert (mag.max(axis=1) == 0x7E).all()  # every group's amax lands on 448 exactly


def test_dequant_weight_error_bound():
    w = _make((83, 300), torch.float32, seed=5)
    q, s = quant_weight(w, (32, 64), backend="torch")
    deq = dequant_weight(q, s, (32, 64))
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    codes, scales = slow_quant(w, (32, 64), "fp32")
    value = np.where(codes & 0x80, -1.0, 1.0) * GRID[np.minimum(codes & 0x7F, 126)]
    s_full = np.repeat(np.repeat(scales, 32, 0)[:83], 64, 1)[:, :300]
    assert np.array_equal(deq.numpy(), (value * s_full).astype(np.float32))
    # Rounding to 3 mantissa bits: relative error <= 2^-4 in the normal range, and half a subnormal step
    # (2^-10 * s) absolute below it.
    err = (deq - w).abs()
    assert (err <= w.abs() * 2.0**-4 + torch.from_numpy(s_full).float() * 2.0**-10).all()


def test_quant_weight_into_preallocated_out(torch_impl):
    w = _make((70, 130), torch.bfloat16, seed=9)
    out = torch.empty(70, 130, dtype=FP8)
    scale_out = torch.empty(3, 3)
    ptrs = (out.data_ptr(), scale_out.data_ptr())
    q, s = quant_weight(w, (32, 64), backend="torch", out=out, scale_out=scale_out)
    assert (q.data_ptr(), s.data_ptr()) == ptrs
    q2, s2 = quant_weight(w, (32, 64), backend="torch")
    assert np.array_equal(_bytes(out), _bytes(q2)) and torch.equal(scale_out, s2)


# ---------------------------------------------------------------------------------------------------------------
# Triton backend (interpreter on a CPU): bit-identical to the torch backend and to the slow reference
# ---------------------------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("shape", [(1, 7), (7, 83), (83, 129)])
@pytest.mark.parametrize("scale_fmt", FMTS)
def test_quant_weight_triton_matches_torch(shape, scale_fmt):
    w = _make(shape, torch.bfloat16, seed=11)
    for block in [(128, 128), (32, 64)]:
        q_t, s_t = quant_weight(w, block, scale_fmt=scale_fmt, backend="triton")
        q_r, s_r = quant_weight(w, block, scale_fmt=scale_fmt, backend="torch")
        assert np.array_equal(_bytes(q_t), _bytes(q_r)) and torch.equal(s_t, s_r)
    codes, scales = slow_quant(w, block, scale_fmt)
    assert np.array_equal(_bytes(q_t), codes) and np.array_equal(s_t.numpy(), scales)


@needs_triton
@pytest.mark.parametrize("shape", [(1, 7), (9, 300), (2, 3, 129)])
@pytest.mark.parametrize("scale_fmt", FMTS)
def test_quant_act_triton_matches_torch(shape, scale_fmt):
    x = _make((math.prod(shape[:-1]), shape[-1]), torch.float32, seed=13).view(shape)
    q_t, s_t = quant_act(x, 128, scale_fmt=scale_fmt, backend="triton")
    q_r, s_r = quant_act(x, 128, scale_fmt=scale_fmt, backend="torch")
    assert q_t.shape == x.shape and s_t.shape == s_r.shape
    assert np.array_equal(_bytes(q_t), _bytes(q_r)) and torch.equal(s_t, s_r)


@needs_triton
@pytest.mark.parametrize("scale_fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_adversarial_values_triton(scale_fmt, dtype):
    w = _adversarial((40, 70), dtype)
    q_t, s_t = quant_weight(w, (16, 16), scale_fmt=scale_fmt, backend="triton")
    codes, scales = slow_quant(w, (16, 16), scale_fmt)
    assert np.array_equal(_bytes(q_t), codes) and np.array_equal(s_t.numpy(), scales)
    xq, xs = quant_act(w, 16, scale_fmt=scale_fmt, backend="triton")
    codes, scales = slow_quant(w, (1, 16), scale_fmt)
    assert np.array_equal(_bytes(xq), codes) and np.array_equal(xs.numpy(), scales)


@needs_triton
def test_quant_weight_triton_into_preallocated_out():
    w = _make((40, 70), torch.bfloat16, seed=17)
    out, scale_out = torch.empty(40, 70, dtype=FP8), torch.empty(2, 3)
    q, s = quant_weight(w, (32, 32), backend="triton", out=out, scale_out=scale_out)
    assert q.data_ptr() == out.data_ptr() and s.data_ptr() == scale_out.data_ptr()
    q2, s2 = quant_weight(w, (32, 32), backend="torch")
    assert np.array_equal(_bytes(out), _bytes(q2)) and torch.equal(scale_out, s2)


# ---------------------------------------------------------------------------------------------------------------
# Non-finite input
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["native", "pure", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_weight_rejects_non_finite_block(impl, bad, dtype, monkeypatch):
    monkeypatch.setenv(native.NATIVE_ENV, "0" if impl == "pure" else "1")
    w = torch.randn(40, 70)
    w[35, 66] = bad  # block (1, 2) with (32, 32) blocks
    with pytest.raises(ValueError, match=r"block \(1, 2\) \(rows 32:40, cols 64:70\)"):
        quant_weight(w.to(dtype), (32, 32), backend="triton" if impl == "triton" else "torch")


@pytest.mark.parametrize("impl", ["native", "pure", pytest.param("triton", marks=needs_triton)])
def test_quant_act_non_finite_behaviour(impl, monkeypatch):
    monkeypatch.setenv(native.NATIVE_ENV, "0" if impl == "pure" else "1")
    backend = "triton" if impl == "triton" else "torch"
    # Documented in quant_act: a group with inf gets scale inf, NaN codes where x is +-inf and zero codes
    # elsewhere; a group with NaN gets scale NaN and all-NaN codes; other groups are unaffected.
    x = torch.randn(3, 48)
    x[0, 5] = math.inf
    x[1, 20] = math.nan
    q, s = quant_act(x, 16, backend=backend)
    qf = q.float()
    assert s[0, 0] == math.inf and torch.isnan(qf[0, 5]) and (qf[0, :16][torch.arange(16) != 5] == 0).all()
    assert torch.isnan(s[1, 1]) and torch.isnan(qf[1, 16:32]).all()
    q_ok, s_ok = quant_act(x[2:], 16, backend="torch")
    assert np.array_equal(_bytes(q[2:]), _bytes(q_ok)) and torch.equal(s[2:], s_ok)
    assert torch.isfinite(s[0, 1:]).all() and torch.isfinite(s[1, [0, 2]]).all()


# ---------------------------------------------------------------------------------------------------------------
# The block-scaled GEMM
# ---------------------------------------------------------------------------------------------------------------

def _gemm_case(M, N, K, block, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 3
    w = torch.randn(N, K, generator=g) * 0.05
    xq, xs = quant_act(x, block[1], backend="torch")
    wq, ws = quant_weight(w, block, backend="torch")
    xd = (xq.float() * xs.repeat_interleave(block[1], 1)[:, :K]).double()  # per-row 1 x bk groups
    wd = dequant_weight(wq, ws, block).double()
    ref = xd @ wd.T  # exact enough in fp64: the products of fp8 codes and scales are exact
    # fp32 accumulation bound: each output sums K exact products plus 2 scale multiplies per K tile, each step
    # rounding by at most 2^-24 relative of the running magnitude <= (|x| @ |w|.T).
    bound = (K + 3 * -(-K // block[1])) * 2.0**-24 * (xd.abs() @ wd.abs().T)
    return xq, xs, wq, ws, ref, bound


@pytest.mark.parametrize("M,N,K", [(1, 1, 7), (7, 70, 200), (33, 129, 300)])
@pytest.mark.parametrize("block", [(128, 128), (32, 64)])
def test_gemm_torch_against_dequantized_reference(M, N, K, block):
    xq, xs, wq, ws, ref, bound = _gemm_case(M, N, K, block, seed=M + N + K)
    y = block_fp8_matmul(xq, xs, wq, ws, block_size=block, out_dtype=torch.float32, backend="torch")
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert ((y.double() - ref).abs() <= bound).all()
    # bf16 output: one extra rounding to 8 significant bits (relative 2^-8).
    yb = block_fp8_matmul(xq, xs, wq, ws, block_size=block, backend="torch")
    assert yb.dtype == torch.bfloat16
    assert ((yb.double() - ref).abs() <= bound + ref.abs() * 2.0**-8 * (1 + 1e-6)).all()


@needs_triton
@pytest.mark.parametrize("M,N,K", [(1, 1, 7), (7, 70, 200), (20, 33, 130)])
def test_gemm_triton_against_reference_and_torch(M, N, K):
    block = (32, 64)
    xq, xs, wq, ws, ref, bound = _gemm_case(M, N, K, block, seed=M * N + K)
    y_t = block_fp8_matmul(xq, xs, wq, ws, block_size=block, out_dtype=torch.float32, backend="triton")
    y_r = block_fp8_matmul(xq, xs, wq, ws, block_size=block, out_dtype=torch.float32, backend="torch")
    # The interpreter's tl.dot upcasts fp8 to fp16 (exact) and sums in fp32, like the torch path; only the order
    # of the fp32 additions differs, so both sit within the same accumulation bound of the exact result.
    assert ((y_t.double() - ref).abs() <= bound).all()
    assert ((y_t.double() - y_r.double()).abs() <= 2 * bound).all()
    y_b = block_fp8_matmul(xq, xs, wq, ws, block_size=block, backend="triton")
    assert y_b.dtype == torch.bfloat16
    assert ((y_b.double() - ref).abs() <= bound + ref.abs() * 2.0**-8 * (1 + 1e-6)).all()


def test_gemm_leading_dims():
    xq, xs, wq, ws, ref, bound = _gemm_case(6, 20, 100, (32, 32), seed=2)
    y = block_fp8_matmul(xq.view(2, 3, 100), xs.view(2, 3, -1), wq, ws, block_size=(32, 32),
                         out_dtype=torch.float32, backend="torch")
    assert y.shape == (2, 3, 20)
    assert ((y.view(6, 20).double() - ref).abs() <= bound).all()


# ---------------------------------------------------------------------------------------------------------------
# Backend selection and bad input
# ---------------------------------------------------------------------------------------------------------------

@needs_triton
def test_triton_on_cpu_warns_once(monkeypatch):
    if runtime.has_cuda():
        pytest.skip("the interpreter warning only applies without CUDA")
    monkeypatch.setattr(quant_mod, "_interpreter_warned", False)
    x = torch.randn(2, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quant_act(x, 16, backend="triton")
        quant_act(x, 16, backend="triton")
    msgs = [str(c.message) for c in caught if "interpreter" in str(c.message)]
    assert len(msgs) == 1


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv(runtime.BACKEND_ENV, "torch")
    q, s = quant_act(torch.randn(2, 32), 16)  # auto -> torch, no warning
    assert q.shape == (2, 32)


_W = torch.randn(32, 64)
_X = torch.randn(4, 64)


@pytest.mark.parametrize("call,match", [
    (lambda: quant_act(_X.to(torch.int32), 16), "x must have dtype"),
    (lambda: quant_act(_X.to(torch.float64), 16), "x must have dtype"),
    (lambda: quant_act(torch.tensor(1.0), 16), "x must have at least 1"),
    (lambda: quant_act(_X, 24), "group_size must be a power of two"),
    (lambda: quant_act(_X, 8), "group_size must be a power of two"),
    (lambda: quant_act(_X, 0), "group_size must be a power of two"),
    (lambda: quant_act(_X, 16.0), "group_size must be a power of two"),
    (lambda: quant_act(_X, 16, scale_fmt="e8m0"), "scale_fmt must be one of"),
    (lambda: quant_act(_X, 16, backend="cuda"), "backend must be one of"),
    (lambda: quant_weight(_W.to(torch.int8)), "w must have dtype"),
    (lambda: quant_weight(_W[0]), "w must be 2-D"),
    (lambda: quant_weight(_W.view(2, 16, 64)), "w must be 2-D"),
    (lambda: quant_weight(_W, (128, 96)), r"block_size\[1\] must be a power of two"),
    (lambda: quant_weight(_W, (8, 128)), r"block_size\[0\] must be a power of two"),
    (lambda: quant_weight(_W, 128), "block_size must be a pair"),
    (lambda: quant_weight(_W, scale_fmt="fp8"), "scale_fmt must be one of"),
    (lambda: quant_weight(_W, out=torch.empty(32, 64)), "out must be a"),
    (lambda: quant_weight(_W, scale_out=torch.empty(2, 2)), "scale_out must be a"),
    (lambda: dequant_weight(_W, torch.ones(1, 1)), "w_fp8 must have dtype"),
    (lambda: dequant_weight(_W.to(FP8), torch.ones(1, 1, dtype=torch.float64)), "w_scale_inv must have dtype"),
    (lambda: dequant_weight(_W.to(FP8), torch.ones(2, 2)), "w_scale_inv must have shape"),
    (lambda: dequant_weight(_W.to(FP8), torch.ones(1, 1), (100, 128)), r"block_size\[0\] must be a power"),
    (lambda: dequant_weight(_W.to(FP8), torch.ones(1, 1, device="meta")), "w_scale_inv is on meta but w_fp8 is on cpu"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_quant(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _gemm_args():
    xq, xs = quant_act(_X, 32, backend="torch")
    wq, ws = quant_weight(_W, (32, 32), backend="torch")
    return xq, xs, wq, ws


@pytest.mark.parametrize("mutate,match", [
    (lambda a: (a[0].float(), *a[1:]), "x_fp8 must have dtype"),
    (lambda a: (a[0], a[1].double(), *a[2:]), "x_scale must have dtype"),
    (lambda a: (*a[:2], a[2].float(), a[3]), "w_fp8 must have dtype"),
    (lambda a: (*a[:3], a[3].half()), "w_scale_inv must have dtype"),
    (lambda a: (a[0], a[1][0], *a[2:]), "x_scale must be 2-D"),
    (lambda a: (*a[:2], a[2][None], a[3]), "w_fp8 must be 2-D"),
    (lambda a: (a[0][:, :32], a[1][:, :1], *a[2:]), "w_fp8 must have K = 32"),
    (lambda a: (a[0], a[1][:, :1], *a[2:]), "x_scale must have shape"),
    (lambda a: (*a[:3], a[3][:, :1]), "w_scale_inv must have shape"),
    (lambda a: (a[0], a[1].to("meta"), *a[2:]), "x_scale is on meta but x_fp8 is on cpu"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_gemm(mutate, match):
    args = mutate(_gemm_args())
    with pytest.raises(ValueError, match=match):
        block_fp8_matmul(*args, block_size=(32, 32), backend="torch")


def test_bad_input_gemm_block_and_out_dtype():
    args = _gemm_args()
    with pytest.raises(ValueError, match=r"block_size\[1\] must be a power of two"):
        block_fp8_matmul(*args, block_size=(32, 48))
    with pytest.raises(ValueError, match="out_dtype must be one of"):
        block_fp8_matmul(*args, block_size=(32, 32), out_dtype=torch.int32)


def test_quant_weight_device_mismatch_in_out():
    with pytest.raises(ValueError, match="out is on meta"):
        quant_weight(_W, (32, 32), out=torch.empty(32, 64, dtype=FP8, device="meta"))


# ---------------------------------------------------------------------------------------------------------------
# The compiled CPU kernel against the pure-torch loop (random, wide-range, special values)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 7), (83, 129), (300, 2500), (129, 4100)])
@pytest.mark.parametrize("block", [(128, 128), (16, 32), (1, 128), (1, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_matches_pure_torch(shape, block, dtype):
    assert native.available(), native.unavailable_reason()
    g = torch.Generator().manual_seed(sum(shape) + sum(block))
    # Magnitudes from 1e-11 to 1e11 (scales below and above the eps floor), zeros and negative zeros, one NaN
    # row block and one inf (the kernels must produce the same NaN / inf scales and codes).
    x = torch.randn(shape, generator=g) * torch.exp(torch.empty(shape[0], 1).uniform_(-25, 25, generator=g))
    x.view(-1)[::97] = 0.0
    x.view(-1)[5::101] = -0.0
    if shape[0] > 64:
        x[50, 3] = math.nan
        x[-1, -1] = -math.inf
    x = x.to(dtype)
    for scale_fmt in FMTS:
        q_n, s_n = ref.quant_blocks_torch(x, block, scale_fmt, native=True)
        q_p, s_p = ref.quant_blocks_torch(x, block, scale_fmt, native=False)
        assert np.array_equal(_bytes(q_n), _bytes(q_p))
        assert torch.equal(s_n.view(torch.int32), s_p.view(torch.int32))


def test_native_multithreaded_matches_single_thread():
    assert native.available()
    x = _make((1000, 1200), torch.bfloat16, seed=21)  # > 2^20 elements: the thread pool is used
    out1, s1 = torch.empty(1000, 1200, dtype=FP8), torch.empty(8, 10)
    out2, s2 = torch.empty(1000, 1200, dtype=FP8), torch.empty(8, 10)
    native.quant_blocks_native(x, (128, 128), "ue8m0", out1, s1, num_threads=1)
    native.quant_blocks_native(x, (128, 128), "ue8m0", out2, s2, num_threads=3)
    assert np.array_equal(_bytes(out1), _bytes(out2)) and torch.equal(s1, s2)
    codes, scales = slow_quant(x, (128, 128), "ue8m0")
    assert np.array_equal(_bytes(out1), codes) and np.array_equal(s1.numpy(), scales)


def test_missing_native_kernel_warns_and_falls_back(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(ref, "_warned_no_native", False)
    w = _make((40, 70), torch.bfloat16, seed=23)
    with pytest.warns(UserWarning, match="compiled CPU quantizer is unavailable"):
        q, s = quant_weight(w, (32, 32), backend="torch")
    codes, scales = slow_quant(w, (32, 32), "fp32")
    assert np.array_equal(_bytes(q), codes) and np.array_equal(s.numpy(), scales)
    with pytest.raises(RuntimeError, match="unavailable"):
        ref.quant_blocks_torch(w, (32, 32), native=True)


# ---------------------------------------------------------------------------------------------------------------
# The GPU code path, without a GPU: compile the kernels ahead of time for sm_90 (Triton's bundled ptxas) and check
# that x / s and amax / 448 lower to the correctly rounded division and the e4m3 conversion is the hardware one.
# ---------------------------------------------------------------------------------------------------------------

_AOT_SCRIPT = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from helpers.fp8 import kernels as K

target = GPUTarget("cuda", 90, 32)
def ptx(fn, sig, consts):
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target).asm["ptx"]
strides = lambda names: {n: "i32" for n in names}
C = dict(FP8_MAX=448.0, EPS=1e-10)
act = ptx(K._quant_act_kernel, {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "M": "i32", "K": "i32",
          **strides(["stride_xm", "stride_xk", "stride_qm", "stride_qk", "stride_sm", "stride_sk"]),
          "GROUP": "constexpr", "ROWS": "constexpr", "UE8M0": "constexpr", "FP8_MAX": "constexpr", "EPS": "constexpr"},
          dict(GROUP=128, ROWS=16, UE8M0=True, **C))
wgt = ptx(K._quant_weight_kernel, {"w_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "N": "i32", "K": "i32",
          **strides(["stride_wn", "stride_wk", "stride_qn", "stride_qk", "stride_sn", "stride_sk"]),
          "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "UE8M0": "constexpr", "FP8_MAX": "constexpr",
          "EPS": "constexpr"}, dict(BLOCK_N=128, BLOCK_K=128, UE8M0=False, **C))
gemm = ptx(K._block_fp8_matmul_kernel, {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "as_ptr": "*fp32",
           "bs_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
           **strides(["stride_am", "stride_ak", "stride_bn", "stride_bk", "stride_cm", "stride_cn", "stride_asm",
                      "stride_ask", "stride_bsn", "stride_bsk"]),
           "GROUP_N": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
           dict(GROUP_N=128, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128))
for name, code in (("act", act), ("weight", wgt)):
    assert "div.rn.f32" in code, name + ": no correctly rounded division"
    assert "div.approx" not in code and "div.full" not in code, name + ": approximate division"
    assert "satfinite.e4m3x2.f32" in code, name + ": no hardware saturating e4m3 conversion"
assert "e4m3" in gemm and "wgmma" in gemm, "gemm: no fp8 wgmma"
print("AOT OK")
"""


def test_triton_kernels_compile_for_sm90_with_exact_division(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": str(runtime.REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "AOT OK" in proc.stdout, proc.stderr[-3000:]


@needs_triton
@pytest.mark.parametrize("scale_fmt", FMTS)
def test_block_max_never_overflows_triton(scale_fmt):
    # As test_block_max_never_overflows, on the Triton path: amax / s may exceed 448 by an ulp and must land on 448.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 32, generator=g) * torch.exp(torch.empty(256, 1).uniform_(-20, 20, generator=g))
    q_t, s_t = quant_act(x, 32, scale_fmt=scale_fmt, backend="triton")
    q_r, s_r = quant_act(x, 32, scale_fmt=scale_fmt, backend="torch")
    assert np.array_equal(_bytes(q_t), _bytes(q_r)) and torch.equal(s_t, s_r)
    assert (_bytes(q_t) & 0x7F).max() <= 0x7E


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inputs_that_require_grad_are_quantized_detached(backend):
    # a trainer's parameters and activations require grad; quantization must neither fail nor track them
    w = torch.randn(40, 70, requires_grad=True)
    q, s = quant_weight(w, (16, 32), backend=backend)
    qa, sa = quant_act(w, 32, backend=backend)
    q_ref, s_ref = quant_weight(w.detach(), (16, 32), backend="torch")
    assert not q.requires_grad and not sa.requires_grad
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    assert torch.equal(qa.view(torch.uint8), quant_act(w.detach(), 32, backend="torch")[0].view(torch.uint8))
