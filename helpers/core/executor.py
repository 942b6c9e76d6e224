"""One way to run a list of independent tasks: in a local process pool (the default, one machine) or as Ray tasks
(a local Ray, or a cluster joined through ``RAY_ADDRESS``). Notebook 04's run grid and notebook 05's arms x seeds
both go through :func:`map_tasks`.

* ``executor="local"``: ``concurrent.futures.ProcessPoolExecutor`` with the ``spawn`` start method (safe inside a
  Jupyter kernel run by papermill, and with torch), ``max_workers`` processes (default 2), each with one torch
  intra-op thread; ``max_workers=1`` runs every task in this process, one after another.
* ``executor="ray"``: each task is one ``ray.remote`` call (``num_cpus=1``, one torch thread). If Ray is not
  initialised yet, ``ray.init()`` starts a local Ray with ``max_workers`` CPUs (all of them when None) or, when the
  ``RAY_ADDRESS`` environment variable is set, joins that cluster (``ray.init(address=...)``). At most
  ``max_workers`` tasks are in flight when given.
* ``executor=None`` or ``""``: the value of ``$HELPERS_EXECUTOR`` (how a papermill run picks Ray without a new
  parameter), else ``"local"``.

The task function must be a top-level (picklable) function and each task a picklable value; results come back in
task order whatever the executor and the completion order, so a grid's tables are the same under both executors
(the tasks seed themselves; a test checks it).

Ray docs: https://docs.ray.io/en/latest/ray-core/tasks.html (remote functions, ``ray.wait``) and
https://docs.ray.io/en/latest/ray-core/starting-ray.html (``ray.init`` and ``RAY_ADDRESS``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Sequence, TypeVar

from tqdm.auto import tqdm

__all__ = ["EXECUTORS", "EXECUTOR_ENV", "resolve_executor", "map_tasks"]

EXECUTORS = ("local", "ray")
# Environment variable naming the executor when the caller passes none (papermill runs: HELPERS_EXECUTOR=ray).
EXECUTOR_ENV = "HELPERS_EXECUTOR"
# Two workers: the dev and CI machines have 2 cores.
DEFAULT_LOCAL_WORKERS = 2

T = TypeVar("T")
R = TypeVar("R")


def resolve_executor(executor: str | None = None) -> str:
    """``executor`` if given (not None / ""), else ``$HELPERS_EXECUTOR``, else ``"local"``; checked against
    :data:`EXECUTORS`."""
    name = executor or os.environ.get(EXECUTOR_ENV) or "local"
    name = str(name).strip().lower()
    if name not in EXECUTORS:
        src = "executor" if executor else f"${EXECUTOR_ENV}"
        raise ValueError(f"{src} must be one of {EXECUTORS}, got {name!r}")
    return name


def _one_thread() -> None:
    """Worker set-up: one torch intra-op thread (two workers on two cores would otherwise fight over them)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def _call_one_thread(fn: Callable[[Any], Any], task: Any) -> Any:
    """What a Ray worker runs: :func:`_one_thread`, then ``fn(task)``."""
    _one_thread()
    return fn(task)


def map_tasks(fn: Callable[[T], R], tasks: Sequence[T], executor: str | None = None, max_workers: int | None = None,
              progress: bool = True, on_result: Callable[[int, R], None] | None = None,
              order: Sequence[int] | None = None, desc: str = "tasks") -> list[R]:
    """``[fn(t) for t in tasks]``, computed on ``executor``; the list is in task order.

    Args:
        fn: a top-level (picklable) function of one task.
        tasks: picklable task values.
        executor: ``"local"``, ``"ray"``, or None / ``""`` for ``$HELPERS_EXECUTOR`` (default local).
        max_workers: local: worker processes (default 2; 1 = run here, in order); ray: the largest number of tasks in
            flight and, when this call starts Ray itself without ``RAY_ADDRESS``, its CPU count (None: no limit, all
            CPUs).
        progress: show a tqdm bar over the tasks.
        on_result: called as ``on_result(i, result)`` in this process as each task finishes (completion order), e.g.
            to save it at once so that an interrupted grid can resume.
        order: task indices in the order to submit them (e.g. the costliest first); default ``range(len(tasks))``.
        desc: the progress bar's label.

    Raises ValueError on a bad argument; a task's exception is re-raised here (tasks already finished have been
    passed to ``on_result``).
    """
    name = resolve_executor(executor)
    tasks = list(tasks)
    if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
        raise ValueError(f"max_workers must be None or an int >= 1, got {max_workers!r}")
    order = list(range(len(tasks))) if order is None else [int(i) for i in order]
    if sorted(order) != list(range(len(tasks))):
        raise ValueError(f"order must be a permutation of range({len(tasks)}), got {order!r}")
    out: list[Any] = [None] * len(tasks)
    if not tasks:
        return out
    bar = tqdm(total=len(tasks), disable=not progress, desc=desc)

    def done(i: int, result: Any) -> None:
        out[i] = result
        if on_result is not None:
            on_result(i, result)
        bar.update()

    try:
        if name == "ray":
            _map_ray(fn, tasks, order, max_workers, done)
        elif (max_workers or DEFAULT_LOCAL_WORKERS) == 1:
            for i in order:  # in this process (no initializer: the caller's thread settings stay)
                done(i, fn(tasks[i]))
        else:
            _map_local(fn, tasks, order, max_workers or DEFAULT_LOCAL_WORKERS, done)
    finally:
        bar.close()
    return out


def _map_local(fn: Callable, tasks: list, order: list[int], workers: int, done: Callable[[int, Any], None]) -> None:
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=_one_thread) as pool:
        pending = {pool.submit(fn, tasks[i]): i for i in order}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    done(pending.pop(fut), fut.result())
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def _map_ray(fn: Callable, tasks: list, order: list[int], max_in_flight: int | None,
             done: Callable[[int, Any], None]) -> None:
    try:
        import ray
    except ImportError as e:  # pinned in requirements.txt; a hand-made env may lack it
        raise ImportError("executor='ray' needs the ray package (pip install -r requirements.txt)") from e
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:  # join an existing cluster
            ray.init(address=address)
        else:  # a local Ray on this machine
            ray.init(num_cpus=max_in_flight, include_dashboard=False)
    remote = ray.remote(num_cpus=1)(_call_one_thread)
    fn_ref = ray.put(fn)
    queue = list(order)
    in_flight: dict[Any, int] = {}
    limit = max_in_flight or len(tasks)
    try:
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                i = queue.pop(0)
                in_flight[remote.remote(fn_ref, tasks[i])] = i
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                done(in_flight.pop(ref), ray.get(ref))
    except BaseException:
        for ref in in_flight:
            ray.cancel(ref)
        raise
