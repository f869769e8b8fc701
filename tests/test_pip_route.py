"""The pip route of the README, without make: a clean venv, the CPU build of torch first, then
``pip install .`` from a copy of this checkout.

It checks that the plain install gives a working library and CLI, that the plotting subcommands
refuse at once (before any work, nothing written) with a one-line error naming the ``cli`` extra,
and that ``pip install '.[cli]'`` then makes them work. This builds a real venv and installs torch
into it (`--no-compile`: about 40 s on 2 cores); it is part of the default run because it is what CI must prove.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = os.environ.get("CONVSPEC_TEST_TORCH", "torch==2.13.0")


def _copy_checkout(dest: Path) -> Path:
    """What a clone holds that the build needs: no venv, caches, records or build outputs."""
    ignore = shutil.ignore_patterns(
        ".venv", ".git", "out", "runs", "records", "benchmarks", "build", "dist", "*.egg-info",
        "__pycache__", ".pytest_cache", ".hypothesis",
    )
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _run(args, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(args, capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def clean_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("pip_route")
    src = _copy_checkout(base / "checkout")
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    for step in ([TORCH], [str(src)]):
        r = _run([str(py), "-m", "pip", "install", "--quiet", "--no-compile", *step])
        assert r.returncode == 0, f"pip install {step} failed:\n{r.stdout}\n{r.stderr}"
    return py, src, base


def test_plain_install_gives_library_and_cli(clean_env):
    py, _, base = clean_env
    # The library: torch + numpy only, and its own package (not this checkout's src/).
    code = (
        "import convspec, torch, importlib.util as u\n"
        "assert 'site-packages' in convspec.__file__, convspec.__file__\n"
        "assert u.find_spec('matplotlib') is None\n"
        "w = torch.randn(4, 3, 3, 3, dtype=torch.float64)\n"
        "r = convspec.frobenius_penalty(w, 6, padding=1)\n"
        "d = convspec.frobenius_penalty_reference(w, 6, padding=1)\n"
        "assert torch.isclose(r, d, rtol=1e-10), (r, d)\n"
        "print('ok')\n"
    )
    r = _run([str(py), "-c", code], cwd=base)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    cli = py.parent / "convspec"
    r = _run([str(cli), "--version"], cwd=base)
    assert r.returncode == 0 and r.stdout.startswith("convspec "), r.stderr
    # Training writes no plot: it works without the extra (no tqdm either: no progress bar).
    run = base / "run"
    r = _run([str(cli), "train", "--data", "synthetic", "--model", "convnet-8",
              "--batch-size", "32", "--n-train", "64", "--n-test", "32", "--epochs", "1",
              "--out", str(run)], cwd=base)
    assert r.returncode == 0, r.stderr
    assert (run / "metrics.jsonl").read_text().count("test_error") == 1


@pytest.mark.parametrize(
    "args",
    [
        ["spectrum", "convnet-8", "--input-size", "1", "8", "8"],
        ["reproduce", "guo-fig41", "--steps", "2"],
        ["plot", "nothing-here"],
        ["compare", "--config", "nothing.toml"],
    ],
    ids=lambda a: a[0],
)
def test_plotting_commands_refuse_before_work_without_matplotlib(clean_env, tmp_path, args):
    py, _, _ = clean_env
    out = tmp_path / "out"
    r = _run([str(py.parent / "convspec"), *args, "--out", str(out)], cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "convspec[cli]" in lines[0] and "matplotlib" in lines[0], r.stderr
    assert not out.exists()  # refused before any work


def test_cli_extra_makes_plots_work(clean_env, tmp_path):
    py, src, _ = clean_env
    r = _run([str(py), "-m", "pip", "install", "--quiet", "--no-compile", f"{src}[cli]"])
    assert r.returncode == 0, r.stderr
    out = tmp_path / "spec"
    r = _run(
        [str(py.parent / "convspec"), "spectrum", "convnet-8", "--input-size", "1", "8", "8",
         "--out", str(out)],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.suffix for p in out.iterdir() if p.suffix == ".png")
