"""The README's spectrum snippet runs as written and prints what it claims."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_spectrum_snippet_runs(capsys):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
              if "conv_singular_values" in b]
    assert blocks, "README has no conv_singular_values snippet"
    exec(compile(blocks[0], "README.md[spectrum]", "exec"), {"__name__": "__doc__"})
    out = capsys.readouterr().out
    assert "iterative" in out and "True True" in out.splitlines()[0] + " " + out.splitlines()[1]
    assert "fft torch.Size([512])" in out


def test_readme_has_measured_spectrum_table():
    text = README.read_text()
    assert "BENCHMARK_TABLE" not in text and "**Exact spectra** (`benchmarks/spectrum.py`" in text
