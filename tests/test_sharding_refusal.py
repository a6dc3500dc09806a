"""DeepSpeed refusal (issue 20): ``check_sharding`` raises a ConfigError with a Fix wherever DeepSpeed's
optimizer steps detached master weights (ZeRO 1/2/3, or bf16/fp16 without ZeRO), found from fake
trainers, accelerate states, engines and ZeRO-3 parameters; DDP/FSDP/plain training passes."""

from __future__ import annotations

import json
from enum import Enum
from types import SimpleNamespace

import pytest
import torch

from gradroute.errors import ConfigError
from gradroute.integrations.sharding import check_sharding, deepspeed_setup


class FakeDistributedType(str, Enum):  # stands for accelerate.utils.DistributedType
    NO = "NO"
    MULTI_CPU = "MULTI_CPU"
    FSDP = "FSDP"
    DEEPSPEED = "DEEPSPEED"


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))


def _trainer(distributed_type=FakeDistributedType.NO, plugin=None, args=None, model=None):
    state = SimpleNamespace(distributed_type=distributed_type, deepspeed_plugin=plugin)
    return SimpleNamespace(accelerator=SimpleNamespace(state=state), args=args or SimpleNamespace(),
                           model=model if model is not None else _model(), is_deepspeed_enabled=plugin is not None)


def _plugin(stage, bf16="auto"):
    return SimpleNamespace(zero_stage=stage, deepspeed_config={"zero_optimization": {"stage": stage},
                                                               "bf16": {"enabled": bf16}})


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_under_an_accelerate_state_is_refused_with_a_fix(stage):
    trainer = _trainer(FakeDistributedType.DEEPSPEED, _plugin(stage))
    with pytest.raises(ConfigError) as e:
        check_sharding(trainer)
    msg = str(e.value)
    assert f"ZeRO stage {stage}" in msg and "overwritten" in msg and "accelerator" in msg
    assert "Fix:" in msg and "FSDP2" in e.value.fix and "DDP" in e.value.fix
    if stage == 3:
        assert "partitioned" in msg
    else:
        assert "master copies" in msg


def test_deepspeed_distributed_type_without_a_readable_plugin_is_refused():
    for dt in (FakeDistributedType.DEEPSPEED, "DEEPSPEED"):  # the enum, or its value as a string
        trainer = _trainer(dt)
        with pytest.raises(ConfigError, match="stage unknown"):
            check_sharding(trainer)


def test_zero3_parameter_attributes_are_found_on_a_bare_model():
    model = _model()
    check_sharding(model)  # nothing DeepSpeed about it yet
    p = model[1].weight
    p.ds_id, p.ds_status, p.ds_numel = 7, "NOT_AVAILABLE", 16  # what ZeRO-3's Init puts on every parameter
    with pytest.raises(ConfigError, match=r"ZeRO stage 3 \(parameter '1\.weight' carries ZeRO-3 attributes"):
        check_sharding(model)
    with pytest.raises(ConfigError, match="ZeRO stage 3"):
        check_sharding(_trainer(model=model))  # through a trainer's model too


class DeepSpeedEngine(torch.nn.Module):  # the name and methods deepspeed's engine has
    def __init__(self, module, stage, bf16=False):
        super().__init__()
        self.module, self.stage, self.bf16 = module, stage, bf16

    def zero_optimization_stage(self):
        return self.stage

    def bfloat16_enabled(self):
        return self.bf16

    def fp16_enabled(self):
        return False


def test_a_deepspeed_engine_wrapper_is_read():
    with pytest.raises(ConfigError, match="ZeRO stage 2 .*wrapped in a DeepSpeedEngine"):
        check_sharding(DeepSpeedEngine(_model(), 2))
    with pytest.raises(ConfigError, match="without ZeRO but with bf16/fp16 master weights"):
        check_sharding(DeepSpeedEngine(_model(), 0, bf16=True))
    check_sharding(DeepSpeedEngine(_model(), 0, bf16=False))  # steps the model's own parameters: allowed
    assert deepspeed_setup(DeepSpeedEngine(_model(), 0)).overwrites_weights is False


def test_trainer_args_deepspeed_config_dict_and_file(tmp_path):
    cfg = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    with pytest.raises(ConfigError, match=r"ZeRO stage 2 \(the trainer's args.deepspeed\)"):
        check_sharding(_trainer(args=SimpleNamespace(deepspeed=cfg)))
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="ZeRO stage 3"):
        check_sharding(_trainer(args=SimpleNamespace(deepspeed=str(path))))
    with pytest.raises(ConfigError, match="stage unknown"):  # a config that cannot be read is not waved through
        check_sharding(_trainer(args=SimpleNamespace(deepspeed=str(tmp_path / "missing.json"))))
    # stage 0: refused with mixed precision (BF16_Optimizer's float32 copies), or when it cannot be told ("auto")
    with pytest.raises(ConfigError, match="without ZeRO"):
        check_sharding(_trainer(args=SimpleNamespace(deepspeed={"bf16": {"enabled": True}})))
    with pytest.raises(ConfigError, match="bf16/fp16 setting cannot be read"):
        check_sharding(_trainer(args=SimpleNamespace(deepspeed={"bf16": {"enabled": "auto"}})))
    check_sharding(_trainer(args=SimpleNamespace(deepspeed={"zero_optimization": {"stage": 0},
                                                            "bf16": {"enabled": False}})))


def test_accelerate_launch_environment(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match=r"ZeRO stage 3 \(ACCELERATE_USE_DEEPSPEED=true\)"):
        check_sharding(_model())
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")  # accelerate's default stage is 2
    with pytest.raises(ConfigError, match="ZeRO stage 2"):
        check_sharding(_model())


@pytest.mark.parametrize("dt", [FakeDistributedType.NO, FakeDistributedType.MULTI_CPU, FakeDistributedType.FSDP])
def test_ddp_fsdp_and_single_process_pass(dt):
    check_sharding(_trainer(dt))
    assert deepspeed_setup(_trainer(dt)) is None


def test_a_real_cpu_trainer_passes(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from gradroute.testing import tiny_lm

    model, _ = tiny_lm("llama")
    ids = [[5, 6, 7, 8]] * 4
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    check_sharding(trainer)
    check_sharding(trainer.model)


def test_attach_refuses_a_zero_trainer_before_routing(tmp_path):
    """``gradroute.attach`` calls check_sharding first: a trainer configured for ZeRO-2 is refused
    and nothing is hooked (the model has no gradroute parameters afterwards)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    import gradroute as gr
    from gradroute.testing import tiny_lm

    model, _ = tiny_lm("llama")
    ids = [[5, 6, 7, 8]] * 4
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    trainer.args.deepspeed = {"zero_optimization": {"stage": 2}}
    sub = gr.Subspace.from_directions({1: torch.randn(1, 64)})
    with pytest.raises(ConfigError, match="(?i)deepspeed") as e:
        gr.attach(trainer, sub, mode="activation", env_column=None, check_provenance=False)
    assert "Fix:" in str(e.value)
    assert not any("gradroute" in n for n, _ in model.named_parameters())


def test_a_router_built_by_hand_does_not_bypass_the_refusal(monkeypatch):
    """GradientRouter alone refuses ZeRO-3 partitions and DeepSpeed optimizers; a RouterCallback
    added by hand refuses a DeepSpeed launch at train begin (attach is not the only door)."""
    import gradroute as gr
    from gradroute.testing import tiny_lm

    model, _ = tiny_lm("llama")
    sub = gr.Subspace.from_directions({1: torch.randn(1, 64)})
    part = dict(model.named_parameters())["model.layers.1.mlp.down_proj.weight"]
    part.ds_id = 7
    with pytest.raises(ConfigError, match="ZeRO-3"):
        gr.GradientRouter(model, sub, check_provenance=False)
    del part.ds_id
    router = gr.GradientRouter(model, sub, check_provenance=False)
    FakeDS = type("DeepSpeedZeroOptimizer", (), {"__module__": "deepspeed.runtime.zero.stage_1_and_2",
                                                  "param_groups": []})
    with pytest.raises(ConfigError, match="DeepSpeed"):
        router.bind_optimizer(FakeDS())
    cb = gr.RouterCallback(router)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    args = SimpleNamespace(output_dir="/tmp/x", logging_strategy="steps")
    with pytest.raises(ConfigError, match="(?i)deepspeed"):
        cb.on_train_begin(args, SimpleNamespace(global_step=0), SimpleNamespace(), model=model)


def test_a_hand_added_callback_refuses_vllm_generation_without_the_folded_sync():
    import gradroute as gr
    from gradroute.testing import tiny_lm

    model, _ = tiny_lm("llama")
    router = gr.GradientRouter(model, gr.Subspace.from_directions({1: torch.randn(1, 64)}), mode="activation",
                               check_provenance=False)
    cb = gr.RouterCallback(router)
    args = SimpleNamespace(output_dir="/tmp/x", logging_strategy="steps", use_vllm=True)
    with pytest.raises(ConfigError, match="off-policy"):
        cb.on_train_begin(args, SimpleNamespace(global_step=0), SimpleNamespace(), model=model)
