"""The experiment grid of notebook 04: the compared methods as :func:`helpers.m2dqn.dqn.train_dqn` keyword sets,
and a process pool that runs (env, method, seed) configs and gathers their tables."""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from helpers.m2dqn.dqn import ENV_DEFAULTS, Args, make_args, train_dqn

__all__ = ["method_configs", "resolve", "run_grid"]


def method_configs(num_batches: int = 4, batch_size: int | None = None, tilt: float = 10.0,
                   ) -> dict[str, dict[str, Any]]:
    """The compared methods as ``train_dqn`` keyword sets, for M = ``num_batches`` minibatches of B each.

    ``batch_size=None`` keeps each env's default B. Returns, in order:

    * ``DDQN``: Double DQN, one minibatch of B per update;
    * ``M2DQN``: M minibatches of B, loss = max of their means;
    * ``DDQN batch MB``: one minibatch of M*B (same samples per update as M2DQN);
    * ``DDQN M steps``: M gradient steps of B per update (same samples and forward/backward work as M2DQN, M
      optimizer steps);
    * ``M2DQN tilted``: M minibatches, tilted loss with ``tilt`` (between mean and max).
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    b = {} if batch_size is None else {"batch_size": batch_size}
    return {
        "DDQN": dict(algo="ddqn", **b),
        "M2DQN": dict(algo="m2dqn", num_batches=num_batches, loss_agg="max", **b),
        "DDQN batch MB": dict(algo="ddqn", batch_mult=num_batches, **b),
        "DDQN M steps": dict(algo="ddqn", grad_steps=num_batches, **b),
        "M2DQN tilted": dict(algo="m2dqn", num_batches=num_batches, loss_agg="tilted", tilt=tilt, **b),
    }


def resolve(cfg: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Split a grid config into (env_id, method label, train_dqn kwargs); ``batch_mult`` multiplies B."""
    cfg = dict(cfg)
    env_id = cfg.pop("env_id")
    method = cfg.pop("method", cfg.get("algo", "ddqn"))
    mult = int(cfg.pop("batch_mult", 1))
    if mult != 1:
        base = cfg.get("batch_size", ENV_DEFAULTS.get(env_id, {}).get("batch_size", Args.batch_size))
        cfg["batch_size"] = base * mult
    return env_id, method, cfg


def _worker_init() -> None:
    # Two workers on two cores: one intra-op thread each, or they fight over the cores.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _run_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Top-level (picklable) worker: train one config and tag its tables with env, method and seed."""
    env_id, method, kw = resolve(cfg)
    run = train_dqn(env_id, **kw)
    tag = {"env_id": env_id, "method": method, "seed": run.config["seed"]}
    out = {}
    for name in ("episodes", "evals", "losses"):
        df = getattr(run, name).copy()
        for k, v in tag.items():
            df[k] = v
        out[name] = df
    out["metrics"] = {**tag, **run.metrics}
    return out


def _cost(cfg: dict[str, Any]) -> float:
    """A rough relative cost for scheduling the longest runs first."""
    env_id, _, kw = resolve(cfg)
    steps = kw.get("total_steps", ENV_DEFAULTS.get(env_id, {}).get("total_steps", Args.total_steps))
    return steps * (1.0 + 0.3 * kw.get("grad_steps", 1) * kw.get("num_batches", 1))


def run_grid(configs: list[dict[str, Any]], *, jobs: int = 2, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Run every config (``train_dqn`` kwargs plus ``env_id`` and an optional ``method`` label) on ``jobs`` processes.

    Workers are started with the ``spawn`` context (safe inside a Jupyter kernel run by papermill, and with torch)
    and use one torch thread each. ``jobs=1`` runs in this process. Returns concatenated DataFrames
    ``episodes``, ``evals``, ``losses`` and ``metrics`` (one row per run), each with ``env_id``, ``method``, ``seed``.
    """
    if not configs:
        raise ValueError("configs must be a non-empty list of dicts")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs!r}")
    for cfg in configs:  # fail fast, in this process, on bad input
        env_id, _, kw = resolve(cfg)
        make_args(env_id, **kw)
    order = sorted(range(len(configs)), key=lambda i: -_cost(configs[i]))
    outs: list[dict[str, Any] | None] = [None] * len(configs)
    bar = tqdm(total=len(configs), disable=not progress, desc="runs")
    if jobs == 1:
        for i in order:
            outs[i] = _run_config(configs[i])
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init) as pool:
            futures = {pool.submit(_run_config, configs[i]): i for i in order}
            for fut in as_completed(futures):
                outs[futures[fut]] = fut.result()
                bar.update()
    bar.close()
    done = [o for o in outs if o is not None]
    return {
        "episodes": pd.concat([o["episodes"] for o in done], ignore_index=True),
        "evals": pd.concat([o["evals"] for o in done], ignore_index=True),
        "losses": pd.concat([o["losses"] for o in done], ignore_index=True),
        "metrics": pd.DataFrame([o["metrics"] for o in done]),
    }
