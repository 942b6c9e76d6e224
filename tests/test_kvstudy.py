"""The notebook-02 studies on tiny budgets: drift loop, outlier sweep and benchmarks produce sane tables."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

import helpers  # noqa: F401
from helpers.kvcache.bench import calibration_cost, decode_attention_benchmark
from helpers.kvstudy.drift import DEFAULT_ARMS, Arm, DriftConfig, copy_batch, plant_outliers_, run_drift
from helpers.kvstudy.outliers import OUTLIER_METHODS, outlier_sweep
from helpers.models import Decoder, DecoderConfig

TINY = DecoderConfig(vocab_size=16, n_layer=1, n_head=2, n_kv_head=1, head_dim=8, d_model=16, d_ff=32,
                     max_seq_len=16, qk_norm=False)


def test_copy_batch():
    x = copy_batch(3, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == (3, 9) and bool((x[:, 4] == 1).all()) and torch.equal(x[:, :4], x[:, 5:])
    assert bool((x[:, :4] >= 2).all())


def test_run_drift_tiny():
    cfg = DriftConfig(model=TINY, n_steps=3, eval_every=2, copy_len=3, train_batch=4, calib_batch=2,
                      rollout_batch=2, outlier_max=50.0)
    arms_df, steps_df = run_drift(cfg, arms=DEFAULT_ARMS[:4])
    assert sorted(arms_df["step"].unique()) == [0, 2, 3] and len(arms_df) == 3 * 4
    assert list(steps_df["step"]) == [0, 1, 2, 3] and steps_df["loss"].iloc[:3].notna().all()
    assert steps_df["k_amax"].iloc[-1] > 40  # the planted outlier reached the cache's view
    for col in ("attn_rel_err", "k3_kl", "token_mult_prob_error", "greedy_agreement", "k_saturated_fraction"):
        assert arms_df[col].notna().all(), col
    assert (arms_df["token_mult_prob_error"] >= 1.0).all() and (arms_df["k3_kl"] >= 0).all()
    unit = arms_df[arms_df["arm"] == "unit"]
    assert (unit["k_scale_mean"] == 1.0).all()
    with pytest.raises(ValueError, match="policy must be one of"):
        run_drift(cfg, arms=[Arm("bad", "sometimes")])


def test_plant_outliers_needs_a_bias():
    with pytest.raises(ValueError, match="qkv_bias"):
        plant_outliers_(Decoder(TINY), 10.0)
    model = Decoder(replace(TINY, qkv_bias=True))
    plant_outliers_(model, 10.0)
    assert model.layers[0].self_attn.k_proj.bias[[3, 7]].tolist() == [10.0, 10.0]


def test_outlier_sweep_knee():
    df = outlier_sweep([1.0, 1e3, 1e6], n_tokens=256)
    assert set(df["method"]) == set(OUTLIER_METHODS)
    amax = df[df["method"] == "per-tensor amax"].set_index("ratio")["rel_err_typical_head0"]
    # e4m3 keeps its relative precision up to ratios ~1e4, then the typical channels fall into subnormals.
    assert amax[1e3] < 0.05 and amax[1e6] > 0.5
    per_head = df[df["method"] == "per-head amax"].set_index("ratio")["rel_err_typical"]
    assert per_head[1e6] < amax[1e6]  # the other KV head keeps its own scale


def test_benchmarks_run_with_a_custom_timer():
    calls = []

    def timer(fn, quantiles):
        fn()
        calls.append(1)
        return [1.0, 0.9, 1.1]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = decode_attention_benchmark((8, 20), batch=1, n_head=2, n_kv_head=1, head_dim=16, timer=timer,
                                        backend="triton", rounds=2)
    assert len(df) == 4 and len(calls) == 8 and set(df["cache"]) == {"bfloat16", "fp8_e4m3"}
    fp8 = df[df["cache"] == "fp8_e4m3"]
    assert (fp8["ratio_vs_hp"] == 1.0).all() and (fp8["kv_bytes"] * 2 == df[df["cache"] == "bfloat16"]["kv_bytes"].values).all()
    cost = calibration_cost(Decoder(TINY).eval(), [2, 4], rollout_batch=2, prompt_len=3, calib_batch=2, calib_len=4,
                            repeats=1)
    assert list(cost["response_len"]) == [2, 4] and cost["calibration_fraction"].between(0, 1).all()
