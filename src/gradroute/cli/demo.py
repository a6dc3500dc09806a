"""``gradroute demo``: the toy persona world end to end (see :mod:`gradroute.demo`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the embedded end-to-end run: toy persona world, GRPO, routing, halt, discard")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a shorter run (under 90 s; used by the tests)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the whole demo (default 0)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out that is not a demo directory")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..demo import run_demo
    from ._common import check_out_dir

    out = Path(args.out)
    own = out.is_dir() and ((out / "report.json").is_file() or (out / "runs").is_dir())
    check_out_dir(args.out, args.force, allow_existing=own)  # a previous demo run is regenerated in place

    summary = run_demo(out=args.out, quick=args.quick, seed=args.seed)
    print(summary["table"])
    print(f"\nrun directory: {args.out} (report.md, report.json, figures/, runs/*/gradroute.jsonl); "
          f"{summary['seconds']:.0f} s")
    return 0
