"""Scale drift under training: how stale FP8 KV scales degrade rollouts while the weights move (notebook 02).

The setup, in one loop (:func:`run_drift`):

* **Task and optimizer.** The decoder learns a synthetic copy task (``copy_len`` random tokens, a separator, the
  same tokens again; loss on the copy) with AdamW at a learning rate high enough that attention sharpens within a
  few dozen steps - which is what moves the q / k / v statistics: without QK-norm the K amax grows ~15x over the
  run, with QK-norm ~1.5x (measured and reported by the notebook). Real optimizer steps on real gradients; not RL
  (the GRPO loop lives elsewhere), but the cache only sees the weights, and they move as they do in training.
* **Outlier variant.** ``outlier_max > 0`` plants a few outlier channels in K that grow with training (linearly
  over the first half of the run, then held): the k_proj bias (Qwen2.5-style ``qkv_bias``) of the lowest-frequency
  RoPE pair of KV head 0 in every layer is set to ``outlier_max * ramp(step)`` after each optimizer step. A
  constant offset on a channel that RoPE barely rotates adds about the same ``q . b`` to every key of a query, so
  the high-precision model's attention hardly changes, while a per-tensor scale must stretch to cover it - the
  mechanism suspected for Qwen2.5-Math-7B's FP8-KV collapse (veRL PR #4435). With QK-norm, the norm runs after
  the bias and bounds what the cache sees.
* **Each step**: (1) recalibrate the arms whose schedule says so (``every_step``: now; ``once``: step 0 only;
  ``never``: 1.0) on the latest training batch (its first ``calib_batch`` sequences), timed; (2) the rollout: sample responses to fresh prompts with the
  high-precision cache at temperature 1, timed; (3) per arm, replay those responses through an FP8 cache with the
  arm's scales, token by token (:meth:`Decoder.decode_logits`: the log-probs the FP8 engine would have reported
  while sampling them), and compare with the trainer's high-precision forward; (4) one optimizer step, timed.

Per step and arm (metric names ``kv/...``): ``attn_rel_err`` (attention output through the FP8 cache vs the
high-precision cache for the same q / k / v, ||o_fp8 - o_hp|| / ||o_hp|| over real tokens, mean over layers, and
``attn_rel_err_max_layer``), ``k3_kl`` and ``kl`` (from :func:`helpers.rl.rollout_correction.mismatch_metrics`,
trainer = high precision, rollout = FP8), ``token_mult_prob_error`` (NeMo-RL: mean over tokens of
exp|logp_fp8 - logp_hp|, 1.0 = identical), ``greedy_agreement`` (argmax under the FP8 replay equals the
high-precision argmax), ``k_saturated_fraction`` / ``v_saturated_fraction`` (entries clipped at +-448), and the
scales themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
import torch.nn.functional as F

from helpers.core.runtime import seed_everything
from helpers.kvcache.cache import attention_reference
from helpers.kvcache.calibration import calibrate_kv_scales, capture_qkv
from helpers.kvcache.fp8 import Fp8KVCache
from helpers.kvcache.scales import KVScales, get_policy
from helpers.models.decoder import Decoder, DecoderConfig
from helpers.rl.rollout_correction import masked_mean, mismatch_metrics

__all__ = ["Arm", "DEFAULT_ARMS", "DriftConfig", "copy_batch", "plant_outliers_", "arm_metrics", "run_drift"]

SEPARATOR = 1  # token id between the source and its copy; ids >= 2 are content


@dataclass(frozen=True)
class Arm:
    """One way to run the FP8 cache: a scale policy, its granularity, and whether Q is FP8 too."""

    name: str
    policy: str
    granularity: str = "tensor"
    fp8_query: bool = False


DEFAULT_ARMS: tuple[Arm, ...] = (
    Arm("unit", "unit"),
    Arm("once (step 0)", "nemo_rl_once"),
    Arm("vllm once", "vllm"),
    Arm("every step", "nemo_rl"),
    Arm("every step, per head", "nemo_rl", granularity="head"),
    Arm("every step, p99.9", "p99.9"),
    Arm("every step, p99.9 per head", "p99.9", granularity="head"),
    Arm("every step + FP8 query", "nemo_rl", fp8_query=True),
)


@dataclass
class DriftConfig:
    """Knobs of :func:`run_drift`."""

    model: DecoderConfig = field(default_factory=lambda: DecoderConfig(
        vocab_size=48, n_layer=2, n_head=4, n_kv_head=2, head_dim=32, d_model=128, d_ff=256, max_seq_len=64))
    """The decoder (``qk_norm`` and ``qkv_bias`` set per variant by the caller)."""
    n_steps: int = 60
    """Optimizer steps."""
    eval_every: int = 1
    """Evaluate the arms every this many steps (and at the last step)."""
    copy_len: int = 12
    """Tokens to copy; sequences are 2 * copy_len + 1 long."""
    train_batch: int = 32
    """Sequences per optimizer step."""
    calib_batch: int = 8
    """Calibration sequences: the first ones of the latest training batch (NeMo-RL calibrates on training data)."""
    rollout_batch: int = 16
    """Prompts per rollout."""
    lr: float = 3e-3
    """AdamW learning rate (no weight decay: nothing holds the activations back)."""
    temperature: float = 1.0
    """Rollout sampling temperature."""
    outlier_max: float = 0.0
    """Final value of the planted K outlier channels (0 = none; needs ``model.qkv_bias``)."""
    seed: int = 0
    """Seeds the model init, the task batches and the sampling."""


def copy_batch(batch: int, copy_len: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Copy-task sequences long ``[batch, 2 * copy_len + 1]``: content ids in [2, vocab), the separator, the copy."""
    src = torch.randint(2, vocab, (batch, copy_len), generator=generator)
    return torch.cat([src, torch.full((batch, 1), SEPARATOR, dtype=torch.long), src], dim=1)


def _outlier_channels(cfg: DecoderConfig) -> list[int]:
    """k_proj output rows of the lowest-frequency RoPE pair (channels D/2 - 1 and D - 1) of KV head 0."""
    d = cfg.head_dim
    return [d // 2 - 1, d - 1]


@torch.no_grad()
def plant_outliers_(model: Decoder, value: float) -> None:
    """Set the k_proj bias of the outlier channels (:func:`_outlier_channels`) of every layer to ``value``."""
    if not model.cfg.qkv_bias:
        raise ValueError("plant_outliers_ needs a model with qkv_bias=True (the outliers live in k_proj.bias)")
    for blk in model.layers:
        blk.self_attn.k_proj.bias[_outlier_channels(model.cfg)] = value


def _attention_errors(captured: dict, arm: Arm, scales: KVScales, cfg: DecoderConfig) -> dict[str, float]:
    """Attention output through an FP8 cache with ``scales`` vs the high-precision cache, same q / k / v."""
    errs = []
    sat_k = sat_v = 0.0
    for layer in range(cfg.n_layer):
        q, k, v, key_mask = captured[layer]
        b, _, t, _ = k.shape
        cache = Fp8KVCache(1, b, t, cfg.n_kv_head, cfg.head_dim, n_head=cfg.n_head, granularity=arm.granularity,
                           fp8_query=arm.fp8_query, scales=KVScales(scales.q[layer:layer + 1],
                                                                    scales.k[layer:layer + 1],
                                                                    scales.v[layer:layer + 1]))
        cache.append(0, k.float(), v.float(), key_mask)
        o_fp8 = cache.attention(0, cache.prepare_query(0, q.float()))  # [B, H, T, D]
        o_hp = attention_reference(q, k, v, key_mask)
        real = key_mask[:, None, :, None].expand_as(o_hp)
        errs.append(float((o_fp8 - o_hp)[real].norm() / o_hp[real].norm().clamp_min(1e-30)))
        sat = cache.saturation_metrics()
        sat_k += sat["k_saturated_fraction"] / cfg.n_layer
        sat_v += sat["v_saturated_fraction"] / cfg.n_layer
    return {"attn_rel_err": sum(errs) / len(errs), "attn_rel_err_max_layer": max(errs),
            "k_saturated_fraction": sat_k, "v_saturated_fraction": sat_v}


@torch.no_grad()
def arm_metrics(model: Decoder, arm: Arm, scales: KVScales, prompt: torch.Tensor, response: torch.Tensor,
                logp_hp: torch.Tensor, logits_hp: torch.Tensor, captured: dict, temperature: float = 1.0
                ) -> dict[str, float]:
    """The per-arm metrics of the module docstring for one rollout (``response`` long ``[B, T_new]``, all
    valid; ``logp_hp`` / ``logits_hp``: the trainer's high-precision log-probs ``[B, T_new]`` and logits
    ``[B, T_new, V]``; ``captured``: :func:`capture_qkv`'s q / k / v of the high-precision forward)."""
    cfg = model.cfg
    b, t_new = response.shape
    cache = Fp8KVCache.from_config(cfg, b, prompt.shape[1] + t_new, granularity=arm.granularity,
                                   fp8_query=arm.fp8_query, scales=scales, backend="torch")
    logits = model.decode_logits(prompt, response, cache=cache)  # [B, T_new, V]
    logp = torch.log_softmax(logits / temperature, -1).gather(-1, response[..., None]).squeeze(-1)
    mask = torch.ones_like(logp)
    mm = mismatch_metrics(logp_hp, logp, mask)
    out = {
        "k3_kl": mm["k3_kl"], "kl": mm["kl"],
        "token_mult_prob_error": float(masked_mean(torch.exp((logp - logp_hp).abs()), mask)),
        "greedy_agreement": float((logits.argmax(-1) == logits_hp.argmax(-1)).float().mean()),
        "replay_k_saturated_fraction": cache.saturation_metrics()["k_saturated_fraction"],
    }
    out.update(_attention_errors(captured, arm, scales, cfg))
    out["k_scale_mean"] = float(scales.k.mean())
    out["v_scale_mean"] = float(scales.v.mean())
    return out


def run_drift(cfg: DriftConfig, arms: Sequence[Arm] = DEFAULT_ARMS, *,
              progress: Callable[[int], None] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train the decoder for ``cfg.n_steps`` optimizer steps and evaluate every arm along the way.

    Returns ``(arms_df, steps_df)``: ``arms_df`` one row per (step, arm) with the metrics of :func:`arm_metrics`
    (names without the ``kv/`` namespace, which the caller adds when logging); ``steps_df`` one row per step with
    the training loss, the high-precision q / k / v amax per layer (max over layers), and the timings in seconds of
    the calibration forward (one ``"nemo_rl"`` calibration), the rollout (sampling with the high-precision cache)
    and the optimizer step. ``progress(step)`` is called after each step (a tqdm ``update``).
    """
    for arm in arms:
        get_policy(arm.policy)  # fail on a bad name before training
    seed_everything(cfg.seed)
    model_cfg = cfg.model if cfg.outlier_max == 0 else replace(cfg.model, qkv_bias=True)
    model = Decoder(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    g_train = torch.Generator().manual_seed(cfg.seed + 1)
    g_roll = torch.Generator().manual_seed(cfg.seed + 2)
    vocab, n = model_cfg.vocab_size, cfg.copy_len
    ramp_steps = max(1, cfg.n_steps // 2)
    train_seq = copy_batch(cfg.train_batch, n, vocab, g_train)
    scales: dict[str, KVScales] = {}
    arm_rows, step_rows = [], []
    for step in range(cfg.n_steps + 1):
        if cfg.outlier_max:
            plant_outliers_(model, cfg.outlier_max * min(1.0, step / ramp_steps))
        evaluate = step % cfg.eval_every == 0 or step == cfg.n_steps
        model.eval()
        # (1) recalibration, per arm schedule; the timed one is NeMo-RL's (all batches, every step).
        t0 = time.perf_counter()
        calib = [train_seq[:cfg.calib_batch]]
        fresh = calibrate_kv_scales(model, calib, policy="nemo_rl")
        t_calib = time.perf_counter() - t0
        for arm in arms:
            pol = get_policy(arm.policy)
            if arm.name in scales and pol.schedule != "every_step":
                continue
            if arm.policy == "nemo_rl" and arm.granularity == "tensor":
                scales[arm.name] = fresh
            else:
                # vLLM calibrates on the engine's first forward: the step-0 rollout prompts.
                batch = [calib[0][:, :n + 1]] if arm.policy == "vllm" else calib
                scales[arm.name] = calibrate_kv_scales(model, batch, policy=pol, granularity=arm.granularity)
        # (2) the rollout with the high-precision cache.
        prompt = copy_batch(cfg.rollout_batch, n, vocab, g_roll)[:, :n + 1]  # source + separator
        t0 = time.perf_counter()
        out = model.generate(prompt, n, temperature=cfg.temperature, generator=g_roll)
        t_rollout = time.perf_counter() - t0
        # (3) the trainer's view of those tokens, and every arm's replay through its FP8 cache.
        seq = torch.cat([prompt, out.tokens], 1)
        with torch.no_grad(), capture_qkv(model) as captured:
            logits_hp = model(seq)[:, n:-1]  # [B, T_new, V]: the logits that predicted each response token
        logp_hp = torch.log_softmax(logits_hp / cfg.temperature, -1).gather(-1, out.tokens[..., None]).squeeze(-1)
        amax = {name: max(float(captured[i][j].abs().max()) for i in captured) for j, name in enumerate("qkv")}
        if evaluate:
            for arm in arms:
                m = arm_metrics(model, arm, scales[arm.name], prompt, out.tokens, logp_hp, logits_hp, captured,
                                cfg.temperature)
                arm_rows.append({"step": step, "arm": arm.name, **m})
        # (4) one optimizer step on a fresh batch (which is also the next calibration batch).
        loss = float("nan")
        t_train = 0.0
        if step < cfg.n_steps:
            model.train()
            train_seq = copy_batch(cfg.train_batch, n, vocab, g_train)
            t0 = time.perf_counter()
            logits = model(train_seq[:, :-1])
            loss_t = F.cross_entropy(logits[:, n:].reshape(-1, vocab), train_seq[:, n + 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss_t.backward()
            opt.step()
            t_train = time.perf_counter() - t0
            loss = float(loss_t.detach())
        step_rows.append({"step": step, "loss": loss, "q_amax": amax["q"], "k_amax": amax["k"],
                          "v_amax": amax["v"], "hp_logp_mean": float(logp_hp.mean()),
                          "t_calibration_s": t_calib, "t_rollout_s": t_rollout, "t_train_s": t_train})
        if progress is not None:
            progress(step)
    return pd.DataFrame(arm_rows), pd.DataFrame(step_rows)

