import json

import pandas as pd

from helpers.core import report


def _fake(out, name, *, status="ok", results=None, figure=True):
    d = out / name
    d.mkdir(parents=True)
    if status == "ok":
        (d / "fig.png").write_bytes(b"\x89PNG fake")
        metrics = {"notebook": name, "title": f"Title {name}", "profile": "full", "wall_time_s": 12.5,
                   "git_commit": "abc123", "environment": {"device": "cpu", "gpu": None},
                   "verdicts": [{"claim": f"claim of {name}", "verdict": "partly", "reason": "because <3"}],
                   "results": results or [{"quantity": "q", "measured": 1.0, "paper": "2", "note": "n"}],
                   "headline_figure": "fig.png" if figure else None}
        (d / "metrics.json").write_text(json.dumps(metrics))
        (d / "report.html").write_text("<html></html>")
    (d / "run.json").write_text(json.dumps({"status": status, "cell": 4 if status != "ok" else None,
                                            "error": "ValueError: bad <input>" if status != "ok" else None}))


def test_gallery_has_a_card_per_notebook_with_figure_and_table(tmp_path):
    _fake(tmp_path, "01_a")
    _fake(tmp_path, "02_b", results=[{"quantity": "x", "measured": 0.25, "paper": "0.3", "note": ""},
                                     {"quantity": "y", "measured": "n/a", "paper": "", "note": "cpu"}])
    _fake(tmp_path, "03_c", status="failed")
    (tmp_path / "not_a_notebook").mkdir()
    index = report.build_gallery(tmp_path).read_text()
    for name in ("01_a", "02_b", "03_c"):
        assert f'data-notebook="{name}"' in index
    assert "not_a_notebook" not in index
    assert index.count('<table class="results">') == 2
    assert 'src="01_a/fig.png"' in index and 'href="02_b/report.html"' in index
    assert "cell 4: ValueError: bad &lt;input&gt;" in index  # escaped, failing cell named
    # the verdict block opens the card, before the figure
    card = index[index.index('data-notebook="01_a"'):]
    assert card.index('class="verdicts"') < card.index("<img")
    assert '<span class="verdict v-partly">partly</span> claim of 01_a' in card and "because &lt;3" in card

    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary.columns) == report.SUMMARY_COLUMNS
    assert summary.groupby("notebook").size().to_dict() == {"01_a": 2, "02_b": 3, "03_c": 1}
    assert summary.set_index("notebook").loc["01_a"].set_index("kind").loc["verdict", "measured"] == "partly"
    assert summary.set_index("notebook").loc["03_c", "status"] == "failed"


def test_ok_run_without_metrics_counts_as_failed(tmp_path):
    d = tmp_path / "04_d"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"status": "ok"}))
    assert report.collect(tmp_path)[0]["status"] == "failed"


def _notebook(folder, name, params):
    import nbformat

    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), str(folder / f"{name}.ipynb"))


def _run(out, name, profile, parameters):
    d = out / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({
        "notebook": name, "title": name, "profile": profile, "wall_time_s": 90.0, "parameters": parameters,
        "verdicts": [{"claim": "c", "verdict": "reproduced", "reason": "r"}], "results": []}))


def test_cards_show_the_parameters_changed_from_the_profiles_defaults(tmp_path):
    nbs, out = tmp_path / "nbs", tmp_path / "out"
    nbs.mkdir()
    _notebook(nbs, "10_a", 'profile = "full"  # x\nn_seeds = 10  # x\nenvs = ["CartPole-v1"]  # x\n'
                           'shape = (8, 8)  # x\n'
                           'smoke_overrides = {"n_seeds": 2}  # x')
    _run(out, "10_a", "full", {"n_seeds": 3, "envs": ["Acrobot-v1"], "shape": [8, 8]})
    index = report.build_gallery(out, notebook_dir=nbs).read_text()
    assert "changed from the defaults: n_seeds = 3, envs = [&#x27;Acrobot-v1&#x27;]</div>" in index  # shape: same
    assert 'class="smoke-banner"' not in index and "total wall time 2 min" in index
    # a smoke run compares with the smoke values: n_seeds = 2 is its default, nothing to show
    _run(out, "20_b", "smoke", {"n_seeds": 2})
    _notebook(nbs, "20_b", 'profile = "full"  # x\nn_seeds = 10  # x\nsmoke_overrides = {"n_seeds": 2}  # x')
    index = report.build_gallery(out, notebook_dir=nbs).read_text()
    card = index[index.index('data-notebook="20_b"'):]
    assert 'class="params"' not in card
    assert 'class="smoke-banner"' in index and "only check that each notebook runs end to end" in index


def test_a_run_of_an_unknown_notebook_shows_no_parameter_line(tmp_path):
    _run(tmp_path, "30_gone", "full", {"n": 1})
    assert report.changed_parameters({"notebook": "30_gone", "parameters": {"n": 1}}, tmp_path) == {}
    assert 'class="params"' not in report.build_gallery(tmp_path, notebook_dir=tmp_path).read_text()
