"""Batch runner: execute notebooks headlessly with papermill, render HTML reports, rebuild the gallery.

    python -m helpers.run [--profile smoke|full] [--only NAME ...] [--jobs N] [--out DIR] [-p KEY VALUE ...]

Each notebook runs in its own papermill process with an explicit kernel name (papermill #761: without one,
venvs hit NoSuchKernel), a per-cell timeout, and its log in ``<out>/<notebook>/run.log``. Notebooks write their
figures and ``metrics.json`` into ``<out>/<notebook>/`` through :class:`helpers.core.results.Results` (the runner sets
``HELPERS_RESULTS_DIR=<out>``). The executed notebook is kept as ``executed.ipynb`` (also when it failed) and
rendered to ``report.html``. Finally ``<out>/index.html`` and ``<out>/summary.csv`` are rebuilt from every
``metrics.json`` under ``<out>``.

Exit codes: 0 all notebooks ran, 1 at least one failed (each failure is named with its cell and error),
2 bad arguments (nothing was run).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from helpers.core.results import PROFILES, atomic_write_text, results_root
from helpers.core.runtime import REPO_ROOT

__all__ = ["KERNEL_NAME", "NOTEBOOK_DIR", "NotebookRun", "discover", "select", "parse_params", "check_value",
           "describe_parameters", "main"]

KERNEL_NAME = "fp8rl"
KERNEL_DISPLAY = "Python (fp8rl .venv)"
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
# Per-cell limits: a smoke cell that runs minutes is a bug; a full-profile training cell may legitimately run long.
CELL_TIMEOUT_S = {"smoke": 600, "full": 3600}


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit code 2, before anything runs."""


@dataclass
class NotebookRun:
    """The outcome of one notebook's execution."""

    name: str
    status: str = "pending"  # "ok" | "failed"
    wall_time_s: float = 0.0
    cell: int | None = None  # the failing cell, counted from 1 in the source notebook
    error: str | None = None
    out_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.status == "ok":
            return f"ok      {self.name} ({self.wall_time_s:.0f} s)"
        where = f"cell {self.cell}" if self.cell is not None else "before any cell"
        return f"FAILED  {self.name}: {where}: {self.error} (log: {self.out_dir}/run.log)"


# -- selection and parameters ------------------------------------------------------------------------------------
def discover(notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """Every notebook under ``notebook_dir``, in name order (``00_...`` first)."""
    return sorted(p for p in notebook_dir.glob("*.ipynb") if not p.name.startswith("."))


def select(notebooks: Sequence[Path], only: Sequence[str] | None) -> list[Path]:
    """Notebooks named by ``only`` (full stem, or a unique prefix such as ``01``); all when ``only`` is empty."""
    if not only:
        return list(notebooks)
    chosen: list[Path] = []
    for name in only:
        stem = name[:-6] if name.endswith(".ipynb") else name
        stem = Path(stem).name
        matches = [p for p in notebooks if p.stem == stem] or [p for p in notebooks if p.stem.startswith(stem)]
        if len(matches) != 1:
            known = ", ".join(p.stem for p in notebooks)
            what = "unknown" if not matches else "ambiguous"
            raise UsageError(f"{what} notebook {name!r} (known: {known})")
        if matches[0] not in chosen:
            chosen.append(matches[0])
    return chosen


def parse_value(text: str) -> Any:
    """``-p`` values: Python literals (``3``, ``0.5``, ``True``, ``[1, 2]``, ``None``), anything else a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def notebook_parameters(path: Path) -> dict[str, Any]:
    """The names declared in the notebook's cell tagged ``parameters`` (papermill's own inspection)."""
    import papermill

    return dict(papermill.inspect_notebook(str(path)))


# Parameters of the cell tagged ``parameters`` that are not knobs: the profile is set with --profile, and the smoke
# overrides are the runner's business (they are shown beside each knob by --list).
_NOT_KNOBS = ("profile", "smoke_overrides")


def _literal(source: str) -> tuple[bool, Any]:
    """``(True, value)`` when the parameter's default ``source`` is a Python literal, else ``(False, None)``."""
    try:
        return True, ast.literal_eval(source)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None


def _kind(value: Any) -> str:
    """The type family a ``-p`` value is checked against: lists and tuples are one family (JSON has no tuple)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (list, tuple)):
        return "list"
    return "None" if value is None else type(value).__name__


_KIND_WORDS = {"bool": "True or False", "int": "an integer", "float": "a number", "str": "a string",
               "list": "a list", "dict": "a dict", "None": "None"}
_KIND_PLURAL = {"bool": "booleans", "int": "integers", "float": "numbers", "str": "strings", "list": "lists",
                "dict": "dicts", "None": "None"}


def _compatible(value: Any, default: Any) -> bool:
    """True if ``value`` has the type of ``default`` (an int where a float is expected is fine; list elements are
    checked against the kinds the default's elements have; a None default accepts anything)."""
    if default is None:
        return True
    kd, kv = _kind(default), _kind(value)
    if kd == "float" and kv == "int":
        return True
    if kd != kv:
        return False
    if kd == "list" and len(default):
        return all(any(_compatible(v, d) for d in default) for v in value)
    return True


def check_value(key: str, text: str, value: Any, default_source: str, notebook: str) -> Any:
    """``value`` (parsed from the command-line ``text``) checked against the type of the parameter's default
    (``default_source``, the notebook's own text); returns the value to inject.

    A string default takes the raw text even when it reads as another literal (``-p tag 2024`` gives ``"2024"``).
    A default that is not a literal (an expression) is not checked. Raises :class:`UsageError` naming the
    parameter, the value, and the expected type with the default as an example.
    """
    ok, default = _literal(default_source)
    if not ok:
        return value
    if isinstance(default, str) and not isinstance(value, str):
        return text
    if _compatible(value, default):
        return value
    expected = _KIND_WORDS.get(_kind(default), type(default).__name__)
    if _kind(default) == "list" and _kind(value) == "list":
        expected = f"a list of {' or '.join(sorted({_KIND_PLURAL.get(_kind(d), '?') for d in default}))}"
    if isinstance(value, str):
        got = f"the string {text!r}"
    else:
        got = f"{_KIND_WORDS.get(_kind(value), type(value).__name__)} {value!r}"
    if len(default_source) > 60:
        default_source = default_source[:57] + "..."
    hint = " (not a Python/JSON literal; quote strings inside lists, e.g. '[\"a\", \"b\"]')" if (
        isinstance(value, str) and _kind(default) in ("list", "dict")) else ""
    raise UsageError(f"-p {key}: expected {expected} like {notebook}'s default {default_source}, got {got}{hint}")


def parse_params(pairs: Sequence[Sequence[str]], notebooks: Sequence[Path]) -> dict[str, Any]:
    """Check every ``-p KEY VALUE`` against each selected notebook's parameters cell: the name must be declared,
    and the value must have the type of the declared default (:func:`check_value`), before any kernel starts."""
    params: dict[str, Any] = {}
    declared = {p.stem: notebook_parameters(p) for p in notebooks}
    for name, names in declared.items():
        if "profile" not in names:
            raise UsageError(f"notebook {name} declares no 'profile' in a cell tagged 'parameters' "
                             "(papermill skips lines holding two '=' signs, e.g. '<=' in a comment)")
    for key, value in pairs:
        if key == "profile":
            raise UsageError("set the profile with --profile, not -p profile")
        if key == SMOKE_NAME:
            raise UsageError(f"{SMOKE_NAME} is not a knob: pass each value with -p KEY VALUE")
        missing = [name for name, names in declared.items() if key not in names]
        if missing:
            raise UsageError(f"unknown parameter {key!r} for notebook(s) {', '.join(missing)}")
        parsed = parse_value(value)
        for name, names in declared.items():
            parsed = check_value(key, value, parsed, names[key]["default"], name)
        params[key] = parsed
    return params


def describe_parameters(path: Path) -> list[str]:
    """``--list``'s lines for one notebook: each knob's default (the full profile), its smoke value when the smoke
    profile changes it, and its comment; ``profile`` and ``smoke_overrides`` are not knobs and are left out."""
    smoke = smoke_overrides(path)
    lines = [path.stem]
    for key, info in notebook_parameters(path).items():
        if key in _NOT_KNOBS:
            continue
        line = f"  {key} = {info['default']}"
        if key in smoke:
            line += f"  (smoke: {smoke[key]!r})"
        if info.get("help"):
            line += f"  # {info['help']}"
        lines.append(line)
    return lines


SMOKE_NAME = "smoke_overrides"


def smoke_overrides(path: Path) -> dict[str, Any]:
    """The literal dict ``smoke_overrides = {...}`` of the notebook's parameters cell: the values the smoke profile
    uses instead of the cell's (full-profile) values ({} when the notebook declares none).

    The runner injects them as papermill parameters (``-p`` values win) together with ``smoke_overrides = {}``, so
    the executed notebook's injected cell shows exactly what ran and the notebook's own
    ``if profile == "smoke": globals().update(smoke_overrides)`` (for interactive runs) does nothing more.
    """
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if "parameters" not in cell.get("metadata", {}).get("tags", []):
            continue
        for node in ast.parse(cell.source).body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == SMOKE_NAME
                                                    for t in node.targets):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError as exc:
                    raise UsageError(f"{path.stem}: {SMOKE_NAME} must be a literal dict ({exc})") from None
                if not isinstance(value, dict):
                    raise UsageError(f"{path.stem}: {SMOKE_NAME} must be a dict, got {type(value).__name__}")
                return value
    return {}


# -- execution ---------------------------------------------------------------------------------------------------
def ensure_kernel() -> None:
    """Register this interpreter as the ``fp8rl`` Jupyter kernel if it is not registered yet."""
    from jupyter_client.kernelspec import KernelSpecManager

    if KERNEL_NAME in KernelSpecManager().find_kernel_specs():
        return
    print(f"registering Jupyter kernel {KERNEL_NAME!r} for {sys.executable}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", KERNEL_NAME,
         "--display-name", KERNEL_DISPLAY],
        check=True, capture_output=True,
    )


# Cells papermill adds to the executed copy; they are not part of the notebook the user edits.
_PAPERMILL_TAGS = {"injected-parameters", "papermill-error-cell-tag"}


def first_error(executed: Path) -> tuple[int | None, str | None]:
    """(cell number, "Name: message") of the first cell whose outputs hold an error.

    The number counts cells from 1 in the source notebook, as JupyterLab shows them (cells papermill injected into
    the executed copy are skipped).
    """
    import nbformat

    try:
        nb = nbformat.read(str(executed), as_version=4)
    except Exception:  # noqa: BLE001 - an unreadable notebook is itself the error to report
        return None, None
    number = 0
    for cell in nb.cells:
        if _PAPERMILL_TAGS & set(cell.get("metadata", {}).get("tags", [])):
            continue
        number += 1
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return number, f"{out.get('ename')}: {str(out.get('evalue'))[:300]}"
    return None, None


# Cells tagged so show their outputs but not their code in report.html (e.g. a verdict cell whose rules live in a
# tested helper: the verdicts are what the reader needs, the call is in the notebook).
HIDE_INPUT_TAG = "hide-input"


def machine_paths(out: Path | None = None) -> list[tuple[str, str]]:
    """``(absolute prefix, what a report shows instead)`` pairs, longest first: the output folder, the repository,
    the home directory. A committed report must not carry the path of the machine that ran it."""
    pairs = [(str(REPO_ROOT), "."), (str(Path.home()), "~")]
    if out is not None:
        pairs.append((str(Path(out).resolve()), "<out>"))
    return sorted({(a, b) for a, b in pairs if len(a) > 1}, key=lambda ab: -len(ab[0]))


def scrub_paths(text: str, pairs: Sequence[tuple[str, str]]) -> str:
    """``text`` with every absolute prefix of ``pairs`` replaced (``<repo>/results/x.png`` -> ``./results/x.png``),
    whole path components only."""
    for prefix, short in pairs:
        text = re.sub(re.escape(prefix) + r"(?![\w.-])", lambda _: short, text)  # "/root" but not "/rootfs"
    return text


def _scrub_outputs(nb: Any, pairs: Sequence[tuple[str, str]]) -> None:
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = scrub_paths(out["text"], pairs)
            if "traceback" in out:
                out["traceback"] = [scrub_paths(t, pairs) for t in out["traceback"]]
            if "evalue" in out:
                out["evalue"] = scrub_paths(out["evalue"], pairs)
            for mime, value in out.get("data", {}).items():
                if mime.startswith("text/") and isinstance(value, str):
                    out["data"][mime] = scrub_paths(value, pairs)


def verdict_cell_source(metrics: dict[str, Any]) -> str | None:
    """The Markdown block that opens report.html: the run's verdicts (from ``metrics.json``), or None if none."""
    verdicts = metrics.get("verdicts") or []
    if not verdicts:
        return None
    lines = [f"- **{v['verdict']}**: {v['claim']} - {v['reason']}" for v in verdicts]
    profile = metrics.get("profile", "?")
    note = (" Smoke profile: tiny budgets, so these verdicts only check that the notebook runs end to end, not the "
            "claims." if profile == "smoke" else "")
    return (f"**Verdicts of this run** (profile {profile}; the `## Result` section at the end gives the numbers "
            f"and the reasoning).{note}\n\n" + "\n".join(lines))


def render_html(executed: Path, target: Path, *, out: Path | None = None) -> None:
    """Render an executed notebook to a standalone HTML report (images embedded).

    The report opens with the run's verdicts (from ``metrics.json`` beside ``target``, when the run wrote one), hides
    the code of cells tagged ``hide-input``, and carries no absolute path of this machine (:func:`machine_paths`).
    """
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor

    nb = nbformat.read(str(executed), as_version=4)
    _scrub_outputs(nb, machine_paths(out))
    metrics_path = target.parent / "metrics.json"
    if metrics_path.exists():
        try:
            source = verdict_cell_source(json.loads(metrics_path.read_text()))
        except ValueError:
            source = None
        if source:
            at = 1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0  # after the title
            nb.cells.insert(at, nbformat.v4.new_markdown_cell(source, metadata={"tags": ["verdict-summary"]}))
    exporter = HTMLExporter()
    exporter.register_preprocessor(TagRemovePreprocessor(remove_input_tags={HIDE_INPUT_TAG}), enabled=True)
    body, _ = exporter.from_notebook_node(nb)
    atomic_write_text(target, body)  # (not scrubbed as a whole: embedded base64 images could match a prefix)


def run_notebook(path: Path, *, profile: str, params: dict[str, Any], out: Path, threads: int) -> NotebookRun:
    """Execute one notebook with papermill in a child process; never raises for a notebook failure."""
    name = path.stem
    nb_out = out / name
    nb_out.mkdir(parents=True, exist_ok=True)
    run = NotebookRun(name=name, out_dir=nb_out)
    executed = nb_out / "executed.ipynb"
    # A failed run must not leave the previous run's numbers looking current.
    for stale in ("metrics.json", "run.json"):
        (nb_out / stale).unlink(missing_ok=True)

    env = dict(os.environ)
    env["HELPERS_RESULTS_DIR"] = str(out.resolve())
    env["PYTHONUNBUFFERED"] = "1"
    # Parallel notebooks share the cores: give each a fair share of intra-op threads unless the user chose.
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("MKL_NUM_THREADS", str(threads))
    cmd = [
        sys.executable, "-m", "papermill", str(path), str(executed),
        "-k", KERNEL_NAME, "--cwd", str(path.parent),
        "--execution-timeout", str(CELL_TIMEOUT_S[profile]),
        "--log-output", "--no-progress-bar",
        "-p", "profile", profile,
    ]
    if profile == "smoke":
        smoke = smoke_overrides(path)
        if smoke:
            params = {**smoke, **params, SMOKE_NAME: {}}
    for key, value in params.items():
        cmd += ["-y", json.dumps({key: value})]
    t0 = time.perf_counter()
    for attempt in range(1 + KERNEL_START_RETRIES):
        with open(nb_out / "run.log", "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT))
        if proc.returncode == 0 or not kernel_died_at_start(nb_out / "run.log"):
            break
        run.extra["kernel_start_retries"] = attempt + 1  # no cell ran: starting again is safe
    run.wall_time_s = time.perf_counter() - t0
    if proc.returncode == 0:
        run.status = "ok"
    else:
        run.status = "failed"
        run.cell, run.error = first_error(executed)
        if run.error is None:
            tail = (nb_out / "run.log").read_text(errors="replace").strip().splitlines()[-1:]
            run.error = f"papermill exited {proc.returncode}: {tail[0] if tail else 'no output'}"
    if executed.exists():
        try:
            render_html(executed, nb_out / "report.html", out=out)
        except Exception as exc:  # noqa: BLE001 - a broken render is reported, the run's outcome stands
            run.extra["render_error"] = f"{type(exc).__name__}: {exc}"
    record = {"notebook": name, "status": run.status, "profile": profile, "wall_time_s": round(run.wall_time_s, 1),
              "cell": run.cell, "error": run.error, "parameters": params, **run.extra}
    atomic_write_text(nb_out / "run.json", json.dumps(record, indent=2) + "\n")
    return run


# Kernels started at the same moment (--jobs > 1) now and then die before their first reply (jupyter_client picks
# free ports, then binds them, and two kernels can race for one); such a run executed no cell and is started again.
KERNEL_START_RETRIES = 1
KERNEL_START_FAILURE = "Kernel died before replying to kernel_info"


def kernel_died_at_start(log_path: Path) -> bool:
    """True if papermill's log at ``log_path`` says the kernel died before running anything."""
    try:
        return KERNEL_START_FAILURE in log_path.read_text(errors="replace")
    except OSError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.run", description="Run the notebooks with papermill and rebuild the HTML gallery."
    )
    parser.add_argument("--profile", default="full", help="smoke (quick pass) or full (default)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="notebook stems or unique prefixes (e.g. 01)")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks run in parallel (default 1)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: results/ for --profile full, results-smoke/ for smoke, so a "
                             "quick pass never overwrites the committed full-profile results)")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="override a notebook parameter (repeatable)")
    parser.add_argument("--notebook-dir", default=str(NOTEBOOK_DIR), help="where the notebooks are (default notebooks/)")
    parser.add_argument("--list", action="store_true", help="list the notebooks and their parameters, then exit")
    parser.add_argument("--no-index", action="store_true", help="do not rebuild index.html / summary.csv")

    def one_line_error(message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

    parser.error = one_line_error  # type: ignore[method-assign]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.profile not in PROFILES:
            raise UsageError(f"--profile must be one of {', '.join(PROFILES)}, got {args.profile!r}")
        if args.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
        notebooks = discover(Path(args.notebook_dir))
        if not notebooks:
            raise UsageError(f"no notebooks found in {args.notebook_dir}")
        chosen = select(notebooks, args.only)
        params = parse_params(args.param, chosen)
        for p in chosen:
            smoke_overrides(p)  # a malformed smoke_overrides is a usage error before anything runs
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.list:
        for p in chosen:
            print("\n".join(describe_parameters(p)))
        return 0

    from helpers.core.report import build_gallery

    out = results_root(args.out, args.profile).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ensure_kernel()
    jobs = min(args.jobs, len(chosen))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    print(f"running {len(chosen)} notebook(s), profile={args.profile}, jobs={jobs}, out={out}", flush=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_notebook, p, profile=args.profile, params=params, out=out, threads=threads)
                   for p in chosen]
        runs = []
        for fut in futures:
            run = fut.result()
            runs.append(run)
            print(run.describe(), flush=True)
    if not args.no_index:
        index = build_gallery(out, notebook_dir=args.notebook_dir)
        print(f"gallery: {index}", flush=True)
    failed = [r for r in runs if r.status != "ok"]
    print(f"{len(runs) - len(failed)} notebook(s) ok, {len(failed)} failed in {time.perf_counter() - t0:.0f} s",
          flush=True)
    for r in failed:
        print(r.describe(), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
