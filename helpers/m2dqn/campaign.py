"""The resumable extra runs of notebook 04: CartPole-v1 under the single learning-rate protocol, and DDQN vs M2DQN on
the paper's four games at their rl-baselines3-zoo budgets, 20 seeds per game and arm.

Every finished run (game x arm x seed) is written at once to its own file, ``<out>/runs/<env>/<arm>/seed_<s>.json.gz``;
a restart skips the runs whose file exists. The protocol - the learning-rate rule, the decisions, the budgets, the
seed groups - is written to ``<out>/protocol.json`` before the first run, and a restart with another protocol is
refused (runs under two protocols never mix in one directory)::

    python -m helpers.m2dqn.campaign --plan cartpole games --out results/04_m2dqn_study [--executor ray] [--jobs 2]
    python -m helpers.m2dqn.campaign --plan games --out results/04_m2dqn_study --dry-run   # what is left, its cost
    python -m helpers.m2dqn.campaign --plan games --env Acrobot-v1 --method DDQN --out results/04_m2dqn_study

**Learning-rate protocol** (fixed before the runs): every arm trains at rl-baselines3-zoo's tuned rate for the game
(``hyperparams/dqn.yml``), SB3's reference included; the sensitivity pair, DDQN and M2DQN both at half that rate, runs
on the same CartPole seeds. No rate is chosen from the evaluation runs, and no method gets a rate another lacks.

Seeds of one (game, arm, lr) train in fixed groups of ``seeds_per_task`` (seeds 1-10, 11-20, ...) as one batched
task, whatever is left to run, so a resumed study stacks the same seeds together as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from helpers.core.executor import EXECUTORS, map_tasks
from helpers.core.results import atomic_write_bytes, atomic_write_text
from helpers.core.runtime import git_commit
from helpers.m2dqn import grid
from helpers.m2dqn.decide import Decisions
from helpers.m2dqn.dqn import ENV_DEFAULTS, make_args

__all__ = ["GAMES", "GAME_SEEDS", "SENSITIVITY_FACTOR", "LR_PROTOCOL", "PLANS", "RunSpec", "plan_runs", "protocol",
           "pending_tasks", "run_campaign", "load_runs", "study_arm", "train_or_read", "core_hours",
           "estimate_core_hours", "main"]

GAMES = ("CartPole-v1", "Acrobot-v1", "LunarLander-v3", "MountainCar-v0")
# The sensitivity pair's learning rate, as a multiple of the zoo's: the factor the earlier 2-seed sweep picked for
# M2DQN, so the re-run also shows what that rate gives DDQN.
SENSITIVITY_FACTOR = 0.5
LR_PROTOCOL = ("every arm at rl-baselines3-zoo's tuned learning rate for the game; sensitivity pair: DDQN and M2DQN "
               f"both at x{SENSITIVITY_FACTOR:g} that rate on the same CartPole-v1 seeds; no rate chosen from the "
               "evaluation runs")
# Seeds per game and arm of the games plan (sized for a per-game SD of ~0.09, a +0.05 effect, 4 comparisons, 80% power)
GAME_SEEDS = 20
CARTPOLE_METHODS = ("SB3 DQN", "DQN", "DDQN", "M2DQN", "DDQN batch MB", "DDQN M steps", "DDQN PER", "M2DQN tilted")
# (env, methods, lr factor, seeds) per plan.
PLANS: dict[str, list[tuple[str, tuple[str, ...], float, tuple[int, ...]]]] = {
    "cartpole": [("CartPole-v1", CARTPOLE_METHODS, 1.0, tuple(range(1, 11))),
                 ("CartPole-v1", ("DDQN", "M2DQN"), SENSITIVITY_FACTOR, tuple(range(1, 11)))],
    "games": [(env, ("DDQN", "M2DQN"), 1.0, tuple(range(1, GAME_SEEDS + 1))) for env in GAMES],
}
# Greedy evaluations per run (every total_steps / EVALS_PER_RUN env steps) and episodes per evaluation: notebook 04's
# 2500-step interval on CartPole's 50k steps.
EVALS_PER_RUN = 20
EVAL_EPISODES = 10
# Core-seconds per unit of grid.arm_cost, from notebook 04's committed full run (results/04_m2dqn: 7 CartPole arms,
# 173.6e6 cost units in 1886.6 s on 2 workers); it predicts the Acrobot-v1 baseline run's 2 x 1107 s within 3%.
CORE_S_PER_COST_UNIT = 2.174e-5


@dataclass(frozen=True)
class RunSpec:
    """One run: game, method (a :func:`helpers.m2dqn.grid.method_configs` name), learning-rate factor, seed."""

    env_id: str
    method: str
    lr_factor: float
    seed: int

    @property
    def arm(self) -> str:
        """The arm's label in tables: the method, with ``@ lr x<f>`` unless at the zoo's rate."""
        return self.method if self.lr_factor == 1.0 else f"{self.method} @ lr x{self.lr_factor:g}"

    def path(self, out: str | Path) -> Path:
        slug = self.arm.replace(" @ ", "@").replace(" ", "_")
        return Path(out) / "runs" / self.env_id / slug / f"seed_{self.seed:03d}.json.gz"


def plan_runs(plans: Sequence[str], envs: Sequence[str] | None = None,
              methods: Sequence[str] | None = None) -> list[RunSpec]:
    """Every run of the named plans (``PLANS``), each once (the plans share CartPole's DDQN and M2DQN seeds);
    ``envs`` / ``methods``: only these games / methods (None: all). Training a subset first lets whole games (or
    arms) finish in one sitting."""
    unknown = sorted(set(plans) - set(PLANS))
    if unknown or not plans:
        raise ValueError(f"plans must name some of {sorted(PLANS)}, got {list(plans)!r}")
    if envs is not None and (not envs or set(envs) - set(GAMES)):
        raise ValueError(f"envs must name some of {list(GAMES)}, got {list(envs)!r}")
    known = {m for name in plans for _, ms, _, _ in PLANS[name] for m in ms}
    if methods is not None and (not methods or set(methods) - known):
        raise ValueError(f"methods must name some of {sorted(known)}, got {list(methods)!r}")
    out: dict[RunSpec, None] = {}
    for name in plans:
        for env, arm_methods, factor, seeds in PLANS[name]:
            if envs is not None and env not in envs:
                continue
            for m in arm_methods:
                if methods is not None and m not in methods:
                    continue
                for s in seeds:
                    out[RunSpec(env, m, float(factor), int(s))] = None
    return list(out)


def protocol(*, steps_scale: float = 1.0, num_batches: int = 2, tilt: float = 10.0, seeds_per_task: int = 10,
             decisions: Decisions = Decisions()) -> dict[str, Any]:
    """The study's protocol as stored in ``protocol.json``: what must not change between the runs of one directory."""
    if not 0 < steps_scale <= 1:
        raise ValueError(f"steps_scale must be in (0, 1], got {steps_scale!r}")
    if not isinstance(seeds_per_task, int) or seeds_per_task < 1:
        raise ValueError(f"seeds_per_task must be an int >= 1, got {seeds_per_task!r}")
    return {"lr_protocol": LR_PROTOCOL, "sensitivity_factor": SENSITIVITY_FACTOR, "decisions": decisions.as_dict(),
            "steps_scale": float(steps_scale), "num_batches": int(num_batches), "tilt": float(tilt),
            "seeds_per_task": seeds_per_task, "evals_per_run": EVALS_PER_RUN, "eval_episodes": EVAL_EPISODES,
            "zoo_settings": {e: {k: list(v) if isinstance(v, tuple) else v for k, v in ENV_DEFAULTS[e].items()}
                             for e in GAMES}}


def _arm_cfg(env_id: str, method: str, factor: float, seeds: list[int], proto: dict[str, Any]) -> dict[str, Any]:
    """The :func:`helpers.m2dqn.grid.run_grid` arm of these seeds under ``proto``."""
    base = make_args(env_id)
    steps = max(int(base.total_steps * proto["steps_scale"]), EVALS_PER_RUN)
    cfg = grid.method_configs(proto["num_batches"], (), proto["tilt"])[method]
    return dict(env_id=env_id, method=RunSpec(env_id, method, factor, 0).arm, seeds=seeds, total_steps=steps,
                learning_rate=base.learning_rate * factor, eval_interval=steps // EVALS_PER_RUN,
                eval_episodes=proto["eval_episodes"],
                learning_starts=min(base.learning_starts, steps // 4), **cfg)


def _pending_groups(out: str | Path, specs: Sequence[RunSpec], k: int) -> list[tuple[str, str, float, list[int]]]:
    """(env, method, lr factor, seeds) of each fixed seed group (``k`` seeds, by seed number) with a file missing."""
    groups: dict[tuple[str, str, float, int], list[int]] = {}
    for s in specs:
        groups.setdefault((s.env_id, s.method, s.lr_factor, (s.seed - 1) // k), []).append(s.seed)
    return [(env, method, factor, sorted(seeds)) for (env, method, factor, _), seeds in groups.items()
            if any(not RunSpec(env, method, factor, s).path(out).exists() for s in seeds)]


def pending_tasks(out: str | Path, specs: Sequence[RunSpec], proto: dict[str, Any]) -> list[dict[str, Any]]:
    """The arms still to train: the fixed seed groups (``seeds_per_task``, by seed number: 1-10, 11-20, ...) of each
    (game, method, lr) with a run file missing. Each is a :func:`helpers.m2dqn.grid.run_grid` arm."""
    return [_arm_cfg(env, method, factor, seeds, proto)
            for env, method, factor, seeds in _pending_groups(out, specs, proto["seeds_per_task"])]


def _check_protocol(out: Path, proto: dict[str, Any]) -> None:
    path = out / "protocol.json"
    if path.exists():
        old = json.loads(path.read_text())
        mine = {k: v for k, v in old.items() if k not in ("git_commit", "plans")}
        if json.loads(json.dumps(proto)) != mine:
            diff = sorted(k for k in set(mine) | set(proto) if mine.get(k) != json.loads(json.dumps(proto)).get(k))
            raise ValueError(f"{out} holds runs under another protocol (differs in {diff}); use another --out")
    else:
        atomic_write_text(path, json.dumps({**proto, "git_commit": git_commit()}, indent=1) + "\n")


def _save_arm(out: Path, cfg: dict[str, Any], factor: float, method: str, res: dict[str, Any]) -> None:
    """Split a finished arm into one gzip'ed JSON file per seed (atomic writes)."""
    for k, row in enumerate(res["metrics"]):
        spec = RunSpec(cfg["env_id"], method, factor, int(row["seed"]))
        doc = {"spec": {"env_id": spec.env_id, "method": spec.method, "lr_factor": spec.lr_factor, "seed": spec.seed,
                        "arm": spec.arm},
               "metrics": row, "git_commit": git_commit(),
               **{name: res[name][k].to_dict(orient="list") for name in ("episodes", "evals", "losses")}}
        atomic_write_bytes(spec.path(out), gzip.compress(json.dumps(doc, default=float).encode(), mtime=0))


def run_campaign(out: str | Path, plans: Sequence[str], *, envs: Sequence[str] | None = None,
                 methods: Sequence[str] | None = None, executor: str | None = None, jobs: int = 2,
                 steps_scale: float = 1.0, seeds_per_task: int = 10, num_batches: int = 2, tilt: float = 10.0,
                 decisions: Decisions = Decisions(), progress: bool = True) -> dict[str, int]:
    """Train every missing run of ``plans`` into ``out`` (see the module docstring); each finished arm's runs are
    saved as it completes. Returns ``{"planned", "done_before", "trained"}`` run counts."""
    out = Path(out)
    proto = protocol(steps_scale=steps_scale, num_batches=num_batches, tilt=tilt, seeds_per_task=seeds_per_task,
                     decisions=decisions)
    specs = plan_runs(plans, envs, methods)
    groups = _pending_groups(out, specs, proto["seeds_per_task"])
    tasks = [_arm_cfg(env, method, factor, seeds, proto) for env, method, factor, seeds in groups]
    done_before = sum(s.path(out).exists() for s in specs)
    if not tasks:
        return {"planned": len(specs), "done_before": done_before, "trained": 0}
    _check_protocol(out, proto)

    def save(i: int, res: dict[str, Any]) -> None:
        _save_arm(out, tasks[i], groups[i][2], groups[i][1], res)

    grid.run_grid(tasks, jobs=jobs, progress=progress, executor=executor, on_result=save)
    return {"planned": len(specs), "done_before": done_before,
            "trained": sum(len(t["seeds"]) for t in tasks)}


def _read_run(path: Path) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """One run file: its ``episodes`` / ``evals`` / ``losses`` tables and its metrics row, tagged with env, arm
    label (``method``) and seed."""
    doc = json.loads(gzip.decompress(path.read_bytes()))
    sp = doc["spec"]
    tag = {"env_id": sp["env_id"], "method": sp["arm"], "seed": sp["seed"]}
    tables = {name: pd.DataFrame(doc[name]).assign(**tag) for name in ("episodes", "evals", "losses")}
    return tables, {**doc["metrics"], **tag, "lr_factor": sp["lr_factor"]}


def _concat(runs: list[tuple[dict[str, pd.DataFrame], dict[str, Any]]]) -> dict[str, pd.DataFrame]:
    if not runs:
        return {name: pd.DataFrame(columns=["env_id", "method", "seed"])
                for name in ("episodes", "evals", "losses", "metrics")}
    return {name: pd.concat([t[name] for t, _ in runs], ignore_index=True)
            for name in ("episodes", "evals", "losses")} | {"metrics": pd.DataFrame([m for _, m in runs])}


def load_runs(out: str | Path) -> dict[str, pd.DataFrame]:
    """Every run file under ``<out>/runs`` as :func:`helpers.m2dqn.grid.run_grid`'s tables (``episodes``,
    ``evals``, ``losses``, ``metrics``), ``method`` = the arm label (:attr:`RunSpec.arm`), plus ``lr_factor`` in
    ``metrics``. Empty tables when there is none."""
    return _concat([_read_run(f) for f in sorted((Path(out) / "runs").glob("*/*/seed_*.json.gz"))])


def _settings(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """What decides an arm's runs besides its seeds: the trainer and every resolved ``make_args`` field."""
    env_id, _, kw = grid.resolve(cfg)
    return cfg.get("trainer", "batched"), asdict(make_args(env_id, **kw))


def study_arm(out: str | Path, arm: dict[str, Any], method: str, lr_factor: float) -> dict[str, pd.DataFrame] | None:
    """The runs of ``arm`` (a :func:`helpers.m2dqn.grid.run_grid` arm of ``method`` at ``lr_factor`` x the zoo's
    rate) read from the study in ``out``, as ``run_grid``'s tables - or None unless the study trained them exactly
    as ``run_grid`` would: every seed's file present, the same trainer and resolved settings (budget, rate,
    evaluation, M, ...), and, for the batched trainer (whose stacked matmuls round each seed by its batch), the arm's
    seeds one whole seed group of the study (SB3's reference trains seed by seed: any subset)."""
    path = Path(out) / "protocol.json"
    if not path.exists():
        return None
    proto = json.loads(path.read_text())
    seeds = sorted(int(s) for s in arm["seeds"])
    specs = [RunSpec(arm["env_id"], method, float(lr_factor), s) for s in seeds]
    if not all(sp.path(out).exists() for sp in specs):
        return None
    try:
        mine = _settings(arm)
        theirs = _settings(_arm_cfg(arm["env_id"], method, float(lr_factor), seeds, proto))
    except (KeyError, ValueError):  # a method or env this study's protocol cannot express
        return None
    if mine != theirs:
        return None
    k = int(proto["seeds_per_task"])
    one_group = seeds == list(range(seeds[0], seeds[0] + k)) and (seeds[0] - 1) % k == 0
    if mine[0] == "batched" and not one_group:
        return None
    runs = [_read_run(sp.path(out)) for sp in specs]
    if any(m["method"] != arm["method"] for _, m in runs):  # the arm's label in the tables
        return None
    return _concat(runs)


def train_or_read(arms: list[dict[str, Any]], keys: Sequence[tuple[str, float]], study: str | Path | None, *,
                  jobs: int = 2, executor: str | None = None, progress: bool = True
                  ) -> tuple[dict[str, pd.DataFrame], list[bool]]:
    """:func:`helpers.m2dqn.grid.run_grid` over ``arms``, except that an arm whose runs the study in ``study``
    holds exactly as it would train them (:func:`study_arm`; ``keys[i]`` = (method, lr factor) of ``arms[i]``) is
    read, not retrained. Returns run_grid's tables (arms in order) and, per arm, whether it was read."""
    if len(keys) != len(arms):
        raise ValueError(f"one (method, lr_factor) key per arm: {len(keys)} keys for {len(arms)} arms")
    labels = [(a["env_id"], a["method"]) for a in arms]
    if len(set(labels)) != len(labels):  # the tables tell arms apart by (env_id, method) only
        raise ValueError(f"two arms share an (env_id, method) label: {labels}")
    read = [study_arm(study, a, m, f) if study else None for a, (m, f) in zip(arms, keys)]
    todo = [a for a, r in zip(arms, read) if r is None]
    trained = grid.run_grid(todo, jobs=jobs, executor=executor, progress=progress) if todo else None
    parts: list[dict[str, pd.DataFrame]] = []
    for a, r in zip(arms, read):
        if r is not None:
            parts.append(r)
        else:
            assert trained is not None
            parts.append({name: t[(t.env_id == a["env_id"]) & (t.method == a["method"])]
                          for name, t in trained.items()})
    out = {name: pd.concat([p[name] for p in parts], ignore_index=True)
           for name in ("episodes", "evals", "losses", "metrics")}
    return out, [r is not None for r in read]


def core_hours(metrics: pd.DataFrame) -> pd.DataFrame:
    """Measured cost per (game, arm): the sum over runs of their task's wall time / runs in the task, in hours (one
    task runs on one core)."""
    if metrics.empty:
        return pd.DataFrame(columns=["env_id", "method", "runs", "core_hours"])
    m = metrics.assign(core_h=metrics["time/task_wall_s"] / metrics["time/task_runs"] / 3600.0)
    return (m.groupby(["env_id", "method"], sort=False).agg(runs=("seed", "size"), core_hours=("core_h", "sum"))
            .reset_index())


def estimate_core_hours(tasks: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Predicted core-hours per (game, arm) of ``tasks`` (:func:`pending_tasks`) from :data:`CORE_S_PER_COST_UNIT`."""
    rows = [{"env_id": t["env_id"], "method": t["method"], "runs": len(t["seeds"]),
             "core_hours": grid.arm_cost(t) * CORE_S_PER_COST_UNIT / 3600.0} for t in tasks]
    if not rows:
        return pd.DataFrame(columns=["env_id", "method", "runs", "core_hours"])
    return pd.DataFrame(rows).groupby(["env_id", "method"], sort=False).sum().reset_index()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m helpers.m2dqn.campaign", description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", nargs="+", required=True, choices=sorted(PLANS), help="which runs")
    p.add_argument("--env", nargs="+", choices=GAMES, default=None, help="only these games (default: all)")
    p.add_argument("--method", nargs="+", default=None, help="only these methods (default: all of the plans')")
    p.add_argument("--out", required=True, help="study directory (runs/ and protocol.json)")
    p.add_argument("--executor", choices=EXECUTORS, default=None,
                   help="local process pool or Ray (default: $HELPERS_EXECUTOR, else local)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes / Ray tasks in flight (default 2)")
    p.add_argument("--seeds-per-task", type=int, default=10, help="seeds stacked per batched task (default 10)")
    p.add_argument("--steps-scale", type=float, default=1.0, help="fraction of the zoo budgets (checks only)")
    p.add_argument("--dry-run", action="store_true", help="print what is left and its estimated cost; train nothing")
    a = p.parse_args(argv)
    try:
        proto = protocol(steps_scale=a.steps_scale, seeds_per_task=a.seeds_per_task)
        specs = plan_runs(a.plan, a.env, a.method)
        tasks = pending_tasks(a.out, specs, proto)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    est = estimate_core_hours(tasks)
    left = int(est["runs"].sum()) if len(est) else 0
    print(f"{len(specs)} runs planned, {len(specs) - left} done, {left} to train in {len(tasks)} tasks; "
          f"estimated {est['core_hours'].sum() * a.steps_scale:.1f} core-hours")
    if len(est):
        print(est.assign(core_hours=(est.core_hours * a.steps_scale).round(2)).to_string(index=False))
    if a.dry_run or not tasks:
        return 0
    try:
        counts = run_campaign(a.out, a.plan, envs=a.env, methods=a.method, executor=a.executor, jobs=a.jobs,
                              steps_scale=a.steps_scale, seeds_per_task=a.seeds_per_task)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"trained {counts['trained']} runs into {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
