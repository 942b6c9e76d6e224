"""The experiment grid of notebook 04: the compared methods as training keyword sets, and :func:`run_grid`, which
trains *arms* (one env, one method, many seeds) with the batched trainer on an executor (a local process pool or
Ray: :mod:`helpers.core.executor`) and gathers their tables."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import pandas as pd

from helpers.core.executor import map_tasks
from helpers.m2dqn.batched import train_batched
from helpers.m2dqn.dqn import Args, make_args
from helpers.m2dqn.sb3_reference import sb3_kwargs, train_sb3_dqn

__all__ = ["PRIMARY", "REFERENCE", "method_configs", "resolve", "arm_cost", "check_arm", "run_arm", "run_grid"]

# The method every comparison is about; the controls are defined relative to its M.
PRIMARY = "M2DQN"
# Stable-Baselines3's own DQN at the zoo's settings (helpers.m2dqn.sb3_reference): the level our baseline must reach.
REFERENCE = "SB3 DQN"
TRAINERS = ("batched", "sb3")


def method_configs(num_batches: int = 2, sweep_m: Sequence[int] = (4, 8), tilt: float = 10.0,
                   ) -> dict[str, dict[str, Any]]:
    """The compared methods as ``train_batched`` keyword sets, for M = ``num_batches`` minibatches of the env's B.

    Returns, in order:

    * ``SB3 DQN``: Stable-Baselines3's DQN at the zoo's settings (``trainer="sb3"``): the reference level;
    * ``DQN``: our vanilla DQN, the same algorithm as SB3's (batched trainer);
    * ``DDQN``: Double DQN, one minibatch of B per gradient step (the rl-baselines3-zoo schedule);
    * ``M2DQN``: M minibatches of B, loss = max of their means;
    * ``M2DQN M<m>`` for each ``m`` in ``sweep_m``: the same with m minibatches;
    * ``DDQN batch MB``: one minibatch of M*B (same samples per gradient step as M2DQN);
    * ``DDQN M steps``: M times the gradient steps of B (same samples and forward/backward work, M optimizer steps);
    * ``DDQN PER``: proportional prioritized replay (M2DQN's max acts like a crude prioritisation);
    * ``M2DQN tilted``: M minibatches, tilted loss with ``tilt`` (between mean and max).
    """
    for name, v in (("num_batches", num_batches), *((f"sweep_m[{i}]", m) for i, m in enumerate(sweep_m))):
        if not isinstance(v, int) or v < 2:
            raise ValueError(f"{name} must be an int >= 2 (M = 1 is DDQN), got {v!r}")
    out: dict[str, dict[str, Any]] = {
        REFERENCE: dict(algo="dqn", trainer="sb3"),
        "DQN": dict(algo="dqn"),
        "DDQN": dict(algo="ddqn"),
        PRIMARY: dict(algo="m2dqn", num_batches=num_batches, loss_agg="max"),
    }
    for m in sweep_m:
        if m != num_batches:
            out[f"M2DQN M{m}"] = dict(algo="m2dqn", num_batches=m, loss_agg="max")
    out.update({
        "DDQN batch MB": dict(algo="ddqn", batch_mult=num_batches),
        "DDQN M steps": dict(algo="ddqn", grad_mult=num_batches),
        "DDQN PER": dict(algo="ddqn", replay="prioritized"),
        "M2DQN tilted": dict(algo="m2dqn", num_batches=num_batches, loss_agg="tilted", tilt=tilt),
    })
    return out


def resolve(cfg: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Split an arm into (env_id, method label, ``make_args`` kwargs): ``seeds`` and ``trainer`` are dropped,
    ``batch_mult`` multiplies the env's B, ``grad_mult`` its gradient steps per training call."""
    cfg = dict(cfg)
    env_id = cfg.pop("env_id")
    method = cfg.pop("method", cfg.get("algo", "ddqn"))
    cfg.pop("seeds", None)
    cfg.pop("trainer", None)
    base = make_args(env_id, **{k: v for k, v in cfg.items() if k not in ("batch_mult", "grad_mult")})
    mult = int(cfg.pop("batch_mult", 1))
    if mult != 1:
        cfg["batch_size"] = base.batch_size * mult
    gmult = int(cfg.pop("grad_mult", 1))
    if gmult != 1:
        cfg["grad_steps"] = base.grad_steps * gmult
    return env_id, method, cfg


def arm_cost(cfg: dict[str, Any]) -> float:
    """Relative cost of an arm: seeds x gradient steps x rows per step (the MLP's matmuls dominate)."""
    env_id, _, kw = resolve(cfg)
    a: Args = make_args(env_id, **kw)
    calls = max(a.total_steps - a.learning_starts, 0) / a.train_frequency
    # SB3's single-run loop took ~1.7x a batched run's time per seed at the zoo's CartPole settings (notebook 04)
    per_seed = 1.7 if cfg.get("trainer") == "sb3" else 1.0
    return per_seed * len(cfg.get("seeds", [1])) * (calls * a.grad_steps * a.batch_size * a.num_batches
                                                    + a.total_steps)


def run_arm(cfg: dict[str, Any]) -> dict[str, Any]:
    """Top-level (picklable) task: train one arm and tag its tables with env, method and seed. Returns lists (one
    entry per seed) ``episodes``, ``evals``, ``losses`` (DataFrames) and ``metrics`` (dicts, with ``learning_rate``
    and ``time/task_wall_s``: this task's wall time, shared by its seeds)."""
    t0 = time.perf_counter()
    env_id, method, kw = resolve(cfg)
    if cfg.get("trainer", "batched") == "sb3":  # one process, the seeds one after another
        runs = [train_sb3_dqn(env_id, seed=s, **kw) for s in cfg["seeds"]]
    else:
        runs = train_batched(env_id, seeds=cfg["seeds"], **kw)
    out: dict[str, list] = {"episodes": [], "evals": [], "losses": [], "metrics": []}
    for run in runs:
        tag = {"env_id": env_id, "method": method, "seed": run.config["seed"]}
        for name in ("episodes", "evals", "losses"):
            out[name].append(getattr(run, name).assign(**tag))
        out["metrics"].append({**tag, **run.metrics, "learning_rate": run.config["learning_rate"]})
    wall = time.perf_counter() - t0
    for row in out["metrics"]:
        row["time/task_wall_s"] = wall
        row["time/task_runs"] = len(runs)
    return out


def run_grid(arms: list[dict[str, Any]], *, jobs: int = 2, progress: bool = True, executor: str | None = None,
             on_result: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, pd.DataFrame]:
    """Train every arm (``env_id``, ``method`` label, ``seeds`` list and ``train_batched`` kwargs, plus
    ``batch_mult`` / ``grad_mult``) with :func:`helpers.m2dqn.batched.train_batched` (or, for ``trainer="sb3"``,
    :func:`helpers.m2dqn.sb3_reference.train_sb3_dqn` per seed), one task per arm, through
    :func:`helpers.core.executor.map_tasks`.

    ``executor``: ``"local"`` (``jobs`` spawned worker processes, one torch thread each; ``jobs=1`` runs in this
    process), ``"ray"`` (one Ray task per arm, at most ``jobs`` in flight; a local Ray or the cluster at
    ``$RAY_ADDRESS``) or None for ``$HELPERS_EXECUTOR`` (default local). The costliest arms start first.
    ``on_result(i, out)`` is called as arm ``i`` finishes with :func:`run_arm`'s dict. Returns concatenated
    DataFrames ``episodes``, ``evals``, ``losses`` and ``metrics`` (one row per run), each with ``env_id``,
    ``method``, ``seed``, in the order of ``arms`` whatever the executor.
    """
    if not arms:
        raise ValueError("arms must be a non-empty list of dicts")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs!r}")
    for cfg in arms:  # fail fast, in this process, on bad input
        check_arm(cfg)
    order = sorted(range(len(arms)), key=lambda i: -arm_cost(arms[i]))
    outs = map_tasks(run_arm, arms, executor=executor, max_workers=jobs, progress=progress, on_result=on_result,
                     order=order, desc="arms")
    return {name: pd.concat([df for o in outs for df in o[name]], ignore_index=True)
            for name in ("episodes", "evals", "losses")} | {
        "metrics": pd.DataFrame([row for o in outs for row in o["metrics"]])}


def check_arm(cfg: dict[str, Any]) -> None:
    """Raise ValueError for an arm the workers would reject (no seeds, unknown trainer, bad ``make_args`` kwargs,
    settings SB3's DQN cannot express)."""
    if not cfg.get("seeds"):
        raise ValueError(f"every arm needs a non-empty 'seeds' list, got {cfg!r}")
    if cfg.get("trainer", "batched") not in TRAINERS:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {cfg['trainer']!r}")
    env_id, _, kw = resolve(cfg)
    args = make_args(env_id, **kw)
    if cfg.get("trainer") == "sb3":
        sb3_kwargs(args)  # raises for settings SB3's DQN cannot express
