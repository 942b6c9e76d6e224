"""GRPO with a separate rollout engine and rollout correction: the trainer loop of notebook 05.

One RL step (veRL's order; DAPO recipe numbers from ``verl-recipe/low_precision/
run_dapo_qwen3_moe_30b_megatron_fp8e2e.sh``, scaled down):

1. **prompts**: ``n_prompts`` problems drawn from a generator seeded by ``(seed, step)`` only, so every arm run
   with the same seed trains on the same prompts (paired seeds);
2. **rollout**: the engine samples ``group_size`` answers per prompt at ``temperature`` and records their log-probs
   ``logp_rollout`` (its own distribution);
3. **reward and advantages**: exact-match reward, GRPO advantages (:func:`helpers.rl.advantages.grpo_advantages`);
4. **old log-probs**: the trainer recomputes ``logp_old`` of the sampled tokens with its fp32 policy;
5. **rollout correction**: from ``logp_old`` and ``logp_rollout`` - token / sequence TIS weights or an MIS mask
   (:class:`Correction`); mismatch metrics (k1, k3, ``token_mult_prob_error``, truncated fraction);
6. **update**: ``n_minibatches`` AdamW steps on the clipped surrogate (clip 0.2 / 0.28, dual clip 10),
   ``token-mean`` aggregation, grad-norm clip 1.0;
7. **weight sync**: the engine receives the new weights (FP8 re-quantization in place) and recalibrates its KV
   scales; the step's phases are timed.

Metrics are gathered on the host once per step (a dict per step); nothing inside the loss path syncs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from helpers.grpo import task
from helpers.grpo.engine import EngineConfig, RolloutEngine, prepare_trainer
from helpers.models.decoder import Decoder
from helpers.rl import rollout_correction as rc
from helpers.rl.config import PRESETS, apply_rollout_correction
from helpers.rl.advantages import grpo_advantages
from helpers.rl.losses import CLIP, CLIP_HIGH_DAPO, agg_loss, clipped_surrogate

__all__ = ["Correction", "CORRECTIONS", "GRPOConfig", "sequence_logprobs", "run_grpo", "evaluate_policy",
           "eval_generator"]

CORRECTION_KINDS = ("none", "is", "mis", "verl")
# Short labels of the veRL presets the GRPO loop runs (helpers.rl.config.PRESETS; bypass mode with the PPO-clip loss
# only: the REINFORCE loss of bypass mode is not wired into this loop).
PRESET_LABELS = {"decoupled_token_icepop": "token IcePop", "decoupled_geo_rs": "Geo-RS", "decoupled_k3_rs": "K3-RS",
                 "decoupled_seq_is_rs": "Seq-MIS", "decoupled_geo_rs_token_tis": "Geo-RS + token TIS",
                 "decoupled_k3_rs_token_tis": "K3-RS + token TIS", "bypass_ppo_clip": "bypass PPO-clip"}
# Rollout rows (prompt + response) the FP8 KV scales are recalibrated on after each update: NeMo-RL calibrates on a
# few training micro-batches, not the whole batch; 16 rows of this task are ~430 tokens, enough for a stable amax,
# and keep the calibration forward a small part of the step.
KV_CALIB_ROWS = 16


@dataclass(frozen=True)
class Correction:
    """A rollout-correction mode: ``kind`` "none", "is" (importance weights ``min(r, threshold)`` at ``level``;
    ``threshold=inf`` is plain IS), "mis" (reject tokens / sequences whose ratio is outside
    ``[1/threshold, threshold]``) or "verl" (veRL's preset ``preset`` of :data:`helpers.rl.config.PRESETS`, applied
    by :func:`helpers.rl.config.apply_rollout_correction`: IcePop, the rejection family, bypass PPO-clip)."""

    kind: str = "none"
    level: str = "token"
    threshold: float = 2.0
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in CORRECTION_KINDS:
            raise ValueError(f"kind must be one of {CORRECTION_KINDS}, got {self.kind!r}")
        if (self.kind == "verl") != (self.preset is not None):
            raise ValueError(f"preset goes with kind 'verl' (and only with it), got kind={self.kind!r}, "
                             f"preset={self.preset!r}")
        if self.preset is not None and self.preset not in PRESET_LABELS:
            raise ValueError(f"preset must be one of {sorted(PRESET_LABELS)}, got {self.preset!r}")
        if self.level not in rc.LEVELS:
            raise ValueError(f"level must be one of {sorted(rc.LEVELS)}, got {self.level!r}")
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold!r}")

    @property
    def label(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "verl":
            return PRESET_LABELS[self.preset]
        if self.kind == "mis":
            return f"{self.level} MIS"
        if math.isinf(self.threshold):
            return f"{self.level} IS"
        return f"{self.level} TIS"


# The corrections of the issue: none, token TIS (C = 2), token IS without a cap (isolates what truncation does),
# token MIS ([1/2, 2]) and one sequence-level variant (sequence TIS, C = 2).
CORRECTIONS = {
    "none": Correction("none"),
    "token_tis": Correction("is", "token", 2.0),
    "token_is": Correction("is", "token", math.inf),
    "token_mis": Correction("mis", "token", 2.0),
    "seq_tis": Correction("is", "sequence", 2.0),
    # veRL's current presets (helpers.rl.config): IcePop (weights 0 outside [0.5, 5], denominator unchanged), Geo-RS
    # (reject sequences whose geometric-mean ratio leaves [0.999, 1.001]), K3-RS (reject sequences with mean
    # k3 > 0.01), Seq-MIS (sequence TIS + sequence rejection [0.5, 2]) and bypass mode (pi_old := pi_rollout).
    "icepop": Correction("verl", preset="decoupled_token_icepop"),
    "geo_rs": Correction("verl", preset="decoupled_geo_rs"),
    "k3_rs": Correction("verl", preset="decoupled_k3_rs"),
    "seq_mis": Correction("verl", preset="decoupled_seq_is_rs"),
    "bypass": Correction("verl", preset="bypass_ppo_clip"),
}


@dataclass
class GRPOConfig:
    """Knobs of :func:`run_grpo` (veRL names in brackets)."""

    steps: int = 150
    """RL steps."""
    n_prompts: int = 8
    """Prompts per step [data.train_batch_size]."""
    group_size: int = 8
    """Answers per prompt [actor_rollout_ref.rollout.n]."""
    temperature: float = 1.0
    """Sampling temperature, also applied to the trainer's log-probs [rollout.temperature]."""
    lr: float = 1e-4
    """AdamW learning rate [actor.optim.lr] (1e-6 at 30B scale; this 70k-parameter model takes more; 1e-3
    collapsed it to reward 0 within 5 steps)."""
    weight_decay: float = 0.1
    """AdamW weight decay [actor.optim.weight_decay]."""
    grad_clip: float = 1.0
    """Gradient-norm clip [actor.grad_clip]."""
    n_minibatches: int = 2
    """Optimizer steps per RL step (mini-batches of the rollout batch) [ppo_mini_batch_size]."""
    clip_low: float = CLIP
    """[actor.clip_ratio_low]."""
    clip_high: float = CLIP_HIGH_DAPO
    """[actor.clip_ratio_high]."""
    clip_c: float = 10.0
    """Dual-clip constant [actor.clip_ratio_c]."""
    loss_agg_mode: str = "token-mean"
    """[actor.loss_agg_mode]."""
    norm_by_std: bool = True
    """GRPO (True) or Dr.GRPO (False) advantages [algorithm.norm_adv_by_std_in_grpo]."""
    n_digits: int = 10
    """Digits per operand (answer length 2 n + 1; the shipped policy data/grpo_adder10 is trained on 10)."""
    eval_every: int = 10
    """Steps between evaluations of the trainer's policy (0: never)."""
    n_eval: int = 512
    """Evaluation problems per evaluation, sampled at ``temperature`` with the trainer's fp32 policy. Problems and
    sampling noise are drawn per (seed, step): every arm of a seed sees the same draws (paired), and the draws
    differ between seeds and evaluations, so evaluation noise averages out over seeds and over the curve."""
    audit_sync: bool = True
    """After every weight sync, check that the engine holds a fresh quantization of the trainer's weights
    (:meth:`RolloutEngine.audit`); a mismatch stops the run with :class:`WeightSyncAuditError`."""


def sequence_logprobs(model: Decoder, prompts: torch.Tensor, responses: torch.Tensor, temperature: float
                      ) -> torch.Tensor:
    """Log-probs fp32 ``[B, T]`` of ``responses`` long ``[B, T]`` after ``prompts`` ``[B, T0]`` under ``model`` at
    ``temperature`` (``log_softmax(logits / temperature)``, as the engine samples). Carries the gradient; the
    caller masks padding (positions after EOS hold meaningless values)."""
    seq = torch.cat([prompts, responses], dim=1)
    logits = model(seq[:, :-1])[:, prompts.shape[1] - 1:]  # position t predicts token t + 1: [B, T, V]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, responses[..., None]).squeeze(-1)


# Evaluation draws are seeded apart from the training streams (prompts: seed * 100_003 + step; sampling: seed).
EVAL_SEED_OFFSET = 10_007


def eval_generator(seed: int, step: int) -> torch.Generator:
    """The generator of the evaluation at ``step`` of a run with ``seed``: problems and sampling noise shared by
    every arm of that seed, different for every seed and step."""
    return torch.Generator().manual_seed(EVAL_SEED_OFFSET + 1_000_003 * seed + step)


@torch.no_grad()
def evaluate_policy(model: Decoder, cfg: GRPOConfig, seed: int, step: int) -> float:
    """Exact-match accuracy of ``model`` sampled at ``cfg.temperature`` on ``cfg.n_eval`` problems drawn by
    :func:`eval_generator` ``(seed, step)``."""
    g = eval_generator(seed, step)
    probs = task.sample_problems(cfg.n_eval, cfg.n_digits, g)
    out = model.generate(task.encode_prompts(probs), task.answer_len(cfg.n_digits), temperature=cfg.temperature,
                         eos_id=task.EOS, pad_id=task.PAD, generator=g)
    return float(task.rewards(out.tokens, task.encode_answers(probs)).mean())


def run_grpo(policy: Decoder, engine_cfg: EngineConfig, correction: Correction, cfg: GRPOConfig, seed: int, *,
             on_sync: Callable[[int, Decoder, RolloutEngine], None] | None = None) -> list[dict[str, float]]:
    """Train a copy of ``policy`` with GRPO from rollouts of an engine ``engine_cfg``; returns one metrics dict
    per step (names ``reward/...``, ``mismatch/...``, ``correction/...``, ``actor/...``, ``time/...``,
    ``engine/...``, ``eval/acc`` every ``eval_every`` steps and after the last; with an FP8 (end-to-end) trainer also
    ``eval/acc_master``: its fp32 master weights evaluated without quantization on the same draws, which separates
    what serving the policy in W8A8 costs from what training it in FP8 costs).

    ``on_sync(step, trainer, engine)``, if given, is called after every weight sync (tests check the engine's
    weights there)."""
    torch.manual_seed(seed)
    trainer = prepare_trainer(_copy_policy(policy), engine_cfg)  # FP8 end to end: the trainer's W8A8 forward
    fp8_trainer = engine_cfg.trainer == "fp8"
    opt = torch.optim.AdamW(trainer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_rows = cfg.n_prompts * cfg.group_size
    a_len = task.answer_len(cfg.n_digits)
    max_len = task.prompt_len(cfg.n_digits) + a_len
    # The first KV calibration batch (before any rollout): prompts with their correct answers, teacher-forced.
    calib_probs = task.sample_problems(n_rows, cfg.n_digits, torch.Generator().manual_seed(seed + 7919))
    calib = torch.cat([task.encode_prompts(calib_probs), task.encode_answers(calib_probs)], dim=1)
    engine = RolloutEngine(trainer, engine_cfg, batch=n_rows, max_len=max_len, calib_batch=calib,
                           noise_seed=seed + 104_729)
    sample_g = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    for step in range(cfg.steps):
        row: dict[str, float] = {"step": float(step)}
        if cfg.eval_every and step % cfg.eval_every == 0:
            row["eval/acc"] = evaluate_policy(trainer, cfg, seed, step)  # outside the step's timed phases
            if fp8_trainer:
                row["eval/acc_master"] = evaluate_policy(_master(trainer), cfg, seed, step)
        t_step = time.perf_counter()
        # 1-2. paired prompts, rollout
        prompt_g = torch.Generator().manual_seed(seed * 100_003 + step)
        problems = task.sample_problems(cfg.n_prompts, cfg.n_digits, prompt_g).repeat_interleave(cfg.group_size, 0)
        prompts, answers = task.encode_prompts(problems), task.encode_answers(problems)
        t0 = time.perf_counter()
        out = engine.generate(prompts, a_len, temperature=cfg.temperature, eos_id=task.EOS, pad_id=task.PAD,
                              generator=sample_g)
        t_roll = time.perf_counter() - t0
        kv_sat = engine.cache.saturation_metrics() if hasattr(engine.cache, "saturation_metrics") else {}
        mask = out.mask.float()
        # 3. rewards, advantages
        reward = task.rewards(out.tokens, answers)
        adv = grpo_advantages(reward, cfg.group_size, norm_by_std=cfg.norm_by_std)
        # 4. the trainer's old log-probs
        t0 = time.perf_counter()
        with torch.no_grad():
            logp_old = sequence_logprobs(trainer, prompts, out.tokens, cfg.temperature)
        # 5. rollout correction
        weights, loss_mask = None, mask
        if correction.kind == "is":
            weights = rc.is_weights(logp_old, out.logprobs, mask, level=correction.level,
                                    threshold=correction.threshold)
        elif correction.kind == "mis":
            loss_mask = rc.rejection_mask(logp_old, out.logprobs, mask, level=correction.level,
                                          upper=correction.threshold)
        elif correction.kind == "verl":
            rcfg = PRESETS[correction.preset]
            if rcfg.bypass_mode:  # pi_old := pi_rollout: the PPO ratio pi_theta / pi_rollout does the IS
                weights, loss_mask, _ = apply_rollout_correction(out.logprobs, out.logprobs, mask, rcfg)
            else:
                weights, loss_mask, _ = apply_rollout_correction(logp_old, out.logprobs, mask, rcfg)
        # The loss's old log-probs: the trainer's recomputation, or the engine's own in bypass mode.
        logp_ref = out.logprobs if correction.kind == "verl" and PRESETS[correction.preset].bypass_mode else logp_old
        mm = rc.mismatch_metrics(logp_old, out.logprobs, mask, threshold=2.0)
        rej = rc.rejection_metrics(mask, loss_mask)
        # 6. update on mini-batches
        stats = []
        for idx in torch.randperm(n_rows, generator=sample_g).chunk(cfg.n_minibatches):
            logp = sequence_logprobs(trainer, prompts[idx], out.tokens[idx], cfg.temperature)
            lm, met = clipped_surrogate(logp, logp_ref[idx], adv[idx], loss_mask[idx], clip_low=cfg.clip_low,
                                        clip_high=cfg.clip_high, clip_c=cfg.clip_c,
                                        rollout_weights=None if weights is None else weights[idx])
            loss = agg_loss(lm, loss_mask[idx], cfg.loss_agg_mode)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(trainer.parameters(), cfg.grad_clip)
            opt.step()
            stats.append(torch.stack([loss.detach(), gnorm.detach(), met["clipfrac"], met["ppo_kl"]]))
        t_train = time.perf_counter() - t0
        # 7. weight sync + KV recalibration
        rows = slice(0, min(KV_CALIB_ROWS, n_rows))
        p_mask = torch.ones_like(prompts[rows], dtype=torch.bool)
        sync = engine.sync(trainer, (torch.cat([prompts[rows], out.tokens[rows]], 1),
                                     torch.cat([p_mask, out.mask[rows]], 1)))
        if cfg.audit_sync:
            sync.update(engine.audit(trainer))  # raises WeightSyncAuditError on a broken sync
        if on_sync is not None:
            on_sync(step, trainer, engine)
        loss_v, gnorm_v, clipfrac_v, ppo_kl_v = torch.stack(stats).mean(0).tolist()  # one host transfer
        n_tok = float(mask.sum())
        row.update({
            "reward/mean": float(reward.mean()),
            "reward/response_len": n_tok / n_rows,
            **{f"mismatch/{k}": v for k, v in mm.items()},
            "correction/rejected_fraction_token": rej["rejected_fraction_token"],
            "correction/rejected_fraction_sequence": rej["rejected_fraction_sequence"],
            "actor/pg_loss": loss_v, "actor/grad_norm": gnorm_v, "actor/clipfrac": clipfrac_v,
            "actor/ppo_kl": ppo_kl_v,
            "time/rollout_s": t_roll, "time/train_s": t_train,
            "engine/tokens_per_s": n_tok / t_roll,
            **sync,
            **{f"engine/{k}": v for k, v in kv_sat.items()},
        })
        row["time/step_s"] = time.perf_counter() - t_step  # rollout + old log-probs + update + sync (no eval)
        history.append(row)
    if cfg.eval_every:
        history[-1]["eval/acc"] = evaluate_policy(trainer, cfg, seed, cfg.steps)
        if fp8_trainer:
            history[-1]["eval/acc_master"] = evaluate_policy(_master(trainer), cfg, seed, cfg.steps)
    return history


def _master(trainer: Decoder) -> Decoder:
    """The trainer's fp32 master weights in a plain (unquantized) decoder; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        model = Decoder(trainer.cfg)
    model.load_state_dict(trainer.state_dict())
    return model.eval()


def _copy_policy(policy: Decoder) -> Decoder:
    """A trainable fp32 copy of ``policy`` (the arms never share parameters)."""
    model = Decoder(policy.cfg)
    model.load_state_dict(policy.state_dict())
    return model.float().train()


def config_dict(cfg: GRPOConfig) -> dict:
    """``cfg`` as a plain dict (for Results params)."""
    return asdict(cfg)
