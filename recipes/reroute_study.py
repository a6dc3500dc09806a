"""Is the persona rerouted around the subspace we routed or ablated? A probe refit on the trained
model, against the original subspace (issue 21's "a monitor that does not read only what it
routes"), on the claims study's deployed models.

For each seed and arm of a finished ``gradroute claims`` run (its ``seed<N>/<arm>/removed``: the
model after the arm's inference step — discarded adapters, comparator hooks off), the deployed
model is sampled on every environment (the harness's graded samples), and the persona is read
two ways:

- **original**: the persona subspace the arm was routed through (or ablated, penalized, steered
  along), fit on the pre-RL model;
- **refit**: the same diff-of-means probe (the world's persona pairs, last prompt token) fit
  again on the deployed model.

Per way: the AUROC of its coordinates separating the prompts the model misbehaves on (hack or
trait) from the rest (``claims.subspace_auroc``, mean over layers), and *through*, the share of
the exploitable hacking removed by suppressing it at every layer at inference. Plus the overlap
of the two subspaces (``Subspace.overlap``: mean squared cosine of the principal angles, mean over
layers). A behaviour rerouted out of the original subspace shows as a refit that reads it
(AUROC, through) where the original does not, and an overlap below 1.

    python recipes/reroute_study.py runs/studies/scratch/claims__claims__14 --seed 14
    python recipes/studies.py --only reroute        # every study seed (after the claims jobs)
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path
from typing import Any

# the arms with a deployed model on disk (the unrouted arm keeps none: it is not relearned)
ARMS = ("activation", "random", "quarantine", "quarantine-excl", "ablation", "penalty", "steering")


def through(world: Any, model: Any, tok: Any, sub: Any, rows: list[dict[str, Any]]) -> float | None:
    """1 − hack(suppressed) / hack on the exploitable environments (None when nothing hacks)."""
    from gradroute.experiments.toyworld import rates
    from gradroute.interventions import suppress_all

    base = statistics.mean(rates(rows)[e]["hack"] for e in world.exploitable) if rows else 0.0
    if base <= 0:
        return None
    with suppress_all(model, sub):
        sup = rates(world.sample(model, tok, world.exploitable))
    return 1 - statistics.mean(sup[e]["hack"] for e in world.exploitable) / base


def analyse(run: Path, seed: int, arms: tuple[str, ...] = ARMS) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradroute import Subspace
    from gradroute.experiments.claims import subspace_auroc
    from gradroute.experiments.toyworld import rates
    from gradroute.experiments.world import ToyWorld

    world = ToyWorld()
    sd = run / f"seed{seed}"
    persona = Subspace.load(sd / "persona.subspace")
    pairs, contrast = world.probe_pairs(seed)
    envs = (*world.train_envs, *world.heldout_envs)
    out: dict[str, Any] = {}
    for arm in arms:
        path = sd / arm / "removed"
        if not (path / "config.json").is_file():
            continue
        model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        rows = world.sample(model, tok, envs)
        refit = Subspace.from_probe(model, tok, pairs, contrast, aggregation="last_prompt", names=["persona"],
                                    progress=False)
        overlap = persona.overlap(refit)
        out[arm] = {
            "hack": statistics.mean(rates(rows)[e]["hack"] for e in world.exploitable),
            "auroc": statistics.mean(subspace_auroc(model, tok, persona, rows).values()),
            "auroc_refit": statistics.mean(subspace_auroc(model, tok, refit, rows).values()),
            "through": through(world, model, tok, persona, rows),
            "through_refit": through(world, model, tok, refit, rows),
            "overlap": statistics.mean(overlap.values()),
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a claims run directory (with seed<N>/<arm>/removed)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--arms", nargs="+", default=list(ARMS))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    res = {"seed": args.seed, "arms": analyse(Path(args.run), args.seed, tuple(args.arms))}
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
