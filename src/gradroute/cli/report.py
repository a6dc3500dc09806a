"""``gradroute report RUN_DIR``: figures and a markdown summary (with the halt story) for a run."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="figures + markdown summary of a run directory (demo, recipe, notebook)")
    p.add_argument("run_dir", help="a trainer output_dir with gradroute.jsonl, or a demo directory")
    p.add_argument("--out", help="where to write report.md and figures/ (default: ./<RUN_DIR name>-report; "
                   "pass RUN_DIR itself to write into the run)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..report import report

    print(report(args.run_dir, args.out))
    return 0
