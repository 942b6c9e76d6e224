"""Device and backend selection, library versions, seeding: the small core every notebook uses.

Backends
--------
* ``"triton"`` - the Triton kernels. Compiled on a CUDA GPU; on a CPU-only machine they run under the Triton
  interpreter (``TRITON_INTERPRET=1``), which is exact but slow: use it to validate kernels on small shapes.
* ``"torch"`` - a vectorized PyTorch path that computes the same numbers (bit-identical codes and scales for
  the FP8 quantizers), used for heavy experiments on the CPU.

``resolve_backend("auto")`` picks ``"triton"`` when CUDA is present and ``"torch"`` otherwise. The environment
variable ``HELPERS_BACKEND`` (``triton`` | ``torch``) overrides the automatic choice.

``TRITON_INTERPRET`` must be set before :mod:`triton` is first imported, so this module sets it (when no GPU is
visible and the user has not set it) at import time; :mod:`helpers` imports this module first.
"""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "REPO_ROOT",
    "device",
    "has_cuda",
    "triton_interpreted",
    "resolve_backend",
    "environment_info",
    "describe_environment",
    "git_commit",
    "seed_everything",
]

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "HELPERS_BACKEND"
REPO_ROOT = Path(__file__).resolve().parents[2]  # helpers/core/runtime.py -> the repository


def has_cuda() -> bool:
    """True when a CUDA device is visible to torch."""
    return torch.cuda.is_available()


# The interpreter switch is read by triton at import time; set it before anyone imports triton.
if not has_cuda() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def triton_interpreted() -> bool:
    """True when Triton kernels run under the CPU interpreter rather than compiled for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device() -> torch.device:
    """The device experiments run on: ``cuda`` when present, else ``cpu``."""
    return torch.device("cuda" if has_cuda() else "cpu")


def resolve_backend(backend: str = "auto") -> str:
    """Turn ``"auto"`` | ``"triton"`` | ``"torch"`` into a concrete backend name (``"triton"`` or ``"torch"``).

    ``"auto"`` honours ``HELPERS_BACKEND`` if set, else picks ``"triton"`` on a GPU and ``"torch"`` on the CPU.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in ("triton", "torch"):
            raise ValueError(f"{BACKEND_ENV} must be 'triton' or 'torch', got {forced!r}")
        return forced
    return "triton" if has_cuda() else "torch"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The repository's HEAD commit (with ``-dirty`` when the tree has uncommitted changes), or None.

    Changes under ``results/`` do not count: a run rewrites the committed results it is about to replace, and that
    says nothing about the code that produced them."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", "-q", "HEAD"],
            capture_output=True, text=True, timeout=10,
        )
        sha = proc.stdout.strip()
        if proc.returncode != 0 or not sha:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere): CPU benchmark figures depend on it
    (cache sizes decide whether a "memory copy" runs from DRAM or from L3)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment_info() -> dict[str, Any]:
    """Device, backend and library versions, as recorded in every ``metrics.json``."""
    info: dict[str, Any] = {
        "device": str(device()),
        "gpu": torch.cuda.get_device_name(0) if has_cuda() else None,
        "backend": resolve_backend("auto"),
        "triton_mode": "interpreter" if triton_interpreted() else "compiled",
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in ("torch", "triton", "numpy", "pandas", "scipy", "gymnasium", "matplotlib", "papermill")
        },
        "git_commit": git_commit(),
    }
    return info


def describe_environment() -> str:
    """A short human-readable summary of :func:`environment_info` for a notebook's first cell."""
    info = environment_info()
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    gpu = info["gpu"] or "no GPU"
    return (
        f"device: {info['device']} ({gpu}); default backend: {info['backend']}; "
        f"triton: {info['triton_mode']}; {info['cpu_count']} CPU cores ({info['cpu_model']}); python {info['python']}\n"
        f"versions: {versions}\ncommit: {info['git_commit']}"
    )


def seed_everything(seed: int, env: Any = None, *, deterministic: bool = True) -> np.random.Generator:
    """Seed ``random``, NumPy, torch (CPU and CUDA) and, when given, a Gymnasium environment.

    The environment is seeded through ``env.reset(seed=seed)`` and ``env.action_space.seed(seed)`` (a vector
    environment seeds each sub-environment with ``seed + i``). Returns a NumPy ``Generator`` seeded with ``seed``
    for code that prefers an explicit generator over global state.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if has_cuda():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if env is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
        if hasattr(env, "observation_space"):
            env.observation_space.seed(seed)
    return np.random.default_rng(seed)
