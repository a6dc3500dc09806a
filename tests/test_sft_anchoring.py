"""The transformer check: anchoring a sparsely, noisily labelled concept during SFT."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import gradroute as gr
from gradroute.anchoring import Anchor, Anchoring, TermSpec
from gradroute.errors import LabelError, PackingError
from gradroute.testing import tiny_lm

ROOT = Path(__file__).resolve().parents[1]


def _recipe():
    spec = importlib.util.spec_from_file_location("sft_anchoring", ROOT / "recipes" / "sft_anchoring.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sft_anchoring"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_sft_anchoring_recipe(tmp_path, monkeypatch, capsys):
    mod = _recipe()
    monkeypatch.chdir(ROOT)
    res = mod.run(["--config", "recipes/configs/sft_anchoring_tiny.yaml", "--output_dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "\n".join(mod.summary_lines(res, tmp_path / "anchoring_metrics.json")) in printed  # ends readable,
    assert '"anchored": {' not in printed  # not in a JSON dump
    a, b = res["anchored"], res["baseline"]
    contrast = min(a["before"]["labelled"]["max_cos"], a["before"]["unlabelled_concept"]["max_cos"]) \
        - a["before"]["other"]["max_cos"]
    base_contrast = b["before"]["labelled"]["max_cos"] - b["before"]["other"]["max_cos"]
    assert contrast > 0.3 and abs(base_contrast) < 0.1, (contrast, base_contrast)
    # small task-loss cost
    for g in ("labelled", "unlabelled_concept", "other"):
        assert a["before"][g]["loss"] - b["before"][g]["loss"] < 0.03
    # suppression removes the projection and hurts concept sentences, not the others
    assert a["suppressed"]["labelled"]["max_cos"] < 0.05
    hurt = {g: a["suppressed"][g]["loss"] - a["before"][g]["loss"] for g in a["before"]}
    assert hurt["unlabelled_concept"] > 0.03 and abs(hurt["other"]) < 0.01, hurt
    assert (tmp_path / "anchoring_metrics.json").is_file()


def test_recipe_summary_is_labelled_lines():
    mod = _recipe()

    def part(cos, loss):
        return {g: {"max_cos": c, "loss": v, "n": n}
                for g, c, v, n in zip(("labelled", "unlabelled_concept", "other"), cos, loss, (29, 71, 100))}

    res = {"layers": [1, 2], "anchored": {"before": part((0.62, 0.65, 0.05), (0.1814, 0.1737, 0.1964)),
                                          "suppressed": part((0.0, 0.0, -0.02), (0.2953, 0.2764, 0.1961)),
                                          "leak": 0.0},
           "baseline": {"before": part((0.25, 0.22, 0.21), (0.1766, 0.1696, 0.1965))}}
    lines = mod.summary_lines(res, "runs/x/anchoring_metrics.json")
    text = "\n".join(lines)
    assert len(lines) <= 15 and "{" not in text
    assert lines[0].startswith("SFT anchoring") and "29 labelled red / 71 unlabelled red / 100 other" in lines[0]
    assert "layer 2" in lines[0]  # the layer the metrics are taken at

    def values(label, after=None):
        i = lines.index(after) if after else 0
        line = next(x for x in lines[i:] if x.strip().startswith(label))
        return [float(v) for v in line[len("    ") + 20:].split()]

    assert values("with anchoring") == [0.62, 0.65, 0.05]  # max cos comes first
    assert values("without anchoring") == [0.25, 0.22, 0.21]
    loss = next(x for x in lines if "held-out LM loss" in x)
    assert values("with anchoring", loss) == [0.1814, 0.1737, 0.1964]
    assert values("without anchoring", loss) == [0.1766, 0.1696, 0.1965]
    assert values("change") == [0.0048, 0.0041, -0.0001]  # with minus without
    assert values("LM loss change") == [0.1139, 0.1027, -0.0003]  # suppressed minus before
    assert lines[-1] == "all metrics: runs/x/anchoring_metrics.json"
    res.pop("baseline")  # compare_baseline=False: no "without" rows
    assert not any("without" in x or x.strip().startswith("change") for x in mod.summary_lines(res))


class _Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


def _trainer(tmp_path, rows, callbacks=(), **kw):
    model, tok = tiny_lm("llama")
    ids = torch.randint(3, 100, (len(rows), 8), generator=torch.Generator().manual_seed(0)).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids, "concepts": rows})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, **kw)
    return model, Trainer(model=model, args=args, train_dataset=ds, callbacks=list(callbacks))


def test_attach_anchoring_on_trainer(tmp_path):
    rec = _Recorder()  # stands for W&B / TensorBoard
    model, trainer = _trainer(tmp_path, [[1.0, 0.0], [0.0, 0.0]] * 4, callbacks=[rec])
    sub = gr.Subspace.from_directions({1: torch.randn(1, 64)}, names=["red"])
    anchoring = Anchoring(model, [TermSpec(Anchor(sub, 1), labels={"red": 1.0})], layers=[1], label_names=["red", "blue"])
    gr.attach_anchoring(trainer, anchoring, label_column="concepts")
    out = trainer.train()
    assert "anchor/1" in anchoring.last and out.training_loss > 0
    assert [entry for entry in rec.logs if "anchoring/anchor/1" in entry]


def test_attach_anchoring_bad_input(tmp_path):
    model, trainer = _trainer(tmp_path, [[1.0, 0.0, 0.0]] * 8)
    sub = gr.Subspace.from_directions({1: torch.randn(1, 64)})
    anchoring = Anchoring(model, [TermSpec(Anchor(sub, 1), labels={"red": 1.0})], layers=[1], label_names=["red", "blue"])
    with pytest.raises(LabelError, match="no column 'tags'"):
        gr.attach_anchoring(trainer, anchoring, label_column="tags")
    gr.attach_anchoring(trainer, anchoring, label_column="concepts")
    with pytest.raises(LabelError, match="3 label values; expected 2"):
        trainer.train()
    model, trainer = _trainer(tmp_path, [{"green": 1.0}] * 8)
    with pytest.raises(LabelError, match="'green' is not among"):
        gr.attach_anchoring(trainer, Anchoring(model, [Anchor(sub, 1)], layers=[1], label_names=["red"]),
                            label_column="concepts")
        trainer.train()


def test_attach_anchoring_refuses_packing(tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, tok = tiny_lm("gpt2")
    ds = Dataset.from_dict({"text": ["a b c"] * 8, "concepts": [[1.0]] * 8})
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, packing=True,
                                                    report_to=[], max_length=16), train_dataset=ds, processing_class=tok)
    sub = gr.Subspace.from_directions({1: torch.randn(1, 64)})
    with pytest.raises(PackingError, match="packing=False"):
        gr.attach_anchoring(trainer, Anchoring(model, [Anchor(sub, 1)], layers=[1], label_names=["red"]))
