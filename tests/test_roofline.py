"""The decode roofline (helpers/roofline) on hand-computed cases: a pure weight-bound step, a pure KV-bound step,
a compute-bound step, an MoE step; the rollout simulation's bookkeeping; the published-figure comparison rules."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import helpers  # noqa: F401
from helpers.roofline import (AGREEMENT_PP, MODES, PAYOFF_THRESHOLD, Efficiency, GpuSpec, ModelShape, agrees,
                              compare_published, decode_step, decode_step_seconds, expected_experts_touched,
                              gpu_spec, gpu_spec_for_device, kv_capacity_tokens, layer_seconds, load_published,
                              model_shape, payoff_grid, predicted_speedup, prefill_seconds, response_lengths,
                              roofline_verdict, simulate_rollout)

H100_BW = 3350e9  # data/gpu_specs.json: 3.35 TB/s
QWEN3_8B_LINEAR = 36 * (4096 * (32 + 2 * 8) * 128 + 32 * 128 * 4096 + 3 * 4096 * 12288)  # q,k,v,o + MLP
QWEN3_8B_LM_HEAD = 151936 * 4096


def test_model_shapes_match_the_public_parameter_counts():
    q8 = model_shape("Qwen3-8B")
    assert q8.quantized_linear_params == QWEN3_8B_LINEAR == 6_945_767_424
    assert q8.total_params == QWEN3_8B_LINEAR + 2 * QWEN3_8B_LM_HEAD  # 8.19 B: untied embeddings
    assert model_shape("Qwen3-4B").total_params == pytest.approx(4.02e9, rel=1e-3)  # tied embeddings
    moe = model_shape("Qwen3-30B-A3B")
    assert (moe.moe_layers, moe.dense_layers, moe.n_experts, moe.experts_per_token) == (48, 0, 128, 8)
    assert moe.total_params == pytest.approx(30.53e9, rel=1e-3)
    assert model_shape("Llama-3.1-70B").total_params == pytest.approx(70.55e9, rel=1e-3)
    with pytest.raises(ValueError, match="GQA attention only"):
        model_shape("DeepSeek-V3")
    with pytest.raises(ValueError, match="unknown model 'Qwen9'"):
        model_shape("Qwen9")


def test_gpu_specs_and_device_matching():
    h100 = gpu_spec("H100")
    assert (h100.hbm_gb_per_s, h100.bf16_tflops, h100.fp8_tflops) == (3350, 989.5, 1979.0)
    assert gpu_spec_for_device("NVIDIA H100 80GB HBM3").name == "H100"
    assert gpu_spec_for_device("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert gpu_spec_for_device("NVIDIA H200").name == "H200"
    assert gpu_spec_for_device("NVIDIA L4").name == "L4"
    assert gpu_spec_for_device("NVIDIA L40S") is None  # "L4" must not match inside "L40S"
    assert gpu_spec_for_device(None) is None
    with pytest.raises(ValueError, match="unknown GPU 'A100'"):
        gpu_spec("A100")
    with pytest.raises(ValueError, match="hbm_gb_per_s"):
        GpuSpec("x", hbm_gb_per_s=0, bf16_tflops=1, fp8_tflops=1, memory_gb=1)


def test_pure_weight_bound_step_is_the_weight_bytes_over_bandwidth():
    """Batch 1, empty cache: every weight read once, FLOPs negligible. Hand: BF16 (6.95e9 + 0.62e9) x 2 bytes /
    3.35e12 = 4.52 ms; W8A8 the linears at 1 byte + 4 / 128^2 bytes of scale, lm_head still BF16. Plus the one
    token's BF16 activations in and out of each GEMM (per layer 4096 + 6144 for qkv, 4096 + 4096 for o, 4096 +
    24576 for gate/up, 12288 + 4096 for down) and its fp32 logits."""
    q8, h100 = model_shape("Qwen3-8B"), gpu_spec("H100")
    bf16 = decode_step_seconds(q8, h100, "bf16", 1, 0)
    w8a8 = decode_step_seconds(q8, h100, "w8a8", 1, 0)
    act = 36 * (4096 + 6144 + 4096 + 4096 + 4096 + 24576 + 12288 + 4096) * 2 + 151936 * 4
    hand_bf16 = (QWEN3_8B_LINEAR * 2 + QWEN3_8B_LM_HEAD * 2 + act) / H100_BW
    hand_w8a8 = (QWEN3_8B_LINEAR * (1 + 4 / 128 ** 2) + QWEN3_8B_LM_HEAD * 2 + act) / H100_BW
    assert bf16 == pytest.approx(hand_bf16, rel=1e-12)
    assert w8a8 == pytest.approx(hand_w8a8, rel=1e-12)
    assert bf16 == pytest.approx(4.52e-3, abs=0.01e-3)
    table = decode_step(q8, h100, "bf16", 1, 0).set_index("component")
    assert (table.loc[["linear", "lm_head"], "bound"] == "memory").all()
    assert table.loc["attention", "seconds"] == 0 and table.loc["total", "seconds"] == pytest.approx(bf16, rel=1e-12)
    assert decode_step_seconds(q8, h100, "kv8", 1, 0) == bf16  # no cache, nothing for FP8 KV to save


def test_pure_kv_bound_step_halves_with_the_fp8_cache():
    """Batch 64 x 32k context: K and V are 64 * 32768 * 2 * 36 * 8 * 128 * 2 bytes = 309 GB -> 92.3 ms, twenty
    times the weights; the FP8 cache halves exactly that term and nothing else."""
    q8, h100 = model_shape("Qwen3-8B"), gpu_spec("H100")
    kv_bytes = 64 * 32768 * (2 * 36 * 8 * 128 * 2)
    t = decode_step(q8, h100, "bf16", 64, 32768).set_index("component")
    assert t.loc["attention", "bytes"] == kv_bytes and t.loc["attention", "bound"] == "memory"
    assert t.loc["attention", "seconds"] == pytest.approx(kv_bytes / H100_BW, rel=1e-12)
    assert t.loc["attention", "seconds"] == pytest.approx(92.3e-3, abs=0.1e-3)
    t8 = decode_step(q8, h100, "kv8", 64, 32768).set_index("component")
    assert t8.loc["attention", "seconds"] == pytest.approx(t.loc["attention", "seconds"] / 2, rel=1e-12)
    assert t8.loc["linear", "seconds"] == t.loc["linear", "seconds"]
    # ragged batch: the cost depends on the total cached tokens only
    assert decode_step_seconds(q8, h100, "bf16", 64, 64 * 32768.0) == pytest.approx(t.loc["total", "seconds"])


def test_compute_bound_step_uses_the_fp8_peak_for_w8a8():
    """Batch 4096: 2 * 4096 * 6.95e9 = 5.69e13 FLOPs in the linears -> 57.5 ms at 989.5 TFLOP/s (BF16) and half at
    the FP8 peak; the 13.9 GB of weights would take only 4.1 ms."""
    q8, h100 = model_shape("Qwen3-8B"), gpu_spec("H100")
    lin = decode_step(q8, h100, "bf16", 4096, 0).set_index("component").loc["linear"]
    assert lin["bound"] == "compute"
    assert lin["seconds"] == pytest.approx(2 * 4096 * QWEN3_8B_LINEAR / 989.5e12, rel=1e-12)
    lin8 = decode_step(q8, h100, "w8a8", 4096, 0).set_index("component").loc["linear"]
    assert lin8["seconds"] == pytest.approx(lin["seconds"] / 2, rel=1e-12)


def test_moe_step_reads_only_the_experts_the_batch_touches():
    """Qwen3-30B-A3B: one token touches its 8 experts of 128; two tokens 128 (1 - (15/16)^2) = 15.5 on average;
    a large batch all 128. Hand bytes at batch 1: 48 layers x (8 experts x 3 x 2048 x 768 x 2 bytes + the BF16
    router 2048 x 128 x 2 + the token's expert activations 8 x (2 x 2048 + 3 x 768) x 2)."""
    assert expected_experts_touched(128, 8, 1) == pytest.approx(8.0)
    assert expected_experts_touched(128, 8, 2) == pytest.approx(15.5)
    assert expected_experts_touched(128, 8, 10_000) == pytest.approx(128.0)
    moe, h100 = model_shape("Qwen3-30B-A3B"), gpu_spec("H100")
    row = decode_step(moe, h100, "bf16", 1, 0).set_index("component").loc["moe"]
    hand = 48 * (8 * 3 * 2048 * 768 * 2 + 2048 * 128 * 2 + 8 * (2 * 2048 + 3 * 768) * 2)
    assert row["bytes"] == pytest.approx(hand, rel=1e-12) and row["bound"] == "memory"
    assert row["seconds"] == pytest.approx(hand / H100_BW, rel=1e-12)
    # W8A8 halves the expert weights (not the router): the gain is largest while few experts are touched
    row8 = decode_step(moe, h100, "w8a8", 1, 0).set_index("component").loc["moe"]
    assert row8["bytes"] == pytest.approx(hand - 48 * 8 * 3 * 2048 * 768 * (1 - 4 / 128 ** 2), rel=1e-12)
    big = decode_step(moe, h100, "bf16", 256, 0).set_index("component").loc["moe", "bytes"]
    assert big > 10 * row["bytes"]  # 256 tokens touch ~110 of the 128 experts


def test_kv_capacity_and_the_nemo_rl_figures():
    """W8A8 frees (16.38 - 9.44) GB of weights = ~47k Qwen3-8B tokens of BF16 cache; NeMo-RL PR #1212 reports
    299,344 - 249,952 = 49,392 (the engine's activation workspace also shrinks a little). FP8 KV doubles it."""
    q8, h100 = model_shape("Qwen3-8B"), gpu_spec("H100")
    freed = (q8.weight_bytes(False) - q8.weight_bytes(True)) / q8.kv_bytes_per_token(2)
    assert freed == pytest.approx(299_344 - 249_952, rel=0.06)
    c = {m: kv_capacity_tokens(q8, h100, m) for m in MODES}
    assert c["kv8"] == pytest.approx(2 * c["bf16"], abs=2) and c["w8a8_kv8"] == pytest.approx(2 * c["w8a8"], abs=2)
    with pytest.raises(ValueError, match="leave no KV cache"):
        kv_capacity_tokens(model_shape("Llama-3.1-70B"), h100, "bf16")


def test_layer_and_prefill_seconds():
    q8, h100 = model_shape("Qwen3-8B"), gpu_spec("H100")
    step = decode_step(q8, h100, "bf16", 16, 8192).set_index("component")["seconds"]
    assert layer_seconds(q8, h100, "bf16", 16, 8192) == pytest.approx(
        (step["linear"] + step["attention"]) / 36, rel=1e-12)
    # prefill of 8 x 2048 tokens is compute-bound: 2 * 16384 * 6.95e9 FLOPs at the FP8 peak for W8A8
    lin_only = 2 * 16384 * QWEN3_8B_LINEAR / 1979e12
    assert prefill_seconds(q8, h100, "w8a8", 8, 2048) > lin_only
    assert prefill_seconds(q8, h100, "bf16", 8, 2048) > prefill_seconds(q8, h100, "w8a8", 8, 2048)
    assert prefill_seconds(q8, h100, "bf16", 0, 2048) == 0.0


def test_response_lengths():
    r = response_lengths(1000, mean=100, max_len=300)
    assert r.min() >= 1 and r.max() == 300 and abs(r.mean() - 100 * (1 - math.exp(-3))) < 2  # capped exponential
    assert (response_lengths(4, mean=7, max_len=10, dist="fixed") == 7).all()
    u = response_lengths(100, mean=50, max_len=1000, dist="uniform")
    assert np.all(np.diff(u) >= 0) and 45 < u.mean() < 55
    with pytest.raises(ValueError, match="dist must be one of"):
        response_lengths(3, mean=1, max_len=2, dist="pareto")


def test_rollout_without_a_memory_limit_is_the_sum_of_its_steps():
    """Two requests of 3 and 5 tokens, prompt 10, no prefill: steps 1-3 run both (caches 22, 24, 26 tokens), steps
    4-5 the longer alone (caches 14, 15)."""
    q8, h100 = model_shape("Qwen3-8B"), gpu_spec("H100")
    out = simulate_rollout(q8, h100, "bf16", prompt_len=10, response_lens=[3, 5], kv_capacity=10 ** 9,
                           include_prefill=False)
    hand = sum(decode_step_seconds(q8, h100, "bf16", 2, c) for c in (22, 24, 26))
    hand += sum(decode_step_seconds(q8, h100, "bf16", 1, c) for c in (14, 15))
    assert out["decode_s"] == pytest.approx(hand, rel=1e-12) and out["prefill_s"] == 0
    assert (out["steps"], out["tokens"], out["max_batch"], out["preemptions"]) == (5, 8, 2, 0)
    assert out["mean_batch"] == pytest.approx(8 / 5)


@pytest.mark.parametrize("admission", ["optimistic", "reserve"])
def test_rollout_under_a_tight_cache_generates_every_token(admission):
    q8, h100 = model_shape("Qwen3-8B"), gpu_spec("H100")
    lens = response_lengths(40, mean=200, max_len=800)
    free = simulate_rollout(q8, h100, "bf16", prompt_len=64, response_lens=lens, kv_capacity=10 ** 9,
                            admission=admission)
    tight = simulate_rollout(q8, h100, "bf16", prompt_len=64, response_lens=lens, kv_capacity=2000,
                             admission=admission)
    assert tight["tokens"] == free["tokens"] == int(lens.sum())
    assert tight["max_batch"] < free["max_batch"] == 40 and tight["total_s"] > free["total_s"]
    assert (tight["preemptions"] > 0) == (admission == "optimistic")
    with pytest.raises(ValueError, match="does not fit in the KV cache"):
        simulate_rollout(q8, h100, "bf16", prompt_len=64, response_lens=[900], kv_capacity=900)


def test_predicted_speedup_of_a_decode_setting_is_the_step_time_ratio():
    q4, l4 = model_shape("Qwen3-4B"), gpu_spec("L4")
    setting = {"model": "Qwen3-4B", "gpu": "L4", "mode": "kv8", "kind": "decode", "batch": 1, "context": 32768}
    want = decode_step_seconds(q4, l4, "bf16", 1, 32768) / decode_step_seconds(q4, l4, "kv8", 1, 32768) - 1
    assert predicted_speedup(setting) == pytest.approx(want, rel=1e-12)
    # a fixed per-step overhead dilutes a per-step gain
    assert predicted_speedup(setting, eff=Efficiency(step_overhead_s=0.05)) < want
    with pytest.raises(ValueError, match="needs 'context'"):
        predicted_speedup({"model": "Qwen3-4B", "gpu": "L4", "mode": "kv8", "kind": "decode", "batch": 1})
    with pytest.raises(ValueError, match="mode / baseline"):
        predicted_speedup({**setting, "mode": "int4"})


def test_agreement_rule_and_verdict():
    assert agrees(0.20, 0.18, "equal") and not agrees(0.30, 0.18, "equal")
    assert agrees(0.90, 0.35, "at_least") and not agrees(0.20, 0.35, "at_least")
    assert agrees(0.05, 0.0, "about") and not agrees(0.5, 0.0, "about")
    assert AGREEMENT_PP == 10.0
    t = pd.DataFrame({"id": ["a", "b", "c", "d"], "agrees": [True, True, False, None],
                      "predicted": [0.1, 0.2, 0.9, math.nan], "reported": [0.1, 0.2, 0.3, 0.0],
                      "difference_pp": [0.0, 0.0, 60.0, math.nan]})
    verdict, reason = roofline_verdict(t)
    assert verdict == "partly" and "2 of 3" in reason and "c predicted +90 % vs reported +30 %" in reason
    assert "1 not modelled" in reason
    assert roofline_verdict(t.iloc[:2])[0] == "reproduced"
    assert roofline_verdict(t.iloc[2:3])[0] == "not reproduced"


def test_published_entries_carry_sources_and_the_decode_rows_compare():
    entries = load_published()
    assert all(e["source"] and e["claim"] and "assumed" in e for e in entries)
    decode_rows = [e for e in entries if e["setting"] and e["setting"]["kind"] == "decode"]
    table = compare_published(decode_rows)
    assert list(table["id"]) == [e["id"] for e in decode_rows]
    assert table["predicted"].notna().all() and table["agrees"].map(type).eq(bool).all()
    np.testing.assert_allclose(table["difference_pp"], 100 * (table["predicted"] - table["reported"]))
    skipped = compare_published([e for e in entries if e["setting"] is None])
    assert skipped["predicted"].isna().all() and skipped["agrees"].isna().all()


def test_payoff_grid():
    q8, h100 = model_shape("Qwen3-8B"), gpu_spec("H100")
    g = payoff_grid(q8, h100, [1, 256], [1024, 32768])
    assert len(g) == 2 * 2 * 3 and set(g["mode"]) == {"w8a8", "kv8", "w8a8_kv8"}
    cell = g.set_index(["batch", "context", "mode"])
    # batch 1, short context: weight-bound, W8A8 pays, the FP8 cache does not
    assert cell.loc[(1, 1024, "w8a8"), "pays_off"] and not cell.loc[(1, 1024, "kv8"), "pays_off"]
    # batch 256 x 32k: 8.4 M tokens fit in no cache of one H100, FP8 KV pays, W8A8 alone does not
    assert not cell.loc[(256, 32768, "kv8"), "fits_bf16"]
    assert cell.loc[(256, 32768, "kv8"), "speedup"] > 0.8 and cell.loc[(256, 32768, "w8a8"), "speedup"] < 0.05
    assert (g["pays_off"] == (g["speedup"] >= PAYOFF_THRESHOLD)).all()


def test_sensitivity_and_the_fp8rl_setting_predictions():
    from helpers.roofline import FP8RL_QWEN3_8B_SETTING, fp8rl_predictions, sensitivity

    decode_rows = [e for e in load_published() if e["setting"] and e["setting"]["kind"] == "decode"]
    s = sensitivity(decode_rows, overhead_ms=5.0)
    assert list(s["id"]) == [e["id"] for e in decode_rows]
    np.testing.assert_allclose(s["cache_unbound"], s["roofline"])  # a decode step has no cache to unbind
    assert (s["overhead"] < s["roofline"]).all()  # a fixed cost per step dilutes a per-step gain
    small = {**FP8RL_QWEN3_8B_SETTING, "n_requests": 16, "response": {"dist": "exponential", "mean": 300, "max": 2000}}
    p = fp8rl_predictions(small).set_index("comparison")["predicted"]
    assert list(p.index) == ["w8a8 vs bf16", "kv8 vs bf16", "w8a8_kv8 vs bf16", "w8a8_kv8 vs w8a8"]
    assert p["w8a8 vs bf16"] == pytest.approx(predicted_speedup({**small, "mode": "w8a8"}), rel=1e-12)
    # the gains compose: (1 + both vs bf16) = (1 + w8a8 vs bf16) (1 + both vs w8a8)
    assert 1 + p["w8a8_kv8 vs bf16"] == pytest.approx((1 + p["w8a8 vs bf16"]) * (1 + p["w8a8_kv8 vs w8a8"]), rel=1e-9)
    assert (p > 0).all()
