"""Regenerate every results file the README quotes, from the current code.

    python recipes/studies.py --jobs 2                 # everything (about an hour of CPU)
    python recipes/studies.py --only demo claims       # some studies
    python recipes/studies.py --assemble               # only rebuild docs/results/ from finished jobs
    python recipes/studies.py --assemble --figures     # ... and redraw docs/figures/

Each study is split into jobs (one seed of one configuration) that run as separate processes
with one torch thread each (``OMP_NUM_THREADS=1``): on a 2-core machine two competing torch
threads ran ~25x slower than one, and one-thread results do not depend on the machine's core
count. A job writes ``runs/studies/jobs/<name>.json`` when it finishes; a re-run skips finished
jobs (``--fresh`` starts over). Logs go to ``runs/studies/logs/<name>.log``.

Then the jobs are assembled into ``docs/results/``:

- ``demo.json``: ``gradroute demo``'s ``report.json`` (seed 0, default configuration);
- ``activation_study.json``: ``study`` (``STUDY_SEEDS``, update and activation x10/30/100,
  persona and random) and ``seed0_sweeps`` (multipliers, PCA ranks, probe layers);
- ``claims_study.json`` (every arm, ``STUDY_SEEDS``), ``claims_lowhack.json`` (``--hack-rate 0.02``) and
  ``claims_sweeps.json`` (adapters x100, penalty weights 10 and 100, steering scale 1/4, the
  issue-22 trials: adapter weight decay, a protected rank-4 persona);
- ``sft_anchoring.json``: ``recipes/sft_anchoring.py`` with its tiny config;
- ``colour_anchoring.json``: ``recipes/colour_anchoring.py``, seeds 0-4, and its ``--conflict``;
- ``locate_study.json``: ``recipes/locate_study.py`` (locating signal and halting rules as
  detectors), seeds 9-13 (seeds 3-8 were used while the signal was designed);
- ``reroute_study.json``: ``recipes/reroute_study.py`` on the claims jobs' deployed models (a
  probe refit on each against the original subspace), ``STUDY_SEEDS``.

``python tools/readme_results.py --write`` then renders the README's result blocks from them,
and ``tests/test_readme_results.py`` checks that the README and these files agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
SEEDS = (0, 1, 2)  # the sweeps' seeds (used while the methods were tuned)
# the seeds the README's per-seed tables and medians are on: never used to tune anything (seeds 0-2
# designed the methods, 3-5 replicated them in issue 22's report, 3-13 designed and tested the
# locating signal; a quarantine smoke run used seed 0)
STUDY_SEEDS = tuple(range(14, 22))

# activation study: name -> activation_study.py arguments (besides --seeds/--out)
ACTIVATION = {"study": ["--mults", "10", "30", "100"]}
ACTIVATION_SWEEPS = {
    "sweep1": ["--mults", "30", "100", "300", "--subspaces", "dm1", "pca4", "--no-random"],
    "sweep2a": ["--mults", "50", "100", "--subspaces", "dm1", "pca2", "--no-random"],
    "sweep2b": ["--mults", "50", "100", "--layers", "1", "2", "3", "--no-random"],
    "sweep2c": ["--mults", "50", "100", "--layers", "2", "3", "--no-random"],
}
# every claims arm, the quarantine and monitor arms included (issue 22)
ALL_ARMS = ("unrouted", "update", "activation", "random", "quarantine", "quarantine-r0.5", "quarantine-r0.1",
            "quarantine-ff0.2", "quarantine-probe", "quarantine-monitor", "early-stop", "halt-restart", "ablation",
            "penalty", "steering")
# claims: name -> (results file, key inside it or None, ToyWorld kwargs, ClaimsConfig kwargs)
CLAIMS: dict[str, tuple[str, str | None, dict[str, Any], dict[str, Any]]] = {
    "claims": ("claims_study.json", None, {}, {"arms": ALL_ARMS}),
    # quarantine with the unflagged rows' advantages recomputed (added after the main jobs ran): its arms
    # join claims_study.json's seeds; its unrouted arm must equal the main job's (checked when assembled)
    "qx": ("claims_study.json", "+", {}, {"arms": ("unrouted", "quarantine-excl", "quarantine-r0.5-excl")}),
    "lowhack": ("claims_lowhack.json", None, {"hack_rate": 0.02}, {}),
    "act100": ("claims_sweeps.json", "act100", {}, {"arms": ("unrouted", "activation", "random"),
                                                    "adapter_lr_multiplier": 100.0}),
    "pen10": ("claims_sweeps.json", "pen10", {}, {"arms": ("unrouted", "penalty"), "penalty_weight": 10.0}),
    "pen100": ("claims_sweeps.json", "pen100", {}, {"arms": ("unrouted", "penalty"), "penalty_weight": 100.0}),
    "steer025": ("claims_sweeps.json", "steer025", {}, {"arms": ("unrouted", "steering"), "steering_scale": 0.25}),
    # issue 22's trials: adapter weight decay, a rank-4 persona with the honest tasks protected
    "trials": ("claims_sweeps.json", "trials", {}, {"arms": ("unrouted", "activation", "activation-wd",
                                                             "activation-pca4")}),
}
LOCATE_SEEDS = (9, 10, 11, 12, 13)
STUDIES = ("demo", "activation", "claims", "sft", "colour", "locate", "reroute")


def jobs(only: tuple[str, ...] = STUDIES) -> list[str]:
    """Job names, longest first (so that the pool ends evenly)."""
    out: list[str] = []
    if "claims" in only:
        out += [f"claims/{name}/{s}" for name in CLAIMS for s in STUDY_SEEDS]
    if "activation" in only:
        out += [f"activation/study/{s}" for s in STUDY_SEEDS] + [f"activation/{k}/0" for k in ACTIVATION_SWEEPS]
    if "locate" in only:
        out += [f"locate/default/{s}" for s in LOCATE_SEEDS]
    if "reroute" in only:  # reads the claims jobs' deployed models: run after them
        out += [f"reroute/default/{s}" for s in STUDY_SEEDS]
    if "demo" in only:
        out.append("demo/default/0")
    if "sft" in only:
        out.append("sft/default/0")
    if "colour" in only:
        out += ["colour/study/0", "colour/conflict/0"]
    return out


def _job_file(work: Path, job: str) -> Path:
    return work / "jobs" / (job.replace("/", "__") + ".json")


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def run_job(job: str, work: Path) -> dict[str, Any]:
    """Run one job in this process (one seed of one configuration) and return its results."""
    study, name, seed = job.split("/")
    scratch = work / "scratch" / job.replace("/", "__")
    if scratch.exists():
        shutil.rmtree(scratch)
    if study == "demo":
        import inspect

        from gradroute.experiments.demo import run_demo

        kw = {"jobs": 1} if "jobs" in inspect.signature(run_demo).parameters else {}
        return run_demo(scratch, seed=int(seed), progress=False, **kw)
    if study == "activation":
        args = {**ACTIVATION, **ACTIVATION_SWEEPS}[name]
        return _recipe("activation_study").main(["--seeds", seed, "--out", str(scratch), *args])
    if study == "locate":
        return _recipe("locate_study").main(["--seeds", seed, "--out", str(scratch)])
    if study == "reroute":
        claims_run = work / "scratch" / f"claims__claims__{seed}"
        extra = work / "scratch" / f"claims__qx__{seed}"  # quarantine-excl ran in its own job
        res = _recipe("reroute_study").analyse(claims_run, int(seed))
        if extra.is_dir():
            res.update(_recipe("reroute_study").analyse(extra, int(seed), ("quarantine-excl",)))
        return {"seed": int(seed), "arms": res}
    if study == "colour":
        args = ["--conflict"] if name == "conflict" else ["--seeds", "0", "1", "2", "3", "4", "--out", str(scratch)]
        return _recipe("colour_anchoring").main(args)
    if study == "sft":
        return _recipe("sft_anchoring").run(["--config", str(ROOT / "recipes" / "configs" / "sft_anchoring_tiny.yaml"),
                                             "--output_dir", str(scratch), "--seed", seed])
    if study == "claims":
        from gradroute.experiments.claims import ClaimsConfig, run_claims
        from gradroute.experiments.world import ToyWorld

        _, _, world_kw, cfg_kw = CLAIMS[name]
        return run_claims(scratch, ToyWorld(**world_kw), ClaimsConfig(seeds=(int(seed),), **cfg_kw), progress=False)
    raise ValueError(f"unknown job {job!r}")


def _launch(job: str, work: Path) -> tuple[str, int, float]:
    log = work / "logs" / (job.replace("/", "__") + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.time()
    with log.open("w") as fh:
        rc = subprocess.call([sys.executable, __file__, "--job", job, "--work", str(work)], stdout=fh,
                             stderr=subprocess.STDOUT, env=env)
    return job, rc, time.time() - t


def assemble(work: Path, only: tuple[str, ...] = STUDIES) -> list[Path]:
    """Merge finished jobs into docs/results/*.json; returns the files written."""
    def load(job: str) -> dict[str, Any] | None:
        f = _job_file(work, job)
        return json.loads(f.read_text()) if f.is_file() else None

    written: list[Path] = []

    def write(name: str, data: dict[str, Any]) -> None:
        path = RESULTS / name
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")
        written.append(path)

    if "demo" in only and (d := load("demo/default/0")) is not None:
        write("demo.json", d)
    if "sft" in only and (d := load("sft/default/0")) is not None:
        write("sft_anchoring.json", d)
    if "colour" in only and (d := load("colour/study/0")) is not None and (c := load("colour/conflict/0")) is not None:
        d.pop("figures", None)
        write("colour_anchoring.json", {"study": d, "conflict": c})
    if "activation" in only:
        def merged(name: str, seeds) -> dict[str, Any] | None:
            parts = [load(f"activation/{name}/{s}") for s in seeds]
            if any(p is None for p in parts):
                return None
            res = {"config": {**parts[0]["config"], "seeds": list(seeds), "out": None}, "seeds": {}}
            for p in parts:
                res["seeds"].update(p["seeds"])
            return res
        study = merged("study", STUDY_SEEDS)
        sweeps = {k: merged(k, (0,)) for k in ACTIVATION_SWEEPS}
        if study is not None and all(v is not None for v in sweeps.values()):
            write("activation_study.json", {"study": study, "seed0_sweeps": sweeps})
    if "locate" in only:
        parts = [load(f"locate/default/{s}") for s in LOCATE_SEEDS]
        if all(p is not None for p in parts):
            res: dict[str, Any] = {"config": {**parts[0]["config"], "seeds": list(LOCATE_SEEDS), "out": None},
                                   "seeds": {}}
            for p in parts:
                res["seeds"].update(p["seeds"])
            for seed in res["seeds"].values():  # the per-step trajectories stay in the job files
                for run in seed["runs"].values():
                    run.pop("z_trajectory", None)
            write("locate_study.json", res)
    if "reroute" in only:
        parts = [load(f"reroute/default/{s}") for s in STUDY_SEEDS]
        if all(p is not None for p in parts):
            write("reroute_study.json", {"seeds": {str(p["seed"]): p["arms"] for p in parts}})
    if "claims" in only:
        files: dict[str, dict[str, Any]] = {}
        extra: dict[str, list[dict[str, Any]]] = {}
        complete = True
        for name, (fname, key, _, _) in CLAIMS.items():
            parts = [load(f"claims/{name}/{s}") for s in STUDY_SEEDS]
            if any(p is None for p in parts):
                complete = False
                continue
            rep = {k: v for k, v in parts[0].items() if k != "table"}  # the jobs' tables are one seed's
            rep["seeds"] = {}
            rep["config"] = {**parts[0]["config"], "seeds": list(STUDY_SEEDS)}
            for p in parts:
                rep["seeds"].update(p["seeds"])
            if key == "+":
                extra[fname] = extra.get(fname, []) + [rep]
            elif key is None:
                files[fname] = rep
            else:
                files.setdefault(fname, {})[key] = rep
        if complete:
            from gradroute.experiments.claims import tabulate

            for fname, reps in extra.items():  # more arms for the same seeds
                main = files[fname]
                for rep in reps:
                    for seed, s in rep["seeds"].items():
                        base = main["seeds"][seed]["arms"]["unrouted"]
                        if _strip(s["arms"]["unrouted"]) != _strip(base):
                            raise SystemExit(f"seed {seed}: the added arms' unrouted run differs from the main one's")
                        main["seeds"][seed]["arms"].update({a: r for a, r in s["arms"].items() if a != "unrouted"})
                    main["config"]["arms"] = list(dict.fromkeys([*main["config"]["arms"], *rep["config"]["arms"]]))
            for fname, data in files.items():
                for rep in [data] if "seeds" in data else data.values():  # a file of one report, or of several
                    rep["table"] = tabulate(rep)
                write(fname, data)
    return written


def _strip(x: Any) -> Any:
    """A result without its wall-clock times."""
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k != "seconds"}
    return x


FIGURES = ROOT / "docs" / "figures"
# docs/figures/<name> <- the demo job's run directory (gradroute report's figures)
DEMO_FIGURES = {"demo_rates.png": "figures/rates.png", "demo_env_share.png": "figures/persona/env_share.png",
                "demo_layer_heatmap.png": "figures/persona/layer_heatmap.png",
                "demo_halt_locate.png": "figures/halt/locate.png"}


def figures(work: Path) -> list[Path]:
    """Redraw docs/figures/ from docs/results/ and the finished jobs' run directories."""
    written: list[Path] = []
    act = RESULTS / "activation_study.json"
    if act.is_file():
        written.append(_recipe("activation_study").figure(json.loads(act.read_text())["study"],
                                                          FIGURES / "activation_study.png"))
    claims = RESULTS / "claims_study.json"
    if claims.is_file():
        from gradroute.experiments.claims import figure

        written.append(figure(json.loads(claims.read_text()), FIGURES / "claims.png"))
    demo_dir = work / "scratch" / "demo__default__0"
    if demo_dir.is_dir():
        from gradroute.report import report

        report(demo_dir, out=demo_dir)  # today's figure style, from the run's own logs
        for name, rel in DEMO_FIGURES.items():
            if (demo_dir / rel).is_file():
                shutil.copyfile(demo_dir / rel, FIGURES / name)
                written.append(FIGURES / name)
    colour = work / "scratch" / "colour__study__0" / "colour_anchoring.png"
    if colour.is_file():
        shutil.copyfile(colour, FIGURES / "colour_anchoring.png")
        written.append(FIGURES / "colour_anchoring.png")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes at once (default: CPU cores)")
    p.add_argument("--only", nargs="+", choices=STUDIES, default=list(STUDIES), help="studies to run")
    p.add_argument("--work", default=str(ROOT / "runs" / "studies"), help="work directory")
    p.add_argument("--fresh", action="store_true", help="re-run finished jobs too")
    p.add_argument("--assemble", action="store_true", help="only merge finished jobs into docs/results/")
    p.add_argument("--figures", action="store_true", help="also redraw docs/figures/ (after assembling)")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: run one job in this process
    args = p.parse_args(argv)
    work = Path(args.work)
    if args.job:
        res = run_job(args.job, work)
        f = _job_file(work, args.job)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(res, indent=1, default=str))
        return 0
    only = tuple(args.only)
    todo = [j for j in jobs(only) if args.fresh or not _job_file(work, j).is_file()]
    if not args.assemble and todo:
        print(f"{len(todo)} jobs ({len(jobs(only)) - len(todo)} already done), {args.jobs} at a time; "
              f"logs in {work / 'logs'}", flush=True)
        t0 = time.time()
        failed = []
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for fut in as_completed([pool.submit(_launch, j, work) for j in todo]):
                job, rc, secs = fut.result()
                print(f"  {'done' if rc == 0 else 'FAILED'} {job} ({secs:.0f} s; {time.time() - t0:.0f} s in)",
                      flush=True)
                if rc:
                    failed.append(job)
        if failed:
            print(f"failed: {failed}; see their logs", file=sys.stderr)
    for path in assemble(work, only):
        print(f"wrote {path.relative_to(ROOT)}")
    if args.figures:
        for path in figures(work):
            print(f"drew {Path(path).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
