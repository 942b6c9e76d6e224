"""A rollout on the decode roofline: continuous batching over a response-length distribution (the batch shrinks as
sequences finish, as in RL rollouts with long tails), bounded by the engine's ``max_num_seqs`` and its KV-cache
capacity, and the predicted speedup of an FP8 mode over a baseline.

:func:`simulate_rollout` is event driven: between two events (a sequence finishes, the cache overflows) the batch
is fixed and every context grows by one token per step, so the step times of the whole interval are one
vectorised :func:`~helpers.roofline.decode.decode_step_seconds` call. Admission (``admission``):

* ``"optimistic"`` (vLLM V1's scheduler): a waiting request is admitted while its prompt fits in the free cache;
  when the running sequences outgrow the cache, the most recently admitted one is preempted, its cache dropped,
  and it is re-prefilled (prompt plus the tokens generated so far) when admitted again;
* ``"reserve"``: a request is admitted only if its final length fits (an oracle that never preempts).

Each admission wave pays :func:`~helpers.roofline.decode.prefill_seconds` for its prompts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from helpers.roofline.decode import (MODES, PURE_ROOFLINE, Efficiency, decode_step_seconds, kv_capacity_tokens,
                                     prefill_seconds)
from helpers.roofline.specs import GpuSpec, ModelShape, gpu_spec, model_shape

__all__ = ["DISTRIBUTIONS", "ADMISSIONS", "response_lengths", "simulate_rollout", "predicted_speedup",
           "setting_inputs"]

DISTRIBUTIONS = ("exponential", "uniform", "fixed")
ADMISSIONS = ("optimistic", "reserve")


def response_lengths(n: int, *, mean: float, max_len: int, dist: str = "exponential") -> np.ndarray:
    """``n`` response lengths (int64, in [1, max_len]) at the quantiles ``(i + 0.5) / n`` of the distribution
    (deterministic: no sampling noise between modes):

    * ``"exponential"``: exponential with mean ``mean``, capped at ``max_len`` (the capped ones are responses
      that hit the length limit, a long tail as in RL rollouts);
    * ``"uniform"``: uniform on [1, 2 mean], capped; ``"fixed"``: every response ``mean`` tokens.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not mean > 0 or max_len < 1:
        raise ValueError(f"mean must be > 0 and max_len >= 1, got mean={mean!r}, max_len={max_len!r}")
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")
    u = (np.arange(n) + 0.5) / n
    if dist == "exponential":
        x = -mean * np.log1p(-u)
    elif dist == "uniform":
        x = 1 + u * (2 * mean - 1)
    else:
        x = np.full(n, float(mean))
    return np.clip(np.round(x), 1, max_len).astype(np.int64)


def simulate_rollout(shape: ModelShape, gpu: GpuSpec, mode: str, *, prompt_len: int, response_lens: Sequence[int],
                     max_num_seqs: int = 1024, kv_capacity: int | None = None, admission: str = "optimistic",
                     tp: int = 1, eff: Efficiency = PURE_ROOFLINE, include_prefill: bool = True) -> dict[str, float]:
    """Time to generate ``response_lens`` (one entry per request, all with ``prompt_len``-token prompts) on one
    engine of ``tp`` GPUs in ``mode``.

    ``kv_capacity``: KV-cache tokens per engine (default :func:`~helpers.roofline.decode.kv_capacity_tokens`
    for this mode at vLLM's ``gpu_memory_utilization=0.9``). Returns seconds (``total_s``, ``decode_s``,
    ``prefill_s``), ``steps``, ``tokens`` generated, ``tokens_per_s``, ``mean_batch`` (sequences per decode step),
    ``max_batch``, ``preemptions``. ValueError if one request can never fit in the cache.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if admission not in ADMISSIONS:
        raise ValueError(f"admission must be one of {ADMISSIONS}, got {admission!r}")
    lens = np.asarray(response_lens, dtype=np.int64)
    if lens.ndim != 1 or lens.size == 0 or (lens < 1).any():
        raise ValueError(f"response_lens must be a non-empty 1-D sequence of ints >= 1, got shape {lens.shape}")
    if prompt_len < 0 or max_num_seqs < 1:
        raise ValueError(f"prompt_len must be >= 0 and max_num_seqs >= 1, got {prompt_len!r}, {max_num_seqs!r}")
    cap = kv_capacity if kv_capacity is not None else kv_capacity_tokens(shape, gpu, mode, tp=tp)
    if prompt_len + int(lens.max()) > cap:
        raise ValueError(f"a request of {prompt_len} + {int(lens.max())} tokens does not fit in the KV cache of "
                         f"{cap} tokens ({shape.name}, {mode}, {gpu.name}, tp={tp})")
    queue: list[int] = list(range(lens.size))  # request ids waiting, front first
    done_tokens = np.zeros(lens.size, dtype=np.int64)  # tokens generated so far per request (kept on preemption)
    active: list[int] = []  # running request ids, in admission order
    decode_s = prefill_s = 0.0
    steps = batch_steps = max_batch = preemptions = 0
    while queue or active:
        # -- admit -----------------------------------------------------------------------------------------------
        used = sum(prompt_len + int(done_tokens[r]) + 1 for r in active)  # the cache the next step needs
        reserved = sum(prompt_len + int(lens[r]) for r in active)
        admitted_tokens = 0
        n_admitted = 0
        while queue and len(active) < max_num_seqs:
            r = queue[0]
            need_now = prompt_len + int(done_tokens[r]) + 1
            if admission == "reserve":
                if reserved + prompt_len + int(lens[r]) > cap:
                    break
                reserved += prompt_len + int(lens[r])
            elif used + need_now > cap:
                break
            queue.pop(0)
            active.append(r)
            used += need_now
            admitted_tokens += prompt_len + int(done_tokens[r])
            n_admitted += 1
        if not active:  # cannot happen: one request always fits (checked above)
            raise AssertionError("no request admitted into an empty cache")
        if include_prefill and n_admitted:
            prefill_s += prefill_seconds(shape, gpu, mode, n_admitted, max(1, round(admitted_tokens / n_admitted)),
                                         tp=tp, eff=eff)
        # -- decode until the next event ---------------------------------------------------------------------------
        ids = np.asarray(active)
        b = ids.size
        remaining = lens[ids] - done_tokens[ids]
        span = int(remaining.min())  # steps until the first finishes
        ctx0 = float(b * prompt_len + done_tokens[ids].sum() + b)  # this step's cache holds the new token too
        if admission == "optimistic":
            room = cap - ctx0
            overflow_in = int(room // b) + 1 if room >= 0 else 0  # first step whose cache would exceed capacity
            span = max(1, min(span, overflow_in)) if overflow_in > 0 else 0
        if span > 0:
            ctx = ctx0 + b * np.arange(span, dtype=float)
            decode_s += float(np.sum(decode_step_seconds(shape, gpu, mode, b, ctx, tp=tp, eff=eff)))
            steps += span
            batch_steps += b * span
            max_batch = max(max_batch, b)
            done_tokens[ids] += span
        finished = [r for r in active if done_tokens[r] >= lens[r]]
        active = [r for r in active if done_tokens[r] < lens[r]]
        if admission == "optimistic" and not finished:
            # the cache is full: preempt the newest until the next step fits (recompute on readmission)
            while active and sum(prompt_len + int(done_tokens[r]) + 1 for r in active) > cap:
                r = active.pop()
                queue.insert(0, r)
                preemptions += 1
    total = decode_s + prefill_s
    tokens = int(lens.sum())
    return {"total_s": total, "decode_s": decode_s, "prefill_s": prefill_s, "steps": steps, "tokens": tokens,
            "tokens_per_s": tokens / total if total > 0 else math.inf,
            "mean_batch": batch_steps / steps if steps else 0.0, "max_batch": max_batch, "preemptions": preemptions}


def setting_inputs(setting: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a setting (a row of ``data/published_speedups.json``, or a dict of the same form) needs, with
    their defaults: ``model``, ``gpu``, ``mode``, ``baseline`` ("bf16"), ``kind`` ("rollout" | "decode"),
    ``tp`` (1); decode: ``batch``, ``context``; rollout: ``prompt_len``, ``n_requests``, ``response``
    (``{"dist", "mean", "max"}``), ``max_num_seqs`` (1024), ``admission`` ("optimistic"), ``kv_capacity`` (a
    ``{mode: tokens}`` dict; modes it lacks use ``gpu_memory_utilization``, default 0.9)."""
    s = dict(setting)
    for key in ("model", "gpu", "mode"):
        if key not in s:
            raise ValueError(f"setting lacks {key!r}: {sorted(s)}")
    s.setdefault("baseline", "bf16")
    s.setdefault("kind", "rollout")
    s.setdefault("tp", 1)
    if s["kind"] not in ("rollout", "decode"):
        raise ValueError(f"setting kind must be 'rollout' or 'decode', got {s['kind']!r}")
    for m in (s["mode"], s["baseline"]):
        if m not in MODES:
            raise ValueError(f"setting mode / baseline must be one of {list(MODES)}, got {m!r}")
    if s["kind"] == "decode":
        for key in ("batch", "context"):
            if key not in s:
                raise ValueError(f"a decode setting needs {key!r}")
    else:
        for key in ("prompt_len", "n_requests", "response"):
            if key not in s:
                raise ValueError(f"a rollout setting needs {key!r}")
        s.setdefault("max_num_seqs", 1024)
        s.setdefault("admission", "optimistic")
        s.setdefault("kv_capacity", {})
        s.setdefault("gpu_memory_utilization", 0.9)
    return s


def _time(s: dict[str, Any], shape: ModelShape, gpu: GpuSpec, mode: str, eff: Efficiency) -> float:
    if s["kind"] == "decode":
        return float(decode_step_seconds(shape, gpu, mode, int(s["batch"]), float(s["batch"]) * s["context"],
                                         tp=int(s["tp"]), eff=eff))
    resp = s["response"]
    lens = response_lengths(int(s["n_requests"]), mean=float(resp["mean"]), max_len=int(resp["max"]),
                            dist=resp.get("dist", "exponential"))
    cap = s["kv_capacity"].get(mode)
    if cap is None:
        cap = kv_capacity_tokens(shape, gpu, mode, tp=int(s["tp"]), gpu_memory_utilization=s["gpu_memory_utilization"])
    return simulate_rollout(shape, gpu, mode, prompt_len=int(s["prompt_len"]), response_lens=lens,
                            max_num_seqs=int(s["max_num_seqs"]), kv_capacity=int(cap), admission=s["admission"],
                            tp=int(s["tp"]), eff=eff)["total_s"]


def predicted_speedup(setting: Mapping[str, Any], *, eff: Efficiency = PURE_ROOFLINE,
                      shape: ModelShape | None = None, gpu: GpuSpec | None = None) -> float:
    """The roofline's predicted throughput gain of ``setting["mode"]`` over ``setting["baseline"]``:
    ``time(baseline) / time(mode) - 1`` for the same tokens (``0.18`` = +18 %). ``setting`` as
    :func:`setting_inputs` describes (e.g. a row of ``data/published_speedups.json``); ``shape`` / ``gpu``
    override the named model / GPU (tests use made-up ones)."""
    s = setting_inputs(setting)
    shape = shape if shape is not None else model_shape(s["model"])
    gpu = gpu if gpu is not None else gpu_spec(s["gpu"])
    return _time(s, shape, gpu, s["baseline"], eff) / _time(s, shape, gpu, s["mode"], eff) - 1.0
