"""Decode-attention benchmark: attention of one new token over the FP8 cache beside the high-precision cache, at
several context lengths, in one process (benchmarks, not tests: nothing here asserts a time).

``decode_attention_benchmark(...)`` fills one layer of a :class:`~helpers.kvcache.KVCache` (bf16 by default, what
the engines cache without FP8) and of an :class:`~helpers.kvcache.Fp8KVCache` with the same random K / V, then
times :func:`helpers.kvcache.decode_attention` on each. The timing function is a parameter with
``triton.testing.do_bench``'s signature (``timer(fn, quantiles=...) -> milliseconds``): the default is the host
timer :func:`helpers.fp8.bench.wall_clock_bench` for CPU runs; a GPU run passes ``triton.testing.do_bench``.
``calibration_cost(model, ...)`` times one NeMo-RL calibration (a no-grad forward over the calibration batch plus
the reductions) beside a rollout (sampling ``response_len`` tokens for a batch of prompts with the FP8 cache) at
several response lengths: the calibration's share of a rollout shrinks as responses lengthen.

Reported: milliseconds (median and the 20/80% quantiles), the K/V bytes the call has to read, the achieved GB/s,
and the FP8 / high-precision time ratio at each context length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch

from helpers.core import runtime
from helpers.fp8.bench import wall_clock_bench
from helpers.core.timing import median_time
from helpers.kvcache.attention import decode_attention
from helpers.kvcache.calibration import calibrate_kv_scales
from helpers.kvcache.cache import KVCache
from helpers.kvcache.fp8 import Fp8KVCache
from helpers.kvcache.scales import KVScales, compute_qkv_scales

__all__ = ["decode_attention_benchmark", "calibration_cost"]

GB = 1e9


def decode_attention_benchmark(context_lengths: Sequence[int] = (512, 2048, 8192), *, batch: int = 4,
                               n_head: int = 32, n_kv_head: int = 8, head_dim: int = 128,
                               hp_dtype: torch.dtype = torch.bfloat16, granularity: str = "tensor",
                               backend: str = "auto", device: torch.device | str | None = None,
                               timer: Callable[..., list[float]] = wall_clock_bench,
                               quantiles: Sequence[float] = (0.5, 0.2, 0.8), rounds: int = 3,
                               seed: int = 0) -> pd.DataFrame:
    """Rows ``(context, cache, backend, ms, ms_p20, ms_p80, kv_bytes, gb_per_s, rounds, ratio_vs_hp)``; defaults
    are one Qwen3-8B attention layer (32 query heads, 8 KV heads of 128) for 4 sequences. Each cache is timed in
    ``rounds`` interleaved rounds (one ``timer`` call each); the figures are the medians over rounds."""
    dev = torch.device(device) if device is not None else runtime.device()
    name = runtime.resolve_backend(backend)
    rows = []
    for n in context_lengths:
        g = torch.Generator(device="cpu").manual_seed(seed + n)
        k = torch.randn(batch, n_kv_head, n, head_dim, generator=g).to(dev)
        v = torch.randn(batch, n_kv_head, n, head_dim, generator=g).to(dev)
        q = torch.randn(batch, n_head, head_dim, generator=g).to(dev)
        qs, ks, vs = compute_qkv_scales(q[:, :, None], k, v, granularity=granularity)
        hp = KVCache(1, batch, n, n_kv_head, head_dim, dtype=hp_dtype, device=dev)
        hp.append(0, k.to(hp_dtype), v.to(hp_dtype))
        fp8 = Fp8KVCache(1, batch, n, n_kv_head, head_dim, n_head=n_head, granularity=granularity, device=dev,
                         scales=KVScales(qs[None], ks[None], vs[None]))
        fp8.append(0, k, v)
        del k, v
        # Interleave the two caches over `rounds` rounds and take the median of each one's per-round figures, so a
        # load change on a shared machine hits both alike instead of whichever was timed second.
        caches = ((str(hp_dtype).replace("torch.", ""), hp), ("fp8_e4m3", fp8))
        per_round: dict[str, list[list[float]]] = {label: [] for label, _ in caches}
        for _ in range(rounds):
            for label, cache in caches:
                per_round[label].append(timer(lambda c=cache: decode_attention(q, c, 0, backend=name),
                                              quantiles=list(quantiles)))
        times = {}
        for label, cache in caches:
            ms = [float(x) for x in torch.tensor(per_round[label]).median(dim=0).values]
            kv_bytes = 2 * batch * n_kv_head * n * head_dim * cache.k.element_size()
            times[label] = ms[0]
            rows.append({"context": n, "cache": label, "backend": name, "device": str(dev), "ms": ms[0],
                         "ms_p20": ms[1] if len(ms) > 1 else None, "ms_p80": ms[2] if len(ms) > 2 else None,
                         "kv_bytes": kv_bytes, "gb_per_s": kv_bytes / (ms[0] * 1e-3) / GB, "rounds": rounds})
        hp_ms = next(iter(times.values()))
        for row in rows[-2:]:
            row["ratio_vs_hp"] = row["ms"] / hp_ms
        del hp, fp8
    return pd.DataFrame(rows)


def calibration_cost(model, response_lens: Sequence[int], *, rollout_batch: int = 16, prompt_len: int = 16,
                     calib_batch: int = 8, calib_len: int = 64, repeats: int = 3, seed: int = 0) -> pd.DataFrame:
    """Rows ``(response_len, t_calibration_s, t_rollout_s, calibration_fraction)`` for a
    :class:`~helpers.models.Decoder` ``model``: the median time of ``calibrate_kv_scales(policy="nemo_rl")`` on
    ``calib_batch`` random sequences of ``calib_len`` tokens, and of ``model.generate`` (``rollout_batch``
    prompts of ``prompt_len`` tokens, ``response_len`` new ones, FP8 cache, temperature 1);
    ``calibration_fraction = t_calibration / (t_calibration + t_rollout)``."""
    from helpers.kvcache.fp8 import Fp8KVCache

    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    calib = [torch.randint(0, cfg.vocab_size, (calib_batch, calib_len), generator=g)]
    prompt = torch.randint(0, cfg.vocab_size, (rollout_batch, prompt_len), generator=g)
    t_cal = median_time(lambda: calibrate_kv_scales(model, calib, policy="nemo_rl"), repeats=repeats)
    scales = calibrate_kv_scales(model, calib, policy="nemo_rl")
    rows = []
    for n in response_lens:
        cache = Fp8KVCache.from_config(cfg, rollout_batch, prompt_len + n, scales=scales)
        t_roll = median_time(lambda: model.generate(prompt, n, cache=cache, generator=g), repeats=repeats)
        rows.append({"response_len": n, "t_calibration_s": t_cal, "t_rollout_s": t_roll,
                     "calibration_fraction": t_cal / (t_cal + t_roll)})
    return pd.DataFrame(rows)
