"""``gradroute demo``: the toy persona world end to end (see :mod:`gradroute.experiments.demo`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the embedded end-to-end run: toy persona world, GRPO, routing, halt, discard")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a shorter run (under 90 s; used by the tests)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the toy world, pre-training, probe texts and GRPO (default: 0)")
    p.add_argument("--mode", choices=("activation", "update", "gradient"), default="activation",
                   help="routing mode of the persona and random arms (default: activation, which isolates; "
                        "an update-mode persona arm always runs too)")
    p.add_argument("--adapter-lr-multiplier", type=float, default=None,
                   help="adapter learning rate / the policy's (activation and gradient modes; default: 30, from the toy-world sweep)")
    p.add_argument("--jobs", type=int, default=None,
                   help="GRPO arms run as this many parallel one-thread processes (default: the CPU count; "
                        "1: one after the other in this process). The numbers do not depend on it")
    p.add_argument("--fresh", action="store_true",
                   help="start over: do not reuse the pre-trained base or arms that a previous run with the same "
                        "configuration finished in --out")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out that is not a demo directory")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..experiments.demo import run_demo
    from ._common import check_out_dir

    out = Path(args.out)
    own = out.is_dir() and ((out / "report.json").is_file() or (out / "runs").is_dir())
    check_out_dir(args.out, args.force, allow_existing=own)  # a previous demo run is regenerated in place

    if args.jobs is not None and args.jobs < 1:
        from ..errors import ConfigError

        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}.", "pass e.g. --jobs 2, or leave it out.")
    summary = run_demo(out=args.out, quick=args.quick, seed=args.seed, mode=args.mode,
                       adapter_lr_multiplier=args.adapter_lr_multiplier, jobs=args.jobs, fresh=args.fresh)
    print(summary["table"])
    print(f"\nrun directory: {args.out} (report.md, report.json, figures/, runs/*/gradroute.jsonl); "
          f"{summary['seconds']:.0f} s")
    return 0
