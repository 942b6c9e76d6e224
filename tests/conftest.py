"""Shared fixtures. ``helpers`` is imported first so TRITON_INTERPRET is set before anything imports triton."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import helpers  # noqa: F401  (must precede any triton import)
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Every notebook executed once on the smoke profile through the batch runner (shared by several tests)."""
    out = tmp_path_factory.mktemp("smoke_results")
    proc = subprocess.run(
        [sys.executable, "-m", "helpers.run", "--profile", "smoke", "--jobs", "2", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO,
    )
    print(proc.stdout)
    print(proc.stderr, file=sys.stderr)
    return out, proc
