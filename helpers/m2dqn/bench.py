"""Throughput benchmark for notebook 04 (not a test): aggregate env steps per second of the batched trainer over N
runs against the single-run trainer at the same settings, measured in the same process, back to back, beside a
plain random-action loop.

Numbers are wall-clock on whatever machine runs them; on a shared machine, compare the ratios, not the absolutes.
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import pandas as pd
import torch

from helpers.core.timing import median_time, single_thread
from helpers.m2dqn import batched, dqn

__all__ = ["reference_loop_sps", "update_flops", "gemm_peak_gflops", "batched_speedup"]


def reference_loop_sps(env_id: str, steps: int, seed: int = 0) -> float:
    """Env steps per second of the plainest loop: ``env.step(random action)``, reset at episode end."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    env = gym.make(env_id)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    t = time.perf_counter()
    for _ in range(steps):
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            env.reset()
    sps = steps / (time.perf_counter() - t)
    env.close()
    return sps


def update_flops(args: dqn.Args, obs_dim: int, n_actions: int) -> float:
    """Matmul FLOPs of one gradient step of one run: forward of Q_online(s), of Q_target(s') and (Double DQN,
    M2DQN) of Q_online(s') over ``R = batch_size * num_batches`` rows, and the backward's weight and input gradients
    (no input gradient for the first layer). A matmul ``[R, i] @ [i, o]`` counts ``2 R i o``; the elementwise work,
    the optimizer and the environment are left out, so time at this count is a lower bound."""
    dims = [obs_dim, *args.hidden, n_actions]
    p = sum(i * o for i, o in zip(dims[:-1], dims[1:]))
    rows = args.batch_size * args.num_batches
    forwards = 2 if args.algo == "dqn" else 3
    return 2.0 * rows * (forwards * p + p + (p - dims[0] * dims[1]))


def gemm_peak_gflops(width: int = 256, rows: int = 4096) -> float:
    """Single-thread float32 GFLOP/s of a ``[rows, width] @ [width, width]`` matmul: the compute roof one core of
    this machine gives the trainers (they run one intra-op thread per process)."""
    with single_thread():
        x, w = torch.randn(rows, width), torch.randn(width, width)
        t = median_time(lambda: x @ w, warmup=3, repeats=15)
    return 2.0 * rows * width * width / t / 1e9


def batched_speedup(env_id: str = "CartPole-v1", *, n_runs: int = 20, steps: int = 3000, label: str = "",
                    **kwargs: Any) -> pd.DataFrame:
    """Training env steps per second (evaluation excluded) of ``train_dqn`` (one run) and of ``train_batched``
    (``n_runs`` runs, aggregate), same ``kwargs``, ``steps`` env steps each, learning from ``steps // 3`` on.

    Returns rows ``single-run`` and ``batched x N`` with ``label``, ``env_steps_per_s``, ``update_ms`` (one
    training call: all runs for the batched trainer), ``speedup`` (aggregate SPS / single-run SPS), ``gflops`` (the
    matmul FLOP rate of the training calls, :func:`update_flops`), and ``ceiling``: the largest speedup any batching
    could give here, if every run's gradient steps ran at :func:`gemm_peak_gflops` and nothing else took time -
    single-run seconds per env step / (matmul FLOPs per env step / peak).
    """
    if n_runs < 1 or steps < 2:
        raise ValueError(f"need n_runs >= 1 and steps >= 2, got {n_runs!r}, {steps!r}")
    kw = dict(total_steps=steps, learning_starts=steps // 3, eval_interval=steps, eval_episodes=1)
    kw.update(kwargs)
    single = dqn.train_dqn(env_id, seed=1, **kw).metrics
    many = batched.train_batched(env_id, seeds=range(1, n_runs + 1), **kw)[0].metrics
    args = dqn.make_args(env_id, seed=1, **kw)
    env = gym.make(env_id)
    flops = update_flops(args, int(env.observation_space.shape[0]), int(env.action_space.n))  # per grad step, run
    env.close()
    peak = gemm_peak_gflops(max(args.hidden))
    per_env_step = flops * single["train/grad_steps"] / args.total_steps
    rows = [{"label": label, "trainer": "single-run", "runs": 1, "env_steps_per_s": single["charts/SPS"],
             "update_ms": single["time/update_ms"], "gflops": flops * args.grad_steps / single["time/update_ms"] / 1e6},
            {"label": label, "trainer": f"batched x {n_runs}", "runs": n_runs, "env_steps_per_s": many["charts/SPS"],
             "update_ms": many["time/update_ms"],
             "gflops": n_runs * flops * args.grad_steps / many["time/update_ms"] / 1e6}]
    out = pd.DataFrame(rows)
    out["speedup"] = out["env_steps_per_s"] / single["charts/SPS"]
    out["peak_gflops"] = peak
    out["ceiling"] = (1.0 / single["charts/SPS"]) / (per_env_step / (peak * 1e9))
    return out
