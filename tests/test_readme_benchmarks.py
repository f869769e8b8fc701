"""The README's benchmark tables are what ``benchmarks/readme_tables.py`` makes of
``benchmarks/results/*.json``, and the generator refuses JSON it does not understand."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _load_generator():
    path = ROOT / "benchmarks" / "readme_tables.py"
    spec = importlib.util.spec_from_file_location("readme_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = _load_generator()


def test_readme_tables_match_the_results():
    readme = (ROOT / "README.md").read_text()
    generated = tables.render(readme, tables.load_results(RESULTS))
    assert readme == generated, (
        "README.md's benchmark tables differ from benchmarks/results/*.json; "
        "run: python benchmarks/readme_tables.py (it prints the diff with --check)")


def test_every_block_is_in_the_readme_once():
    readme = (ROOT / "README.md").read_text()
    for name in ("results", "penalty", "spectrum", "fft", "svb", "regularizer"):
        assert readme.count(f"<!-- bench:{name} -->") == 1
        assert readme.count(f"<!-- /bench:{name} -->") == 1


@pytest.fixture
def workspace(tmp_path):
    """A copy of the README and of the results to edit."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(RESULTS, tmp_path / "results")
    return tmp_path


def _run(ws, *extra):
    return tables.main(["--readme", str(ws / "README.md"), "--results", str(ws / "results"),
                        "--records", str(ROOT / "records"), *extra])


def _edit(path: Path, change):
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record, indent=1))


def test_check_passes_on_the_committed_readme(workspace):
    assert _run(workspace, "--check") == 0


def test_check_fails_when_a_number_changes_and_rewrite_fixes_it(workspace, capsys):
    _edit(workspace / "results" / "penalty.json",
          lambda r: r["rows"][0].update(ratio=r["rows"][0]["ratio"] * 2))
    assert _run(workspace, "--check") == 1
    assert "differs" in capsys.readouterr().err
    assert _run(workspace) == 0
    assert _run(workspace, "--check") == 0
    assert (workspace / "README.md").read_text() != (ROOT / "README.md").read_text()


def test_check_fails_when_the_readme_is_edited_by_hand(workspace):
    readme = workspace / "README.md"
    text = readme.read_text()
    start = text.index("<!-- bench:svb -->")
    edited = text[start:].replace("| WRN-28-10 | 29 |", "| WRN-28-10 | 30 |", 1)
    assert edited != text[start:]
    readme.write_text(text[:start] + edited)
    assert _run(workspace, "--check") == 1


@pytest.mark.parametrize("name, path", [
    ("penalty", ("rows", 0)),
    ("spectrum", ("rows", 4)),
    ("svb", ("rows", 2, "seconds")),
    ("svb", ()),
    ("spectrum", ("environment",)),
    ("fft", ("rows", 0)),
    ("fft", ("rows", 1, "runs_s")),
    ("fft", ("dense_check",)),
    ("fft", ()),
])
def test_an_unknown_field_fails_loudly(workspace, capsys, name, path):
    def change(record):
        target = record
        for key in path:
            target = target[key]
        target["new_measurement"] = 1.0

    _edit(workspace / "results" / f"{name}.json", change)
    with pytest.raises(tables.SchemaError, match="new_measurement"):
        tables.load_results(workspace / "results")
    for mode in ((), ("--check",)):
        assert _run(workspace, *mode) == 2
        assert "new_measurement" in capsys.readouterr().err


def test_a_missing_field_fails_loudly(workspace):
    _edit(workspace / "results" / "spectrum.json", lambda r: r["rows"][0].pop("route_s"))
    with pytest.raises(tables.SchemaError, match="route_s"):
        tables.load_results(workspace / "results")


def test_an_unknown_benchmark_file_fails_loudly(workspace):
    (workspace / "results" / "newbench.json").write_text(json.dumps({"benchmark": "newbench"}))
    with pytest.raises(tables.SchemaError, match="newbench"):
        tables.load_results(workspace / "results")


def test_a_row_the_first_screen_quotes_must_exist(workspace):
    _edit(workspace / "results" / "spectrum.json", lambda r: r["rows"].pop(1))
    with pytest.raises(tables.SchemaError, match="first-screen"):
        tables.render((ROOT / "README.md").read_text(), tables.load_results(workspace / "results"))


def test_a_missing_marker_fails_loudly():
    readme = (ROOT / "README.md").read_text().replace("<!-- /bench:penalty -->", "")
    with pytest.raises(tables.SchemaError, match="bench:penalty"):
        tables.render(readme, tables.load_results(RESULTS))


def test_number_formats():
    assert tables.sig(5694.69) == "5690"
    assert tables.sig(1.0001) == "1.00"
    assert tables.sig(0.99996) == "1.00"
    assert tables.sig(0.000557) == "0.000557"
    assert tables.sig(0.0060293, 2) == "0.0060"
    assert tables.sig(67513.2, 2) == "68000"
    assert tables.sig(2.5e5, 2) == "2.5e5"
    assert tables.exp(4.0197e-16) == "4e-16"
    assert tables.exp(3.4175e-8, 2) == "3.4e-8"
