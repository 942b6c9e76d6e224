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

from helpers.m2dqn import batched, dqn

__all__ = ["reference_loop_sps", "batched_speedup"]


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


def batched_speedup(env_id: str = "CartPole-v1", *, n_runs: int = 20, steps: int = 3000, label: str = "",
                    **kwargs: Any) -> pd.DataFrame:
    """Training env steps per second (evaluation excluded) of ``train_dqn`` (one run) and of ``train_batched``
    (``n_runs`` runs, aggregate), same ``kwargs``, ``steps`` env steps each, learning from ``steps // 3`` on.

    Returns rows ``single-run`` and ``batched x N`` with ``label``, ``env_steps_per_s``, ``update_ms`` (one
    training call: all runs for the batched trainer) and ``speedup`` (aggregate SPS / single-run SPS).
    """
    if n_runs < 1 or steps < 2:
        raise ValueError(f"need n_runs >= 1 and steps >= 2, got {n_runs!r}, {steps!r}")
    kw = dict(total_steps=steps, learning_starts=steps // 3, eval_interval=steps, eval_episodes=1)
    kw.update(kwargs)
    single = dqn.train_dqn(env_id, seed=1, **kw).metrics
    many = batched.train_batched(env_id, seeds=range(1, n_runs + 1), **kw)[0].metrics
    rows = [{"label": label, "trainer": "single-run", "runs": 1, "env_steps_per_s": single["charts/SPS"],
             "update_ms": single["time/update_ms"]},
            {"label": label, "trainer": f"batched x {n_runs}", "runs": n_runs, "env_steps_per_s": many["charts/SPS"],
             "update_ms": many["time/update_ms"]}]
    out = pd.DataFrame(rows)
    out["speedup"] = out["env_steps_per_s"] / single["charts/SPS"]
    return out
