"""The gallery as a reader sees it: headless Chromium renders results/index.html from the smoke run."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=10000", "--allow-file-access-from-files"]


def _chromium(*args, user_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={user_dir}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`make test` installs it as root; "
                                             "apt-get install chromium failed or was not allowed here)")
def test_gallery_renders_every_card_figure_and_table(smoke_run, tmp_path):
    out, proc = smoke_run
    index = out / "index.html"
    assert index.exists(), proc.stdout + proc.stderr
    dom = _chromium("--dump-dom", index.as_uri(), user_dir=tmp_path / "profile1").stdout
    assert "<main>" in dom, "chromium rendered nothing"
    for path in run.discover():
        card = re.search(rf'<section class="card[^"]*" data-notebook="{path.stem}">(.*?)</section>', dom, re.S)
        assert card, f"no card for {path.stem}"
        body = card.group(1)
        assert 'data-loaded="true"' in body, f"{path.stem}: headline figure did not load in the browser"
        assert '<table class="results">' in body, f"{path.stem}: no results table"
        assert "report.html" in body
    assert 'data-loaded="false"' not in dom, "a figure failed to load"
    shot = out / "index.png"
    _chromium(f"--screenshot={shot}", "--window-size=1400,2200", index.as_uri(), user_dir=tmp_path / "profile2")
    assert shot.exists() and shot.stat().st_size > 20_000, "screenshot missing or blank"
    print(f"screenshot: {shot}")
