"""The decode-layer GPU benchmark's code on the CPU (helpers/gpu_bench/decode_layer.py): one tiny transformer layer
with the Triton kernels under the interpreter against a torch reference, and the benchmark table's arithmetic with
a stand-in timer and a made-up datasheet. No timing is asserted."""

from __future__ import annotations

import math

import helpers  # noqa: F401  (sets TRITON_INTERPRET=1 on CPU before triton is imported)
import pytest
import torch

from helpers.core import runtime
from helpers.gpu_bench import DecodeLayer, decode_layer_benchmark, filled_cache
from helpers.gpu_bench.decode_layer import LAYER_MODES
from helpers.roofline import GpuSpec, ModelShape, layer_seconds

# Two query heads of 128 over one KV head; hidden 256 and MLP 384: two and three 128-wide FP8 blocks along K.
TINY = ModelShape(name="tiny", n_layers=1, hidden=256, n_heads=2, n_kv_heads=1, head_dim=128, intermediate=384,
                  vocab=1)
needs_interpreter = pytest.mark.skipif(not runtime.triton_interpreted(),
                                       reason="runs the Triton kernels under the CPU interpreter")


@pytest.fixture(autouse=True)
def _quiet_interpreter_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="backend='triton' on CPU")
        warnings.filterwarnings("ignore", message="decode_attention backend='triton' on CPU")
        yield


def _reference_step(layer: DecodeLayer, x: torch.Tensor, cache) -> torch.Tensor:
    """The BF16 layer written out in torch: RMSNorm, q from the fused projection, softmax(q K^T / sqrt(d)) V over
    the cached K/V (each KV head shared by its query group), o + residual, RMSNorm, SwiGLU, down + residual."""
    s = layer.shape

    def norm(t):
        tf = t.float()
        return (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)

    b = x.shape[0]
    q = (norm(x) @ layer.w["qkv"].t())[:, : s.n_heads * s.head_dim].float().view(b, s.n_heads, 1, s.head_dim)
    k, v = cache.read(0)  # [B, H_kv, L, d]
    group = s.n_heads // s.n_kv_heads
    k, v = k.float().repeat_interleave(group, dim=1), v.float().repeat_interleave(group, dim=1)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(s.head_dim), dim=-1)
    attn = (p @ v).view(b, s.n_heads * s.head_dim).to(torch.bfloat16)
    x = x + attn @ layer.w["o"].t()
    gate, up = (norm(x) @ layer.w["gate_up"].t()).split(s.intermediate, dim=-1)
    return x + (torch.nn.functional.silu(gate) * up) @ layer.w["down"].t()


def test_filled_cache():
    bf16 = filled_cache(TINY, 3, 70, fp8=False, device="cpu")
    fp8 = filled_cache(TINY, 3, 70, fp8=True, device="cpu", backend="torch")
    assert bf16.lengths == fp8.lengths == [70] and bool(bf16.key_mask.all()) and bool(fp8.key_mask.all())
    assert bf16.k.dtype == torch.bfloat16 and fp8.k.dtype == torch.float8_e4m3fn
    # same seed, same values: the FP8 cache holds the BF16 one rounded to e4m3 at scale 6 / 448
    k8, _ = fp8.read(0)
    kb, _ = bf16.read(0)
    assert (k8.float() - kb.float()).abs().max() <= 6 / 448 * 16  # half an e4m3 step at the top binade (|x| < 6)
    assert fp8.saturation_metrics()["k_saturated_fraction"] == 0.0


@needs_interpreter
def test_decode_layer_step_under_the_interpreter_matches_torch():
    """BF16 mode against the written-out reference (the only difference is the attention kernel's fp32 order, then
    one BF16 rounding: 2 BF16 ulps); W8A8 modes, Triton kernels vs the package's torch path on the same FP8 codes
    (the fp32 accumulation order of the block GEMM differs: 3e-2)."""
    torch.manual_seed(0)
    tr = DecodeLayer(TINY, device="cpu", backend="triton", seed=1)
    ref = DecodeLayer(TINY, device="cpu", backend="torch", seed=1)
    for name in tr.w_fp8:  # the quantizer is bit-exact between backends
        assert torch.equal(tr.w_fp8[name][0].view(torch.uint8), ref.w_fp8[name][0].view(torch.uint8))
        assert torch.equal(tr.w_fp8[name][1], ref.w_fp8[name][1])
    x = torch.randn(3, TINY.hidden).to(torch.bfloat16)
    cache = filled_cache(TINY, 3, 64, fp8=False, device="cpu")
    torch.testing.assert_close(tr.step(x, cache, fp8_linears=False), _reference_step(tr, x, cache),
                               rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(tr.step(x, cache, fp8_linears=True), ref.step(x, cache, fp8_linears=True),
                               rtol=3e-2, atol=3e-2)
    cache8 = filled_cache(TINY, 3, 64, fp8=True, device="cpu", backend="triton")
    y8 = tr.step(x, cache8, fp8_linears=True)
    assert y8.shape == (3, TINY.hidden) and y8.dtype == torch.bfloat16 and bool(torch.isfinite(y8).all())
    torch.testing.assert_close(y8, ref.step(x, cache8, fp8_linears=True), rtol=3e-2, atol=3e-2)


@needs_interpreter
def test_decode_layer_benchmark_table():
    calls = []

    def fake_bench(fn, quantiles):
        y = fn()
        calls.append(tuple(y.shape))
        return [2.0, 1.0, 3.0] if len(calls) % 3 == 1 else [1.0, 0.5, 1.5]  # ms: bf16 slower than the FP8 modes

    gpu = GpuSpec("made-up", hbm_gb_per_s=1.0, bf16_tflops=1.0, fp8_tflops=2.0, memory_gb=1.0)
    df = decode_layer_benchmark((1, 2), (64,), device="cpu", bench=fake_bench, shape=TINY, gpu=gpu)
    assert calls == [(1, 256)] * 3 + [(2, 256)] * 3
    assert list(df["mode"]) == list(LAYER_MODES) * 2 and (df["context"] == 64).all()
    lin = TINY.attn_params + TINY.dense_mlp_params
    row = df.iloc[2]  # batch 1, w8a8_kv8
    assert row["weight_bytes"] == pytest.approx(lin * (1 + 4 / 128 ** 2)) and row["kv_bytes"] == 2 * 64 * 128
    assert df.iloc[0]["kv_bytes"] == 2 * 64 * 128 * 2  # BF16 cache: two bytes
    assert row["roofline_ms"] == pytest.approx(layer_seconds(TINY, gpu, "w8a8_kv8", 1, 64) * 1e3, rel=1e-12)
    assert row["fraction_of_roofline"] == pytest.approx(row["roofline_ms"] / row["ms"], rel=1e-12)
    assert row["speedup_vs_bf16"] == 2.0 and df.iloc[0]["speedup_vs_bf16"] == 1.0
    assert row["predicted_speedup_vs_bf16"] == pytest.approx(
        layer_seconds(TINY, gpu, "bf16", 1, 64) / layer_seconds(TINY, gpu, "w8a8_kv8", 1, 64), rel=1e-12)
    assert row["gb_per_s"] == pytest.approx((row["weight_bytes"] + row["kv_bytes"]) / 1e-3 / 1e9)
    no_spec = decode_layer_benchmark((1,), (64,), device="cpu", bench=fake_bench, shape=TINY, gpu=None,
                                     modes=("bf16",))
    assert math.isnan(no_spec["roofline_ms"].iloc[0]) and math.isnan(no_spec["predicted_speedup_vs_bf16"].iloc[0])


@pytest.mark.parametrize("kwargs,match", [
    ({"batches": ()}, "batches must be a non-empty"),
    ({"contexts": (0,)}, "contexts must be a non-empty"),
    ({"modes": ("int4",)}, "modes must be a non-empty subset"),
])
def test_decode_layer_benchmark_rejects_bad_arguments(kwargs, match):
    args = {"batches": (1,), "contexts": (64,), **kwargs}
    with pytest.raises(ValueError, match=match):
        decode_layer_benchmark(device="cpu", bench=lambda fn, quantiles: [1.0, 1.0, 1.0], shape=TINY, **args)


def test_decode_layer_rejects_an_moe_shape():
    moe = ModelShape(name="moe", n_layers=1, hidden=256, n_heads=2, n_kv_heads=1, head_dim=128, intermediate=0,
                     vocab=1, n_experts=4, experts_per_token=2, moe_intermediate=128, moe_layers=1)
    with pytest.raises(ValueError, match="dense layer"):
        DecodeLayer(moe, device="cpu")


@pytest.mark.skipif(runtime.has_cuda(), reason="checks the behaviour without a CUDA device")
def test_module_entry_point_without_a_gpu(tmp_path):
    """``python -m helpers.gpu_bench`` (the package's ``__main__``, what the Makefile calls) exits with NO_GPU_EXIT
    and writes nothing."""
    import subprocess
    import sys

    from helpers.gpu_bench import NO_GPU_EXIT

    out = tmp_path / "gpu"
    for argv in (["--check"], ["--out", str(out)]):
        proc = subprocess.run([sys.executable, "-m", "helpers.gpu_bench", *argv], capture_output=True, text=True,
                              cwd=runtime.REPO_ROOT, timeout=300)
        assert proc.returncode == NO_GPU_EXIT and "no CUDA device" in proc.stderr
    assert not out.exists()
