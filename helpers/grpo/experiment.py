"""The arms of notebook 05, their runs over paired seeds, the veRL / NeMo-RL settings and the engine benchmark.

An arm is an engine configuration (:class:`~helpers.grpo.engine.EngineConfig`) and a rollout correction
(:class:`~helpers.grpo.trainer.Correction`). :func:`run_arms` trains every arm from the same pre-trained policy for
every seed (same seed = same prompts and evaluation draws in every arm) on a pool of processes, keeps each finished
run in a cache so a long study resumes, and returns one long table (a row per arm, seed and step);
:mod:`helpers.grpo.analysis` decides from it. :func:`engine_settings` lists, per arm, the equivalent settings of
veRL and NeMo-RL; :func:`bench_engines` times the engines side by side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from helpers.core.executor import map_tasks
from helpers.core.timing import median_time, single_thread
from helpers.fp8.format import DEFAULT_BLOCK, check_block_size
from helpers.grpo import task
from helpers.grpo.engine import EngineConfig, RolloutEngine
from helpers.grpo.trainer import CORRECTIONS, GRPOConfig, run_grpo
from helpers.models.decoder import Decoder
from helpers.rl.config import PRESETS

__all__ = ["Arm", "ENGINES", "BENCH_ENGINES", "RUN_VERSION", "make_arms", "run_arms",
           "engine_settings", "bench_engines"]

# The engine configurations of the issue, plus the scale levers of the FP8 KV cache. The training arms run the
# exact block-scaled GEMM with fp32 scales (vLLM's block-FP8 semantics): the bf16 fast path rounds fp32-scaled
# operands to bf16, which on this position-sensitive model is a mismatch of its own (measured by
# gemm_path_accuracy); it is exact with ue8m0 scales, the "fp8 ue8m0 bf16-gemm" benchmark row.
ENGINES = {
    "bf16": EngineConfig(),
    "fp8": EngineConfig(linear="fp8", gemm="exact"),
    "fp8+kv": EngineConfig(linear="fp8", gemm="exact", kv_cache="fp8", kv_policy="nemo_rl"),
    "fp8+kv stale": EngineConfig(linear="fp8", gemm="exact", kv_cache="fp8", kv_policy="nemo_rl_once"),
    "fp8+kv unit": EngineConfig(linear="fp8", gemm="exact", kv_cache="fp8", kv_policy="unit"),
    # The mismatch dose-response of notebook 07: the zero-mismatch engine (fp32 everywhere, as the trainer), FP8
    # end to end (the trainer runs the engine's W8A8 forward on the same weights; the sync sends fp32, so both
    # quantize the same tensor), and the fp32 engine with Gaussian logit noise at three standard deviations
    # (per-token k1 ~ 1.3e-2, 4.6e-2 and 0.19 at the start policy: between and beyond the precisions).
    "fp32": EngineConfig(dtype="fp32"),
    "fp8 e2e": EngineConfig(linear="fp8", gemm="exact", trainer="fp8"),
    "fp8 e2e bf16-sync": EngineConfig(linear="fp8", gemm="exact", trainer="fp8", sync_dtype="bf16"),
    "fp8 e2e bf16-both": EngineConfig(linear="fp8", gemm="exact", trainer="fp8", sync_dtype="bf16",
                                      trainer_weight_src="bf16"),
    "noise 0.6": EngineConfig(dtype="fp32", logit_noise=0.6),
    "noise 1": EngineConfig(dtype="fp32", logit_noise=1.0),
    "noise 2": EngineConfig(dtype="fp32", logit_noise=2.0),
}
# Engine configurations timed side by side by bench_engines (the training arms' engines and the GEMM paths).
BENCH_ENGINES = {
    "bf16": ENGINES["bf16"],
    "fp8 exact-gemm": ENGINES["fp8"],
    "fp8 bf16-gemm": EngineConfig(linear="fp8", gemm="bf16"),
    "fp8 ue8m0 bf16-gemm": EngineConfig(linear="fp8", gemm="bf16", scale_fmt="ue8m0"),
    "fp8+kv exact-gemm": ENGINES["fp8+kv"],
    "fp8+kv bf16-gemm": EngineConfig(linear="fp8", gemm="bf16", kv_cache="fp8", kv_policy="nemo_rl"),
}


@dataclass(frozen=True)
class Arm:
    """One arm: ``engine`` (a key of :data:`ENGINES`) and ``correction`` (a key of ``CORRECTIONS``)."""

    engine: str
    correction: str

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {sorted(ENGINES)}, got {self.engine!r}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {sorted(CORRECTIONS)}, got {self.correction!r}")

    @property
    def name(self) -> str:
        return f"{self.engine} / {CORRECTIONS[self.correction].label}"


def make_arms(engines: Sequence[str], corrections: Sequence[str], bf16_corrections: Sequence[str] = ("none",)
              ) -> list[Arm]:
    """BF16 with each of ``bf16_corrections`` (``"none"`` the baseline; ``"token_tis"`` the control that asks
    whether the correction itself changes learning when there is no FP8 mismatch), then every FP8 engine in
    ``engines`` with every correction in ``corrections``."""
    arms = [Arm("bf16", c) for c in bf16_corrections] if "bf16" in engines else []
    return arms + [Arm(e, c) for e in engines if e != "bf16" for c in corrections]


# Bump when a change alters what a run computes (trainer, engine, task, corrections, metrics): cached runs of an
# older version are then trained again. Runs are keyed by this, the config, the block size and the starting policy.
RUN_VERSION = 2


def _run_key(arm: Arm, seed: int, cfg: GRPOConfig, block_size: tuple[int, int], policy_digest: str) -> str:
    """File stem of a finished run in the cache: the arm, the seed and a digest of what decides it (:data:`RUN_VERSION`,
    the GRPO config, the block size, the starting policy)."""
    h = hashlib.sha256()
    h.update(json.dumps([RUN_VERSION, asdict(cfg), list(block_size), policy_digest], sort_keys=True).encode())
    safe = re.sub(r"[^A-Za-z0-9]+", "_", arm.name).strip("_")
    return f"{safe}__seed{seed}__{h.hexdigest()[:12]}"


def _policy_digest(policy: Decoder) -> str:
    h = hashlib.sha256(json.dumps(asdict(policy.cfg), sort_keys=True).encode())
    for k, v in policy.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _run_one(job: tuple) -> list[dict[str, float]]:
    """Top-level (picklable) worker: one arm x seed, on one intra-op thread."""
    policy_cfg, policy_state, arm, seed, cfg, block_size = job
    policy = Decoder(policy_cfg)
    policy.load_state_dict(policy_state)
    engine = dataclasses.replace(ENGINES[arm.engine], block_size=block_size)
    # One intra-op thread: this model's ops are tiny, and waking torch's pool costs more than they do when the
    # other core is busy (helpers.core.timing.single_thread); it also makes the timings far less noisy.
    with single_thread():
        return run_grpo(policy, engine, CORRECTIONS[arm.correction], cfg, seed)


def run_arms(policy: Decoder, arms: Iterable[Arm], seeds: Sequence[int], cfg: GRPOConfig, *,
             block_size: Sequence[int] = DEFAULT_BLOCK, workers: int = 1, executor: str | None = None,
             cache_dir: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Train every arm for every seed; a long DataFrame with columns ``arm``, ``engine``, ``correction``, ``seed``,
    ``step`` and every metric of :func:`~helpers.grpo.trainer.run_grpo`.

    ``block_size`` is the FP8 engines' weight block (activation groups 1 x bk). The arm x seed jobs run through
    :func:`helpers.core.executor.map_tasks`: ``executor`` "local" (a pool of ``workers`` processes, one torch thread
    each; ``workers=1`` runs here) or "ray" (``$HELPERS_EXECUTOR`` when None); a run is deterministic given its arm,
    seed and config, so the table does not depend on either. With ``cache_dir``, each finished run is saved there as
    it completes (``<arm>__seed<s>__<digest>.csv``; the digest covers :data:`RUN_VERSION`, the config, the block
    size and the starting policy) and a later call skips it: a long study resumes where it stopped. Jobs start
    seed by seed (every arm of seed 0, then of seed 1, ...), so a study stopped early holds complete pairs."""
    arms, seeds = list(arms), list(seeds)
    block_size = check_block_size(tuple(block_size))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    digest = _policy_digest(policy)
    jobs = [(a, s) for a in arms for s in seeds]
    done: dict[tuple[Arm, int], list[dict]] = {}
    todo = []
    for seed, arm in ((s, a) for s in seeds for a in arms):  # seed-major: a stopped study has whole seeds
        path = cache / f"{_run_key(arm, seed, cfg, block_size, digest)}.csv" if cache is not None else None
        if path is not None and path.exists():
            done[(arm, seed)] = pd.read_csv(path).to_dict("records")
        else:
            todo.append((arm, seed, path))
    state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    tasks = [(policy.cfg, state, a, s, cfg, block_size) for a, s, _ in todo]

    def finish(i: int, hist: list[dict]) -> None:
        arm, seed, path = todo[i]
        done[(arm, seed)] = hist
        if path is not None:  # atomic: a run killed mid-write leaves no half file
            tmp = path.with_suffix(".tmp")
            pd.DataFrame(hist).to_csv(tmp, index=False)
            tmp.replace(path)

    if progress and len(todo) < len(jobs):
        print(f"run_arms: {len(jobs) - len(todo)} of {len(jobs)} runs read from {cache}")
    map_tasks(_run_one, tasks, executor=executor, max_workers=workers, progress=progress, on_result=finish,
              desc="arms x seeds")
    rows = []
    for arm, seed in jobs:  # arm-major, seed order: the table does not depend on completion order
        for r in done[(arm, seed)]:
            rows.append({"arm": arm.name, "engine": arm.engine, "correction": arm.correction, "seed": seed, **r})
    return pd.DataFrame(rows)


def engine_settings(arm: Arm, cfg: GRPOConfig) -> dict[str, str]:
    """The settings that run ``arm`` at scale: veRL (``actor_rollout_ref.rollout.quantization`` of veRL's
    ``docs/advance/fp8.md``; ``algorithm.rollout_correction.*`` of ``docs/algo/rollout_corr.md``; vLLM engine
    arguments ``kv_cache_dtype`` / ``calculate_kv_scales`` passed through ``rollout.engine_kwargs.vllm``, and
    veRL PR #4435 for per-step recalibration) and NeMo-RL (``policy.generation.vllm_cfg.precision`` /
    ``kv_cache_dtype``; scales recalibrated every step by PR #1212; ``loss_fn.use_importance_sampling_correction``)."""
    e, c = ENGINES[arm.engine], CORRECTIONS[arm.correction]
    kv_fp8 = e.kv_cache == "fp8"
    recal = {"nemo_rl": "every step (veRL PR #4435 / NeMo-RL PR #1212)", "nemo_rl_once": "once (stale)",
             "vllm": "once, first batch (calculate_kv_scales)", "unit": "none: scale 1.0"}.get(e.kv_policy, e.kv_policy)
    if c.kind == "none":
        is_mode, is_thr, rs_mode, rs_thr = "null", "-", "null", "-"
    elif c.kind == "is":
        is_mode, rs_mode, rs_thr = c.level, "null", "-"
        is_thr = "inf (no cap: a very large value)" if math.isinf(c.threshold) else f"{c.threshold:g}"
    elif c.kind == "mis":
        is_mode, is_thr, rs_mode = "null", "-", c.level
        rs_thr = f"{c.threshold:g} (lower {1 / c.threshold:g})"
    else:  # a veRL preset: its own fields
        p = PRESETS[c.preset]
        is_mode, is_thr = (p.rollout_is or "null"), ("-" if p.rollout_is is None else str(p.rollout_is_threshold))
        rs_mode, rs_thr = (p.rollout_rs or "null"), ("-" if p.rollout_rs is None else str(p.rollout_rs_threshold))
        if p.bypass_mode:
            is_mode = f"{is_mode} (bypass_mode=True, loss_type={p.loss_type})"
    return {
        "arm": arm.name,
        "verl rollout.quantization": "fp8" if e.linear == "fp8" else "null (bf16)",
        "verl engine_kwargs.vllm.kv_cache_dtype": "fp8_e4m3" if kv_fp8 else "auto",
        "KV scale recalibration": recal if kv_fp8 else "-",
        "verl rollout_correction preset": c.preset or "-",
        "verl rollout_correction.rollout_is": is_mode,
        "rollout_is_threshold": is_thr,
        "verl rollout_correction.rollout_rs": rs_mode,
        "rollout_rs_threshold": rs_thr,
        "verl actor.loss_agg_mode": cfg.loss_agg_mode,
        "verl actor.clip_ratio_low / high / c": f"{cfg.clip_low:g} / {cfg.clip_high:g} / {cfg.clip_c:g}",
        "nemo-rl vllm_cfg.precision": "fp8" if e.linear == "fp8" else "bfloat16",
        "nemo-rl vllm_cfg.kv_cache_dtype": "fp8" if kv_fp8 else "auto",
        "nemo-rl loss_fn.use_importance_sampling_correction":
            "true (token IS)" if c.kind == "is" and c.level == "token" else ("-" if c.kind != "none" else "false"),
    }


def _prompts(n: int, n_digits: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = task.sample_problems(n, n_digits, torch.Generator().manual_seed(seed))
    return task.encode_prompts(probs), task.encode_answers(probs)


def bench_engines(policy: Decoder, configs: dict[str, EngineConfig], *, batch: int, n_digits: int,
                  repeats: int = 5, rounds: int = 5) -> pd.DataFrame:
    """Rollout tokens/s of each engine configuration, side by side on the same prompts, and each one's weight sync
    and KV recalibration time.

    The engines are timed round-robin - ``rounds`` rounds, each timing every engine with
    :func:`helpers.core.timing.median_time` (``repeats`` calls) - and the median over rounds is reported, so that
    a burst of load from other processes on a shared machine hits every engine alike. One intra-op thread, as in
    training (:func:`run_arms`). Columns: ``engine``, ``tokens_per_s``, ``ratio_vs_bf16``, ``generate_s``,
    ``generate_s_min`` / ``_max`` (over rounds), ``sync_s``, ``recalib_s``, ``gemm``."""
    prompts, answers = _prompts(batch, n_digits, 1)
    calib = torch.cat([prompts, answers], 1)
    a_len = task.answer_len(n_digits)
    with single_thread():
        built = {name: RolloutEngine(policy, ec, batch=batch, max_len=prompts.shape[1] + a_len, calib_batch=calib)
                 for name, ec in configs.items()}
        gens = {name: (lambda e=eng: e.generate(prompts, a_len, temperature=1.0, eos_id=task.EOS, pad_id=task.PAD,
                                                 generator=torch.Generator().manual_seed(0)))
                for name, eng in built.items()}
        n_tok = {name: float(gen().mask.sum()) for name, gen in gens.items()}  # also the warm-up
        times: dict[str, list[float]] = {name: [] for name in built}
        syncs: dict[str, list[float]] = {name: [] for name in built}
        for _ in range(rounds):
            for name, gen in gens.items():
                times[name].append(median_time(gen, repeats=repeats, warmup=0))
                syncs[name].append(median_time(lambda e=built[name]: e.sync(policy, calib), repeats=1, warmup=0))
        recal = {name: eng.sync(policy, calib)["engine/recalib_s"] for name, eng in built.items()}
    rows = []
    for name, ec in configs.items():
        t = float(torch.tensor(times[name]).median())
        rows.append({"engine": name, "tokens_per_s": n_tok[name] / t, "generate_s": t,
                     "generate_s_min": min(times[name]), "generate_s_max": max(times[name]),
                     "sync_s": float(torch.tensor(syncs[name]).median()), "recalib_s": recal[name],
                     "gemm": ec.gemm if ec.linear == "fp8" else "-"})
    out = pd.DataFrame(rows)
    base = out.loc[out["engine"] == "bf16", "tokens_per_s"]
    out["ratio_vs_bf16"] = out["tokens_per_s"] / (float(base.iloc[0]) if len(base) else float("nan"))
    return out
