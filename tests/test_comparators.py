"""Training-time comparators (CAFT ablation, one-sided activation penalty, preventative
steering) on the same Subspace: they act in training forward passes only, and do what they say."""

from __future__ import annotations

import pytest
import torch

import gradroute as gr
from gradroute import projection as P
from gradroute.errors import ConfigError
from gradroute.model import residual_hooks
from gradroute.testing import tiny_lm


def _sub():
    g = torch.Generator().manual_seed(0)
    return gr.Subspace.from_directions({1: torch.randn(2, 64, generator=g), 2: torch.randn(1, 64, generator=g)})


def _coords(model, sub, x, layers=(1, 2)):
    out = {}
    with residual_hooks(model, layers, lambda L, h: out.__setitem__(L, P.coords(h.detach(), sub.basis(L)))):
        model(input_ids=x)
    return out


X = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def test_concept_ablation_zeroes_the_coordinates_while_training_only():
    model, _ = tiny_lm("llama")
    sub = _sub()
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=X).logits
    comp = gr.ConceptAblation(sub).attach(model)
    model.train()
    c = _coords(model, sub, X)
    assert all(float(v.abs().max()) < 1e-5 for v in c.values())
    model.eval()
    with torch.no_grad():  # inference: untouched
        assert torch.equal(model(input_ids=X).logits, plain)
    comp.remove()


def test_preventative_steering_adds_the_directions_while_training():
    model, _ = tiny_lm("llama")
    sub = _sub()
    model.train()
    before = _coords(model, sub, X, layers=(1,))[1]
    comp = gr.PreventativeSteering(sub, alpha=3.0, layers=[1]).attach(model)
    after = _coords(model, sub, X, layers=(1,))[1]
    U = sub.basis(1)
    assert torch.allclose(after - before, (3.0 * U.sum(1) @ U).expand_as(after), atol=1e-4)
    comp.remove()
    assert torch.allclose(_coords(model, sub, X, layers=(1,))[1], before, atol=1e-6)


def test_activation_penalty_is_one_sided_and_pushes_coordinates_down():
    model, tok = tiny_lm("llama")
    sub = _sub()
    pen = gr.ActivationPenalty(sub, weight=1.0)
    ref = pen.calibrate(model, tok, ["copy abc:", "rev cab:", "12+34="], quantile=0.5)
    assert set(ref) == {1, 2} and ref[1].shape == (2,)
    pen.attach(model)
    model.train()
    model(input_ids=X)
    loss = pen.loss()
    assert torch.is_tensor(loss) and float(loss) > 0
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in model.parameters())
    # above an infinite reference there is nothing to penalize
    high = gr.ActivationPenalty(sub, reference={1: torch.full((2,), 1e9), 2: torch.full((1,), 1e9)}).attach(model)
    model(input_ids=X)
    assert float(high.loss()) == 0.0
    high.remove()
    pen.remove()
    with pytest.raises(ConfigError, match="reference level"):
        bare = gr.ActivationPenalty(sub).attach(model)
        try:
            model(input_ids=X)
        finally:
            bare.remove()


def test_comparator_bad_input():
    with pytest.raises(ConfigError):
        gr.ConceptAblation("persona.subspace")
    with pytest.raises(ConfigError):
        gr.ConceptAblation(_sub(), layers=[7])
    with pytest.raises(ConfigError):
        gr.PreventativeSteering(_sub(), alpha=float("nan"))
    with pytest.raises(ConfigError):
        gr.ActivationPenalty(_sub(), weight=-1)


def test_attach_comparator_in_a_trainer(tmp_path):
    """The penalty's term reaches TRL's loss (compute_loss is wrapped)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok = tiny_lm("llama")
    sub = _sub()
    ds = Dataset.from_dict({"text": ["copy abc: abc", "rev abc: cba", "12+34= 46"] * 4})
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=2, per_device_train_batch_size=4,
                     report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    pen = gr.ActivationPenalty(sub, weight=1e6, reference={1: torch.full((2,), -1e3), 2: torch.full((1,), -1e3)})
    gr.attach_comparator(trainer, pen)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and min(losses) > 1e6  # the penalty dominates the logged loss


def test_preventative_steering_takes_one_alpha_per_layer():
    model, _ = tiny_lm("llama")
    sub = _sub()
    model.train()
    before = _coords(model, sub, X)
    comp = gr.PreventativeSteering(sub, alpha={1: 2.0, 2: -1.0}).attach(model)
    after = _coords(model, sub, X)
    comp.remove()
    shift1 = (after[1] - before[1]).mean(dim=(0, 1))
    assert torch.allclose(shift1, 2.0 * sub.basis(1).sum(1) @ sub.basis(1), atol=1e-3)
    with pytest.raises(ConfigError, match="steered layers"):
        gr.PreventativeSteering(sub, alpha={1: 2.0})  # layer 2 missing
    with pytest.raises(ConfigError, match="steered layers"):
        gr.PreventativeSteering(sub, alpha={1: 2.0, 2: 1.0, 3: 1.0}, layers=[1, 2])
