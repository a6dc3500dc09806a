"""``gradroute report RUN_DIR``: figures and a markdown summary (with the halt story) for a run."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="figures + markdown summary of a run directory (demo, recipe, notebook)")
    p.add_argument("run_dir", help="a trainer output_dir with gradroute.jsonl, or a demo directory")
    p.add_argument("--out", help="where to write report.md and figures/ (default: RUN_DIR/report, inside the run; "
                   "pass another directory to write elsewhere)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import FileFormatError
    from ..report import report
    from ._common import check_out_dir

    if not Path(args.run_dir).is_dir():
        raise FileFormatError(f"{args.run_dir} is not a directory.",
                              "pass a run directory (a trainer output_dir with gradroute.jsonl, or a demo directory).")
    out = args.out if args.out is not None else str(Path(args.run_dir) / "report")
    check_out_dir(out, allow_existing=True)  # a report is regenerated in place; a file is refused
    print(report(args.run_dir, out))
    return 0
