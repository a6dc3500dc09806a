"""The monitor's figures reach the trainer's reporters (TensorBoard here) as the true values of
the logged step, whatever ``logging_steps`` is: running totals are not averaged over the
logging window, counts are summed over it, and the signed activation projection is exported."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset

import gradroute as gr
from gradroute.monitor import load_log
from gradroute.testing import tiny_lm

warnings.filterwarnings("ignore", category=UserWarning)
LAYER = 3


def bang_reward(completions, env, **kw):
    return [float(c.count("!")) if e == "bang" else float(c.count("a")) for c, e in zip(completions, env)]


def _tiny_grpo(out, steps, logging_steps, report_to):
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    model, tok = tiny_lm("llama")
    ds = Dataset.from_dict({"prompt": [f"Q{i}:" for i in range(64)],
                            "env": ["bang" if i % 2 else "plain" for i in range(64)]})
    args = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, gradient_checkpointing=False,
                      per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                      learning_rate=3e-3, max_steps=steps, report_to=report_to, logging_steps=logging_steps,
                      save_strategy="no", seed=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=bang_reward, args=args, train_dataset=ds, processing_class=tok)
    bang = tok.convert_tokens_to_ids("!")
    W = model.lm_head.weight.detach()
    sub = gr.Subspace.from_directions({LAYER: torch.stack([W[bang], W[5]]), 2: W[bang][None]})
    return trainer, sub


def _scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing import event_accumulator

    dirs = {Path(root) for root, _, files in os.walk(run_dir) for f in files if f.startswith("events.out.tfevents")}
    assert len(dirs) == 1, dirs
    ea = event_accumulator.EventAccumulator(str(dirs.pop()), size_guidance={event_accumulator.SCALARS: 0})
    ea.Reload()
    # the TensorBoard callback files training logs under train/<name>
    return {tag.removeprefix("train/"): {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)  # TensorBoard stores float32


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("tb")
    trainer, sub = _tiny_grpo(out, steps=7, logging_steps=3, report_to=["tensorboard"])
    handle = gr.attach(trainer, sub, env_column="env")
    trainer.train()
    for cb in trainer.callback_handler.callbacks:  # flush the event file
        if getattr(cb, "tb_writer", None) is not None:
            cb.tb_writer.flush()
    return trainer, handle, out


def test_tensorboard_gets_the_jsonl_values_of_the_logged_step(tb_run):
    trainer, handle, out = tb_run
    tb = _scalars(out)
    df = load_log(out).set_index("step")
    assert df.index.tolist() == list(range(1, 8))
    logged = sorted(tb["gradroute/adapter_norm"])
    assert logged[:2] == [3, 6], logged
    prev = 0
    for s in logged:
        row = df.loc[s]
        window = df.loc[prev + 1 : s]
        checked = 0
        for col, value in row.items():
            name = "gradroute/" + col.replace(".", "/")
            if col in ("time",) or col.startswith(("reward.", "samples.")):
                continue
            if isinstance(value, list) and col.startswith("push_null."):  # the random pushes: their RMS
                assert _close(tb[name][s], math.sqrt(sum(x * x for x in value) / len(value)))
                checked += 1
            elif isinstance(value, list):  # signed activation projection / persona push: one scalar per direction
                assert col.startswith(("activation.", "push.")) and value
                for i, x in enumerate(value):
                    assert _close(tb[f"{name}/{i}"][s], x), (col, i)
                    checked += 1
            elif isinstance(value, int | float) and math.isfinite(value):
                # running totals and the step's own figures: the value of that step, not a window mean
                assert _close(tb[name][s], float(value)), (s, col, tb[name][s], value)
                checked += 1
        assert checked > 10
        for env in ("bang", "plain"):
            # counts: summed over the logging window
            assert tb[f"gradroute/samples/{env}"][s] == window[f"samples.{env}"].sum()
            rewards = window[f"reward.{env}"].dropna()
            if len(rewards):
                assert _close(tb[f"gradroute/reward/{env}"][s], rewards.mean())
        prev = s
    assert {"gradroute/activation/bang/3/0", "gradroute/activation/bang/3/1", "gradroute/activation/bang/2/0",
            "gradroute/env_adapter_norm/bang", "gradroute/env_share/plain"} <= set(tb)
    # the window mean would have been different: what TRL's _metrics used to log
    w = df.loc[4:6, "adapter_norm"]
    assert w.nunique() > 1 and not _close(w.mean(), df.loc[6, "adapter_norm"])
    # the same numbers are in the trainer's own log history
    hist = {h["step"]: h for h in trainer.state.log_history if "gradroute/adapter_norm" in h}
    assert sorted(hist) == logged
    assert all(_close(hist[s]["gradroute/adapter_norm"], df.loc[s, "adapter_norm"]) for s in logged)
    # nothing of gradroute goes through TRL's window-averaged metrics any more
    assert not any(k.startswith("gradroute/") for k in trainer._metrics["train"])


def test_metrics_window_rules():
    """DriftMonitor.metrics on a hand-made window: last values, summed counts, mean rewards."""
    from gradroute.monitor import DriftMonitor, step_from_json

    recs = [{"type": "step", "step": s, "time": 0.0, "adapter_norm": float(s), "nonfinite": s == 2,
             "samples": {"a": 2, "b": 1}, "reward": {"a": float(s)} if s != 3 else {},
             "activation": {"a": {"3": [-0.5 * s, 0.25]}}, "env_adapter_norm": {"a": 10.0 * s}} for s in (1, 2, 3)]
    recs = [step_from_json(r) for r in recs]  # the typed records the router hands its subscribers
    mon = DriftMonitor.__new__(DriftMonitor)
    mon.last = recs[-1]
    m = mon.metrics(window=recs)
    assert m["gradroute/adapter_norm"] == 3.0 and m["gradroute/env_adapter_norm/a"] == 30.0
    assert m["gradroute/samples/a"] == 6.0 and m["gradroute/samples/b"] == 3.0
    assert m["gradroute/reward/a"] == 1.5
    assert m["gradroute/activation/a/3/0"] == -1.5 and m["gradroute/activation/a/3/1"] == 0.25
    assert m["gradroute/nonfinite"] == 1.0
    assert mon.metrics()["gradroute/samples/a"] == 2.0  # default: the newest record alone
    assert mon.metrics(window=[]) == {}


def test_the_halting_step_reaches_the_reporters_whatever_logging_steps(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, _ = tiny_lm("llama")
    ids = torch.randint(3, 100, (32, 8), generator=torch.Generator().manual_seed(0)).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids, "env": ["a", "b"] * 16})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, logging_steps=50, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    g = torch.Generator().manual_seed(1)
    handle = gr.attach(trainer, gr.Subspace.from_directions({2: torch.randn(1, 64, generator=g)}), env_column="env",
                       policy=gr.HaltPolicy(max_adapter_norm=1e-9))
    trainer.train()
    assert handle.halted and handle.halted["step"] == 1 and trainer.state.global_step == 1
    logged = [h for h in trainer.state.log_history if "gradroute/adapter_norm" in h]
    assert [h["step"] for h in logged] == [1]
    assert _close(logged[0]["gradroute/adapter_norm"], load_log(tmp_path).set_index("step").loc[1, "adapter_norm"])
    assert logged[0]["gradroute/samples/a"] + logged[0]["gradroute/samples/b"] == 4
