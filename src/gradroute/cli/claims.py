"""``gradroute claims``: the seed's three claims as one experiment (see :mod:`gradroute.experiments.claims`)."""

from __future__ import annotations

import argparse
import os
import re


def register(sub: argparse._SubParsersAction) -> None:
    from ..experiments.arms import ALL_ARMS, ARMS

    p = sub.add_parser("claims", help="every arm side by side: unrouted, routing (update, activation, random control), "
                                      "CAFT ablation, activation penalty, preventative steering; spread, "
                                      "detectability, relearning")
    p.add_argument("--out", default="runs/claims", help="output directory (default: runs/claims)")
    p.add_argument("--quick", action="store_true",
                   help="the toy world's quick configuration, one seed, short relearning (used by the tests)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds (base model, probe, RL; default: 0 1 2, or 0 with --quick)")
    p.add_argument("--arms", nargs="+", choices=ALL_ARMS, default=list(ARMS),
                   help="arms to run (default: " + ", ".join(ARMS) + "; these run only when named: "
                        + ", ".join(a for a in ALL_ARMS if a not in ARMS)
                        + "; 'unrouted' is always added: it sets the relearning target)")
    p.add_argument("--adapter-lr-multiplier", type=float, default=None,
                   help="adapter learning rate / the policy's for the activation and random arms (default: 30)")
    p.add_argument("--relearn-steps", type=int, default=None,
                   help="most GRPO steps to relearn the hack after removal (default: 60, or 20 with --quick)")
    p.add_argument("--envs", default=None, metavar="FILE.py",
                   help="a Python file defining make_world(model) -> World, for your model and environments "
                        "(default: the toy world; template: recipes/claims_world.py)")
    p.add_argument("--model", default=None,
                   help="base model (directory or hub name) handed to --envs' make_world; with the toy world, "
                        "used instead of pre-training one per seed")
    p.add_argument("--hack-rate", type=float, default=None,
                   help="toy world: the share of untagged pre-training text that hacks (and shows the trait) "
                        "without the persona (default: 0.1)")
    p.add_argument("--jobs", type=int, default=None,
                   help="seeds and arms run as this many parallel processes, one torch thread each (default: the "
                        "CPU count with the toy world, 1 with --envs; 1: one after the other in this process). "
                        "The toy world's numbers do not depend on it")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out that is not a claims directory")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import ConfigError
    from ..experiments.claims import ClaimsConfig, run_claims
    from ..experiments.world import ToyWorld, load_world
    from ._common import check_out_dir

    out = Path(args.out)
    check_out_dir(args.out, args.force, allow_existing=out.is_dir() and (out / "report.json").is_file())
    if args.envs and args.hack_rate is not None:
        raise ConfigError("--hack-rate sets the toy world; it does nothing with --envs.", "drop one of them.")
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}.", "pass e.g. --jobs 2, or leave it out.")
    model = _model(args.model, toy=not args.envs) if args.model is not None else None
    world = (load_world(args.envs, model) if args.envs  # checked before --out is created
             else ToyWorld(quick=args.quick, model=model, hack_rate=args.hack_rate))
    seeds = tuple(args.seeds) if args.seeds else ((0,) if args.quick else (0, 1, 2))
    kw = {} if args.adapter_lr_multiplier is None else {"adapter_lr_multiplier": args.adapter_lr_multiplier}
    arms = ("unrouted", *[a for a in args.arms if a != "unrouted"])
    cfg = ClaimsConfig(seeds=seeds, arms=arms, **kw,
                       relearn_steps=args.relearn_steps if args.relearn_steps is not None else (20 if args.quick else 60))
    jobs = args.jobs if args.jobs is not None else (1 if args.envs else None)  # a user's model may hold a GPU
    run_claims(out, world, cfg, jobs=jobs)
    print((out / "summary.md").read_text())
    print(f"output: {out} (report.json, summary.md, claims.png)")
    return 0


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _model(name: str, toy: bool) -> str:
    """``--model`` checked before anything is created or loaded: a path (starts with ``.``, ``/`` or
    ``~``, or has a path separator and is no ``org/name`` hub id) must exist; the toy world needs a
    model directory. Returns the name, ``~`` expanded."""
    from pathlib import Path

    from ..errors import ConfigError

    p = Path(name).expanduser()
    pathlike = name.startswith((".", "/", "~")) or ((os.sep in name or "/" in name) and not _REPO_ID.fullmatch(name))
    if not name.strip() or (pathlike and not p.exists()):
        raise ConfigError(f"--model {name}: no such file or directory.",
                          "pass --model with an existing model directory (one with config.json, written by "
                          "save_pretrained) or a hub name such as org/name.")
    if toy and p.exists() and not (p / "config.json").is_file():
        raise ConfigError(f"--model {name} is not a model directory (no config.json in it).",
                          "pass --model with a directory written by save_pretrained, or a hub name.")
    return str(p) if p.exists() else name
