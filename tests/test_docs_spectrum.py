"""docs/spectrum.md's Python snippets run as written."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "spectrum.md"


def test_spectrum_doc_python_snippets_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/spectrum.md has no python snippet"
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/spectrum.md[python block {i}]", "exec"), {"__name__": "__doc__"})
    out = capsys.readouterr().out
    assert "iterative" in out and "True True" in out.splitlines()[0] + " " + out.splitlines()[1]
    assert "fft torch.Size([512])" in out


def test_spectrum_doc_has_measured_table():
    text = DOC.read_text()
    assert "BENCHMARK_TABLE" not in text
    assert "| case |" in text
