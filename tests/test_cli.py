"""The command-line contract: a usage error is one line on stderr that names the bad input; --help is unchanged."""

from __future__ import annotations

import pytest

from vl.cli.regions import main as regions_main
from vl.cli import main


@pytest.mark.parametrize("argv, named", [
    (["finetune", "vqa", "--init", "scratch"], "--train-questions"),
    (["nosuch"], "nosuch"),
    (["demo", "--seed", "x"], "--seed"),
])
def test_usage_errors_are_one_line_naming_the_input(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and err.startswith("vl") and "usage:" not in err


def test_vl_regions_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit):
        regions_main(["extract"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--detector" in err and err.startswith("vl-regions extract: error:")


def test_help_still_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "vqa", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: vl finetune vqa")


def _subcommands(parser, prefix):
    """(command line prefix, parser) for every leaf subcommand, e.g. ("vl finetune vqa", parser)."""
    import argparse

    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        yield prefix, parser
        return
    for name, sub in actions[0].choices.items():
        yield from _subcommands(sub, f"{prefix} {name}")


def test_docs_cli_md_names_every_command_and_its_required_flags():
    """docs/cli.md is the contract users read; a command or required flag missing from it is out of step."""
    from pathlib import Path

    from vl.cli import COMMAND_MODULES, build_parser
    from vl.cli.regions import COMMAND_MODULES as REGION_MODULES

    contract = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    missing = []
    for program, modules in (("vl", COMMAND_MODULES), ("vl-regions", REGION_MODULES)):
        for command, parser in _subcommands(build_parser(program, modules, program), program):
            words = command.split()
            if f"`{command}" not in contract and not (len(words) == 3 and f"{words[0]} {words[1]} " in contract
                                                      and words[2] in contract):
                missing.append(command)
            missing += [f"{command} {flag}" for action in parser._actions if action.required
                        for flag in action.option_strings[:1] if flag not in contract]
    assert not missing, f"not in docs/cli.md: {missing}"
