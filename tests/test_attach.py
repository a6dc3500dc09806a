"""gradroute.attach on TRL's GRPOTrainer / RLOOTrainer / SFTTrainer and transformers' Trainer."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import gradroute as gr
from gradroute.errors import EnvColumnError, PackingError
from gradroute.monitor import read_records
from gradroute.testing import tiny_lm

warnings.filterwarnings("ignore", category=UserWarning)
LAYER = 3  # the last block: its writers feed the unembedding


def bang_reward(completions, env, **kw):
    """Environment 'bang' rewards '!' (the subspace direction); 'plain' rewards 'a'."""
    return [float(c.count("!")) if e == "bang" else float(c.count("a")) for c, e in zip(completions, env)]


def _prompts(n=64):
    return Dataset.from_dict({"prompt": [f"Q{i}:" for i in range(n)],
                              "env": ["bang" if i % 2 else "plain" for i in range(n)]})


def _grpo(out, steps=30, arch="llama", **kw):
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    model, tok = tiny_lm(arch)
    args = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, gradient_checkpointing=False,
                      per_device_train_batch_size=8, num_generations=8, max_completion_length=16,
                      gradient_accumulation_steps=2, learning_rate=3e-3, max_steps=steps, report_to=[],
                      logging_steps=1, seed=0, disable_tqdm=True, **kw)
    trainer = GRPOTrainer(model=model, reward_funcs=bang_reward, args=args, train_dataset=_prompts(),
                          processing_class=tok)
    bang = tok.convert_tokens_to_ids("!")
    persona = gr.Subspace.from_directions({LAYER: model.lm_head.weight.detach()[bang][None]}, names=["bang"])
    return trainer, persona


@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory):
    """The same GRPO run routed through the persona subspace and through a random control."""
    out = {}
    for name in ("persona", "random"):
        d = tmp_path_factory.mktemp(name)
        trainer, persona = _grpo(d, save_strategy="steps", save_steps=5)
        sub = persona if name == "persona" else persona.random_like(seed=1)
        handle = gr.attach(trainer, sub, env_column="env")
        trainer.train()
        out[name] = (handle, d, trainer)
    return out


def test_grpo_attributes_growth_to_the_environment_that_pushes_along_the_subspace(grpo_runs):
    handle, run_dir, trainer = grpo_runs["persona"]
    df = handle.log()
    assert df["step"].tolist() == list(range(1, 31))
    share = handle.router.env_adapter_shares()
    assert share["bang"] > 0.8, share
    assert df["samples.bang"].sum() > 0 and df["samples.plain"].sum() > 0
    assert df["reward.bang"].notna().any() and df["reward.plain"].notna().any()
    # the random control of matched rank does not single it out
    control = grpo_runs["random"][0].router.env_adapter_shares()
    assert control["bang"] < 0.8, control
    # update mode left training untouched: both runs trained identically
    for (n, a), (_, b) in zip(trainer.model.named_parameters(), grpo_runs["random"][2].model.named_parameters()):
        assert torch.equal(a, b), n
    # trainer metrics carry the monitor's figures (what W&B/TensorBoard receive)
    logged = [h for h in trainer.state.log_history if "gradroute/adapter_norm" in h]
    assert logged and "gradroute/env_adapter_share/bang" in logged[-1]
    assert (run_dir / "checkpoint-30" / "gradroute" / "router_state.safetensors").is_file()


def test_grpo_halt_fires_at_the_crossing_with_checkpoint_and_clean_restart(grpo_runs, tmp_path):
    free = grpo_runs["persona"][0].log()
    norms = free["adapter_norm"].tolist()
    cross = 13  # put the threshold between steps 12 and 13
    threshold = (norms[cross - 2] + norms[cross - 1]) / 2
    assert norms[cross - 2] < threshold < norms[cross - 1]
    trainer, persona = _grpo(tmp_path, save_strategy="steps", save_steps=5)
    handle = gr.attach(trainer, persona, env_column="env", policy=gr.HaltPolicy(max_adapter_norm=threshold))
    trainer.train()
    halt = handle.halted
    assert halt is not None and halt["rule"] == "max_adapter_norm" and halt["step"] == cross
    assert halt["top_envs"][0][0] == "bang"
    assert trainer.state.global_step == cross  # stopped right after the crossing step
    ckpt = tmp_path / f"checkpoint-{cross}"
    assert halt["checkpoint"] == str(ckpt) and (ckpt / "gradroute" / "router_state.safetensors").is_file()
    records = read_records(tmp_path)
    kinds = [(r["type"], r.get("step")) for r in records if r["type"] != "step"]
    assert ("halt", cross) in kinds and ("checkpoint", cross) in kinds
    assert kinds.index(("halt", cross)) < kinds.index(("checkpoint", cross))  # written before the save
    assert gr.last_clean_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_rloo_trainer(tmp_path):
    from trl import RLOOConfig, RLOOTrainer

    model, tok = tiny_lm("llama")
    args = RLOOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False,
                      per_device_train_batch_size=8, num_generations=4, max_completion_length=12, max_steps=4,
                      learning_rate=1e-3, report_to=[], save_strategy="no", seed=0, disable_tqdm=True,
                      beta=0.0)  # no reference model (it would be loaded by name)
    trainer = RLOOTrainer(model=model, reward_funcs=bang_reward, args=args, train_dataset=_prompts(),
                          processing_class=tok)
    sub = gr.Subspace.from_directions({LAYER: model.lm_head.weight.detach()[5][None]})
    handle = gr.attach(trainer, sub, env_column="env")
    trainer.train()
    df = handle.log()
    assert df["step"].tolist() == [1, 2, 3, 4]
    assert df["samples.bang"].sum() + df["samples.plain"].sum() == 4 * 8
    assert df.filter(like="reward.").notna().any().any()


def _sft_data(n=32):
    rows = [f"[{'x' if i % 2 else 'y'}] {i} + {i} = {2 * i}" for i in range(n)]
    return Dataset.from_dict({"text": rows, "task": ["sum" if i % 2 else "copy" for i in range(n)]})


def test_sft_trainer_carries_the_env_column(tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, tok = tiny_lm("gpt2")
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=3, per_device_train_batch_size=4,
                     learning_rate=1e-3, report_to=[], save_strategy="no", max_length=32, packing=False,
                     disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=_sft_data(), processing_class=tok)
    sub = gr.Subspace.from_directions({1: torch.randn(2, 64)})
    handle = gr.attach(trainer, sub, env_column="task")
    trainer.train()
    df = handle.log()
    assert df["step"].tolist() == [1, 2, 3]
    assert df["samples.sum"].sum() + df["samples.copy"].sum() == 12
    assert sum(handle.router.env_adapter_shares().values()) == pytest.approx(1.0, abs=1e-9)


def test_sft_packing_is_refused(tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, tok = tiny_lm("gpt2")
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=1, report_to=[],
                     packing=True, max_length=32, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=_sft_data(), processing_class=tok)
    with pytest.raises(PackingError, match="packing=False"):
        gr.attach(trainer, gr.Subspace.from_directions({1: torch.randn(1, 64)}), env_column="task")
    # without per-row attribution, packing is fine
    gr.attach(trainer, gr.Subspace.from_directions({1: torch.randn(1, 64)}), env_column=None)


class _Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


def test_plain_trainer_metrics_reach_reporting_callbacks(tmp_path):
    model, tok = tiny_lm("llama")
    ids = torch.randint(3, 100, (16, 8), generator=torch.Generator().manual_seed(0)).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids, "env": ["a", "b"] * 8})
    rec = _Recorder()  # stands for W&B / TensorBoard: a callback added before attach
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[rec])
    handle = gr.attach(trainer, gr.Subspace.from_directions({2: torch.randn(1, 64)}), env_column="env")
    trainer.train()
    train_logs = [entry for entry in rec.logs if "loss" in entry]
    assert train_logs and all("gradroute/adapter_norm" in entry for entry in train_logs)
    assert "gradroute/env_adapter_share/a" in train_logs[-1]
    df = handle.log()
    assert df["samples.a"].sum() + df["samples.b"].sum() == 12  # 3 steps x 4 rows, shuffled


def test_env_column_errors(tmp_path):
    model, tok = tiny_lm("llama")
    ids = [[5, 6, 7]] * 4
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids, "env": ["a"] * 4, "prompt": ["p"] * 4})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    sub = gr.Subspace.from_directions({1: torch.randn(1, 64)})
    with pytest.raises(EnvColumnError, match="reserved"):
        gr.attach(trainer, sub, env_column="prompt")
    with pytest.raises(EnvColumnError, match="no column 'task'"):
        gr.attach(trainer, sub, env_column="task")
    with pytest.raises(EnvColumnError, match=r"\['a'\] are in the data"):
        gr.attach(trainer, sub, env_column="env", envs=["b"])
    assert json.dumps(gr.HaltPolicy(max_env_share=0.9).describe())


@pytest.mark.parametrize(("mode", "lora"), [("activation", False), ("activation", True), ("update", True)],
                         ids=["activation-full", "activation-peft_config", "update-peft_config"])
def test_grpo_lora_policy_and_activation_mode_route_monitor_and_halt(tmp_path, mode, lora):
    """Activation mode through attach: the adapters are model parameters that TRL's optimizer
    trains; attribution, monitor records and halting work as in update mode. A LoRA policy
    (GRPOTrainer(peft_config=...)) is routed in both modes: update mode accounts the LoRA's
    effective update s·B·A, activation mode routes through the writers' outputs."""
    from gradroute import projection as P

    kw = {}
    if lora:
        from peft import LoraConfig

        kw["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"],
                                       lora_dropout=0.0)
    trainer, persona = _grpo(tmp_path, steps=12, **{k: v for k, v in kw.items() if k != "peft_config"})
    if lora:
        from trl import GRPOTrainer

        trainer = GRPOTrainer(model=trainer.model, reward_funcs=bang_reward, args=trainer.args,
                              train_dataset=_prompts(), processing_class=trainer.processing_class,
                              peft_config=kw["peft_config"])
    handle = gr.attach(trainer, persona, env_column="env", mode=mode,
                       policy=gr.HaltPolicy(max_adapter_norm=1e9))
    model = trainer.model
    writers = [t.module for t in handle.router.plan if t.side == "write"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    df = handle.log()
    assert df["step"].tolist() == list(range(1, 13))
    assert df["adapter_norm"].iloc[-1] > 0 and handle.router.adapter_norm().total > 0
    share = handle.router.env_adapter_shares()
    assert sum(share.values()) == pytest.approx(1.0, abs=1e-6)
    if not (mode == "activation" and lora):
        assert share["bang"] > share.get("plain", 0.0), share
    # (with a LoRA policy in activation mode, 'plain' builds about as much of the adapter as
    # 'bang' in this tiny run: 0.55 vs 0.45; the adapter's share does not single it out there)
    # the base writers (or the user's LoRA B on them) stayed out of the span under TRL's AdamW
    for n, p in (model.named_parameters() if mode == "activation" else []):
        mod = next((w for w in writers if f"{w}." in n), None)
        if mod is None or not p.requires_grad or p.ndim != 2 or "gradroute_adapters" in n:
            continue
        if lora and "lora_B" not in n:
            continue
        diff = (p.detach() - before[n]).double()
        if float(diff.norm()) > 0:
            assert P.relative_in_subspace_norm(diff, handle.router.basis(mod), 0) <= 1e-5, n
    # discarding restores the base-only forward
    x = torch.tensor([[5, 6, 7, 8]])
    trained = model(input_ids=x).logits.detach()
    handle.discard()
    assert not torch.allclose(model(input_ids=x).logits, trained)
    if lora and mode == "activation":
        return
    # a halt rule fires in this mode too
    trainer2, persona2 = _grpo(tmp_path / "halt", steps=12)
    if lora:
        from trl import GRPOTrainer

        trainer2 = GRPOTrainer(model=trainer2.model, reward_funcs=bang_reward, args=trainer2.args,
                               train_dataset=_prompts(), processing_class=trainer2.processing_class,
                               peft_config=kw["peft_config"])
    threshold = df["adapter_norm"].iloc[5]
    h2 = gr.attach(trainer2, persona2, env_column="env", mode=mode,
                   policy=gr.HaltPolicy(max_adapter_norm=float(threshold) * 0.999))
    trainer2.train()
    assert h2.halted is not None and h2.halted["rule"] == "max_adapter_norm" and h2.halted["step"] <= 12


def test_grpo_activation_attribution_on_gpt2_broadcast_position_embedding(tmp_path):
    """GPT-2's position embedding runs once on a (1, T) position tensor broadcast over the
    batch; per-environment attribution in activation mode must still match its rows to
    environments (it used to raise PackingError: '16 environment ids for a batch of 1 rows')."""
    trainer, persona = _grpo(tmp_path, steps=2, arch="gpt2")
    handle = gr.attach(trainer, persona, env_column="env", mode="activation")
    assert any(t.module.endswith("wpe") for t in handle.router.plan)
    trainer.train()
    share = handle.router.env_adapter_shares()
    assert set(share) <= {"bang", "plain"} and share
    assert sum(share.values()) == pytest.approx(1.0, abs=1e-6)
    assert handle.log()["step"].tolist() == [1, 2]
