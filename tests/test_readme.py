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


def _command_lines(text: str):
    """The ``convspec ...`` command lines of the fenced blocks of ``text`` (continuations
    joined, comments dropped), as argument lists after ``convspec``."""
    blocks, current, lang = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, lang = [], line[3:].strip()
            else:
                if lang in ("", "bash"):
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            tokens = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()  # [optional flags]
            programs = [i for i, t in enumerate(tokens) if t.rsplit("/", 1)[-1] == "convspec"
                        and (i == 0 or tokens[i - 1] == "-m")]
            if programs:
                yield tokens[programs[0] + 1:]


def test_readme_and_config_commands_parse_and_use_the_model_names(monkeypatch):
    """Every complete command of the README and of the configs' comments parses, its config is
    valid, and ``spectrum`` gets a model name, a checkpoint or package.module:factory."""
    from convspec.cli import _config_from_args, build_parser
    from convspec.experiments.spectrum_report import is_factory_path
    from convspec.train.models import parse_model_name

    root = README.parent
    monkeypatch.chdir(root)  # config paths are relative to the checkout
    texts = [README.read_text()]
    texts += ["```\n" + "\n".join(ln.lstrip("# ") for ln in p.read_text().splitlines()) + "\n```"
              for p in sorted((root / "configs").glob("*.toml"))]
    parser, checked = build_parser(), 0
    for text in texts:
        for argv in _command_lines(text):
            if "..." in argv or not argv:
                continue  # an abbreviated command
            args = parser.parse_args([a if a != "DIR" else "data" for a in argv])
            if args.command in ("train", "compare"):
                _config_from_args(args, parser)
            if args.command == "spectrum":
                assert (args.model.endswith(".pt") or is_factory_path(args.model)
                        or parse_model_name(args.model)), argv
            checked += 1
    assert checked >= 10
