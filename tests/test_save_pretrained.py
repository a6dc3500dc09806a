"""``model.save_pretrained`` with gradroute attached (issue 20): no ``gradroute_*`` tensor is written,
plain ``AutoModelForCausalLM.from_pretrained`` loads the result without missing/unexpected keys, and
what is written is documented (:mod:`gradroute.integrations.discard`, "What model.save_pretrained
writes"):

- activation mode: the model's weights are the base (the adapters are separate parameters, left
  out through ``_keys_to_ignore_on_save``), so ``save_pretrained`` writes the discarded model —
  the same tensors as ``gradroute.save_discarded``;
- update mode: the weights hold base + U A, so ``save_pretrained`` writes the trained policy (what
  a Trainer checkpoint must hold to resume); ``gradroute.save_discarded`` writes the discarded one.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import gradroute as gr
from gradroute.router.modes.activation import ADAPTERS_ATTR
from gradroute.testing import tiny_lm

X = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(42))


def _sub() -> gr.Subspace:
    g = torch.Generator().manual_seed(0)
    return gr.Subspace.from_directions({L: torch.randn(k, 64, generator=g) for L, k in ((1, 2), (2, 3))})


def _train(model, router, steps: int = 2) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    router.bind_optimizer(opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(3, 100, (4, 10), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        router.step()
        opt.zero_grad()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=X).logits


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _load_plain(path: Path):
    """``from_pretrained`` with transformers' own report of missing/unexpected/mismatched keys."""
    log = logging.getLogger("transformers")  # transformers' loggers do not propagate to the root
    handler = _Collect()
    log.addHandler(handler)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    finally:
        log.removeHandler(handler)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert not [m for m in handler.messages if "key" in m.lower() or "gradroute" in m], handler.messages
    return model


def _saved_keys(path: Path) -> set[str]:
    return {k for f in path.glob("*.safetensors") for k in load_file(str(f))}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["activation", "update"])
def test_save_pretrained_writes_no_gradroute_tensors_and_loads_plainly(tmp_path, arch, mode):
    model, _ = tiny_lm(arch)
    router = gr.GradientRouter(model, _sub(), mode=mode, check_provenance=False)
    _train(model, router)
    assert router.adapter_norm().total > 0
    trained = _logits(model)
    model.save_pretrained(tmp_path / "m")
    keys = _saved_keys(tmp_path / "m")
    assert keys and not [k for k in keys if "gradroute" in k]
    loaded = _load_plain(tmp_path / "m")
    gr.save_discarded(router, tmp_path / "d")
    discarded = _load_plain(tmp_path / "d")
    if mode == "activation":
        # the weights are the base: saving writes the discarded model, tensor for tensor
        sd, sd_d = loaded.state_dict(), discarded.state_dict()
        assert all(torch.equal(sd[k], sd_d[k]) for k in sd)
        assert not torch.allclose(_logits(loaded), trained, atol=1e-4)  # the adapter is not in it
    else:
        # the weights hold base + U A: saving writes the trained policy (a Trainer checkpoint resumes from it)
        assert torch.allclose(_logits(loaded), trained, atol=1e-5)
        assert not torch.allclose(_logits(discarded), trained, atol=1e-4)
    router.discard()
    assert torch.allclose(_logits(model), _logits(discarded), atol=1e-5)
    # saving did not disturb the routing: training goes on
    model.train()
    _train(model, router, steps=1)
    # a deep copy saves the same way
    copy.deepcopy(model).save_pretrained(tmp_path / "copy")
    assert not [k for k in _saved_keys(tmp_path / "copy") if "gradroute" in k]


def test_trainer_save_model_and_resume_load_with_activation_routing(tmp_path):
    """``Trainer.save_model`` goes through ``save_pretrained(state_dict=...)``; loading a checkpoint
    back into the routed model misses exactly the ignored keys, which transformers does not warn about."""
    model, _ = tiny_lm("llama")
    ids = torch.randint(3, 100, (8, 8), generator=torch.Generator().manual_seed(0)).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids, "env": ["a", "b"] * 4})
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    handle = gr.attach(trainer, _sub(), env_column="env", mode="activation", check_provenance=False)
    trainer.train()
    assert handle.router.adapter_norm().total > 0
    trainer.save_model(str(tmp_path / "saved"))
    assert not [k for k in _saved_keys(tmp_path / "saved") if "gradroute" in k]
    _load_plain(tmp_path / "saved")
    # what Trainer._load_from_checkpoint does: load_state_dict(strict=False), then warn unless the
    # missing keys are exactly model._keys_to_ignore_on_save
    result = model.load_state_dict(load_file(str(tmp_path / "saved" / "model.safetensors")), strict=False)
    assert set(result.missing_keys) == set(model._keys_to_ignore_on_save)
    assert all(k.startswith(f"{ADAPTERS_ATTR}.") for k in result.missing_keys) and not result.unexpected_keys


def test_user_lora_policy_saves_no_gradroute_tensors(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, _ = tiny_lm("llama")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"]))
    router = gr.GradientRouter(peft_model, _sub(), mode="activation", check_provenance=False)
    _train(peft_model, router)
    peft_model.save_pretrained(tmp_path / "lora")
    assert not [k for k in _saved_keys(tmp_path / "lora") if "gradroute" in k]
    base, _ = tiny_lm("llama")
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "lora"))
    router.discard()  # the routed model without its persona adapter is the user's LoRA on the base
    assert torch.allclose(_logits(reloaded), _logits(peft_model), atol=1e-5)


def test_exact_post_norm_routing_saves_plain_weights_and_refuses_a_discarded_save(tmp_path):
    """``post_norm="exact"`` keeps frozen copies outside the model: ``save_pretrained`` writes plain
    weights only, and ``save_discarded`` refuses, since those weights are not the discarded model."""
    from gradroute.errors import AdapterError
    from gradroute.testing import tiny_family

    model = tiny_family("gemma2")
    d = model.get_input_embeddings().weight.shape[1]
    sub = gr.Subspace.from_directions({1: torch.randn(2, d, generator=torch.Generator().manual_seed(0))})
    router = gr.GradientRouter(model, sub, mode="activation", post_norm="exact", check_provenance=False)
    model.save_pretrained(tmp_path / "m")
    assert not [k for k in _saved_keys(tmp_path / "m") if "gradroute" in k]
    with pytest.raises(AdapterError, match="post_norm='exact'"):
        gr.save_discarded(router, tmp_path / "d")
