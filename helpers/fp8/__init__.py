"""Blockwise FP8 (float8_e4m3fn) W8A8 quantization: quantizers, the block-scaled GEMM, and model-level tools.

* :mod:`helpers.fp8.format` - THE e4m3 constants, the scale rule and the shared argument checks;
* :mod:`helpers.fp8.reference` - the torch path (the exact semantics; the CPU re-quantizer);
* :mod:`helpers.fp8.native` - the compiled CPU kernel the torch path uses for large bf16 / fp32 weights;
* :mod:`helpers.fp8.kernels` - the Triton kernels (compiled on a GPU, interpreted on the CPU);
* :mod:`helpers.fp8.interpreter` - the fix for the Triton interpreter's fp32 -> float8e4nv (and -> bf16) casts;
* :mod:`helpers.fp8.quant` - the public functions below (argument checks and backend dispatch);
* :mod:`helpers.fp8.linear` / :mod:`helpers.fp8.checkpoint` - Fp8Linear, the per-step weight sync, engine layout;
* :mod:`helpers.fp8.fake_quant` - the FP8 end-to-end trainer's layer (the engine's W8A8 forward, straight-through
  backward);
* :mod:`helpers.fp8.analysis` / :mod:`helpers.fp8.bench` - error metrics per scheme, benchmarks.

The math and its sources: ``docs/fp8_blockwise.md``.
"""

from helpers.core import runtime  # noqa: F401  (sets TRITON_INTERPRET before triton can be imported)
from helpers.fp8.quant import block_fp8_matmul, dequant_weight, quant_act, quant_weight
from helpers.fp8.format import FP8_DTYPE, FP8_E4M3_MAX, SCALE_EPS, SCALE_FMTS, compute_scale, fake_quant, ue8m0_round_up

__all__ = [
    "FP8_DTYPE",
    "FP8_E4M3_MAX",
    "SCALE_EPS",
    "SCALE_FMTS",
    "compute_scale",
    "fake_quant",
    "ue8m0_round_up",
    "quant_act",
    "quant_weight",
    "dequant_weight",
    "block_fp8_matmul",
]

# Model-level API (Fp8Linear, quantize_model, requantize_model_, checkpoints) is appended below.
from helpers.fp8.linear import DEFAULT_SKIP, Fp8Linear, fp8_linears, quantize_model, requantize_model_  # noqa: E402
from helpers.fp8.checkpoint import load_fp8_checkpoint, read_kv_scale_tensors, save_fp8_checkpoint  # noqa: E402

__all__ += ["DEFAULT_SKIP", "Fp8Linear", "fp8_linears", "quantize_model", "requantize_model_", "save_fp8_checkpoint",
            "load_fp8_checkpoint", "read_kv_scale_tensors"]
from helpers.fp8.fake_quant import Fp8FakeQuantLinear, fake_quantize_model  # noqa: E402

__all__ += ["Fp8FakeQuantLinear", "fake_quantize_model"]
