"""The ``gradroute subspace`` command line, end to end on a locally saved tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import gradroute as gr
from gradroute.cli import main


def _write_probe_file(path, n=12):
    rows = [{"text": f"P hello {i}", "label": 1} for i in range(n)] + [{"text": f"N bye {i}", "label": 0} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_build_inspect_compare(tmp_path, saved_tiny_lm, capsys):
    texts = _write_probe_file(tmp_path / "probe.jsonl")
    out = tmp_path / "p.subspace"
    assert main(["subspace", "build", "--model", str(saved_tiny_lm), "--texts", str(texts),
                 "--layers", "1", "2", "--out", str(out)]) == 0
    sub = gr.Subspace.load(out)
    assert sub.layers == (1, 2) and sub.provenance.source == "probe"
    assert sub.provenance.model == str(saved_tiny_lm)
    ctl = tmp_path / "ctl.subspace"
    sub.random_like(seed=0).save(ctl)
    capsys.readouterr()
    assert main(["subspace", "inspect", str(out), "--compare", str(ctl)]) == 0
    text = capsys.readouterr().out
    assert "probe layer 1" in text and "overlap" in text and "principal angles" in text
    assert main(["subspace", "inspect", str(out), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["content_hash"] == sub.content_hash and js["layers"]["1"]["k"] == 1


def test_build_from_sae_and_import(tmp_path, capsys):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    StandardSAE(StandardSAEConfig(d_in=16, d_sae=32, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post"))
                ).save_model(str(tmp_path / "sae"))
    assert main(["subspace", "build", "--sae", str(tmp_path / "sae"), "--latents", "3", "4",
                 "--out", str(tmp_path / "s.subspace")]) == 0
    assert gr.Subspace.load(tmp_path / "s.subspace").rank(1) == 2
    T = torch.randn(5, 16)
    torch.save(T, tmp_path / "pv.pt")
    assert main(["subspace", "import", str(tmp_path / "pv.pt"), "--format", "persona_vectors",
                 "--layers", "2", "--name", "evil", "--out", str(tmp_path / "pv.subspace")]) == 0
    pv = gr.Subspace.load(tmp_path / "pv.subspace")
    assert pv.names(2) == ("evil",) and torch.equal(pv.directions(2)[0], T[3])


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}))
    assert main(["subspace", "build", "--model", "never-loaded/model", "--texts", str(bad),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no 'label' column" in capsys.readouterr().err
    assert main(["subspace", "inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradroute: error:") and "not a subspace directory" in err


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "gradroute", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "subspace" in r.stdout


def test_adapter_discard_merge_export(tmp_path, capsys):
    """CLI round trip on a Trainer run: export from a checkpoint, discard and merge with PEFT."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from gradroute.testing import tiny_lm

    model, tok = tiny_lm("gpt2")
    sub = gr.Subspace.from_directions({1: torch.randn(2, 64)})
    router = gr.GradientRouter(model, sub)
    ids = torch.randint(3, 100, (16, 8), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
            callbacks=[gr.RouterCallback(router)]).train()
    tok.save_pretrained(tmp_path / "run" / "checkpoint-4")
    x = torch.tensor([ids[0]])
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=x).logits
    ckpt = tmp_path / "run" / "checkpoint-4"
    assert main(["adapter", "export", str(ckpt / "gradroute"), "--base", "model", "--out", str(tmp_path / "ad")]) == 0
    assert main(["adapter", "discard", str(tmp_path / "ad"), "--model", str(ckpt), "--out", str(tmp_path / "disc")]) == 0
    assert main(["adapter", "merge", str(tmp_path / "ad"), "--out", str(tmp_path / "merged")]) == 0
    router.discard()
    with torch.no_grad():
        discarded = model(input_ids=x).logits
        disc = AutoModelForCausalLM.from_pretrained(tmp_path / "disc").eval()(input_ids=x).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=x).logits
    assert torch.allclose(disc, discarded, atol=1e-5)
    assert torch.allclose(merged, trained, atol=1e-5)
    assert not torch.allclose(disc, trained, atol=1e-4)
    capsys.readouterr()
    assert main(["adapter", "merge", str(tmp_path / "disc"), "--out", str(tmp_path / "x")]) == 2
    assert "not a PEFT adapter" in capsys.readouterr().err
