"""Every flag of every subcommand has a help text, and every flag that takes a value shows its
default; the shown default is the one that applies."""

import argparse
import re
from dataclasses import fields

import pytest

from convspec.cli import _show, build_parser, main
from convspec.train.config import TrainConfig

#: Options hidden on purpose: the old '--model FAMILY --depth D --width W' form, kept only to
#: answer with the name to write instead (tests/test_train_loop.py::test_bad_flags_exit_2).
HIDDEN = {("train", "--depth"), ("train", "--width"), ("compare", "--depth"),
          ("compare", "--width"), ("frob-sweep", "--depth"), ("frob-sweep", "--width"),
          ("jia-fig1", "--depth"), ("jia-fig1", "--width")}
CONFIG_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def _parsers(parser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"subcommand {' '.join(path + (name,))} has no help"
                yield from _parsers(sub, path + (name,))


def _options():
    """(command path, parser, action) for every option and positional of every parser."""
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                   argparse._SubParsersAction)):
                continue
            yield path, parser, action


def _name(path, action):
    return " ".join(["convspec", *path, action.option_strings[-1] if action.option_strings
                     else action.metavar or action.dest])


def test_walk_finds_every_subcommand():
    paths = {" ".join(path) for path, _ in _parsers(build_parser())}
    assert paths == {"", "reproduce", "reproduce guo-fig41", "reproduce guo-2norm",
                     "reproduce frob-sweep", "reproduce jia-fig1", "reproduce norm-layers",
                     "train", "compare", "plot",
                     "spectrum", "lipschitz"}
    assert sum(1 for _ in _options()) > 50


@pytest.mark.parametrize("path,parser,action", [
    pytest.param(path, parser, action, id=_name(path, action)) for path, parser, action in _options()
])
def test_every_option_has_help_and_shows_its_default(path, parser, action):
    name = _name(path, action)
    if action.option_strings and (path[-1:] + (action.option_strings[0],)) in HIDDEN:
        assert action.help == argparse.SUPPRESS, name
        return
    assert action.help and action.help != argparse.SUPPRESS, f"{name} has no help text"
    text = parser._get_formatter()._expand_help(action)
    takes_value = action.nargs != 0
    if not action.option_strings or not takes_value:
        return  # positionals are required; flags without a value are off unless given
    if action.required:
        assert "required" in text, f"{name}: say that it is required"
        return
    m = re.search(r"\(default: ([^)]*(?:\([^)]*\)[^)]*)*)\)$", text)
    assert m, f"{name} does not show its default: {text!r}"
    # The default shown is the default that applies: argparse's, or (for train and compare,
    # whose flags default to None so that a config file can set them) TrainConfig's.
    effective = action.default
    if effective is None and action.dest in CONFIG_DEFAULTS:
        effective = CONFIG_DEFAULTS[action.dest]
    if effective is not None:
        assert m.group(1) == _show(effective), f"{name} shows {m.group(1)!r}, applies {effective!r}"


def test_the_flags_the_issue_named_have_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split("options:")[1].split())
    for flag, default in [("--batch-size", "128"), ("--momentum", "0.9"),
                          ("--weight-decay", "0.0001"), ("--nesterov", "off"),
                          ("--bbn-mode", "bbn"), ("--eps", "0.05"), ("--frob-weight", "0.001"),
                          ("--model", "convnet-20")]:
        seg = out[out.index(f"{flag} "):]
        assert re.search(r"\(default: ([^)]*)\)", seg).group(1) == default, (flag, seg[:300])
    with pytest.raises(SystemExit):
        main(["plot", "--help"])
    assert "(default: test_error)" in " ".join(capsys.readouterr().out.split())


def test_version(capsys):
    from convspec import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"convspec {__version__}"
