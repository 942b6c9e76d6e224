"""The experiment driver: arms, paired differences, summaries and the veRL / NeMo-RL settings."""

import pandas as pd
import pytest

import helpers  # noqa: F401  (sets up the runtime before anything else)
from helpers.grpo import experiment as ex
from helpers.grpo.trainer import GRPOConfig


def test_make_arms_and_names():
    arms = ex.make_arms(["bf16", "fp8", "fp8+kv"], ["none", "token_tis"])
    assert [a.name for a in arms] == ["bf16 / none", "fp8 / none", "fp8 / token TIS", "fp8+kv / none",
                                      "fp8+kv / token TIS"]
    assert ex.make_arms(["fp8"], ["seq_tis"]) == [ex.Arm("fp8", "seq_tis")]
    with pytest.raises(ValueError):
        ex.Arm("fp4", "none")
    with pytest.raises(ValueError):
        ex.Arm("fp8", "ppo")


def test_engine_settings_name_the_engine_knobs():
    cfg = GRPOConfig()
    kv = ex.engine_settings(ex.Arm("fp8+kv", "token_tis"), cfg)
    assert kv["verl rollout.quantization"] == "fp8" and kv["verl engine_kwargs.vllm.kv_cache_dtype"] == "fp8_e4m3"
    assert kv["verl rollout_correction.rollout_is"] == "token" and kv["rollout_is_threshold"] == "2"
    assert kv["verl actor.loss_agg_mode"] == "token-mean"
    mis = ex.engine_settings(ex.Arm("fp8", "token_mis"), cfg)
    assert mis["verl rollout_correction.rollout_rs"] == "token" and mis["rollout_rs_threshold"].startswith("2 ")
    bf = ex.engine_settings(ex.Arm("bf16", "none"), cfg)
    assert bf["verl rollout.quantization"].startswith("null") and bf["nemo-rl vllm_cfg.precision"] == "bfloat16"


def _tiny_policy():
    import torch

    from helpers.grpo import task
    from helpers.models.decoder import Decoder, DecoderConfig

    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=task.VOCAB_SIZE, n_layer=1, n_head=2, n_kv_head=1, head_dim=16,
                                 d_model=32, d_ff=64, max_seq_len=16))


def test_run_arms_workers_and_cache_give_the_same_table(tmp_path, monkeypatch):
    """Two worker processes compute what one process computes (each run is deterministic); a second call with the
    same cache reads every finished run instead of training it; a changed config is a different run."""
    policy = _tiny_policy()
    cfg = GRPOConfig(steps=2, n_prompts=2, group_size=2, n_digits=2, eval_every=1, n_eval=8)
    arms = ex.make_arms(["bf16", "fp8"], ["none"], bf16_corrections=("none", "token_tis"))
    assert [a.name for a in arms] == ["bf16 / none", "bf16 / token TIS", "fp8 / none"]
    kw = dict(block_size=(16, 16), progress=False)
    one = ex.run_arms(policy, arms, [0, 1], cfg, workers=1, **kw)
    two = ex.run_arms(policy, arms, [0, 1], cfg, workers=2, cache_dir=tmp_path, **kw)
    timing = [c for c in one.columns if c.startswith("time/") or c.endswith("_s") or c.endswith("per_s")]
    pd.testing.assert_frame_equal(one.drop(columns=timing), two.drop(columns=timing))
    assert len(list(tmp_path.glob("*.csv"))) == 6

    def no_training(job):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(ex, "_run_one", no_training)
    again = ex.run_arms(policy, arms, [0, 1], cfg, workers=1, cache_dir=tmp_path, **kw)
    pd.testing.assert_frame_equal(two, again, check_dtype=False)
    with pytest.raises(AssertionError, match="trained again"):  # another config is another run
        ex.run_arms(policy, arms[:1], [0], GRPOConfig(steps=3, n_prompts=2, group_size=2, n_digits=2, eval_every=1,
                                                       n_eval=8), cache_dir=tmp_path, **kw)
