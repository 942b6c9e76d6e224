"""When does FP8 rollout pay off: a decode roofline (notebook 06).

Public API
----------
Inputs (:mod:`helpers.roofline.specs`): ``GpuSpec`` / ``gpu_spec(name)`` / ``gpu_spec_for_device(torch name)``
from ``data/gpu_specs.json``; ``ModelShape`` / ``model_shape(name)`` from ``data/model_configs.json``.

One decode step (:mod:`helpers.roofline.decode`): ``decode_step(shape, gpu, mode, batch, context)`` (a table per
component: linear, moe, attention, lm_head, overhead), ``decode_step_seconds``, ``layer_seconds`` (one layer, what
``python -m helpers.gpu_bench`` measures), ``prefill_seconds``, ``kv_capacity_tokens``,
``expected_experts_touched``; ``MODES`` = bf16, w8a8, kv8, w8a8_kv8; ``Efficiency`` (fractions of peak, fixed
per-step overhead).

A rollout (:mod:`helpers.roofline.rollout`): ``response_lengths``, ``simulate_rollout`` (continuous batching with
the KV capacity and preemption), ``predicted_speedup(setting) -> float`` (``0.18`` = +18 %).

Against the literature (:mod:`helpers.roofline.published`): ``load_published`` (``data/published_speedups.json``),
``compare_published``, ``roofline_verdict``, ``overhead_to_match``, ``payoff_grid``, ``sensitivity``;
``fp8rl_predictions()`` - the predicted gains in FP8-RL's Qwen3-8B setting (``FP8RL_QWEN3_8B_SETTING``).
"""

from helpers.roofline.decode import (COMPONENTS, MODES, PURE_ROOFLINE, Efficiency, decode_step, decode_step_seconds,
                                     expected_experts_touched, kv_capacity_tokens, layer_seconds, prefill_seconds)
from helpers.roofline.published import (AGREEMENT_PP, FP8RL_QWEN3_8B_SETTING, PAYOFF_THRESHOLD, agrees,
                                        compare_published, fp8rl_predictions, load_published, overhead_to_match,
                                        payoff_grid, roofline_verdict, sensitivity)
from helpers.roofline.rollout import predicted_speedup, response_lengths, simulate_rollout
from helpers.roofline.specs import GpuSpec, ModelShape, gpu_spec, gpu_spec_for_device, load_gpu_specs, model_shape

__all__ = [
    "GpuSpec", "ModelShape", "gpu_spec", "gpu_spec_for_device", "load_gpu_specs", "model_shape",
    "MODES", "COMPONENTS", "Efficiency", "PURE_ROOFLINE", "decode_step", "decode_step_seconds", "layer_seconds",
    "prefill_seconds", "kv_capacity_tokens", "expected_experts_touched",
    "response_lengths", "simulate_rollout", "predicted_speedup",
    "AGREEMENT_PP", "PAYOFF_THRESHOLD", "agrees", "load_published", "compare_published", "overhead_to_match",
    "roofline_verdict", "payoff_grid", "sensitivity", "FP8RL_QWEN3_8B_SETTING", "fp8rl_predictions",
]
