"""The colour concept-anchoring study (seeds 000/002, "Sparse Concept Anchoring"), reproduced
through gradroute's public API: anchoring terms + dopesheet schedules + interventions.

A small RGB autoencoder ``3 → 16 → (GELU) → k → L2-normalize → 16 → (GELU) → 3`` is trained on
the 8³ RGB grid (batches of 64 drawn with replacement, Adam, 1,501 steps, learning rate and
term weights from a dopesheet), while sparse, noisy labels (redrawn every batch: red with
probability ``redness⁸ · 0.08``, vibrant ``(s·v)¹⁰ · 0.01``) anchor "red" to a reserved latent
direction e0. Two configurations:

- **anchored** (k = 4, one hidden layer each side): anchor(red → e0) + subspace(vibrant →
  dims 0, 1) + separate(p = 100); scored by *suppression* (remove the positive e0 component).
- **isolated** (k = 5, two hidden layers each side): anchor(red → e0) + anti-anchor(−e0) +
  anti-subspace(dim 0, all samples) + separate(p = 100); scored by *ablation* (zero the writer
  row and reader column of dim 0).

Damage = per-colour reconstruction MSE increase over the 8³ grid; selectivity R² = squared
Pearson correlation of damage with similarity-to-red^p (p = 2 suppression, 3 ablation).

    python recipes/colour_anchoring.py --seeds 0 1 2 3 4 --out runs/colour     # metrics.json + figures
    python recipes/colour_anchoring.py --conflict                              # seed 000's regularizer conflict
"""

from __future__ import annotations

import argparse
import colorsys
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradroute as gr
from gradroute.anchoring import (
    Anchor,
    Anchoring,
    AntiAnchor,
    AntiSubspace,
    Dopesheet,
    EuclideanRepulsion,
    InSubspace,
    Separate,
    TermSpec,
    Unitarity,
)
from gradroute.interventions import ablate, collateral, selectivity_r2, suppress

# ex-2.5.1's sheet (lr, separate, anchor) with a subspace column for the vibrant plane
ANCHORED_SHEET = """STEP,PHASE,ACTION,lr,separate,anchor,subspace
0,Train,,1e-8,0.015,0.01,0.01
+10,,warm-up,0.01,,,
750,,,0.1,0.015,0.1,0.1
+0.9,Anneal,,0.1,0,0,0
1500,,,0.05,,,
"""
# ex-2.9.1's sheet (the +0.33 row resolves to step 248, +0.9 to 1425)
ISOLATED_SHEET = """STEP,PHASE,ACTION,lr,separate,anchor,anti-anchor,anti-subspace
0,Train,,1e-8,,0,0,0.25
+10,,warm-up,0.01,,,,
+0.33,Anchor,,,0.01,0.1,0.05,
750,,,0.1,0.001,0.1,,0.003
+0.9,Anneal,,0.1,0,0,0,0
1500,,,0.05,,,,
"""
CONFIGS: dict[str, dict[str, Any]] = {
    "anchored": {"k": 4, "n_nonlinear": 1, "sheet": ANCHORED_SHEET},
    "isolated": {"k": 5, "n_nonlinear": 2, "sheet": ISOLATED_SHEET},
}
LABELS = ["red", "vibrant"]


class L2Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=-1)


class ColourMLP(nn.Module):
    """RGB → latent (L2-normalized, module ``bottleneck``) → RGB; outputs clamped to [0, 1] in eval."""

    def __init__(self, k: int, n_nonlinear: int = 1, hidden: int = 16, normalize: bool = True):
        super().__init__()
        enc: list[nn.Module] = [nn.Linear(3, hidden), nn.GELU()]
        dec: list[nn.Module] = [nn.Linear(k, hidden), nn.GELU()]
        for _ in range(n_nonlinear - 1):
            enc += [nn.Linear(hidden, hidden), nn.GELU()]
            dec += [nn.Linear(hidden, hidden), nn.GELU()]
        self.encoder = nn.Sequential(*enc, nn.Linear(hidden, k))
        self.bottleneck = L2Normalize() if normalize else nn.Identity()
        self.decoder = nn.Sequential(*dec, nn.Linear(hidden, 3))

    @property
    def writer(self) -> str:
        return f"encoder.{len(self.encoder) - 1}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.decoder(self.bottleneck(self.encoder(x)))
        return y if self.training else y.clamp(0.0, 1.0)


# ---------------------------------------------------------------------- colour data
def rgb_grid(n: int = 8) -> torch.Tensor:
    v = torch.linspace(0, 1, n)
    return torch.cartesian_prod(v, v, v)


def hsv(rgb: torch.Tensor) -> torch.Tensor:
    return torch.tensor([colorsys.rgb_to_hsv(*map(float, c)) for c in rgb])


def label_probabilities(rgb: torch.Tensor) -> torch.Tensor:
    """Columns (red, vibrant): ``redness⁸ · 0.08`` and ``(s·v)¹⁰ · 0.01``."""
    r, g, b = rgb.unbind(-1)
    redness = (r * (1 - g / 2 - b / 2)).clamp_min(0)
    h = hsv(rgb)
    return torch.stack([redness.pow(8) * 0.08, (h[:, 1] * h[:, 2]).pow(10) * 0.01], dim=-1)


def similarity_to_red(rgb: torch.Tensor) -> torch.Tensor:
    """``(r·max(0, (90 − Δhue°)/90) + 1 − r) · s · v`` with ``r = (s·v + 1)/2``."""
    h = hsv(rgb)
    dh = torch.minimum(h[:, 0], 1 - h[:, 0]) * 360
    hue_sim = ((90 - dh) / 90).clamp_min(0)
    sv = h[:, 1] * h[:, 2]
    r = (sv + 1) / 2
    return (r * hue_sim + 1 - r) * sv


# ---------------------------------------------------------------------- training
def build(config: str, model: ColourMLP) -> tuple[Anchoring, gr.Subspace]:
    cfg = CONFIGS[config]
    k = cfg["k"]
    sheet = Dopesheet.from_csv(cfg["sheet"])
    red = gr.Subspace.from_axes({"bottleneck": [0, 1]}, dim=k, names=["red", "hue"])
    if config == "anchored":
        terms = [
            TermSpec(Anchor(red, "bottleneck", "red"), weight="anchor", labels={"red": 1.0}),
            TermSpec(InSubspace(red, "bottleneck"), weight="subspace", labels={"vibrant": 1.0}),
            TermSpec(Separate(power=100.0), weight="separate"),
        ]
    else:
        anti = gr.Subspace.from_directions({"bottleneck": -torch.eye(k)[:1]}, names=["not_red"])
        terms = [
            TermSpec(Anchor(red, "bottleneck", "red"), weight="anchor", labels={"red": 1.0}),
            TermSpec(AntiAnchor(anti, "bottleneck"), weight="anti-anchor"),
            TermSpec(AntiSubspace(red, "bottleneck", ["red"]), weight="anti-subspace"),
            TermSpec(Separate(power=100.0), weight="separate"),
        ]
    reg = Anchoring(model, terms, layers="bottleneck", label_names=LABELS, schedule=sheet)
    return reg, red


def train(config: str, seed: int = 0, steps: int | None = None, batch: int = 64) -> ColourMLP:
    """Train one model; ``steps`` shortens the run (the schedule is compressed to fit)."""
    cfg = CONFIGS[config]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = ColourMLP(cfg["k"], cfg["n_nonlinear"])
    reg, _ = build(config, model)
    sheet = reg.schedule
    total = int(sheet.last_step) + 1
    n = steps or total
    scale = (total - 1) / max(1, n - 1)
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    grid = rgb_grid(8)
    probs = label_probabilities(grid)
    model.train()
    for step in range(n):
        t = step * scale
        for group in opt.param_groups:
            group["lr"] = sheet.value("lr", t)
        idx = torch.randint(0, len(grid), (batch,), generator=g)
        x = grid[idx]
        labels = torch.bernoulli(probs[idx], generator=g)  # redrawn on every visit
        loss = nn.functional.mse_loss(model(x), x) + reg.loss(labels, step=t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    reg.remove()
    return model


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def per_colour_mse(model: ColourMLP, rgb: torch.Tensor) -> torch.Tensor:
    model.eval()
    return (model(rgb) - rgb).pow(2).mean(-1)


@torch.no_grad()
def evaluate(model: ColourMLP) -> dict[str, Any]:
    grid = rgb_grid(8)
    sim = similarity_to_red(grid)
    k = model.encoder[-1].out_features
    red = gr.Subspace.from_axes({"bottleneck": [0]}, dim=k, names=["red"])
    base = per_colour_mse(model, grid)
    latents = model.bottleneck(model.encoder(grid))
    pure_red = int(((grid - torch.tensor([1.0, 0, 0])).abs().sum(-1)).argmin())
    cyan = int(((grid - torch.tensor([0.0, 1, 1])).abs().sum(-1)).argmin())
    reds, others = sim.pow(3) > 0.5, sim.pow(3) < 0.01
    out: dict[str, Any] = {"baseline_mse": float(base.mean()),
                           "leak": float(latents[others, 0].abs().mean())}
    with suppress(model, red, "bottleneck", ["red"]):
        sup = per_colour_mse(model, grid)
    with ablate(model, red, "bottleneck", ["red"], writers=[model.writer], readers=["decoder.0"]):
        abl = per_colour_mse(model, grid)
    for name, after, p in (("suppression", sup, 2.0), ("ablation", abl, 3.0)):
        dmg = after - base
        out[name] = {
            "r2": selectivity_r2(dmg, sim, p),
            "r2_raw_mse": selectivity_r2(after, sim, p),
            "red": float(dmg[pure_red]),
            "red_group": float(dmg[reds].mean()),
            "cyan": float(dmg[cyan]),
            "collateral": collateral(dmg, sim.pow(3), 0.01),
        }
    out["_arrays"] = {"sim": sim, "damage_suppression": sup - base, "damage_ablation": abl - base, "latents": latents}
    return out


# ---------------------------------------------------------------------- seed 000's conflict
def conflict(steps: int = 300, seed: int = 0) -> dict[str, float]:
    """Unitarity + Euclidean repulsion vs unitarity + angular repulsion on the six primary and
    secondary colours, 3-D un-normalized bottleneck: the largest combined loss of each run."""
    colours = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1]], dtype=torch.float32)
    out = {}
    for name, repel in (("euclidean", EuclideanRepulsion()), ("angular", Separate(power=10.0))):
        torch.manual_seed(seed)
        model = ColourMLP(3, 1, normalize=False)
        reg = Anchoring(model, [Unitarity(), repel], layers="bottleneck")
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        peak, last = 0.0, 0.0
        model.train()
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(colours), colours) + reg.loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            peak, last = max(peak, float(loss.detach())), float(loss.detach())
        reg.remove()
        out[f"{name}_peak_loss"], out[f"{name}_final_loss"] = peak, last
    out["ratio"] = out["euclidean_peak_loss"] / out["angular_peak_loss"]
    return out


# ---------------------------------------------------------------------- figures and CLI
def figures(results: dict[str, dict[str, Any]], out: Path, seed: int | None = None,
            seeds: list[int] | None = None) -> list[Path]:
    """``colour_anchoring.png`` (latents and damage vs similarity of one trained pair, ``seed``; the
    medians over ``seeds`` are in metrics.json) and ``schedules.png`` (both dopesheets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    grid = rgb_grid(8).numpy()
    tag = f", seed {seed}" if seed is not None else ""
    fig, axes = plt.subplots(2, 3, figsize=(13, 8))
    for row, (config, res) in enumerate(results.items()):
        a = res["_arrays"]
        lat = a["latents"].numpy()
        axes[row, 0].scatter(lat[:, 0], lat[:, 1], c=grid, s=14)
        axes[row, 0].set(title=f"{config}{tag}: latents (e0, e1)", xlabel="e0 (red)", ylabel="e1")
        for col, name in ((1, "suppression"), (2, "ablation")):
            axes[row, col].scatter(a["sim"].numpy(), a[f"damage_{name}"].numpy(), c=grid, s=14)
            axes[row, col].set(title=f"{config} + {name}{tag}: R² {res[name]['r2']:.2f}",
                               xlabel="similarity to red", ylabel="MSE increase")
    if seed is not None:
        among = (f" (one of seeds {', '.join(map(str, seeds))}; medians over all in metrics.json)"
                 if seeds and len(seeds) > 1 else "")
        fig.suptitle(f"Colour study, seed {seed}{among}")
    fig.tight_layout()
    p = out / "colour_anchoring.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths.append(p)
    fig, ax = plt.subplots(2, 1, figsize=(9, 5))
    for i, config in enumerate(CONFIGS):
        Dopesheet.from_csv(CONFIGS[config]["sheet"]).plot(ax=ax[i])
        ax[i].set_title(f"{config} schedule")
    fig.tight_layout()
    p = out / "schedules.png"
    fig.savefig(p, dpi=90, bbox_inches="tight", pad_inches=0.05)  # the legends sit beside the axes
    plt.close(fig)
    paths.append(p)
    return paths


def study(seeds: list[int], steps: int | None = None, out: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Train both configurations for each seed; per-seed metrics and medians (``progress``: a line per run)."""
    import time

    per: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    last: dict[str, dict[str, Any]] = {}
    total, done, t0 = len(seeds) * len(CONFIGS), 0, time.time()
    for seed in seeds:
        for config in CONFIGS:
            t = time.time()
            res = evaluate(train(config, seed, steps))
            last[config] = res
            per[config].append({k: v for k, v in res.items() if k != "_arrays"} | {"seed": seed})
            done += 1
            if progress:
                best = "suppression" if config == "anchored" else "ablation"
                print(f"[{done}/{total}] seed {seed}, {config}: {best} R² {res[best]['r2']:.2f}, "
                      f"red {res[best]['red']:+.3f} ({time.time() - t:.0f} s; {time.time() - t0:.0f} s so far)",
                      flush=True)
    summary: dict[str, Any] = {"seeds": seeds, "steps": steps or 1501, "runs": per, "median": {}}
    for config, runs in per.items():
        med: dict[str, Any] = {}
        for name in ("suppression", "ablation"):
            med[name] = {m: statistics.median(r[name][m] for r in runs) for m in runs[0][name]}
        med["leak"] = statistics.median(r["leak"] for r in runs)
        summary["median"][config] = med
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
        summary["figures"] = [str(p) for p in figures(last, out, seed=seeds[-1], seeds=seeds)]
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=None, help="shorter runs (schedule compressed)")
    ap.add_argument("--out", default="runs/colour")
    ap.add_argument("--conflict", action="store_true", help="seed 000's regularizer conflict instead")
    a = ap.parse_args(argv)
    if a.conflict:
        res = conflict()
        print(json.dumps(res, indent=2))
        return res
    print(f"training {len(a.seeds) * len(CONFIGS)} autoencoders ({', '.join(CONFIGS)} x seeds {a.seeds}) ...", flush=True)
    summary = study(a.seeds, a.steps, Path(a.out), progress=True)
    rows = [("anchored", "suppression"), ("anchored", "ablation"), ("isolated", "ablation"), ("isolated", "suppression")]
    print(f"medians over seeds {a.seeds} (MSE increase after the intervention):")
    print(f"{'model, intervention':<26} {'red':>7} {'red grp':>8} {'cyan':>7} {'collat.':>8} {'R²':>6}")
    for config, name in rows:
        m = summary["median"][config][name]
        print(f"{config + ', ' + name:<26} {m['red']:>7.3f} {m['red_group']:>8.3f} {m['cyan']:>7.3f} "
              f"{m['collateral']:>8.4f} {m['r2']:>6.2f}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
