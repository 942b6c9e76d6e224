"""KV-cache memory arithmetic against the public figures (vLLM / NeMo-RL accounting)."""

from __future__ import annotations

import pytest

import helpers  # noqa: F401
from helpers.kvcache.memory import (NEMO_RL_QWEN3_8B, capacity_table, kv_bytes_per_token, load_model_configs,
                                    scale_bytes)


def test_configs_have_sources_and_the_shapes_of_the_issue():
    cfgs = load_model_configs()
    assert {"Qwen3-8B", "Qwen3-30B-A3B", "Llama-3.1-8B", "Qwen2.5-7B", "DeepSeek-V3"} <= set(cfgs)
    for name, c in cfgs.items():
        assert c["source"].startswith("https://huggingface.co/") and c["source"].endswith("/config.json"), name
    assert kv_bytes_per_token(cfgs["Qwen3-8B"]) == 144 * 1024  # 2 * 36 * 8 * 128 * 2 bytes
    assert kv_bytes_per_token(cfgs["DeepSeek-V3"]) == 61 * (512 + 64) * 2


def test_fp8_is_half_plus_scales_and_matches_nemo_rl_capacity():
    cfgs = load_model_configs()
    for c in cfgs.values():
        assert 2 * kv_bytes_per_token(c, "fp8") == kv_bytes_per_token(c, "bf16")
    q8 = cfgs["Qwen3-8B"]
    assert scale_bytes(q8, "tensor") == 4 * 36 * 2 and scale_bytes(q8, "head") == 4 * 36 * 2 * 8
    assert scale_bytes(q8, "head", with_q=True) == 4 * 36 * (16 + 32)
    budget = NEMO_RL_QWEN3_8B["bf16"] * kv_bytes_per_token(q8)
    row = capacity_table({"Qwen3-8B": q8}, budget_bytes=budget, seq_len=22_528).iloc[0]
    assert row["tokens_bf16"] == NEMO_RL_QWEN3_8B["bf16"]
    assert row["tokens_fp8"] == 2 * NEMO_RL_QWEN3_8B["bf16"] - 1  # the 288 scale bytes cost one token
    assert row["concurrent_seqs_bf16"] == pytest.approx(NEMO_RL_QWEN3_8B["concurrency_bf16"], abs=0.01)
    with pytest.raises(ValueError, match="dtype"):
        kv_bytes_per_token(q8, "fp16")
    with pytest.raises(ValueError, match="attention"):
        kv_bytes_per_token({"attention": "mqa"})
