"""What a notebook's setup cell calls for interactive runs: the smoke profile without losing the user's edits.

Every notebook declares its knobs in one cell tagged ``parameters`` at their full-profile values, with a dict
``smoke_overrides`` of the values the smoke profile uses instead. The batch runner (:mod:`helpers.run`) injects
those values itself. In JupyterLab, a user who sets ``profile = "smoke"`` and edits a knob (``sizes = [2_000]``)
means the edit: :func:`apply_smoke_overrides` applies only the overrides whose parameter still holds its committed
default, and prints what it changed and what it kept.

The committed defaults are read from the notebook as committed (``git show HEAD:<notebook>``), so saving the
notebook with an edit does not turn the edit into a default; without git (an unpacked archive) they are read from
the notebook file on disk.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path
from typing import Any, MutableMapping

from helpers.core.runtime import REPO_ROOT

__all__ = ["SMOKE_NAME", "parameter_defaults", "notebook_defaults", "apply_smoke_overrides", "same_value"]

SMOKE_NAME = "smoke_overrides"
_MISSING = object()


def parameter_defaults(notebook_json: str) -> dict[str, Any]:
    """``name -> value`` of every literal assignment in the cell tagged ``parameters`` of a notebook (its JSON
    text); names assigned a non-literal expression are left out. Raises ValueError when no cell is tagged."""
    nb = json.loads(notebook_json)
    for cell in nb.get("cells", []):
        if "parameters" not in cell.get("metadata", {}).get("tags", []):
            continue
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        defaults: dict[str, Any] = {}
        for node in ast.parse(source).body:
            if not isinstance(node, ast.Assign):
                continue
            try:
                value = ast.literal_eval(node.value)
            except (ValueError, SyntaxError, TypeError):
                continue
            for target in node.targets:
                if isinstance(target, ast.Name):
                    defaults[target.id] = value
        return defaults
    raise ValueError("the notebook has no cell tagged 'parameters'")


def _committed_text(path: Path) -> str | None:
    """The notebook at ``path`` as committed at HEAD, or None outside a git checkout / for an uncommitted file."""
    try:
        proc = subprocess.run(["git", "-C", str(path.parent), "show", f"HEAD:./{path.name}"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 and proc.stdout.strip() else None


def notebook_defaults(notebook: str, notebook_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The committed defaults of ``notebook``'s parameters cell (see the module docstring).

    ``notebook`` is the stem (``"00_environment"``); it is looked for in ``notebook_dir``, else in the current
    directory (a kernel started by JupyterLab or papermill runs in the notebook's folder), else in ``notebooks/``.
    Raises FileNotFoundError naming the places looked in.
    """
    name = notebook if notebook.endswith(".ipynb") else f"{notebook}.ipynb"
    places = [Path(notebook_dir)] if notebook_dir is not None else [Path.cwd(), REPO_ROOT / "notebooks"]
    for folder in places:
        path = folder / name
        if path.exists():
            return parameter_defaults(_committed_text(path) or path.read_text())
    raise FileNotFoundError(f"notebook {name!r} not found in {', '.join(str(p) for p in places)}")


def apply_smoke_overrides(namespace: MutableMapping[str, Any], notebook: str, *,
                          defaults: dict[str, Any] | None = None, verbose: bool = True) -> dict[str, Any]:
    """On ``profile == "smoke"``, set each ``smoke_overrides`` value in ``namespace`` (a notebook's ``globals()``)
    whose parameter still holds its committed default; keep the values the user edited.

    Args:
        namespace: the notebook's globals, holding ``profile``, ``smoke_overrides`` and the knobs.
        notebook: the notebook's stem, to read its committed defaults (:func:`notebook_defaults`).
        defaults: the full-profile defaults, if the caller has them (then no file is read).
        verbose: print one line saying what was overridden and which edits were kept.

    Returns ``{name: value}`` of the overrides applied (``{}`` on the full profile, and under the batch runner,
    which injects the smoke values itself and sets ``smoke_overrides = {}``). A knob whose default cannot be read
    (not a literal, or no notebook file) counts as unedited.
    """
    profile = namespace.get("profile")
    overrides = namespace.get(SMOKE_NAME) or {}
    if profile != "smoke" or not overrides:
        return {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{SMOKE_NAME} must be a dict of parameter -> smoke value, got {type(overrides).__name__}")
    if defaults is None:
        try:
            defaults = notebook_defaults(notebook)
        except (FileNotFoundError, ValueError):
            defaults = {}
    applied: dict[str, Any] = {}
    kept: dict[str, Any] = {}
    for key, value in overrides.items():
        current = namespace.get(key, _MISSING)
        default = defaults.get(key, _MISSING)
        if current is _MISSING or default is _MISSING or same_value(current, default):
            namespace[key] = value
            applied[key] = value
        else:
            kept[key] = current
    if verbose:
        said = ", ".join(f"{k} = {v!r}" for k, v in applied.items()) or "nothing"
        line = f"smoke profile: set {said}"
        if kept:
            line += f"; kept your edits: {', '.join(f'{k} = {v!r}' for k, v in kept.items())}"
        print(line)
    return applied


def same_value(a: Any, b: Any) -> bool:
    """Equality of parameter values, tuples and lists alike (JSON, and so papermill, turns tuples into lists)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) != isinstance(b, bool):
        return False  # True == 1 in Python, but a flag and a count are different edits
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared (arrays) count as edited
        return False
