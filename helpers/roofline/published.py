"""The roofline against every published FP8 rollout / decode speedup (``data/published_speedups.json``), the
verdict rule of that comparison, and where FP8 pays off (batch x context).

* :func:`load_published` - the entries, each with its source, reported gain and setting (the assumed fields
  named).
* :func:`compare_published` - predicted vs reported per entry, the difference in percentage points, whether
  they agree within :data:`AGREEMENT_PP`, and the fixed per-step overhead that would close the gap
  (:func:`overhead_to_match`).
* :func:`roofline_verdict` - reproduced / partly / not reproduced from the agreement count.
* :func:`payoff_grid` - the per-step speedup of each FP8 mode over BF16 on a batch x context grid at the same
  batch, with whether the batch fits in each mode's KV cache.
* :func:`sensitivity` - the published settings again under other assumptions (the KV cache not binding, a fixed
  per-step overhead), to say which assumption a disagreement hangs on.
* :func:`fp8rl_predictions` - the predicted gains in FP8-RL's own Qwen3-8B setting (what notebooks 01, 02, 05
  cite while no GPU has measured them).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from helpers.core.runtime import REPO_ROOT
from helpers.roofline.decode import PURE_ROOFLINE, Efficiency, decode_step_seconds, kv_capacity_tokens
from helpers.roofline.rollout import predicted_speedup
from helpers.roofline.specs import GpuSpec, ModelShape

__all__ = ["PUBLISHED", "AGREEMENT_PP", "PAYOFF_THRESHOLD", "REPORTED_KINDS", "FP8RL_QWEN3_8B_SETTING",
           "load_published", "agrees", "compare_published", "overhead_to_match", "roofline_verdict", "payoff_grid",
           "fp8rl_predictions", "sensitivity"]

PUBLISHED = REPO_ROOT / "data" / "published_speedups.json"
# Agreement band, in percentage points of throughput gain. The published figures themselves move by this much
# for one model on one GPU: veRL's Qwen3-8B W8A8 gain is +12 % with CUDA 12.6 + DeepGEMM and +18 % with CUDA 12.9,
# and veRL PR #7519 measured a 7.2 % difference between two identical BF16 rollout arms.
AGREEMENT_PP = 10.0
# A mode "pays off" where its predicted per-step gain is at least this: below ~10 % a gain is inside the run-to-run
# noise the sources above report, so nobody would measure it.
PAYOFF_THRESHOLD = 0.10
REPORTED_KINDS = ("equal", "at_least", "about")


def load_published(path: str | os.PathLike = PUBLISHED) -> list[dict[str, Any]]:
    """The entries of ``data/published_speedups.json`` (``id``, ``source``, ``claim``, ``reported``,
    ``reported_kind``, ``setting`` - None where the roofline cannot model it - and ``assumed``)."""
    data = json.loads(Path(path).read_text())
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty 'entries' list")
    for e in entries:
        if e.get("reported_kind") not in REPORTED_KINDS:
            raise ValueError(f"{path}: entry {e.get('id')!r} has reported_kind {e.get('reported_kind')!r}, expected "
                             f"one of {REPORTED_KINDS}")
    return entries


def agrees(predicted: float, reported: float, kind: str, tol_pp: float = AGREEMENT_PP) -> bool:
    """Whether a predicted gain agrees with a reported one (both fractions): ``"equal"`` and ``"about"``:
    ``|predicted - reported| <= tol``; ``"at_least"``: ``predicted >= reported - tol``."""
    if kind not in REPORTED_KINDS:
        raise ValueError(f"kind must be one of {REPORTED_KINDS}, got {kind!r}")
    tol = tol_pp / 100.0
    if kind == "at_least":
        return predicted >= reported - tol
    return abs(predicted - reported) <= tol


def overhead_to_match(setting: dict[str, Any], reported: float,
                      grid_ms: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)) -> float | None:
    """The smallest fixed per-decode-step overhead (ms, from ``grid_ms``) at which the predicted gain falls to
    ``reported`` or below - how much time per step that FP8 does not shorten (launches, sampling, scheduling)
    the pure roofline would need to explain the figure. None if even the largest leaves it above."""
    for ms in grid_ms:
        if predicted_speedup(setting, eff=Efficiency(step_overhead_s=ms * 1e-3)) <= reported:
            return float(ms)
    return None


def compare_published(entries: Sequence[dict[str, Any]] | None = None, *, eff: Efficiency = PURE_ROOFLINE,
                      tol_pp: float = AGREEMENT_PP, overhead_grid_ms: Sequence[float] | None = None) -> pd.DataFrame:
    """One row per published entry: ``id, model, gpu, comparison, kind, reported, predicted, difference_pp,
    agrees, overhead_to_match_ms, source, assumed``. ``predicted`` is NaN (and ``agrees`` None) for an entry
    without a setting. ``overhead_grid_ms``: also search the per-step overhead that closes each gap where the
    prediction is too high (slow: two rollouts per grid point); None skips it."""
    entries = load_published() if entries is None else entries
    rows = []
    for e in entries:
        s = e.get("setting")
        row = {"id": e["id"], "claim": e["claim"], "reported": e["reported"], "reported_kind": e["reported_kind"],
               "source": e["source"], "assumed": e.get("assumed", "")}
        if s is None:
            row.update(model="", gpu="", comparison="", kind="", predicted=math.nan, difference_pp=math.nan,
                       agrees=None, overhead_to_match_ms=None)
        else:
            pred = predicted_speedup(s, eff=eff)
            ok = agrees(pred, e["reported"], e["reported_kind"], tol_pp)
            over = None
            if overhead_grid_ms is not None and not ok and pred > e["reported"]:
                over = overhead_to_match(s, e["reported"], overhead_grid_ms)
            row.update(model=s["model"], gpu=s["gpu"], comparison=f"{s['mode']} vs {s.get('baseline', 'bf16')}",
                       kind=s.get("kind", "rollout"), predicted=pred, difference_pp=100.0 * (pred - e["reported"]),
                       agrees=ok, overhead_to_match_ms=over)
        rows.append(row)
    cols = ["id", "model", "gpu", "comparison", "kind", "reported", "reported_kind", "predicted", "difference_pp",
            "agrees", "overhead_to_match_ms", "claim", "source", "assumed"]
    return pd.DataFrame(rows, columns=cols)


def roofline_verdict(table: pd.DataFrame) -> tuple[str, str]:
    """``(verdict, reason)`` for "the decode roofline predicts the published FP8 speedups": over the entries it
    can model, ``reproduced`` if all agree within the band, ``partly`` if at least half do, else
    ``not reproduced``; the reason names the counts and the largest disagreement."""
    modelled = table[table["agrees"].notna()]
    if modelled.empty:
        raise ValueError("no modelled entry in the table (every 'agrees' is None)")
    n, k = len(modelled), int(modelled["agrees"].astype(bool).sum())
    worst = modelled.loc[modelled["difference_pp"].abs().idxmax()]
    verdict = "reproduced" if k == n else ("partly" if 2 * k >= n else "not reproduced")
    reason = (f"{k} of {n} modelled published figures agree within {AGREEMENT_PP:.0f} percentage points; largest "
              f"gap: {worst['id']} predicted {100 * worst['predicted']:+.0f} % vs reported "
              f"{100 * worst['reported']:+.0f} %")
    skipped = len(table) - n
    if skipped:
        reason += f"; {skipped} not modelled"
    return verdict, reason


def payoff_grid(shape: ModelShape, gpu: GpuSpec, batches: Sequence[int], contexts: Sequence[int], *,
                modes: Sequence[str] = ("w8a8", "kv8", "w8a8_kv8"), tp: int = 1, eff: Efficiency = PURE_ROOFLINE,
                gpu_memory_utilization: float = 0.9) -> pd.DataFrame:
    """Rows ``batch, context, mode, speedup, pays_off, fits_bf16, fits_mode``: the per-decode-step gain of
    ``mode`` over BF16 at the same batch and context (``t_bf16 / t_mode - 1``), whether it reaches
    :data:`PAYOFF_THRESHOLD`, and whether ``batch * context`` tokens fit in the BF16 / the mode's KV cache
    (:func:`~helpers.roofline.decode.kv_capacity_tokens`). Where only the mode fits, FP8 also buys the batch."""
    if not batches or not contexts:
        raise ValueError(f"batches and contexts must be non-empty, got {list(batches)!r}, {list(contexts)!r}")
    cap_bf16 = kv_capacity_tokens(shape, gpu, "bf16", tp=tp, gpu_memory_utilization=gpu_memory_utilization)
    rows = []
    for b in batches:
        for c in contexts:
            t0 = decode_step_seconds(shape, gpu, "bf16", b, float(b) * c, tp=tp, eff=eff)
            for m in modes:
                t = decode_step_seconds(shape, gpu, m, b, float(b) * c, tp=tp, eff=eff)
                cap = kv_capacity_tokens(shape, gpu, m, tp=tp, gpu_memory_utilization=gpu_memory_utilization)
                rows.append({"batch": b, "context": c, "mode": m, "speedup": t0 / t - 1.0,
                             "pays_off": t0 / t - 1.0 >= PAYOFF_THRESHOLD, "fits_bf16": b * c <= cap_bf16,
                             "fits_mode": b * c <= cap})
    return pd.DataFrame(rows)


def sensitivity(entries: Sequence[dict[str, Any]] | None = None, *, overhead_ms: float = 5.0) -> pd.DataFrame:
    """Each modelled published entry predicted three ways: ``roofline`` (as in the file), ``cache_unbound`` (a
    rollout's KV capacity set so large that every request runs at once: what is left when FP8 buys no
    concurrency) and ``overhead`` (a fixed ``overhead_ms`` per decode step that FP8 does not shorten). Rows
    ``id, reported, roofline, cache_unbound, overhead`` (fractions; decode settings have no cache to unbind)."""
    entries = load_published() if entries is None else entries
    rows = []
    for e in entries:
        s = e.get("setting")
        if s is None:
            continue
        unbound = dict(s)
        if s.get("kind", "rollout") == "rollout":
            unbound["kv_capacity"] = {m: 10 ** 12 for m in ("bf16", "w8a8", "kv8", "w8a8_kv8")}
        rows.append({"id": e["id"], "reported": e["reported"], "roofline": predicted_speedup(s),
                     "cache_unbound": predicted_speedup(unbound),
                     "overhead": predicted_speedup(s, eff=Efficiency(step_overhead_s=overhead_ms * 1e-3))})
    return pd.DataFrame(rows)


# The FP8-RL / veRL DAPO setting for Qwen3-8B-Base (8 x H100, 128 prompts x 16 responses, 20K max response): the
# setting of the "not testable here" speed rows of notebooks 01, 02 and 05. The fields the sources do not give
# (tp, prompt and mean response length, the KV capacity taken from NeMo-RL PR #1212) are those of the
# verl_qwen3_8b_w8a8_* rows of data/published_speedups.json.
FP8RL_QWEN3_8B_SETTING: dict[str, Any] = {
    "model": "Qwen3-8B", "gpu": "H100", "kind": "rollout", "tp": 1, "prompt_len": 512, "n_requests": 256,
    "response": {"dist": "exponential", "mean": 6000, "max": 20480},
    "kv_capacity": {"bf16": 249_952, "w8a8": 299_344, "kv8": 2 * 249_952, "w8a8_kv8": 598_672},
}


def fp8rl_predictions(setting: dict[str, Any] | None = None, *, eff: Efficiency = PURE_ROOFLINE) -> pd.DataFrame:
    """The roofline's predicted rollout gain of each FP8 mode over BF16 (and of FP8 KV over W8A8) in the FP8-RL
    Qwen3-8B setting (:data:`FP8RL_QWEN3_8B_SETTING`, or ``setting``): rows ``comparison, predicted`` (a fraction),
    the figures notebooks 01, 02 and 05 cite in their "not testable here" speed rows."""
    base = dict(FP8RL_QWEN3_8B_SETTING if setting is None else setting)
    rows = []
    for mode, baseline in (("w8a8", "bf16"), ("kv8", "bf16"), ("w8a8_kv8", "bf16"), ("w8a8_kv8", "w8a8")):
        rows.append({"comparison": f"{mode} vs {baseline}",
                     "predicted": predicted_speedup({**base, "mode": mode, "baseline": baseline}, eff=eff)})
    return pd.DataFrame(rows)
