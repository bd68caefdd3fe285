"""The ``vl-regions`` command: train the detector, detect, extract region features, convert feature stores."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from vl.cli import build_parser, run
from vl.cli import region_commands as _region_commands
from vl.cli import region_convert as _region_convert

# Each module's ``add_parser(subparsers)`` registers a subcommand; imported explicitly.
COMMAND_MODULES: list = [_region_commands, _region_convert]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("vl-regions", COMMAND_MODULES, __doc__.splitlines()[0])
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
