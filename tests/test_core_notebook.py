"""Interactive runs: the smoke profile applies only the overrides whose parameter the user did not edit."""

import json
import subprocess

import nbformat
import pytest

from helpers.core import notebook

PARAMS = ('profile = "full"  # smoke or full\nsizes = [1_000, 10_000]  # element counts\nshape = (8, 8)  # a tuple\n'
          'steps = 10  # steps\nflag = False  # a flag\nscale = 2 ** 3  # not a literal\n'
          'smoke_overrides = {"sizes": [100], "shape": (2, 2), "steps": 1, "flag": True, "scale": 1}  # smoke')


def _notebook_json(params: str = PARAMS) -> str:
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"), cell])
    return nbformat.writes(nb)


def _namespace(**edits):
    ns = {"profile": "smoke", "sizes": [1_000, 10_000], "shape": (8, 8), "steps": 10, "flag": False, "scale": 8,
          "smoke_overrides": {"sizes": [100], "shape": (2, 2), "steps": 1, "flag": True, "scale": 1}}
    ns.update(edits)
    return ns


def test_parameter_defaults_reads_the_literals_of_the_parameters_cell():
    defaults = notebook.parameter_defaults(_notebook_json())
    assert defaults["sizes"] == [1000, 10000] and defaults["shape"] == (8, 8) and defaults["profile"] == "full"
    assert "scale" not in defaults  # 2 ** 3 is an expression, not a literal
    with pytest.raises(ValueError, match="no cell tagged 'parameters'"):
        notebook.parameter_defaults(nbformat.writes(nbformat.v4.new_notebook()))


def test_smoke_overrides_keep_the_values_the_user_edited(capsys):
    defaults = notebook.parameter_defaults(_notebook_json())
    ns = _namespace(sizes=[2_000], flag=1)  # the user edited sizes; flag = 1 is not the default False either
    applied = notebook.apply_smoke_overrides(ns, "x", defaults=defaults)
    assert ns["sizes"] == [2_000] and ns["flag"] == 1  # kept
    assert ns["shape"] == (2, 2) and ns["steps"] == 1 and ns["scale"] == 1  # unedited (or unknown default): smoke
    assert applied == {"shape": (2, 2), "steps": 1, "scale": 1}
    out = capsys.readouterr().out
    assert out == ("smoke profile: set shape = (2, 2), steps = 1, scale = 1; kept your edits: sizes = [2000], "
                   "flag = 1\n")


def test_a_list_default_given_as_tuple_counts_as_unedited():
    ns = _namespace(shape=[8, 8])  # papermill / JSON turn tuples into lists
    notebook.apply_smoke_overrides(ns, "x", defaults=notebook.parameter_defaults(_notebook_json()), verbose=False)
    assert ns["shape"] == (2, 2)


@pytest.mark.parametrize("ns", [_namespace(profile="full"), _namespace(smoke_overrides={})])
def test_nothing_happens_on_full_or_under_the_runner(ns):
    before = dict(ns)
    assert notebook.apply_smoke_overrides(ns, "x", defaults={}) == {}
    assert ns == before


def test_defaults_come_from_the_committed_notebook_not_the_saved_edit(tmp_path):
    path = tmp_path / "70_nb.ipynb"
    path.write_text(_notebook_json())
    git = ["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", path.name], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "nb"], check=True)
    path.write_text(_notebook_json(PARAMS.replace("sizes = [1_000, 10_000]", "sizes = [2_000]")))  # saved edit
    defaults = notebook.notebook_defaults("70_nb", tmp_path)
    assert defaults["sizes"] == [1_000, 10_000]
    ns = _namespace(sizes=[2_000])
    notebook.apply_smoke_overrides(ns, "70_nb", defaults=defaults, verbose=False)
    assert ns["sizes"] == [2_000]
    # outside git the file on disk is all there is
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "71_nb.ipynb").write_text(_notebook_json())
    assert notebook.notebook_defaults("71_nb", plain)["steps"] == 10
    with pytest.raises(FileNotFoundError, match="72_nb.ipynb"):
        notebook.notebook_defaults("72_nb", plain)


def test_every_committed_notebook_has_readable_defaults_for_its_smoke_overrides():
    from helpers import run

    for path in run.discover():
        defaults = notebook.notebook_defaults(path.stem, path.parent)
        smoke = defaults.get("smoke_overrides", {})
        unknown = set(smoke) - set(defaults)
        assert not unknown, f"{path.stem}: smoke_overrides names {unknown}, which the parameters cell does not set"
        assert json.dumps(list(smoke))  # plain names
