"""The README's Python snippets run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text: str):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_snippets_run():
    blocks = _python_blocks(README.read_text())
    assert blocks, "README has no python snippet"
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md[python block {i}]", "exec"), {"__name__": "__readme__"})


def test_readme_starts_with_the_two_commands():
    head = README.read_text().split("```python")[0]
    assert "make demo" in head and "make test" in head
