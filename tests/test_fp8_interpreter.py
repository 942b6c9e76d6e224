"""The Triton interpreter's fp32 -> float8e4nv cast: the raw bug, and the fix in helpers.fp8.interpreter."""

import helpers  # noqa: F401  (sets TRITON_INTERPRET=1 on CPU before triton is imported)
from helpers.core import runtime

import pytest
import torch

if runtime.has_cuda() or not runtime.triton_interpreted():
    pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, no CUDA)", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from helpers.fp8 import interpreter, kernels  # noqa: E402,F401  (importing kernels installs the fix)

FP8 = torch.float8_e4m3fn


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(tl.float8e4nv), mask=mask)


def _triton_cast(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=FP8)
    _cast_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    return y


@pytest.fixture
def raw_interpreter():
    """Temporarily remove the fix (restored afterwards even if the test fails)."""
    interpreter.uninstall()
    try:
        yield
    finally:
        interpreter.install()


# The bug's signature values: rounding that carries into the exponent, and missing saturation.
CARRY = torch.tensor([124.07, 7.84, -124.07])
CARRY_EXPECTED = [128.0, 8.0, -128.0]
SATURATE = torch.tensor([500.0, -470.0])
SATURATE_EXPECTED = [448.0, -448.0]


def test_raw_interpreter_cast_is_wrong(raw_interpreter):
    # If this starts failing, upstream (triton #8322) fixed the interpreter and helpers.fp8.interpreter can go.
    assert not interpreter.is_installed()
    got = _triton_cast(CARRY).float().tolist()
    assert got[:2] == [64.0, 4.0]  # halved: the carry into the exponent is lost
    got = _triton_cast(SATURATE).float()
    assert got[0].item() == 256.0 and torch.isnan(got[1])  # not saturated


def test_fixed_interpreter_cast_matches_torch():
    assert interpreter.is_installed()
    assert _triton_cast(CARRY).float().tolist() == CARRY_EXPECTED
    assert _triton_cast(SATURATE).float().tolist() == SATURATE_EXPECTED
    # A sweep: every fp8 grid point, the midpoints between neighbours (ties to even) and one fp32 ulp either side,
    # subnormals, signed zeros, and values past the saturation point.
    grid = torch.arange(0, 127, dtype=torch.uint8).view(FP8).float()
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([grid, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1),
                      torch.tensor([0.0017, 1e-9, 460.0, 464.0, 470.0, 1e6])])
    vals = torch.cat([vals, -vals])
    got = _triton_cast(vals).view(torch.uint8)
    want = vals.to(FP8).view(torch.uint8)
    assert torch.equal(got, want)


@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float16])
def test_fixed_cast_from_half_types(src_dtype):
    x = torch.tensor([124.0, 7.84, -500.0, 0.0017, -0.0]).to(src_dtype)
    assert torch.equal(_triton_cast(x).view(torch.uint8), x.to(FP8).view(torch.uint8))


def test_install_is_idempotent():
    assert interpreter.install() and interpreter.install()
    assert interpreter.is_installed()
    assert _triton_cast(CARRY).float().tolist() == CARRY_EXPECTED


@triton.jit
def _to_bf16_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(tl.bfloat16), mask=mask)


def _triton_to_bf16(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _to_bf16_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    return y


BF16_CASES = torch.tensor([-1.5529, 1.5529, 2.0053, 1.0 + 2.0**-8 + 2.0**-20, 3.0e38, -0.0])


def test_raw_interpreter_bf16_cast_truncates(raw_interpreter):
    # The same family of bug: fp32 -> bf16 truncates toward zero instead of rounding to nearest even.
    got = _triton_to_bf16(BF16_CASES[:2]).float().tolist()
    assert got == [-1.546875, 1.546875]


def test_fixed_interpreter_bf16_cast_rounds_to_nearest_even():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([BF16_CASES, torch.randn(4000, generator=g) * 100])
    assert torch.equal(_triton_to_bf16(x).view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
