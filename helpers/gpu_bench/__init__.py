"""The GPU runner's benchmark, ``python -m helpers.gpu_bench --out results/gpu`` (``make gpu-bench``) and
``--check`` (``make gpu-test``'s first step).

* :mod:`helpers.gpu_bench.runner` - the command line and :func:`run_benchmarks` (GEMM, weight sync, decode
  attention, decode layer; ``bench.json`` with the device and versions);
* :mod:`helpers.gpu_bench.decode_layer` - one transformer layer's decode step at Qwen3-8B shapes in BF16 / W8A8 /
  W8A8 + FP8 KV beside the decode roofline (:mod:`helpers.roofline`).

Without a CUDA device :func:`main` writes nothing and returns :data:`NO_GPU_EXIT`; :func:`run_benchmarks` runs on
the CPU under the Triton interpreter at tiny shapes for the tests.
"""

from helpers.gpu_bench.decode_layer import DecodeLayer, decode_layer_benchmark, filled_cache
from helpers.gpu_bench.runner import FULL, NO_GPU_EXIT, NO_GPU_MESSAGE, QUICK, cuda_info, main, run_benchmarks

__all__ = ["NO_GPU_EXIT", "NO_GPU_MESSAGE", "FULL", "QUICK", "cuda_info", "run_benchmarks", "main",
           "DecodeLayer", "decode_layer_benchmark", "filled_cache"]
