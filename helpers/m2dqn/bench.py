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


TRAINERS = ("single", "batched")


def update_flops(args: dqn.Args, obs_dim: int, n_actions: int, trainer: str = "single") -> float:
    """Matmul FLOPs of one gradient step of one run, as ``torch.utils.flop_counter.FlopCounterMode`` counts them
    (a matmul ``[R, i] @ [i, o]`` counts ``2 R i o``; the bias add, the elementwise work, the optimizer and the
    environment are not counted, so time at this count is a lower bound). ``R = batch_size * num_batches`` rows,
    ``F = 2 R P`` one forward over them (``P`` the weights of the MLP's matmuls), ``d0 d1`` the first layer's:

    * ``trainer="single"`` (:func:`helpers.m2dqn.dqn.td_update`): DQN: forward of Q_online(s) and Q_target(s'),
      backward over R rows -> ``4F - 2 R d0 d1``. Double DQN / M2DQN run Q_online on ``cat[s, s']`` (2R rows, with
      autograd, so the backward runs over 2R rows too) -> ``7F - 4 R d0 d1``;
    * ``trainer="batched"`` (:func:`helpers.m2dqn.batched.stacked_td_update`, per run): Q_online(s) with autograd,
      Q_target(s') and (Double DQN / M2DQN) Q_online(s') without -> DQN ``4F - 2 R d0 d1``, else ``5F - 2 R d0 d1``.

    The backward computes each layer's weight gradient and, except for the first layer (the observations need
    none), its input gradient. Tests check both trainers against ``FlopCounterMode``.
    """
    if trainer not in TRAINERS:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {trainer!r}")
    dims = [obs_dim, *args.hidden, n_actions]
    p = sum(i * o for i, o in zip(dims[:-1], dims[1:]))
    rows = args.batch_size * args.num_batches
    fwd, first = 2.0 * rows * p, 2.0 * rows * dims[0] * dims[1]
    if args.algo == "dqn":
        return 4 * fwd - first
    if trainer == "single":
        return 7 * fwd - 2 * first
    return 5 * fwd - first


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
    matmul FLOP rate of the training calls, each trainer's own :func:`update_flops`), ``peak_gflops``
    (:func:`gemm_peak_gflops`), ``ceiling``: the largest speedup the batched trainer could give here, if its gradient
    steps ran at the peak and nothing else took time - single-run seconds per env step / (the batched trainer's matmul
    FLOPs per env step and run / peak), and ``ceiling_ratio``: each row's fraction of its own compute-bound ceiling,
    (matmul FLOPs per env step of all its runs) x (its env steps per second) / peak (1.0 = all time in matmuls at the
    peak rate; for the batched row it equals ``speedup / ceiling``).
    """
    if n_runs < 1 or steps < 2:
        raise ValueError(f"need n_runs >= 1 and steps >= 2, got {n_runs!r}, {steps!r}")
    kw = dict(total_steps=steps, learning_starts=steps // 3, eval_interval=steps, eval_episodes=1)
    kw.update(kwargs)
    single = dqn.train_dqn(env_id, seed=1, **kw).metrics
    many = batched.train_batched(env_id, seeds=range(1, n_runs + 1), **kw)[0].metrics
    args = dqn.make_args(env_id, seed=1, **kw)
    env = gym.make(env_id)
    dims = int(env.observation_space.shape[0]), int(env.action_space.n)
    env.close()
    flops = {t: update_flops(args, *dims, trainer=t) for t in TRAINERS}  # per gradient step and run
    peak = gemm_peak_gflops(max(args.hidden))
    steps_per_env_step = single["train/grad_steps"] / args.total_steps  # gradient steps per env step, per run
    rows = [{"label": label, "trainer": "single-run", "runs": 1, "env_steps_per_s": single["charts/SPS"],
             "update_ms": single["time/update_ms"],
             "gflops": flops["single"] * args.grad_steps / single["time/update_ms"] / 1e6,
             "flops_per_env_step": flops["single"] * steps_per_env_step},
            {"label": label, "trainer": f"batched x {n_runs}", "runs": n_runs, "env_steps_per_s": many["charts/SPS"],
             "update_ms": many["time/update_ms"],
             "gflops": n_runs * flops["batched"] * args.grad_steps / many["time/update_ms"] / 1e6,
             "flops_per_env_step": flops["batched"] * steps_per_env_step}]
    out = pd.DataFrame(rows)
    out["speedup"] = out["env_steps_per_s"] / single["charts/SPS"]
    out["peak_gflops"] = peak
    out["ceiling"] = (1.0 / single["charts/SPS"]) / (flops["batched"] * steps_per_env_step / (peak * 1e9))
    out["ceiling_ratio"] = out["flops_per_env_step"] * out["env_steps_per_s"] / (peak * 1e9)
    return out
