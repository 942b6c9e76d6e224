"""Notebook 00's first Triton kernel against its torch reference, and the rule that gives the notebook's verdict."""

import pytest
import torch

from helpers.demo import axpy
from helpers.demo import check_kernel
from helpers.core import runtime


@pytest.mark.parametrize("n", [1, 7, 1023, 1024, 1025, 4099])
def test_axpy_matches_torch(n):
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, generator=g), torch.randn(n, generator=g)
    dev = runtime.device()
    got = axpy.axpy_triton(x.to(dev), y.to(dev), -1.7).cpu()
    want = axpy.axpy_torch(x, y, -1.7)
    if runtime.triton_interpreted():
        assert torch.equal(got, want)  # interpreter: one multiply then one add, as torch
    else:
        # compiled: the multiply-add may be contracted into one FMA (one rounding instead of two)
        torch.testing.assert_close(got, want, rtol=2 ** -23, atol=2 ** -23)


def test_axpy_bad_input():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="float32"):
        axpy.axpy_triton(x.double(), x.double(), 1.0)
    with pytest.raises(ValueError, match="shape"):
        axpy.axpy_triton(x, torch.zeros(5), 1.0)


def test_check_kernel_rule_interpreter_requires_bit_equality():
    ref = torch.tensor([1.0, -2.0, 4.0])
    ok = check_kernel(ref.clone(), ref, interpreted=True)
    assert ok.passed and ok.bit_exact and ok.max_abs_diff == 0.0 and ok.verdict == "reproduced"
    assert ok.reason == "max |difference| 0 on 3 fp32 elements (interpreter, bit-exact required)"
    one_ulp = ref.clone()
    one_ulp[2] = torch.nextafter(ref[2], torch.tensor(10.0))  # 4 + 2^-21
    off = check_kernel(one_ulp, ref, interpreted=True)
    assert not off.passed and off.verdict == "not reproduced" and off.max_abs_diff == 2.0 ** -21


def test_check_kernel_rule_compiled_allows_one_ulp_of_the_largest_value():
    ref = torch.tensor([1.0, -2.0, 4.0])
    tol = torch.finfo(torch.float32).eps * 4.0  # one ulp at the largest |value| (2^-21)
    within = ref.clone()
    within[2] = torch.nextafter(ref[2], torch.tensor(10.0))  # exactly one ulp at 4.0
    check = check_kernel(within, ref, interpreted=False)
    assert check.tolerance == tol and check.passed and not check.bit_exact and check.verdict == "reproduced"
    beyond = ref.clone()
    beyond[0] += 2 * tol
    assert check_kernel(beyond, ref, interpreted=False).verdict == "not reproduced"


def test_check_kernel_rejects_bad_inputs():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="same shape"):
        check_kernel(x, torch.zeros(4), interpreted=True)
    with pytest.raises(ValueError, match="float32"):
        check_kernel(x.double(), x.double(), interpreted=True)
    with pytest.raises(ValueError, match="at least one element"):
        check_kernel(torch.zeros(0), torch.zeros(0), interpreted=True)
