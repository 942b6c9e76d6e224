"""The batch runner: argument errors before anything runs, failures named with their cell, the rest still run."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from helpers import run

REPO = Path(__file__).resolve().parent.parent
KERNELSPEC = {"name": "fp8rl", "display_name": "Python (fp8rl .venv)", "language": "python"}


def _write_notebook(path: Path, body: list[str], params: str = 'profile = "full"  # smoke or full\nscale = 2  # a knob'):
    cells = [nbformat.v4.new_markdown_cell("# test notebook")]
    pc = nbformat.v4.new_code_cell(params)
    pc.metadata["tags"] = ["parameters"]
    cells.append(pc)
    cells += [nbformat.v4.new_code_cell(src) for src in body]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    nbformat.write(nb, str(path))


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "helpers.run", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture()
def nb_dir(tmp_path):
    d = tmp_path / "notebooks"
    d.mkdir()
    good = [
        "from helpers.core import results",
        "res = results.Results('10_good', title='good', profile=profile, params={'scale': scale})\n"
        "res.add_result('scale', scale * 2, 'paper', '')\nres.add_verdict('doubles', 'reproduced', 'it does')\n"
        "res.finalize()",
    ]
    _write_notebook(d / "10_good.ipynb", good)
    _write_notebook(d / "20_bad.ipynb", ["x = 1", "raise RuntimeError('boom in cell')", "y = 2"])
    return d


@pytest.mark.parametrize(
    "args, message",
    [
        (["--profile", "fast"], "--profile must be one of"),
        (["--only", "99_nothing"], "unknown notebook '99_nothing'"),
        (["--jobs", "0"], "--jobs must be >= 1"),
        (["-p", "no_such_knob", "1"], "unknown parameter 'no_such_knob'"),
        (["-p", "profile", "smoke"], "set the profile with --profile"),
        (["--bogus"], "unrecognized arguments"),
        # values are checked against the default's type before a kernel starts
        (["-p", "scale", "ten"], "-p scale: expected an integer like 10_good's default 2, got the string 'ten'"),
        (["-p", "scale", "2.5"], "-p scale: expected an integer"),
        (["-p", "scale", "[2]"], "got a list [2]"),
        (["-p", "smoke_overrides", "{}"], "smoke_overrides is not a knob"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(nb_dir, tmp_path, args, message):
    out = tmp_path / "out"
    proc = _cli("--notebook-dir", str(nb_dir), "--out", str(out), *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert not out.exists()  # nothing ran


def test_notebook_without_profile_parameter_is_rejected(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    _write_notebook(d / "30_x.ipynb", ["pass"], params='profile = "full"  # at <= 90 s\nseed = 0')
    proc = _cli("--notebook-dir", str(d), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "declares no 'profile'" in proc.stderr


def test_failure_is_named_and_other_notebooks_still_run(nb_dir, tmp_path):
    out = tmp_path / "out"
    proc = _cli("--notebook-dir", str(nb_dir), "--out", str(out), "--profile", "smoke", "--jobs", "2",
                "-p", "scale", "21")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # the failure names notebook, cell and error
    assert "FAILED  20_bad: cell 4: RuntimeError: boom in cell" in proc.stderr
    # the good notebook ran with the override and the profile
    metrics = json.loads((out / "10_good" / "metrics.json").read_text())
    assert metrics["profile"] == "smoke" and metrics["parameters"] == {"scale": 21}
    assert metrics["results"][0]["measured"] == 42
    # the failed executed notebook is kept and rendered; its status is recorded
    assert (out / "20_bad" / "executed.ipynb").exists() and (out / "20_bad" / "report.html").exists()
    status = json.loads((out / "20_bad" / "run.json").read_text())
    assert status["status"] == "failed" and status["cell"] == 4
    assert not (out / "20_bad" / "metrics.json").exists()
    # the gallery shows both, the failure as a failure
    index = (out / "index.html").read_text()
    assert 'data-notebook="10_good"' in index and 'data-notebook="20_bad"' in index
    assert "boom in cell" in index
    assert (out / "10_good" / "report.html").exists()


@pytest.mark.parametrize("text, value", [("3", 3), ("0.5", 0.5), ("True", True), ("[1, 2]", [1, 2]),
                                         ("None", None), ("CartPole-v1", "CartPole-v1")])
def test_parse_value(text, value):
    assert run.parse_value(text) == value


def test_select_by_prefix_and_ambiguity(nb_dir):
    nbs = run.discover(nb_dir)
    assert [p.stem for p in run.select(nbs, ["10"])] == ["10_good"]
    assert [p.stem for p in run.select(nbs, ["20_bad.ipynb", "10_good"])] == ["20_bad", "10_good"]
    with pytest.raises(run.UsageError, match="unknown"):
        run.select(nbs, ["30"])


SMOKE_PARAMS = ('profile = "full"  # smoke or full\nscale = 2  # a knob; smoke: 5\nsize = 100  # another; smoke: 7\n'
                'smoke_overrides = {"scale": 5, "size": 7}  # what the smoke profile uses instead')
SMOKE_BODY = [
    "from helpers.core import results\nif profile == 'smoke':\n    globals().update(smoke_overrides)",
    "res = results.Results('40_smoke', title='s', profile=profile, params={'scale': scale, 'size': size})\n"
    "res.add_verdict('c', 'partly', 'r')\nres.finalize()",
]


def test_smoke_overrides_are_injected_and_explicit_values_win(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    _write_notebook(d / "40_smoke.ipynb", SMOKE_BODY, params=SMOKE_PARAMS)
    assert run.smoke_overrides(d / "40_smoke.ipynb") == {"scale": 5, "size": 7}
    out = tmp_path / "o"
    proc = _cli("--notebook-dir", str(d), "--out", str(out), "--profile", "smoke", "-p", "size", "9")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((out / "40_smoke" / "metrics.json").read_text())["parameters"] == {"scale": 5, "size": 9}
    # the executed notebook's injected cell shows what ran
    executed = nbformat.read(str(out / "40_smoke" / "executed.ipynb"), as_version=4)
    injected = [c.source for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])][0]
    assert "scale = 5" in injected and "size = 9" in injected and "smoke_overrides = {}" in injected
    proc = _cli("--notebook-dir", str(d), "--out", str(out), "--profile", "full")
    assert json.loads((out / "40_smoke" / "metrics.json").read_text())["parameters"] == {"scale": 2, "size": 100}


def test_smoke_overrides_must_be_a_literal_dict(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    _write_notebook(d / "50_bad.ipynb", ["pass"], params='profile = "full"  # x\nsmoke_overrides = dict(a=1)  # x')
    with pytest.raises(run.UsageError, match="literal dict"):
        run.smoke_overrides(d / "50_bad.ipynb")


def test_kernel_start_failure_is_recognised(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("Input Notebook: x.ipynb\nRuntimeError: Kernel died before replying to kernel_info\n")
    assert run.kernel_died_at_start(log)
    log.write_text("Executing cell 4\nRuntimeError: boom in cell\n")  # a notebook error is not retried
    assert not run.kernel_died_at_start(log)
    assert not run.kernel_died_at_start(tmp_path / "missing.log")


TYPED_PARAMS = ('profile = "full"  # smoke or full\nsteps = 10  # training steps\nlr = 0.1  # a float\n'
                'methods = ["matched", "tis"]  # arms\nsizes = [1_000, 2_000]  # element counts\n'
                'shape = (16, 16)  # a tuple\nenv = "CartPole-v1"  # a string\nflag = True  # a bool\n'
                'extra = None  # anything\nsmoke_overrides = {"steps": 2, "methods": ["matched"]}  # smoke values')


@pytest.fixture()
def typed_nb(tmp_path):
    d = tmp_path / "typed"
    d.mkdir()
    _write_notebook(d / "60_typed.ipynb", ["pass"], params=TYPED_PARAMS)
    return d


@pytest.mark.parametrize("key, text, value", [
    ("steps", "3", 3), ("lr", "1", 1), ("lr", "3e-4", 3e-4), ("methods", '["tis"]', ["tis"]), ("methods", "[]", []),
    ("sizes", "[5]", [5]), ("shape", "[8, 8]", [8, 8]), ("shape", "(8, 8)", (8, 8)),
    ("env", "Acrobot-v1", "Acrobot-v1"),
    ("env", "2024", "2024"), ("flag", "False", False), ("extra", "[1, 'a']", [1, "a"]),
])
def test_param_values_of_the_default_type_pass(typed_nb, key, text, value):
    params = run.parse_params([(key, text)], run.discover(typed_nb))
    assert params == {key: value} and type(params[key]) is type(value)


@pytest.mark.parametrize("key, text, message", [
    ("steps", "ten", "expected an integer like 60_typed's default 10, got the string 'ten'"),
    ("steps", "True", "expected an integer like 60_typed's default 10, got True or False True"),
    ("lr", "fast", "expected a number"),
    ("methods", "[matched]", "expected a list like 60_typed's default [\"matched\", \"tis\"], got the string "
                             "'[matched]' (not a Python/JSON literal"),
    ("methods", "[1]", "expected a list of strings"),
    ("sizes", "[1.5]", "expected a list of integers"),
    ("flag", "1", "expected True or False"),
])
def test_param_values_of_another_type_are_usage_errors(typed_nb, key, text, message):
    with pytest.raises(run.UsageError, match="^-p " + key + ": ") as err:
        run.parse_params([(key, text)], run.discover(typed_nb))
    assert message in str(err.value)


def test_list_prints_default_smoke_value_and_comment_without_profile(typed_nb):
    proc = _cli("--notebook-dir", str(typed_nb), "--list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "60_typed"
    assert "  steps = 10  (smoke: 2)  # training steps" in lines
    assert "  methods = [\"matched\", \"tis\"]  (smoke: [\'matched\'])  # arms" in lines
    assert "  lr = 0.1  # a float" in lines
    assert not any(line.lstrip().startswith(("profile", "smoke_overrides")) for line in lines)


def test_type_error_exits_2_before_any_kernel_starts(typed_nb, tmp_path):
    out = tmp_path / "out"
    proc = _cli("--notebook-dir", str(typed_nb), "--out", str(out), "-p", "steps", "ten")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert not out.exists()  # nothing ran, nothing written


REPORT_BODY = [
    "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nimport pandas as pd\n"
    "from pathlib import Path\nfrom helpers.core import results\n"
    "res = results.Results('80_report', title='r', profile=profile, params={'scale': scale})",
    "fig = plt.figure()\nplt.plot([1, 2])\nres.save_figure(fig, 'curve')",  # the cell ends in save_figure
    "res.save_table(pd.DataFrame({'a': [1]}), 'table')",
    "print(Path.cwd(), Path.home())",  # a path printed on purpose is shortened as well
    "res.add_result('a quantity whose name is longer than fifty characters, to check truncation', 1, '2',\n"
    "               'a note that is also far longer than the fifty characters pandas shows by default')\n"
    "res.add_verdict('the claim', 'partly', 'the reason')\nres.finalize()",
    "res.result_table()",
]


def test_report_opens_with_verdicts_and_holds_no_machine_path(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    _write_notebook(d / "80_report.ipynb", REPORT_BODY)
    nb = nbformat.read(str(d / "80_report.ipynb"), as_version=4)
    nb.cells[-2].metadata["tags"] = [run.HIDE_INPUT_TAG]  # the verdict cell: outputs shown, code hidden
    nbformat.write(nb, str(d / "80_report.ipynb"))
    out = tmp_path / "out"
    proc = _cli("--notebook-dir", str(d), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    html = (out / "80_report" / "report.html").read_text()
    executed = (out / "80_report" / "executed.ipynb").read_text()
    assert str(out) in executed  # the raw executed notebook does hold the paths (a Path's str, the print) ...
    for path in (str(REPO), str(out.resolve()), str(Path.home())):
        assert path not in html, f"report.html shows the machine path {path}"  # ... the report does not
    assert "PosixPath(" not in html and "saved 80_report/curve.png" in html and "saved 80_report/table.csv" in html
    # the run's verdicts come first: before the first code cell
    first_code = html.index("jp-CodeCell", html.index("<body"))
    assert html.index("Verdicts of this run") < first_code
    assert html.index("<strong>partly</strong>: the claim - the reason") < first_code
    # the hide-input cell's code is gone, and the result table is not truncated
    assert "add_verdict" not in html
    assert "far longer than the fifty characters pandas shows by default" in html
    assert "longer than fifty characters, to check truncation" in html


def test_scrub_paths_replaces_whole_path_components_only():
    pairs = [("/work/main", "."), ("/root", "~")]
    text = "/work/main/results/x.png /root/.cache /rootfs/y /work/mainline"
    assert run.scrub_paths(text, pairs) == "./results/x.png ~/.cache /rootfs/y /work/mainline"
