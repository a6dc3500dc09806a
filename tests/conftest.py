"""Shared fixtures: tiny local models (nothing is downloaded) and deterministic torch."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox")
# three families the invariants are checked on (Qwen2 shares Llama's layout)
FAMILIES = ("llama", "gpt2", "gpt_neox")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=FAMILIES)
def arch(request) -> str:
    return request.param


@pytest.fixture
def lm(arch):
    from gradroute.testing import tiny_lm

    return tiny_lm(arch)


@pytest.fixture(scope="session")
def saved_tiny_lm(tmp_path_factory):
    from gradroute.testing import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="module")
def tiny_subspace(tmp_path_factory):
    """A persona subspace built by the CLI on tiny:llama (layers 2, 3) from the recipe's probe texts."""
    from pathlib import Path

    from gradroute.cli import main as cli

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("sub") / "tiny.subspace"
    assert cli(["subspace", "build", "--model", "tiny:llama", "--texts", str(root / "recipes/data/probe_hack.jsonl"),
                "--layers", "2", "3", "--out", str(out)]) == 0
    return out
