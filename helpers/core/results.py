"""Atomic writes of a notebook's metrics, figures and tables, with provenance.

Every notebook creates one :class:`Results`, saves figures and tables through it, adds the rows of its final
"measured vs paper" table with :meth:`Results.add_result`, one verdict per claim with :meth:`Results.add_verdict`
(reproduced / partly / not reproduced / not testable here, with the reason), and ends with :meth:`Results.finalize`, which writes
``<results dir>/<notebook>/metrics.json``. The gallery (:mod:`helpers.report`) is built from those files alone.

The results directory is, in order: the ``out_dir`` argument, the ``HELPERS_RESULTS_DIR`` environment variable
(set by the batch runner, :mod:`helpers.run`), or ``results-interactive/`` at the repository root (git-ignored): a
notebook run by hand in JupyterLab never overwrites the committed ``results/``. To write an interactive run
elsewhere, set ``HELPERS_RESULTS_DIR`` before the notebook creates its :class:`Results` (or pass ``out_dir``).

The paths the save methods return display (in a notebook cell's output) as ``saved <notebook>/<file>``, never as the
machine's absolute path, so a committed report holds no path of the machine that ran it.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from helpers.core.runtime import REPO_ROOT, environment_info

__all__ = ["RESULTS_ENV", "PROFILES", "INTERACTIVE_DIR", "Results", "ResultTable", "SavedPath", "results_root",
           "atomic_write_bytes", "atomic_write_text"]

RESULTS_ENV = "HELPERS_RESULTS_DIR"
# Where a notebook run outside the batch runner (no HELPERS_RESULTS_DIR, no out_dir) writes: git-ignored.
INTERACTIVE_DIR = "results-interactive"
PROFILES = ("smoke", "full")
# The verdict a notebook gives each claim it tests, in the words the reports use. "inconclusive": the interval covers
# both no effect and the pre-registered target effect (the data neither show the effect nor rule it out).
VERDICTS = ("reproduced", "partly", "not reproduced", "inconclusive", "not testable here")
# Figures are committed with the results: a modest DPI keeps each PNG well under the 5 MB limit.
FIGURE_DPI = 110
_UMASK = os.umask(0)
os.umask(_UMASK)


def results_root(out_dir: str | os.PathLike | None = None, profile: str = "full") -> Path:
    """The directory holding one sub-directory per notebook: ``out_dir``, else ``$HELPERS_RESULTS_DIR``, else
    ``results/`` for the full profile and ``results-smoke/`` (git-ignored) for the smoke profile, so that a quick
    pass never overwrites the committed full-profile results."""
    if out_dir is not None:
        return Path(out_dir)
    env = os.environ.get(RESULTS_ENV)
    if env:
        return Path(env)
    return REPO_ROOT / ("results" if profile == "full" else "results-smoke")


class SavedPath(type(Path())):  # type: ignore[misc]  (PosixPath or WindowsPath, whichever Path() is here)
    """The path of a file a :class:`Results` wrote: an ordinary ``Path`` whose display in a notebook output is
    ``saved <folder>/<file>``. A cell ending in ``res.save_figure(...)`` therefore shows no absolute path of the
    machine in the executed notebook or its HTML report (``repr()`` and ``str()`` are unchanged)."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython's text/plain display hook
        printer.text(f"saved {self.parent.name}/{self.name}")


class ResultTable(pd.DataFrame):
    """The notebook's "measured vs paper" table: a DataFrame whose notebook display never truncates a cell
    (pandas cuts text at ``display.max_colwidth`` = 50 characters, which hid the ``quantity`` and ``note``)."""

    @property
    def _constructor(self) -> type[pd.DataFrame]:
        return ResultTable

    def _repr_html_(self) -> str | None:
        with pd.option_context("display.max_colwidth", None):
            return super()._repr_html_()

    def __repr__(self) -> str:
        with pd.option_context("display.max_colwidth", None, "display.width", 250):
            return super().__repr__()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``.

    A crash mid-write leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; results are shared files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(value: Any) -> Any:
    """Plain JSON types; NaN/inf become None (JSON has no NaN), tensors and numpy scalars become numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


class Results:
    """Collects one notebook run's outputs under ``<root>/<notebook>/`` and writes ``metrics.json`` last.

    Args:
        notebook: the notebook's stem, e.g. ``"01_fp8_blockwise_quant"``.
        title: a one-line title shown on the gallery card.
        profile: ``"smoke"`` or ``"full"``.
        params: the notebook's parameters (recorded verbatim).
        out_dir: overrides the results root (see module docstring).
    """

    def __init__(
        self,
        notebook: str,
        *,
        title: str,
        profile: str,
        params: dict[str, Any] | None = None,
        out_dir: str | os.PathLike | None = None,
    ) -> None:
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
        if not notebook or "/" in notebook:
            raise ValueError(f"notebook must be a bare notebook name, got {notebook!r}")
        self.notebook = notebook
        self.title = title
        self.profile = profile
        self.params = dict(params or {})
        if out_dir is None and not os.environ.get(RESULTS_ENV):
            root = REPO_ROOT / INTERACTIVE_DIR
            print(f"interactive run: results go to {INTERACTIVE_DIR}/{notebook}/ (git-ignored); set {RESULTS_ENV} "
                  "or pass out_dir= to write elsewhere")
        else:
            root = results_root(out_dir, profile)
        self.dir = root / notebook
        self.dir.mkdir(parents=True, exist_ok=True)
        self._t0 = time.perf_counter()
        self._started = datetime.now(timezone.utc)
        self.metrics: dict[str, Any] = {}
        self.results: list[dict[str, Any]] = []
        self.verdicts: list[dict[str, str]] = []
        self.figures: list[str] = []
        self.tables: list[str] = []
        self.headline_figure: str | None = None

    # -- outputs -------------------------------------------------------------------------------------------------
    def save_figure(self, fig: Any, name: str, *, headline: bool = False) -> SavedPath:
        """Save a matplotlib figure as ``<name>.png``; ``headline=True`` makes it the gallery card's picture
        (the first saved figure is the default headline)."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
        fname = f"{name}.png"
        path = SavedPath(atomic_write_bytes(self.dir / fname, buf.getvalue()))
        if fname not in self.figures:
            self.figures.append(fname)
        if headline or self.headline_figure is None:
            self.headline_figure = fname
        return path

    def save_table(self, df: pd.DataFrame, name: str) -> SavedPath:
        """Save a DataFrame as ``<name>.csv``."""
        fname = f"{name}.csv"
        path = SavedPath(atomic_write_text(self.dir / fname, df.to_csv(index=False)))
        if fname not in self.tables:
            self.tables.append(fname)
        return path

    def log(self, **metrics: Any) -> None:
        """Record scalar metrics (names ``namespace/snake_case`` by convention; use ``log(**{"a/b": 1})``)."""
        self.metrics.update(metrics)

    def log_dict(self, metrics: dict[str, Any], prefix: str = "") -> None:
        """Record a dict of metrics, each name prefixed with ``prefix``."""
        self.metrics.update({f"{prefix}{k}": v for k, v in metrics.items()})

    def add_result(self, quantity: str, measured: Any, paper: Any = "", note: str = "") -> None:
        """One row of the notebook's final table: what we measured beside what the paper (or engine) reports."""
        self.results.append({"quantity": quantity, "measured": measured, "paper": paper, "note": note})

    def add_verdict(self, claim: str, verdict: str, reason: str) -> None:
        """One line of the verdict block that opens the Result section and the gallery card: the paper's ``claim``,
        our ``verdict`` (one of :data:`VERDICTS`) and the ``reason`` in a sentence (what was measured, or why it
        cannot be tested here)."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        if not claim.strip() or not reason.strip():
            raise ValueError("claim and reason must be non-empty sentences")
        self.verdicts.append({"claim": claim, "verdict": verdict, "reason": reason})

    def verdict_markdown(self) -> str:
        """The verdicts as a Markdown list (``display(Markdown(res.verdict_markdown()))`` in the Result cell)."""
        return "\n".join(f"- **{v['verdict']}**: {v['claim']} - {v['reason']}" for v in self.verdicts)

    def result_table(self) -> ResultTable:
        """The rows added with :meth:`add_result`, for display at the end of the notebook (a :class:`ResultTable`:
        a DataFrame whose display does not truncate the ``quantity`` / ``note`` text)."""
        return ResultTable(self.results, columns=["quantity", "measured", "paper", "note"])

    # -- provenance ----------------------------------------------------------------------------------------------
    def finalize(self) -> SavedPath:
        """Write ``metrics.json`` (and ``results.csv`` with the final table); returns the metrics path."""
        if not self.verdicts:
            raise ValueError(f"{self.notebook}: no verdict recorded; call add_verdict() for every claim before "
                             "finalize()")
        if self.results:
            self.save_table(self.result_table(), "results")
        payload = {
            "notebook": self.notebook,
            "title": self.title,
            "profile": self.profile,
            "parameters": self.params,
            "environment": environment_info(),
            "started_at": self._started.isoformat(timespec="seconds"),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(time.perf_counter() - self._t0, 2),
            "metrics": self.metrics,
            "verdicts": self.verdicts,
            "results": self.results,
            "figures": self.figures,
            "headline_figure": self.headline_figure,
            "tables": self.tables,
        }
        payload["git_commit"] = payload["environment"]["git_commit"]
        return SavedPath(atomic_write_text(self.dir / "metrics.json", json.dumps(_jsonable(payload), indent=2) + "\n"))
