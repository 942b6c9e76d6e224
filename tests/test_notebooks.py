"""Notebook conventions (static) and every notebook executed on the smoke profile through the batch runner."""

import ast
import json
import warnings

import nbformat
import pytest

from helpers import run

NOTEBOOKS = run.discover()
SMOKE_BUDGET_S = 90  # the budget for a smoke run on a 2-core CPU; reported, never asserted (timing)


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"
    assert NOTEBOOKS[0].stem == "00_environment"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = nbformat.read(str(path), as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_and_structure(path):
    nb = nbformat.read(str(path), as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected exactly one cell tagged 'parameters', found {len(tagged)}"
    assert nb.metadata.get("kernelspec", {}).get("name") == run.KERNEL_NAME
    params = run.notebook_parameters(path)
    assert "profile" in params and params["profile"]["default"].strip("'\"") == "full"
    # every assignment in the parameters cell must be visible to papermill (a second '=' on a line hides it)
    assigned = [t.id for node in ast.parse(tagged[0].source).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)]
    assert set(assigned) <= set(params), f"{path.name}: papermill cannot parse {set(assigned) - set(params)}"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.lstrip().startswith("# "), "opens with a title"
    sources = "\n".join(c.source for c in nb.cells)
    assert any(c.cell_type == "markdown" and c.source.lstrip().startswith("## Result") for c in nb.cells), \
        f"{path.name}: needs a '## Result' section"
    assert ".finalize()" in sources and "Results(" in sources, "writes metrics.json through helpers.core.results"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_smoke_overrides_name_declared_knobs_of_the_defaults_type(path):
    # the runner injects these without the -p check: a typo or a value of another type would reach the kernel
    declared = run.notebook_parameters(path)
    for key, value in run.smoke_overrides(path).items():
        assert key in declared and key not in ("profile", "smoke_overrides"), f"{path.name}: smoke_overrides[{key!r}]"
        run.check_value(key, repr(value), value, declared[key]["default"], path.stem)  # UsageError if not


@pytest.mark.notebooks
def test_every_notebook_runs_on_smoke(smoke_run):
    out, proc = smoke_run
    assert proc.returncode == 0, f"smoke run failed:\n{proc.stdout}\n{proc.stderr}"
    for path in NOTEBOOKS:
        folder = out / path.stem
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["profile"] == "smoke"
        assert metrics["results"], f"{path.stem}: empty result table"
        assert metrics["headline_figure"] and (folder / metrics["headline_figure"]).stat().st_size > 1000
        assert (folder / "report.html").stat().st_size > 10_000
        if metrics["wall_time_s"] > SMOKE_BUDGET_S:
            warnings.warn(f"{path.stem}: smoke profile took {metrics['wall_time_s']:.0f} s "
                          f"(budget {SMOKE_BUDGET_S} s on a 2-core CPU)")
    summary = (out / "summary.csv").read_text()
    for path in NOTEBOOKS:
        assert path.stem in summary
