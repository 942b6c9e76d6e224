import json
import math
import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from helpers.core import results


def test_results_writes_metrics_with_provenance(tmp_path):
    res = results.Results("99_demo", title="Demo", profile="smoke", params={"n": 3}, out_dir=tmp_path)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    res.save_figure(fig, "first")
    res.save_figure(fig, "best", headline=True)
    plt.close(fig)
    res.save_table(pd.DataFrame({"a": [1, 2]}), "table")
    res.log(**{"loss/final": 0.5, "bad/nan": float("nan")})
    res.log_dict({"x": 1}, prefix="ns/")
    res.add_result("error", 0.01, "0.02", "lower is better")
    res.add_verdict("error below 0.02", "reproduced", "measured 0.01")
    path = res.finalize()

    data = json.loads(path.read_text())
    assert data["notebook"] == "99_demo" and data["profile"] == "smoke"
    assert data["parameters"] == {"n": 3}
    assert data["headline_figure"] == "best.png"
    assert data["figures"] == ["first.png", "best.png"]
    assert data["metrics"]["loss/final"] == 0.5
    assert data["metrics"]["bad/nan"] is None  # JSON has no NaN
    assert data["metrics"]["ns/x"] == 1
    assert data["results"][0]["quantity"] == "error"
    assert data["verdicts"] == [{"claim": "error below 0.02", "verdict": "reproduced", "reason": "measured 0.01"}]
    assert data["wall_time_s"] >= 0
    for key in ("environment", "git_commit", "started_at", "finished_at"):
        assert key in data
    assert data["environment"]["versions"]["torch"]
    assert (tmp_path / "99_demo" / "results.csv").exists()
    assert pd.read_csv(tmp_path / "99_demo" / "table.csv")["a"].tolist() == [1, 2]
    assert not [p for p in (tmp_path / "99_demo").iterdir() if p.name.endswith(".tmp")]


def test_verdicts_are_checked_and_required(tmp_path):
    res = results.Results("99_demo", title="t", profile="smoke", out_dir=tmp_path)
    with pytest.raises(ValueError, match="verdict must be one of"):
        res.add_verdict("claim", "mostly", "why")
    with pytest.raises(ValueError, match="non-empty"):
        res.add_verdict("claim", "partly", " ")
    with pytest.raises(ValueError, match="no verdict recorded"):
        res.finalize()
    res.add_verdict("A", "not testable here", "no GPU")
    res.add_verdict("B", "not reproduced", "gap is 0")
    assert res.verdict_markdown() == "- **not testable here**: A - no GPU\n- **not reproduced**: B - gap is 0"
    assert res.finalize().exists()


def test_first_figure_is_default_headline(tmp_path):
    res = results.Results("99_demo", title="t", profile="full", out_dir=tmp_path)
    fig = plt.figure()
    res.save_figure(fig, "only")
    plt.close(fig)
    assert res.headline_figure == "only.png"


def test_results_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(results.RESULTS_ENV, str(tmp_path))
    res = results.Results("99_env", title="t", profile="smoke")
    assert res.dir == tmp_path / "99_env"


def test_atomic_write_keeps_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    results.atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        results.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind


@pytest.mark.parametrize("profile", ["fast", "", None])
def test_bad_profile(tmp_path, profile):
    with pytest.raises(ValueError, match="profile"):
        results.Results("99_demo", title="t", profile=profile, out_dir=tmp_path)


def test_jsonable_handles_tensors_and_infinities():
    import torch

    out = results._jsonable({"t": torch.tensor(2.5), "inf": math.inf, "tuple": (1, 2)})
    assert out == {"t": 2.5, "inf": None, "tuple": [1, 2]}


def test_smoke_runs_never_default_to_the_committed_results(monkeypatch):
    monkeypatch.delenv(results.RESULTS_ENV, raising=False)
    assert results.results_root(profile="full") == results.REPO_ROOT / "results"
    assert results.results_root(profile="smoke") == results.REPO_ROOT / "results-smoke"
    monkeypatch.setenv(results.RESULTS_ENV, "/tmp/x")
    assert str(results.results_root(profile="smoke")) == "/tmp/x"


def test_interactive_runs_write_outside_the_committed_results(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(results.RESULTS_ENV, raising=False)
    monkeypatch.setattr(results, "REPO_ROOT", tmp_path)
    res = results.Results("99_lab", title="t", profile="full")  # no runner, no out_dir: a JupyterLab run
    assert res.dir == results.REPO_ROOT / results.INTERACTIVE_DIR / "99_lab"
    assert "interactive run: results go to results-interactive/99_lab/" in capsys.readouterr().out
    gitignore = (Path(__file__).resolve().parent.parent / ".gitignore").read_text().splitlines()
    assert f"/{results.INTERACTIVE_DIR}/" in gitignore


def test_saved_paths_display_without_the_machine_path(tmp_path):
    from IPython.lib.pretty import pretty

    res = results.Results("99_demo", title="t", profile="full", out_dir=tmp_path)
    fig = plt.figure()
    saved = res.save_figure(fig, "curve")
    plt.close(fig)
    assert saved == tmp_path / "99_demo" / "curve.png" and saved.exists()  # still an ordinary Path
    assert pretty(saved) == "saved 99_demo/curve.png" and str(tmp_path) not in pretty(saved)
    assert pretty(res.save_table(pd.DataFrame({"a": [1]}), "t")) == "saved 99_demo/t.csv"
    res.add_verdict("c", "partly", "r")
    assert pretty(res.finalize()) == "saved 99_demo/metrics.json"


def test_result_table_displays_long_text_in_full(tmp_path):
    res = results.Results("99_demo", title="t", profile="full", out_dir=tmp_path)
    long_q, long_note = "q" * 120, "a note " * 30
    res.add_result(long_q, 1.5, "2", long_note)
    table = res.result_table()
    assert isinstance(table, pd.DataFrame) and list(table.columns) == ["quantity", "measured", "paper", "note"]
    assert long_q in table._repr_html_() and long_note.strip() in table._repr_html_()
    assert long_q in repr(table)
    assert pd.get_option("display.max_colwidth") == 50  # no global option was changed
