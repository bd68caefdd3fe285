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
