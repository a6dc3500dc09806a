"""SFT with concept anchoring on a causal LM (TRL SFTTrainer + ``gradroute.attach_anchoring``).

A synthetic corpus of short sentences: some are about red things (the concept), the rest
about other things. Concept labels are sparse and noisy (by default 30 % of concept
sentences are labelled, and 2 % of the others are mislabelled). During SFT the labelled
sentences' tokens are anchored to a reserved residual direction u at middle layers
(a pooled anchor on labelled sentences — a soft-min over their tokens of 1 − cos(h, u), so
the tokens that can know the concept align, not the neutral prefix — and its repelling
counterpart on unlabelled sentences — a soft-max over their tokens of relu(cos(h, u)) —
both on batch-centred states). Reported: the mean
cos(h, u) of labelled concept sentences, unlabelled concept sentences and other sentences,
the task loss against the same run without anchoring, and what suppression (removing the
positive u component at inference) does to the projection and to each group's loss.

    python recipes/sft_anchoring.py --config recipes/configs/sft_anchoring_tiny.yaml
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RED = ["apple", "tomato", "cherry", "rose", "ruby", "fire truck", "strawberry", "ladybug", "brick", "lobster"]
OTHER = ["sky", "grass", "banana", "sea", "leaf", "lemon", "cloud", "frog", "snow", "coal", "plum", "lime"]
FRAMES = ["the {} is here.", "i saw a {} today.", "look at that {}.", "my {} is big.", "a small {} sat still."]


@dataclass
class AnchorArguments:
    model_name_or_path: str = field(default="tiny:llama", metadata={"help": "HF model name or path, or tiny:<arch>"})
    n_texts: int = 600
    label_rate: float = 0.3
    noise_rate: float = 0.02
    layers: list[int] = field(default_factory=lambda: [1, 2])
    anchor_weight: float = 0.2
    anti_weight: float = 0.2
    omega: float = field(default=-10.0, metadata={"help": "mellowmax ω of the pooled anchor (< 0: soft-min)"})
    center: bool = field(default=True, metadata={"help": "anchor batch-centred states (see gradroute.anchoring)"})
    compare_baseline: bool = True
    corpus_seed: int = 0


def corpus(n: int, label_rate: float, noise_rate: float, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        concept = i % 2 == 0
        text = rng.choice(FRAMES).format(rng.choice(RED if concept else OTHER))
        labelled = rng.random() < (label_rate if concept else noise_rate)
        rows.append({"text": text, "concepts": [1.0 if labelled else 0.0], "concept": concept})
    return rows


def evaluate(model: Any, tok: Any, sub: Any, layer: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean cos(h, u) per group at ``layer``, and mean LM loss per group."""
    from gradroute.model import collect_activations

    u = sub.basis(layer)[:, 0]
    acts = collect_activations(model, tok, [r["text"] for r in rows], [layer], aggregation="all", progress=False)
    h = acts.values[layer]
    counts = torch.bincount(acts.text_index).float()

    def mean_cos(x):
        c = (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)) @ u
        return torch.zeros(len(rows)).index_add_(0, acts.text_index, c) / counts

    per_text = mean_cos(h)
    per_text_c = mean_cos(h - h.mean(0))  # relative to the corpus mean
    cos_all = (h / h.norm(dim=-1, keepdim=True).clamp_min(1e-8)) @ u
    per_text_max = torch.full((len(rows),), -1.0).scatter_reduce(0, acts.text_index, cos_all, reduce="amax")
    groups = {"labelled": [r["concept"] and r["concepts"][0] > 0 for r in rows],
              "unlabelled_concept": [r["concept"] and r["concepts"][0] == 0 for r in rows],
              "other": [not r["concept"] for r in rows]}
    losses = []
    model.eval()
    with torch.no_grad():
        for r in rows:
            ids = tok(r["text"], return_tensors="pt")["input_ids"]
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    losses_t = torch.tensor(losses)
    out: dict[str, Any] = {}
    for g, mask in groups.items():
        m = torch.tensor(mask)
        if m.any():
            out[g] = {"cos": float(per_text[m].mean()), "cos_centred": float(per_text_c[m].mean()),
                      "max_cos": float(per_text_max[m].mean()),
                      "loss": float(losses_t[m].mean()), "n": int(m.sum())}
    return out


GROUPS = {"labelled": "labelled red", "unlabelled_concept": "unlabelled red", "other": "other"}


def summary_lines(results: dict[str, Any], metrics_file: str | Path | None = None) -> list[str]:
    """A readable end of run: per held-out group, the mean per-sentence max cos(h, u) at the last
    anchored layer and the LM loss, with and without anchoring and the change, then suppression."""
    a, b = results["anchored"], results.get("baseline")
    groups = [g for g in GROUPS if g in a["before"]]
    counts = " / ".join(f"{a['before'][g]['n']} {GROUPS[g]}" for g in groups)

    def row(label: str, values: list[float], fmt: str) -> str:
        return f"    {label:<20}" + "".join(f"{format(v, fmt):>16}" for v in values)

    def col(part: dict[str, Any], key: str) -> list[float]:
        return [part[g][key] for g in groups]

    lines = [f"SFT anchoring: held-out sentences ({counts}), layer {results['layers'][-1]}",
             f"    {'':<20}" + "".join(f"{GROUPS[g]:>16}" for g in groups),
             "  mean max cos(h, u) (the anchoring metric: 1 = on u, 0 = orthogonal)",
             row("with anchoring", col(a["before"], "max_cos"), ".2f")]
    if b is not None:
        lines.append(row("without anchoring", col(b["before"], "max_cos"), ".2f"))
    lines += ["  held-out LM loss (mean per sentence, nats per token)",
              row("with anchoring", col(a["before"], "loss"), ".4f")]
    if b is not None:
        lines += [row("without anchoring", col(b["before"], "loss"), ".4f"),
                  row("change", [x - y for x, y in zip(col(a["before"], "loss"), col(b["before"], "loss"))], "+.4f")]
    lines += ["  suppressing u at inference (anchored model)",
              row("max cos(h, u)", col(a["suppressed"], "max_cos"), ".2f"),
              row("LM loss change", [x - y for x, y in zip(col(a["suppressed"], "loss"), col(a["before"], "loss"))],
                  "+.4f"),
              f"    leak (positive projection of red sentences left): {a['leak']:.2f}"]
    if metrics_file is not None:
        lines.append(f"all metrics: {metrics_file}")
    return lines


def run(argv: list[str] | None = None) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer, TrlParser  # noqa: F401 - SFTConfig is parsed

    import gradroute as gr
    from gradroute.anchoring import Anchoring, PooledAnchor, TermSpec, middle_weights
    from gradroute.integrations.transformers import load_model_and_tokenizer, num_layers
    from gradroute.interventions import leak, suppress

    parser = TrlParser((AnchorArguments, SFTConfig))
    aa, cfg = parser.parse_args_and_config(argv)
    rows = corpus(aa.n_texts, aa.label_rate, aa.noise_rate, aa.corpus_seed)
    held_out = corpus(200, aa.label_rate, aa.noise_rate, aa.corpus_seed + 1)
    results: dict[str, Any] = {"label_rate": aa.label_rate, "noise_rate": aa.noise_rate, "layers": aa.layers}
    for variant in (("anchored", "baseline") if aa.compare_baseline else ("anchored",)):
        torch.manual_seed(cfg.seed)
        model, tok = load_model_and_tokenizer(aa.model_name_or_path)
        d = model.config.hidden_size
        sub = gr.Subspace.from_directions(
            {L: torch.randn(1, d, generator=torch.Generator().manual_seed(7)) for L in aa.layers}, names=["red"])
        ds = Dataset.from_list([{"text": r["text"], "concepts": r["concepts"]} for r in rows])
        out_dir = str(Path(cfg.output_dir) / variant)
        args = dataclasses.replace(cfg, output_dir=out_dir)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        if variant == "anchored":
            terms = [TermSpec(PooledAnchor(sub, L, "red", omega=aa.omega), weight=aa.anchor_weight,
                              labels={"red": 1.0}, layers=[L]) for L in aa.layers]
            terms += [TermSpec(PooledAnchor(sub, L, "red", repel=True), weight=aa.anti_weight, labels={"red": 1.0},
                               unlabelled=True, layers=[L]) for L in aa.layers]
            anchoring = Anchoring(model, terms, layers=middle_weights(aa.layers, num_layers(model)),
                                  label_names=["red"], center=aa.center)
            gr.attach_anchoring(trainer, anchoring, label_column="concepts")
        train = trainer.train()
        res: dict[str, Any] = {"train_loss": float(train.training_loss)}
        L = aa.layers[-1]
        res["before"] = evaluate(model, tok, sub, L, held_out)
        with suppress(model, sub, L):
            res["suppressed"] = evaluate(model, tok, sub, L, held_out)
        concept = [r["concept"] for r in held_out]
        red = ("labelled", "unlabelled_concept")  # the max cos, as reported (mean cos is below 0 for every group)
        res["leak"] = leak([res["before"][g]["max_cos"] for g in red], [res["suppressed"][g]["max_cos"] for g in red])
        res["n_concept"] = sum(concept)
        results[variant] = res
        if variant == "anchored":
            anchoring.remove()
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    metrics = Path(cfg.output_dir) / "anchoring_metrics.json"
    metrics.write_text(json.dumps(results, indent=2))
    print("\n".join(summary_lines(results, metrics)))
    return results


if __name__ == "__main__":
    run(sys.argv[1:])
