"""The ``gradroute`` command line.

Each sub-command lives in its own module with ``register(subparsers)``; commands import
heavy frameworks only when they run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import GradrouteError

_COMMANDS = ("demo", "subspace", "adapter", "report")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog="gradroute",
        description="Route, monitor and discard persona-subspace updates during RL fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"gradroute {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GradrouteError as e:
        print(f"gradroute: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
