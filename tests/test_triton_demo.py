import pytest
import torch

from helpers import triton_demo
from helpers.core import runtime


@pytest.mark.parametrize("n", [1, 7, 1023, 1024, 1025, 4099])
def test_axpy_matches_torch(n):
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, generator=g), torch.randn(n, generator=g)
    dev = runtime.device()
    got = triton_demo.axpy_triton(x.to(dev), y.to(dev), -1.7).cpu()
    want = triton_demo.axpy_torch(x, y, -1.7)
    if runtime.triton_interpreted():
        assert torch.equal(got, want)  # interpreter: one multiply then one add, as torch
    else:
        # compiled: the multiply-add may be contracted into one FMA (one rounding instead of two)
        torch.testing.assert_close(got, want, rtol=2 ** -23, atol=2 ** -23)


def test_axpy_bad_input():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="float32"):
        triton_demo.axpy_triton(x.double(), x.double(), 1.0)
    with pytest.raises(ValueError, match="shape"):
        triton_demo.axpy_triton(x, torch.zeros(5), 1.0)
