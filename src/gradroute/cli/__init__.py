"""The ``gradroute`` command line.

Each sub-command lives in its own module with ``register(subparsers)``; commands import
heavy frameworks only when they run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import GradrouteError
from ._common import one_line, short

_COMMANDS = ("demo", "claims", "subspace", "adapter", "report")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``gradroute: error: ... Fix: ...``), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message}. Fix: see `{self.prog} --help`.", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from .._version import __version__

    parser = _Parser(
        prog="gradroute",
        description="Route, monitor and discard persona-subspace updates during RL fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"gradroute {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every failure is one line on stderr and a non-zero exit status
    (2: a gradroute error or bad usage; 1: an unexpected error; 130: interrupted); ``--debug``
    shows the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GradrouteError as e:
        if debug:
            raise
        print(f"gradroute: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("gradroute: interrupted.", file=sys.stderr)
        return 130
    except Exception as e:  # anything else is a bug or an input we did not foresee: still one line
        if debug:
            raise
        print(f"gradroute: error: unexpected {type(e).__name__}: {short(e)} "
              "Fix: re-run with --debug for the traceback, and report it if the input was valid.", file=sys.stderr)
        return 1
