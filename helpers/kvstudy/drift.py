"""Scale drift in the RL regime: do stale FP8 KV scales degrade the rollout engine while a trained policy takes
RL updates, and at which learning rate does per-step recalibration start to matter (notebook 02)?

The setup, in one loop (:func:`run_drift`):

* **Start** from a trained policy (a :func:`helpers.grpo.pretrain.save_policy` checkpoint: notebook 05's adder, or
  its no-QK-norm twin shipped in ``data/``), not from a random init: the step-0 scales are computed on activations
  that already carry the task, as after SFT.
* **Updates** are RL updates: each step samples ``n_prompts x group_size`` answers with the high-precision policy
  (on-policy), scores them with the task's exact-match reward, takes GRPO advantages (group mean and std) and makes
  one AdamW step on the policy-gradient loss ``-mean_t(A * log pi)`` (the on-policy gradient of the clipped
  surrogate: the ratio is 1 at the first mini-batch) with weight decay and gradient clipping as notebook 05's
  recipe. The learning rate is the knob: the recipe's, and 10x / 100x above it, so that activations move.
* **Scales** per arm, on its schedule (:data:`DEFAULT_ARMS`): ``unit`` (1.0), ``once (step 0)`` (NeMo-RL's formula
  at step 0 only), ``vllm once`` (amax/200, /200, /100 on the first forward: the step-0 prompts), ``every step``
  (NeMo-RL: recomputed after every update), ``every step, p99.9`` and the per-head and FP8-query variants. NeMo-RL
  calibrates on training data: here the latest rollout (prompts + sampled answers, padding masked); at step 0 the
  prompts with their correct answers.
* **Measured on the engine's own samples** (:func:`engine_mismatch`): every ``eval_every`` steps each arm *samples*
  answers to the same fresh prompts through its FP8 cache (the log-probs the FP8 engine reports while sampling:
  ``pi_rollout``), the trainer scores those tokens in high precision (``pi_train``), and
  :func:`helpers.rl.rollout_correction.mismatch_metrics` takes ``r = pi_train / pi_rollout`` on them - the direction
  NeMo-RL's ``token_mult_prob_error`` and veRL's rollout-correction metrics use. ``kl`` is then the k1 estimate and
  ``k3_kl`` the k3 estimate of KL(pi_rollout || pi_train), both with the right sign. A high-precision cache arm
  (``hp cache``) gives the floor (same model, same weights: exactly 0 up to float rounding).

Per evaluation and arm (no namespace; the caller adds ``kv/``): the mismatch metrics (``kl``, ``k3_kl``,
``token_mult_prob_error``, ``chi2_token``), the arm's reward, the saturated K / V fractions of the FP8 writes, and
the arm's mean K scale. Per step: the RL reward, the high-precision q / k / v amax (from the fresh calibration:
the amax over the calibration batch), the policy's KL from its starting point (k1 on its own samples), and the
timings of the calibration forward, the rollout and the update.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from helpers.core.runtime import seed_everything
from helpers.fp8.format import FP8_E4M3_MAX
from helpers.grpo import task
from helpers.grpo.pretrain import load_policy
from helpers.kvcache.calibration import calibrate_kv_scales
from helpers.kvcache.fp8 import Fp8KVCache
from helpers.kvcache.scales import NEMO_RL_MARGIN, KVScales, get_policy
from helpers.models.decoder import Decoder
from helpers.rl.advantages import grpo_advantages
from helpers.rl.rollout_correction import mismatch_metrics

__all__ = ["Arm", "DEFAULT_ARMS", "HP_ARM", "DriftConfig", "engine_mismatch", "sequence_logprobs", "run_drift",
           "scale_keys_", "key_growth_sweep", "resolve_checkpoint"]

HP_ARM = "hp cache"
"""Name of the reference arm: the same engine with a high-precision cache (mismatch 0 up to float rounding)."""


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
    Arm("every step, p99.9", "p99.9"),
    Arm("every step, per head", "nemo_rl", granularity="head"),
    Arm("every step + FP8 query", "nemo_rl", fp8_query=True),
)


@dataclass
class DriftConfig:
    """Knobs of :func:`run_drift` (notebook 05's recipe where one exists)."""

    checkpoint: str | Path = "data/grpo_adder"
    """Path stem of the starting policy (``<stem>.safetensors`` + ``<stem>.json``), relative to the repo or absolute."""
    n_steps: int = 40
    """RL steps (one AdamW step each)."""
    eval_every: int = 2
    """Evaluate the arms every this many steps (and at the last step)."""
    lr: float = 1e-4
    """AdamW learning rate (notebook 05's recipe: 1e-4)."""
    weight_decay: float = 0.1
    """AdamW weight decay (notebook 05)."""
    grad_clip: float = 1.0
    """Gradient-norm clip (notebook 05)."""
    n_prompts: int = 16
    """Prompts per RL step."""
    group_size: int = 8
    """Answers per prompt (GRPO groups)."""
    eval_prompts: int = 64
    """Prompts every arm answers at an evaluation (the same prompts and random stream for every arm)."""
    calib_rows: int = 16
    """Rows of the latest rollout used as the calibration batch (NeMo-RL calibrates on training data)."""
    temperature: float = 1.0
    """Sampling temperature (also applied to the trainer's log-probs)."""
    seed: int = 0
    """Seeds the prompts, the sampling and the update order."""


def sequence_logprobs(model: Decoder, prompts: torch.Tensor, responses: torch.Tensor, temperature: float
                      ) -> torch.Tensor:
    """Trainer log-probs fp32 ``[B, T]`` of ``responses`` long ``[B, T]`` after ``prompts`` ``[B, T0]``:
    ``log_softmax(logits / temperature)`` of one full-sequence forward (no cache). Carries the gradient; positions
    after EOS hold meaningless values (the caller masks them)."""
    seq = torch.cat([prompts, responses], dim=1)
    logits = model(seq[:, :-1])[:, prompts.shape[1] - 1:]  # position t predicts token t + 1: [B, T, V]
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, responses[..., None]).squeeze(-1)


@torch.no_grad()
def engine_mismatch(trainer: Any, prompts: torch.Tensor, max_new_tokens: int, *, cache: Any = None,
                    engine: Any = None, temperature: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
                    generator: torch.Generator | None = None) -> tuple[dict[str, float], Any]:
    """Mismatch between a rollout engine and the trainer, on the **engine's own samples**.

    The engine (``engine``, default ``trainer``: the same weights) samples ``max_new_tokens`` after ``prompts`` long
    ``[B, T0]`` through ``cache`` (``engine.generate(..., cache=cache)``: tokens, their sampling log-probs
    ``logp_rollout`` and the valid mask ``[B, T_new]``); the trainer scores the same tokens in one forward
    (``logp_train``, :func:`sequence_logprobs`). Returns ``(metrics, generation)``: ``metrics`` is
    :func:`helpers.rl.rollout_correction.mismatch_metrics(logp_train, logp_rollout, mask)` (``r = pi_train /
    pi_rollout``; ``kl`` = k1 and ``k3_kl`` = k3 estimates of KL(pi_rollout || pi_train) >= 0 in expectation)
    plus ``response_len`` (valid tokens per row); ``generation`` is the engine's output.
    """
    engine = trainer if engine is None else engine
    out = engine.generate(prompts, max_new_tokens, temperature=temperature, eos_id=eos_id, pad_id=pad_id,
                          generator=generator, cache=cache)
    logp_train = sequence_logprobs(trainer, prompts, out.tokens, temperature)
    mask = out.mask.float()
    metrics = mismatch_metrics(logp_train, out.logprobs, mask)
    metrics["response_len"] = float(mask.sum(-1).mean())
    return metrics, out


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` as given when absolute, else relative to the repository root (notebooks run from notebooks/)."""
    from helpers.core.runtime import REPO_ROOT

    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def _problems(n: int, n_digits: int, g: torch.Generator, group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    probs = task.sample_problems(n, n_digits, g).repeat_interleave(group, 0)
    return task.encode_prompts(probs), task.encode_answers(probs)


def run_drift(cfg: DriftConfig, arms: Sequence[Arm] = DEFAULT_ARMS, *,
              progress: Callable[[int], None] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RL-train the checkpoint's policy for ``cfg.n_steps`` steps and evaluate every arm along the way.

    Returns ``(arms_df, steps_df)``: ``arms_df`` one row per (evaluated step, arm) - the ``hp cache`` reference
    first - with the metrics of the module docstring; ``steps_df`` one row per step (``step``, ``reward``,
    ``q_amax`` / ``k_amax`` / ``v_amax`` (max over layers, from the fresh calibration), ``kl_from_start``,
    ``t_calibration_s`` / ``t_rollout_s`` / ``t_train_s``). ``progress(step)`` is called after each step.
    """
    for arm in arms:
        get_policy(arm.policy)  # fail on a bad name before training
    if HP_ARM in {a.name for a in arms}:
        raise ValueError(f"arms must not use the reserved name {HP_ARM!r}")
    seed_everything(cfg.seed)
    policy, meta = load_policy(resolve_checkpoint(cfg.checkpoint))
    start = copy.deepcopy(policy).eval()
    n_digits = int(meta.get("pretrain", {}).get("n_digits", 5))
    a_len, p_len = task.answer_len(n_digits), task.prompt_len(n_digits)
    if policy.cfg.max_seq_len < p_len + a_len:
        raise ValueError(f"checkpoint {cfg.checkpoint}: max_seq_len {policy.cfg.max_seq_len} < {p_len + a_len}")
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g_prompt = torch.Generator().manual_seed(cfg.seed + 1)
    g_sample = torch.Generator().manual_seed(cfg.seed + 2)
    g_eval = torch.Generator().manual_seed(cfg.seed + 3)
    n_rows = cfg.n_prompts * cfg.group_size
    # Step-0 calibration batch: prompts with their correct answers (teacher-forced, as after SFT).
    c_prompts, c_answers = _problems(cfg.calib_rows, n_digits, g_prompt)
    calib: tuple[torch.Tensor, torch.Tensor] = (torch.cat([c_prompts, c_answers], 1),
                                                torch.ones(cfg.calib_rows, p_len + a_len, dtype=torch.bool))
    vllm_batch = c_prompts  # vLLM calibrates on the engine's first forward: the first prompts' prefill
    caches = {arm.name: Fp8KVCache.from_config(policy.cfg, cfg.eval_prompts, p_len + a_len,
                                               granularity=arm.granularity, fp8_query=arm.fp8_query,
                                               backend="torch") for arm in arms}
    scales: dict[str, KVScales] = {}
    arm_rows, step_rows = [], []
    for step in range(cfg.n_steps + 1):
        policy.eval()
        # (1) recalibration on the arms' schedules; the timed one is NeMo-RL's (every step).
        t0 = time.perf_counter()
        fresh = calibrate_kv_scales(policy, [calib], policy="nemo_rl")
        t_calib = time.perf_counter() - t0
        for arm in arms:
            pol = get_policy(arm.policy)
            if arm.name in scales and pol.schedule != "every_step":
                continue
            if arm.policy == "nemo_rl" and arm.granularity == "tensor":
                scales[arm.name] = fresh
            else:
                batch = [vllm_batch] if arm.policy == "vllm" else [calib]
                scales[arm.name] = calibrate_kv_scales(policy, batch, policy=pol, granularity=arm.granularity)
            caches[arm.name].set_scales(scales[arm.name])
        amax = {n: float(getattr(fresh, n).max()) * FP8_E4M3_MAX / NEMO_RL_MARGIN for n in "qkv"}
        # (2) evaluation: every arm samples the same prompts with the same random stream.
        if step % cfg.eval_every == 0 or step == cfg.n_steps:
            e_prompts, e_answers = _problems(cfg.eval_prompts, n_digits, g_eval)
            seed_eval = int(torch.randint(0, 2**31 - 1, (), generator=g_eval))
            for name in (HP_ARM, *caches):
                cache = None if name == HP_ARM else caches[name]
                m, out = engine_mismatch(policy, e_prompts, a_len, cache=cache, temperature=cfg.temperature,
                                         eos_id=task.EOS, pad_id=task.PAD,
                                         generator=torch.Generator().manual_seed(seed_eval))
                row = {"step": step, "arm": name, **m, "reward": float(task.rewards(out.tokens, e_answers).mean())}
                if cache is not None:
                    row.update(cache.saturation_metrics())
                    row["k_scale_mean"] = float(scales[name].k.mean())
                arm_rows.append(row)
        # (3) the RL rollout (high precision, on-policy) and (4) one update.
        prompts, answers = _problems(cfg.n_prompts, n_digits, g_prompt, cfg.group_size)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = policy.generate(prompts, a_len, temperature=cfg.temperature, eos_id=task.EOS, pad_id=task.PAD,
                                  generator=g_sample)
        t_roll = time.perf_counter() - t0
        reward = task.rewards(out.tokens, answers)
        mask = out.mask.float()
        with torch.no_grad():
            d = sequence_logprobs(policy, prompts, out.tokens, cfg.temperature) - \
                sequence_logprobs(start, prompts, out.tokens, cfg.temperature)
            kl_start = float((d * mask).sum() / mask.sum())  # k1 of KL(pi_now || pi_start) on pi_now's samples
        t_train = 0.0
        if step < cfg.n_steps:
            policy.train()
            t0 = time.perf_counter()
            adv = grpo_advantages(reward, cfg.group_size)  # [n_rows]
            logp = sequence_logprobs(policy, prompts, out.tokens, cfg.temperature)
            loss = -(adv[:, None] * logp * mask).sum() / mask.sum()  # token-mean policy gradient
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            opt.step()
            t_train = time.perf_counter() - t0
        # The next calibration batch: this rollout's first rows (prompt + sampled answer, padding masked).
        rows = slice(0, min(cfg.calib_rows, n_rows))
        calib = (torch.cat([prompts[rows], out.tokens[rows]], 1),
                 torch.cat([torch.ones_like(prompts[rows], dtype=torch.bool), out.mask[rows]], 1))
        step_rows.append({"step": step, "reward": float(reward.mean()), "q_amax": amax["q"], "k_amax": amax["k"],
                          "v_amax": amax["v"], "kl_from_start": kl_start, "t_calibration_s": t_calib,
                          "t_rollout_s": t_roll, "t_train_s": t_train})
        if progress is not None:
            progress(step)
    return pd.DataFrame(arm_rows), pd.DataFrame(step_rows)


@torch.no_grad()
def scale_keys_(model: Decoder, factor: float) -> None:
    """Multiply every layer's keys by ``factor`` in place: ``k_norm.weight`` with QK-norm (the only way K can grow
    past the norm), else ``k_proj`` weight and bias. A controlled stand-in for K drift: the model's attention
    sharpens (scores x ``factor``) as it does when K grows in training."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ValueError(f"factor must be a number > 0, got {factor!r}")
    for blk in model.layers:
        attn = blk.self_attn
        if model.cfg.qk_norm:
            attn.k_norm.weight.mul_(factor)
        else:
            attn.k_proj.weight.mul_(factor)
            if attn.k_proj.bias is not None:
                attn.k_proj.bias.mul_(factor)


def key_growth_sweep(checkpoint: str | Path, factors: Sequence[float], *, arms: Sequence[Arm] = DEFAULT_ARMS[:4],
                     eval_prompts: int = 256, temperature: float = 1.0, seed: int = 0) -> pd.DataFrame:
    """Where stale scales start to hurt: calibrate every arm on the checkpoint as it is (step 0), then grow its keys
    by each factor in ``factors`` (:func:`scale_keys_`) and measure on the engine's own samples with the stale
    scales (``once`` / ``vllm once`` keep the step-0 ones; ``every step`` arms recalibrate on the grown model).

    Rows ``(factor, arm, k_amax_growth, kl, k3_kl, token_mult_prob_error, k_saturated_fraction, reward, ...)``;
    the ``hp cache`` rows are the floor. Same prompts and random stream for every arm and factor.
    """
    base, meta = load_policy(resolve_checkpoint(checkpoint))
    n_digits = int(meta.get("pretrain", {}).get("n_digits", 5))
    a_len, p_len = task.answer_len(n_digits), task.prompt_len(n_digits)
    g = torch.Generator().manual_seed(seed + 1)
    c_prompts, c_answers = _problems(32, n_digits, g)
    calib = (torch.cat([c_prompts, c_answers], 1), torch.ones(32, p_len + a_len, dtype=torch.bool))
    e_prompts, e_answers = _problems(eval_prompts, n_digits, g)
    stale = {a.name: calibrate_kv_scales(base, [c_prompts] if a.policy == "vllm" else [calib], policy=a.policy,
                                         granularity=a.granularity) for a in arms}
    k0 = float(calibrate_kv_scales(base, [calib], policy="nemo_rl").k.max())
    rows = []
    for factor in factors:
        model = copy.deepcopy(base).eval()
        scale_keys_(model, factor)
        fresh_k = float(calibrate_kv_scales(model, [calib], policy="nemo_rl").k.max())
        for name in (HP_ARM, *(a.name for a in arms)):
            arm = next((a for a in arms if a.name == name), None)
            cache = None
            if arm is not None:
                pol = get_policy(arm.policy)
                s = stale[name] if pol.schedule != "every_step" else calibrate_kv_scales(
                    model, [calib], policy=pol, granularity=arm.granularity)
                cache = Fp8KVCache.from_config(model.cfg, eval_prompts, p_len + a_len, granularity=arm.granularity,
                                               fp8_query=arm.fp8_query, scales=s, backend="torch")
            m, out = engine_mismatch(model, e_prompts, a_len, cache=cache, temperature=temperature, eos_id=task.EOS,
                                     pad_id=task.PAD, generator=torch.Generator().manual_seed(seed + 7))
            row = {"factor": factor, "arm": name, "k_amax_growth": fresh_k / k0, **m,
                   "reward": float(task.rewards(out.tokens, e_answers).mean())}
            if cache is not None:
                row.update(cache.saturation_metrics())
            rows.append(row)
    return pd.DataFrame(rows)
