"""Where the engine's mismatch comes from: each source toggled on its own, measured on the engine's own samples
(notebook 07).

:func:`measure_engine` builds one engine from a policy, samples ``n_batches`` rollout batches with it and scores the
sampled tokens with the trainer (``r = pi_train / pi_rollout`` on the engine's samples, as NeMo-RL and veRL do):
per-token k1, k3, chi2 and ``token_mult_prob_error``, with their standard errors over batches, and the largest
absolute log-prob difference. :data:`ATTRIBUTION` lists the toggles - the engine dtype, W8A8 per layer group, the
scale format, K / V / Q of the FP8 KV cache and its scale policy, the end-to-end trainer and its weight-sync
variants - and :func:`attribution_table` gives each one's share of the full W8A8 (+ KV) mismatch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch
from scipy import stats

from helpers.grpo import task
from helpers.grpo.engine import EngineConfig, RolloutEngine, prepare_trainer
from helpers.grpo.trainer import sequence_logprobs
from helpers.models.decoder import Decoder
from helpers.rl import rollout_correction as rc

__all__ = ["ATTRIBUTION", "measure_engine", "attribution_table", "last_layer_verdict"]

_W8A8 = dict(linear="fp8", gemm="exact")
# name -> (engine configuration, group, the configuration its share is measured from). The FP8 KV rows sit on the
# BF16 engine so that they are measured alone; "W8A8 + FP8 KV" is the full FP8 engine of notebook 05.
ATTRIBUTION: dict[str, tuple[EngineConfig, str, str | None]] = {
    "fp32 (zero mismatch)": (EngineConfig(dtype="fp32"), "precision", None),
    "bf16": (EngineConfig(), "precision", "fp32 (zero mismatch)"),
    "W8A8 (all linears)": (EngineConfig(**_W8A8), "W8A8 layers", "bf16"),
    "W8A8 attention only": (EngineConfig(**_W8A8, fp8_layers="attn"), "W8A8 layers", "bf16"),
    "W8A8 MLP only": (EngineConfig(**_W8A8, fp8_layers="mlp"), "W8A8 layers", "bf16"),
    "W8A8 first layer only": (EngineConfig(**_W8A8, fp8_layers="first"), "W8A8 layers", "bf16"),
    "W8A8 last layer only": (EngineConfig(**_W8A8, fp8_layers="last"), "W8A8 layers", "bf16"),
    "W8A8 ue8m0 scales": (EngineConfig(**_W8A8, scale_fmt="ue8m0"), "scale format", "bf16"),
    "bf16 + FP8 K": (EngineConfig(kv_cache="fp8", kv_quant="k"), "FP8 KV cache", "bf16"),
    "bf16 + FP8 V": (EngineConfig(kv_cache="fp8", kv_quant="v"), "FP8 KV cache", "bf16"),
    "bf16 + FP8 Q": (EngineConfig(kv_cache="fp8", kv_quant="q"), "FP8 KV cache", "bf16"),
    "bf16 + FP8 K, V": (EngineConfig(kv_cache="fp8"), "FP8 KV cache", "bf16"),
    "bf16 + FP8 Q, K, V": (EngineConfig(kv_cache="fp8", kv_quant="qkv"), "FP8 KV cache", "bf16"),
    "bf16 + FP8 K, V unit scales": (EngineConfig(kv_cache="fp8", kv_policy="unit"), "KV scale policy", "bf16"),
    "W8A8 + FP8 K, V": (EngineConfig(**_W8A8, kv_cache="fp8"), "full FP8 engine", "bf16"),
    "FP8 e2e (fp32 sync)": (EngineConfig(**_W8A8, trainer="fp8"), "FP8 end to end", "bf16"),
    "FP8 e2e, bf16 sync, trainer quantizes fp32": (EngineConfig(**_W8A8, trainer="fp8", sync_dtype="bf16"),
                                                   "FP8 end to end", "bf16"),
    "FP8 e2e, bf16 sync, trainer quantizes bf16": (
        EngineConfig(**_W8A8, trainer="fp8", sync_dtype="bf16", trainer_weight_src="bf16"), "FP8 end to end", "bf16"),
}


@torch.no_grad()
def measure_engine(policy: Decoder, cfg: EngineConfig, *, n_digits: int, batch: int = 64, n_batches: int = 8,
                   temperature: float = 1.0, seed: int = 0) -> dict[str, float]:
    """The mismatch between ``policy`` (the trainer, fp32; fake-quantized when ``cfg.trainer == "fp8"``) and an
    engine ``cfg`` built from it, on ``n_batches`` batches of ``batch`` rollouts the engine samples (problems and
    sampling seeded by ``seed``, the same for every ``cfg``). The FP8 KV scales are calibrated once on the first
    batch's prompts with their correct answers (the fresh-policy state of a run's first step).

    Returns per-token ``k1``, ``k3``, ``chi2``, ``tmpe`` (``token_mult_prob_error``) - each the mean over batches,
    with ``*_se`` its standard error over batches - ``max_abs_logp_diff`` (largest ``|log pi_train - log
    pi_rollout|`` over all sampled tokens), ``frac_ratio_above_2``, ``tokens``, ``trainer_code_mismatch``
    (FP8 trainers: fraction of weight codes that differ between trainer and engine) and ``k1_batches`` (the
    per-batch k1: the same ``seed`` draws the same problems and sampling noise for every configuration, so batches
    pair across configurations)."""
    trainer = Decoder(policy.cfg)
    trainer.load_state_dict(policy.state_dict())
    trainer = prepare_trainer(trainer.float().eval(), cfg)
    a_len = task.answer_len(n_digits)
    g = torch.Generator().manual_seed(seed)
    probs = [task.sample_problems(batch, n_digits, g) for _ in range(n_batches)]
    calib = torch.cat([task.encode_prompts(probs[0]), task.encode_answers(probs[0])], 1)
    engine = RolloutEngine(trainer, cfg, batch=batch, max_len=task.prompt_len(n_digits) + a_len, calib_batch=calib,
                           noise_seed=seed)
    audit = engine.audit(trainer)
    per, worst, tokens = [], 0.0, 0
    for pr in probs:
        prompts = task.encode_prompts(pr)
        out = engine.generate(prompts, a_len, temperature=temperature, eos_id=task.EOS, pad_id=task.PAD,
                              generator=g)
        lt = sequence_logprobs(trainer, prompts, out.tokens, temperature)
        m = out.mask.float()
        mm = rc.mismatch_metrics(lt, out.logprobs, m, threshold=2.0)
        per.append([mm["kl"], mm["k3_kl"], mm["chi2_token"], mm["token_mult_prob_error"], mm["fraction_truncated"]])
        worst = max(worst, float((lt - out.logprobs).abs()[out.mask].max()))
        tokens += int(m.sum())
    a = np.asarray(per)
    mean, se = a.mean(0), a.std(0, ddof=1) / np.sqrt(len(a)) if len(a) > 1 else np.full(a.shape[1], np.nan)
    keys = ["k1", "k3", "chi2", "tmpe", "frac_ratio_above_2"]
    out = {k: float(v) for k, v in zip(keys, mean)}
    out.update({f"{k}_se": float(v) for k, v in zip(keys, se)})
    out["k1_batches"] = tuple(float(v) for v in a[:, 0])  # per batch: paired across configurations (same seed)
    out.update({"max_abs_logp_diff": worst, "tokens": float(tokens),
                "trainer_code_mismatch": audit.get("engine/trainer_code_mismatch", float("nan"))})
    return out


def attribution_table(policy: Decoder, *, n_digits: int, block: int = 64,
                      configs: dict[str, tuple[EngineConfig, str, str | None]] | None = None,
                      progress: bool = True, **kw) -> pd.DataFrame:
    """:func:`measure_engine` for every entry of ``configs`` (default :data:`ATTRIBUTION`) with FP8 weight blocks
    ``block x block``; per row the toggle's ``group``, its mismatch, and its ``share_k1`` / ``share_chi2``: its
    excess over the configuration it is measured from (``base``), as a fraction of the full FP8 engine's excess
    over BF16 ("W8A8 + FP8 K, V" minus "bf16"). Keyword arguments go to :func:`measure_engine`."""
    from tqdm.auto import tqdm

    configs = ATTRIBUTION if configs is None else configs
    rows = {}
    for name, (cfg, group, base) in tqdm(configs.items(), disable=not progress, desc="attribution"):
        cfg = dataclasses.replace(cfg, block_size=(block, block))
        rows[name] = {"toggle": name, "group": group, "base": base or "-", **measure_engine(policy, cfg,
                                                                                            n_digits=n_digits, **kw)}
    out = pd.DataFrame(rows.values())
    full, bf16 = rows.get("W8A8 + FP8 K, V"), rows.get("bf16")
    for col in ("k1", "chi2"):
        excess = [r[col] - rows[r["base"]][col] if r["base"] in rows else np.nan for r in rows.values()]
        denom = full[col] - bf16[col] if full and bf16 else np.nan
        out[f"share_{col}"] = np.asarray(excess) / denom
    return out


def last_layer_verdict(table: pd.DataFrame, *, full: str = "W8A8 (all linears)",
                       without_last: str = "W8A8 first layer only") -> tuple[str, str, str]:
    """NeMo-RL's observation that keeping the last layers in BF16 does not reduce the FP8 mismatch, decided from
    :func:`attribution_table`: the reduction of k1 when the last decoder layer stays BF16, ``k1(full) -
    k1(without_last)``, with a 95 % interval from the two rows' standard errors over batches.

    The interval is paired over batches when the table has ``k1_batches`` (same problems and sampling noise per
    batch in every configuration: most sampled rows are identical, so the per-batch k1 values are correlated), a t
    interval on the per-batch differences; otherwise it combines the two standard errors as independent.
    Reproduced ("does not help") when the interval includes 0 and its upper end is below half of ``k1(full)``
    (the reduction expected if the mismatch were spread evenly over this model's two layers: the test could have
    seen that much); not reproduced when the interval lies above 0; inconclusive otherwise. Returns ``(claim,
    verdict, reason)``."""
    t = table.set_index("toggle")
    a, b = t.loc[full], t.loc[without_last]
    red = a.k1 - b.k1
    if "k1_batches" in t.columns and isinstance(a.k1_batches, tuple) and len(a.k1_batches) > 1:
        d = np.asarray(a.k1_batches) - np.asarray(b.k1_batches)
        half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
        how = f"paired over {len(d)} batches"
    else:
        half = 1.96 * float(np.hypot(a.k1_se, b.k1_se))
        how = "independent SEs"
    lo, hi = red - half, red + half
    if lo > 0:
        v = "not reproduced"
    elif hi < a.k1 / 2:
        v = "reproduced"
    else:
        v = "inconclusive"
    why = (f"k1 per token with every linear in W8A8 {a.k1:.2e} +- {a.k1_se:.1e} (SE), with the last layer in BF16 "
           f"{b.k1:.2e} +- {b.k1_se:.1e}: reduction {red:+.2e} [{lo:+.2e}, {hi:+.2e}] (95 %, {how}), against half of the "
           f"full k1 ({a.k1 / 2:.2e}) that an even spread over the 2 layers would remove")
    return "Keeping the last layers in BF16 does not reduce the FP8 mismatch (NeMo-RL)", v, why
