"""The code of docs/usage.md and of the README's "Use the helpers in your own code" section runs as written.

The blocks of a page run in order in one namespace (later blocks reuse the model of the first), in a temporary
working directory, so an API change that breaks a documented call fails here, loudly.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
README_SECTION = "## Use the helpers in your own code"


def python_blocks(markdown: str) -> list[str]:
    """The ```python fenced blocks of a Markdown text, in order."""
    return FENCE.findall(markdown)


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(README_SECTION)
    end = text.find("\n## ", start + len(README_SECTION))
    return text[start:end if end != -1 else None]


def test_python_blocks_are_found():
    md = "text\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x + 1\n```\n"
    assert python_blocks(md) == ["x = 1\n", "y = x + 1\n"]


@pytest.mark.parametrize("page", ["docs/usage.md", "README.md"])
def test_snippets_run(page, tmp_path, monkeypatch):
    text = (REPO / page).read_text() if page != "README.md" else readme_section()
    blocks = python_blocks(text)
    assert blocks, f"{page}: no ```python block found"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__snippet__"}
    for i, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"{page} python block {i}", "exec"), namespace)  # noqa: S102 - our own docs
        except Exception as exc:
            raise AssertionError(f"{page}, python block {i} fails: {type(exc).__name__}: {exc}\n{block}") from exc


def test_usage_page_is_linked_from_the_readme():
    assert "docs/usage.md" in readme_section()
