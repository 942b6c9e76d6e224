"""The notebook-02 studies: mismatch on the engine's own samples (a known-bias engine), the RL drift loop, the
controlled K-growth sweep, the realistic-head outlier sweep, the verdict rules and the benchmarks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import helpers  # noqa: F401
from helpers.kvcache import Fp8KVCache, calibrate_kv_scales
from helpers.kvcache.bench import calibration_cost, decode_attention_benchmark
from helpers.kvstudy import verdicts
from helpers.kvstudy.drift import (DEFAULT_ARMS, HP_ARM, Arm, DriftConfig, engine_mismatch, key_growth_sweep,
                                   run_drift, scale_keys_)
from helpers.kvstudy.outliers import (HEAD_SWEEP_ARMS, OUTLIER_METHODS, holding_threshold, outlier_sweep,
                                      realistic_head_sweep)
from helpers.models import Decoder, DecoderConfig, GenerationOutput

TINY = DecoderConfig(vocab_size=16, n_layer=1, n_head=2, n_kv_head=1, head_dim=8, d_model=16, d_ff=32,
                     max_seq_len=16, qk_norm=False)


class _ConstantEngine:
    """A rollout engine that samples every token from a fixed distribution ``p`` and reports log p."""

    def __init__(self, p):
        self.logp = torch.tensor(p).log()

    def generate(self, prompts, n, *, temperature, eos_id, pad_id, generator, cache):
        b = prompts.shape[0]
        tokens = torch.multinomial(self.logp.exp().expand(b * n, -1), 1, generator=generator).view(b, n)
        return GenerationOutput(tokens, self.logp[tokens], torch.ones(b, n, dtype=torch.bool))


class _ConstantTrainer(nn.Module):
    """A trainer whose logits are log q at every position, whatever the input."""

    def __init__(self, q):
        super().__init__()
        self.logq = torch.tensor(q).log()

    def forward(self, idx):
        return self.logq.expand(*idx.shape, -1).clone()


def test_engine_mismatch_has_the_sign_and_value_of_kl_rollout_to_train():
    """Engine p = (0.8, 0.2), trainer q = (0.5, 0.5): on the engine's samples r = q / p, so k1 and k3 both estimate
    KL(p || q) = 0.8 ln 1.6 + 0.2 ln 0.4 = 0.1927 (> 0); the reverse direction KL(q || p) = 0.2231 is excluded."""
    p, q = [0.8, 0.2], [0.5, 0.5]
    kl_pq = sum(a * math.log(a / b) for a, b in zip(p, q))
    kl_qp = sum(b * math.log(b / a) for a, b in zip(p, q))
    m, out = engine_mismatch(_ConstantTrainer(q), torch.zeros(8000, 1, dtype=torch.long), 5,
                             engine=_ConstantEngine(p), generator=torch.Generator().manual_seed(0))
    # 40,000 tokens: the per-token sd of k1 is 0.55, of k3 0.35 -> standard errors < 0.003; tolerance 0.012.
    assert m["kl"] == pytest.approx(kl_pq, abs=0.012) and m["kl"] > 0
    assert m["k3_kl"] == pytest.approx(kl_pq, abs=0.012)
    assert abs(m["kl"] - kl_qp) > 0.02
    assert m["response_len"] == 5.0 and out.tokens.shape == (8000, 5)


def test_engine_mismatch_of_a_high_precision_engine_is_zero():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(**{**TINY.__dict__, "init_std": 0.5})).eval()  # peaked, not near-uniform
    prompts = torch.randint(0, 16, (6, 4))
    m, _ = engine_mismatch(model, prompts, 5, generator=torch.Generator().manual_seed(1))
    assert abs(m["kl"]) < 1e-5 and abs(m["k3_kl"]) < 1e-6
    cache = Fp8KVCache.from_config(TINY, 6, 9, scales=calibrate_kv_scales(model, [prompts]), backend="torch")
    m8, _ = engine_mismatch(model, prompts, 5, cache=cache, generator=torch.Generator().manual_seed(1))
    assert m8["k3_kl"] > 1e-8  # the FP8 cache does change the engine's distribution


def test_run_drift_from_the_shipped_checkpoint():
    cfg = DriftConfig(n_steps=2, eval_every=1, n_prompts=2, group_size=4, eval_prompts=8, calib_rows=4, lr=1e-3)
    arms_df, steps_df = run_drift(cfg, arms=DEFAULT_ARMS[:4])
    assert sorted(arms_df["step"].unique()) == [0, 1, 2] and len(arms_df) == 3 * 5
    assert list(arms_df["arm"].iloc[:5]) == [HP_ARM, "unit", "once (step 0)", "vllm once", "every step"]
    hp = arms_df[arms_df["arm"] == HP_ARM]
    assert (hp["kl"].abs() < 1e-5).all()
    s0 = arms_df[arms_df["step"] == 0].set_index("arm")
    assert s0.loc["once (step 0)", "kl"] == s0.loc["every step", "kl"]  # same scales at step 0
    once = arms_df[arms_df["arm"] == "once (step 0)"]["k_scale_mean"]
    assert once.nunique() == 1  # never refreshed
    assert (arms_df[arms_df["arm"] == "unit"]["k_scale_mean"] == 1.0).all()
    assert steps_df["kl_from_start"].iloc[0] == 0.0 and steps_df["kl_from_start"].iloc[-1] != 0.0
    for col in ("reward", "k_amax", "t_train_s"):
        assert steps_df[col].notna().all(), col
    with pytest.raises(ValueError, match="policy must be one of"):
        run_drift(cfg, arms=[Arm("bad", "sometimes")])
    with pytest.raises(ValueError, match="reserved name"):
        run_drift(cfg, arms=[Arm(HP_ARM, "unit")])


@pytest.mark.parametrize("qk_norm", [False, True])
def test_scale_keys_multiplies_the_calibrated_k_amax(qk_norm):
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(**{**TINY.__dict__, "qk_norm": qk_norm})).eval()
    ids = [torch.randint(0, 16, (3, 8))]
    before = calibrate_kv_scales(model, ids, policy="nemo_rl")
    scale_keys_(model, 2.5)
    after = calibrate_kv_scales(model, ids, policy="nemo_rl")
    torch.testing.assert_close(after.k, 2.5 * before.k, rtol=1e-5, atol=0)  # rtol: fp32 rounding of the products
    assert torch.equal(after.v, before.v)
    with pytest.raises(ValueError, match="factor must be a number > 0"):
        scale_keys_(model, 0)


def test_key_growth_sweep_stale_scales_clip_and_fresh_ones_do_not():
    df = key_growth_sweep("data/grpo_adder", [1.0, 3.0], eval_prompts=16)
    at1 = df[df["factor"] == 1.0].set_index("arm")
    assert at1.loc["once (step 0)", "kl"] == at1.loc["every step", "kl"]
    at3 = df[df["factor"] == 3.0].set_index("arm")
    assert at3.loc["once (step 0)", "k_saturated_fraction"] > 0.01
    assert at3.loc["every step", "k_saturated_fraction"] == 0.0
    assert at3.loc["once (step 0)", "k_amax_growth"] == pytest.approx(3.0, rel=1e-4)


def test_realistic_head_sweep_offsets_spikes_and_qk_norm():
    df = realistic_head_sweep([0.0, 1000.0], head_dim=64, n_head=4, n_kv_head=2, n_tokens=64)
    assert set(df["arm"]) == set(HEAD_SWEEP_ARMS) and len(df) == 2 * 2 * 2 * len(HEAD_SWEEP_ARMS)
    z = df[df["magnitude"] == 0.0].set_index(["qk_norm", "shape", "arm"])["attn_rel_err"]
    assert z.loc[(False, "offset", "unit")] == z.loc[(False, "spike", "unit")]  # no outlier: the same tensors
    big = df[df["magnitude"] == 1000.0].set_index(["qk_norm", "shape", "arm"])
    assert big.loc[(False, "spike", "unit"), "k_saturated_fraction"] > 0  # 1000 > 448 clips at scale 1
    assert big.loc[(True, "spike", "unit"), "k_saturated_fraction"] == 0  # QK-norm bounds |k| by sqrt(D)
    assert big.loc[(True, "spike", "per-tensor amax"), "k_amax"] <= math.sqrt(64) * 1.01
    assert big.loc[(False, "spike", "per-tensor amax"), "attn_rel_err"] > \
        2 * z.loc[(False, "spike", "per-tensor amax")]


def test_holding_threshold():
    sweep = pd.DataFrame({"qk_norm": False, "shape": "offset", "arm": "a", "magnitude": [0, 10, 100, 1000],
                          "attn_rel_err": [0.03, 0.05, 0.07, 0.2]})
    t = holding_threshold(pd.concat([sweep, sweep.assign(arm="b", attn_rel_err=0.03)]))
    assert t.set_index("arm").loc["a", "threshold"] == 100 and math.isnan(t.set_index("arm").loc["b", "threshold"])
    with pytest.raises(ValueError, match="missing columns"):
        holding_threshold(sweep.drop(columns="shape"))


def test_paired_gap():
    g = verdicts.paired_gap([0.5, 0.6, 0.7], [0.2, 0.2, 0.2])
    assert g["diff"] == pytest.approx(0.4) and g["ratio"] == pytest.approx(3.0) and 0 < g["lo"] <= g["hi"]
    with pytest.raises(ValueError, match="same|one non-zero length"):
        verdicts.paired_gap([1.0], [1.0, 2.0])


def _drift_tables(gap_at: dict):
    """Synthetic run_drift tables: k1 of 'every step' 0.2; 'once (step 0)' 0.2 + gap_at[lr] on every evaluation."""
    arms, steps = [], []
    rng = np.random.default_rng(0)
    for lr, gap in gap_at.items():
        for step in range(0, 11, 2):
            noise = float(rng.normal(0, 0.005))
            for arm, k1 in (("every step", 0.2 + noise), ("once (step 0)", 0.2 + gap + noise),
                            ("vllm once", 0.2 + noise), ("unit", 0.21 + noise)):
                arms.append({"variant": "v", "lr": lr, "step": step, "arm": arm, "kl": k1,
                             "k_saturated_fraction": 0.01 if gap else 0.0})
        for step in range(11):
            steps.append({"variant": "v", "lr": lr, "step": step, "k_amax": 1 + step * gap, "reward": 0.5,
                          "kl_from_start": 0.1 * step})
    return pd.DataFrame(arms), pd.DataFrame(steps)


NO_THRESHOLD = {"once (step 0)": {"factor": math.nan, "k_amax_growth": math.nan, "k_saturated_fraction": math.nan}}
THRESHOLD = {"once (step 0)": {"factor": 1.5, "k_amax_growth": 1.5, "k_saturated_fraction": 0.02}}


@pytest.mark.parametrize("gaps, thresholds, want", [
    ({1e-4: 0.3, 1e-3: 0.3}, NO_THRESHOLD, "reproduced"),
    ({1e-4: 0.0, 1e-3: 0.3}, NO_THRESHOLD, "partly"),
    ({1e-4: 0.0, 1e-3: 0.0}, THRESHOLD, "partly"),
    ({1e-4: 0.0, 1e-3: 0.0}, NO_THRESHOLD, "not reproduced"),
    ({1e-4: 0.02, 1e-3: 0.02}, NO_THRESHOLD, "not reproduced"),  # consistent but below STALE_MARGIN
])
def test_recalibration_verdict(gaps, thresholds, want):
    table = verdicts.recalibration_table(*_drift_tables(gaps))
    verdict, reason = verdicts.recalibration_verdict(table, recipe_lr=1e-4, thresholds=thresholds)
    assert verdict == want, reason
    with pytest.raises(ValueError, match="recipe_lr must be one of"):
        verdicts.recalibration_verdict(table, recipe_lr=5.0, thresholds=thresholds)


def test_too_few_evaluations_never_hurt():
    arms, steps = _drift_tables({1e-4: 0.3})
    few = arms[arms["step"] <= 2 * (verdicts.MIN_EVALS - 1)]  # MIN_EVALS - 1 evaluations after step 0
    assert not verdicts.recalibration_table(few, steps)["hurts"].any()
    assert verdicts.recalibration_table(arms, steps).set_index("arm").loc["once (step 0)", "hurts"]


def test_growth_threshold():
    rows = []
    for f, stale, sat in ((1.0, 0.2, 0.0), (1.1, 0.22, 0.001), (1.5, 0.8, 0.02), (2.0, 2.0, 0.05)):
        rows += [{"factor": f, "arm": "every step", "kl": 0.2, "k_amax_growth": f, "k_saturated_fraction": 0.0},
                 {"factor": f, "arm": "once (step 0)", "kl": stale, "k_amax_growth": f, "k_saturated_fraction": sat}]
    t = verdicts.growth_threshold(pd.DataFrame(rows), stale_arm="once (step 0)")
    assert t["factor"] == 1.5 and t["k_saturated_fraction"] == 0.02
    with pytest.raises(ValueError, match="must hold rows of arms"):
        verdicts.growth_threshold(pd.DataFrame(rows), stale_arm="nope")


def test_qk_norm_memory_cost_and_decode_verdicts():
    def th(without, with_):
        return pd.DataFrame([{"qk_norm": False, "shape": "offset", "arm": "per-tensor amax", "threshold": without},
                             {"qk_norm": True, "shape": "offset", "arm": "per-tensor amax", "threshold": with_}])

    assert verdicts.qk_norm_verdict(th(100.0, math.nan), 1e5)[0] == "reproduced"
    assert verdicts.qk_norm_verdict(th(math.nan, math.nan), 1e5)[0] == "partly"
    assert verdicts.qk_norm_verdict(th(math.nan, 100.0), 1e5)[0] == "not reproduced"
    assert verdicts.memory_verdict(147456, 73728, 598688, 598672)[0] == "reproduced"
    assert verdicts.memory_verdict(147456, 73729, 598688, 598672)[0] == "partly"
    assert verdicts.calibration_cost_verdict(0.03)[0] == "partly"
    assert verdicts.calibration_cost_verdict(0.2)[0] == "not reproduced"
    with pytest.raises(ValueError, match="share must be a fraction"):
        verdicts.calibration_cost_verdict(3.0)
    assert verdicts.decode_verdict(1.2, None)[0] == "not testable here"
    assert verdicts.decode_verdict(1.2, {2048: 0.9})[0] == "reproduced"


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
