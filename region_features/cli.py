"""The ``vl-regions`` command: train the detector, detect, extract region features, convert feature stores."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from region_features import commands as _commands
from region_features import convert as _convert
from vl.cli import build_parser, run

# Each module's ``add_parser(subparsers)`` registers a subcommand; imported explicitly.
COMMAND_MODULES: list = [_commands, _convert]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("vl-regions", COMMAND_MODULES, __doc__.splitlines()[0])
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
