"""``gradroute demo``: the embedded end-to-end run on a toy persona world."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded end-to-end example on a tiny local model")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="smaller, faster run (used by the tests)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    summary = run_demo(out=args.out, quick=args.quick, seed=args.seed)
    print(summary["table"])
    return 0
