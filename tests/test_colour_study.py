"""The colour study (recipes/colour_anchoring.py), reduced to one seed per configuration."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _recipe(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def colour():
    return _recipe("colour_anchoring")


@pytest.fixture(scope="module")
def study(colour, tmp_path_factory):
    return colour.study([0], out=tmp_path_factory.mktemp("colour"))


def test_anchored_model_suppression_is_selective(study):
    m = study["median"]["anchored"]["suppression"]
    assert m["r2"] >= 0.85 and m["red"] > 0.15 and m["collateral"] < 0.005, m
    assert abs(m["cyan"]) < 0.005


def test_isolated_model_ablation_is_selective(study):
    m = study["median"]["isolated"]["ablation"]
    assert m["r2"] >= 0.7 and m["red_group"] > 0.1, m
    assert m["collateral"] < 0.01 and abs(m["cyan"]) < 0.01


def test_control_anchored_model_ablation_is_not_selective(study):
    m = study["median"]["anchored"]["ablation"]
    assert m["cyan"] > 0.1 and m["r2"] < 0.7, m  # ablating e0 also removes cyan, which sits at −e0


def test_outputs(study):
    assert Path(study["figures"][0]).stat().st_size > 10_000
    assert (Path(study["figures"][0]).parent / "metrics.json").is_file()


def test_figure_names_the_seed_it_shows(colour, tmp_path, monkeypatch):
    import matplotlib
    import torch

    matplotlib.use("Agg")
    saved = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, p, **kw: (saved.append(fig), real(fig, p, **kw)))
    g = torch.Generator().manual_seed(0)
    arrays = {"latents": torch.randn(512, 4, generator=g), "sim": torch.rand(512, generator=g),
              "damage_suppression": torch.rand(512, generator=g), "damage_ablation": torch.rand(512, generator=g)}
    res = {"_arrays": arrays, "suppression": {"r2": 0.9}, "ablation": {"r2": 0.5}}
    paths = colour.figures({"anchored": res, "isolated": res}, tmp_path, seed=4, seeds=[0, 1, 2, 3, 4])
    assert [p.name for p in paths] == ["colour_anchoring.png", "schedules.png"]
    fig = saved[0]
    assert "seed 4" in fig.get_suptitle() and "0, 1, 2, 3, 4" in fig.get_suptitle()
    assert all("seed 4" in ax.get_title() for ax in fig.axes)  # each panel, should it be cropped out
    # the study passes the seed of the models it drew: the last one
    study_fig = []
    monkeypatch.setattr(colour, "figures", lambda last, out, **kw: study_fig.append(kw) or [])
    monkeypatch.setattr(colour, "train", lambda config, seed, steps: None)
    monkeypatch.setattr(colour, "evaluate", lambda model: {**res, "leak": 0.0,
                                                           "suppression": {"r2": 0.9}, "ablation": {"r2": 0.5}})
    colour.study([2, 7], out=tmp_path / "s")
    assert study_fig == [{"seed": 7, "seeds": [2, 7]}]


def test_regularizer_conflict(colour):
    res = colour.conflict(steps=200)
    assert res["ratio"] > 100, res  # Euclidean repulsion + unitarity: orders of magnitude above angular


def test_colour_labels_and_similarity(colour):
    import torch

    rgb = torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0], [0.5, 0.5, 0.5], [1.0, 0.5, 0]])
    sim = colour.similarity_to_red(rgb)
    assert sim[0] == pytest.approx(1.0) and sim[1] == 0 and sim[2] == 0
    assert 0 < sim[3] < 1  # orange: 30° from red
    p = colour.label_probabilities(rgb)
    assert p[0, 0] == pytest.approx(0.08) and p[1, 0] == 0 and p[0, 1] == pytest.approx(0.01)
