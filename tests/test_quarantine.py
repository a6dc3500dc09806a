"""Quarantine mode (data-dependent routing): flagged rows train only the quarantine adapter,
unflagged rows train the base as activation mode does, discarding leaves what the unflagged
rows alone would have trained. Tiny local models only."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import gradroute as gr
from gradroute.errors import AdapterError, ConfigError, PackingError
from gradroute.policy import Rule, Violation
from gradroute.router.modes.activation import ADAPTERS_ATTR
from gradroute.router.modes.quarantine import QUARANTINE_ATTR
from gradroute.testing import random_ids as _batch
from gradroute.testing import random_subspace as _subspace
from gradroute.testing import tiny_lm

ARCHS = ("llama", "gpt2")
FLAGS = [True, False, True, False]


def _base(model):
    return {n: p for n, p in model.named_parameters() if ADAPTERS_ATTR not in n and QUARANTINE_ATTR not in n}


def _row_loss(model, x, rows):
    """Σ over ``rows`` of each row's next-token cross-entropy (summed, so a subset's terms are the same)."""
    logits = model(input_ids=x).logits[:, :-1].double()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                           reduction="none").reshape(x.shape[0], -1).sum(1)
    return ce[rows].sum()


def _grad_norm(params):
    return sum(float(p.grad.norm()) for p in params if p.grad is not None)


def _router(model, **kw):
    return gr.GradientRouter(model, _subspace(), mode="quarantine", **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_init_forward_equals_plain_and_flagged_loss_reaches_only_quarantine(arch):
    """(3) at init the forward is the plain model's (with and without gradients); (1) a loss on
    flagged rows gives exactly zero gradient to every base parameter and the persona adapter,
    and non-zero gradient to the quarantine adapter."""
    model, _ = tiny_lm(arch)
    plain = copy.deepcopy(model)
    router = _router(model)
    ms = router.mode_strategy
    x = _batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, plain(input_ids=x).logits)
    ms.set_flags(FLAGS)
    assert torch.equal(model(input_ids=x).logits.detach(), plain(input_ids=x).logits.detach())
    _row_loss(model, x, [0, 2]).backward()
    for n, p in _base(model).items():
        assert p.grad is None or float(p.grad.abs().max()) == 0.0, n
    assert _grad_norm(ms.params.values()) == 0.0            # the persona adapter neither
    assert _grad_norm(ms.quarantine_parameters()) > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_unflagged_loss_is_activation_mode_and_misses_quarantine(arch):
    """(2) a loss on unflagged rows gives zero gradient to the quarantine adapter, and the base
    and persona adapter get exactly activation mode's gradients."""
    model, _ = tiny_lm(arch, dtype=torch.float64)
    ref = copy.deepcopy(model)
    router = _router(model)
    aref = gr.GradientRouter(ref, _subspace(), mode="activation")
    x = _batch()
    router.mode_strategy.set_flags(FLAGS)
    _row_loss(model, x, [1, 3]).backward()
    _row_loss(ref, x, [1, 3]).backward()
    assert _grad_norm(router.mode_strategy.quarantine_parameters()) == 0.0
    rb = _base(ref)
    for n, p in _base(model).items():
        g0 = rb[n].grad
        if g0 is None:
            assert p.grad is None or float(p.grad.abs().max()) == 0.0, n
        else:
            torch.testing.assert_close(p.grad, g0, rtol=1e-9, atol=1e-12, msg=n)
    for name, p in router.mode_strategy.params.items():
        torch.testing.assert_close(p.grad, aref.mode_strategy.params[name].grad, rtol=1e-9, atol=1e-12)
    assert _grad_norm(_base(model).values()) > 0


def _train_pair(arch, opt_cls, micro, steps=4, **okw):
    """(mixed quarantine run, activation run on the unflagged rows alone), trained alike."""
    model, _ = tiny_lm(arch, dtype=torch.float64)
    ref = copy.deepcopy(model)
    q = _router(model)
    a = gr.GradientRouter(ref, _subspace(), mode="activation")
    oq = opt_cls(model.parameters(), **okw)
    oa = opt_cls(ref.parameters(), **okw)
    q.bind_optimizer(oq)
    a.bind_optimizer(oa)
    for step in range(steps):
        for m in range(micro):
            x = _batch(seed=10 * step + m)
            flags = [bool((step + m + i) % 3 == 0) for i in range(4)]
            q.mode_strategy.set_flags(flags)
            _row_loss(model, x, list(range(4))).backward()
            clean = [i for i, f in enumerate(flags) if not f]
            _row_loss(ref, x, clean).backward()
        oq.step()
        oa.step()
        q.step()
        a.step()
        oq.zero_grad()
        oa.zero_grad()
    return model, ref, q, a


@pytest.mark.parametrize("arch,opt,micro,okw", [
    ("llama", torch.optim.SGD, 1, {"lr": 3e-3}),
    ("gpt2", torch.optim.SGD, 1, {"lr": 3e-3}),
    ("llama", torch.optim.SGD, 2, {"lr": 3e-3}),       # (5) gradient accumulation
    ("llama", torch.optim.AdamW, 2, {"lr": 1e-3, "weight_decay": 0.1}),
])
def test_discard_equals_training_on_unflagged_rows_alone(arch, opt, micro, okw):
    """(4) after training on mixed batches, the base and persona adapter are activation mode's
    on the unflagged rows alone, and after discarding both the model equals that run's
    discarded model; (5) with gradient accumulation too."""
    model, ref, q, a = _train_pair(arch, opt, micro, **okw)
    assert q.mode_strategy.quarantine_norm() > 0  # the flagged rows went somewhere
    rb = _base(ref)
    for n, p in _base(model).items():
        torch.testing.assert_close(p.detach(), rb[n].detach(), rtol=1e-9, atol=1e-11, msg=n)
    for name, p in q.mode_strategy.params.items():
        torch.testing.assert_close(p.detach(), a.mode_strategy.params[name].detach(), rtol=1e-9, atol=1e-11)
    assert q.adapter_norm().total > 0
    q.discard()
    a.discard()
    assert q.mode_strategy.quarantine_norm() == 0.0
    x = _batch(seed=99)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits, rtol=1e-9, atol=1e-10)


def test_quarantine_adapter_is_in_the_trained_model_until_discarded():
    model, ref, q, a = _train_pair("llama", torch.optim.SGD, 1, lr=3e-2)
    x = _batch(seed=5)
    with torch.no_grad():  # no flags needed without gradients: Q is on for every row
        trained = model(input_ids=x).logits
        a_trained = ref(input_ids=x).logits
    assert float((trained - a_trained).abs().max()) > 1e-8
    with pytest.raises(AdapterError, match="quarantine"):
        q.merge()
    q.discard()
    with torch.no_grad():
        plain_a = (a.discard(), ref(input_ids=x).logits)[1]
        torch.testing.assert_close(model(input_ids=x).logits, plain_a, rtol=1e-9, atol=1e-10)


def test_refusals():
    model, _ = tiny_lm("llama")
    router = _router(model)
    ms = router.mode_strategy
    x = _batch()
    with pytest.raises(ConfigError, match="without the rows' flags"):
        model(input_ids=x)
    ms.set_flags([True, False])
    with pytest.raises(PackingError, match="2 quarantine flags for a forward of 4 rows"):
        model(input_ids=x)
    for bad in ([0.5, 1, 0, 1], [[True, False]], "tftf", [float("nan"), 0.0, 1.0, 0.0]):
        with pytest.raises(ConfigError):
            ms.set_flags(bad)
    ms.set_flags(torch.tensor([1, 0, 0, 1]))
    assert ms.flags.tolist() == [True, False, False, True]
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    router.bind_optimizer(opt)
    _row_loss(model, x, [0, 1, 2, 3]).backward()
    opt.step()
    router.step()
    assert ms.flags is None  # each step's micro-batches set their own
    with pytest.raises(ConfigError, match="without the rows' flags"):
        model(input_ids=x)


def test_optimizer_made_before_the_router_is_refused():
    model, _ = tiny_lm("llama")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    router = _router(model)
    with pytest.raises(ConfigError, match="optimizer"):
        router.bind_optimizer(opt)


def test_state_round_trip(tmp_path):
    _, _, q, _ = _train_pair("llama", torch.optim.SGD, 1, lr=3e-2)
    q.save_state(tmp_path / "state")
    tensors, _ = q.mode_strategy.state_dict()
    assert any(k.startswith("quarantine.") for k in tensors)
    before = q.mode_strategy.quarantine_norm()
    for p in q.mode_strategy.quarantine_parameters():
        with torch.no_grad():
            p.zero_()
    q.load_state(tmp_path / "state")
    assert q.mode_strategy.quarantine_norm() == pytest.approx(before, rel=1e-12)


def test_detach_removes_quarantine_from_model():
    model, _ = tiny_lm("llama")
    router = _router(model)
    assert hasattr(model, QUARANTINE_ATTR)
    assert not any(QUARANTINE_ATTR in k for k in model.state_dict() if k not in model._keys_to_ignore_on_save)
    router.detach()
    assert not hasattr(model, QUARANTINE_ATTR)
    model(input_ids=_batch())  # plain again: no flags needed


def test_deepcopy_of_routed_model_runs():
    model, _ = tiny_lm("llama")
    _router(model)
    twin = copy.deepcopy(model)
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=x).logits, model(input_ids=x).logits)


_HAS_MODE_OPTIONS = "mode_options" in inspect.signature(gr.GradientRouter).parameters


@pytest.mark.skipif(not _HAS_MODE_OPTIONS, reason="GradientRouter(mode_options=...) not in core yet")
def test_low_rank_quarantine_isolates_too():
    model, _ = tiny_lm("llama")
    plain = copy.deepcopy(model)
    router = gr.GradientRouter(model, _subspace(), mode="quarantine", mode_options={"quarantine_rank": 3})
    ms = router.mode_strategy
    assert all(p.shape[0] == 3 or p.shape[1] == 3 for p in ms.quarantine_parameters())
    x = _batch()
    ms.set_flags(FLAGS)
    assert torch.equal(model(input_ids=x).logits.detach(), plain(input_ids=x).logits)
    _row_loss(model, x, [0, 2]).backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in _base(model).values())
    assert _grad_norm(ms.quarantine_parameters()) > 0
    with pytest.raises(ConfigError, match="quarantine_rank"):
        gr.GradientRouter(tiny_lm("llama")[0], _subspace(), mode="quarantine", mode_options={"quarantine_rank": 0})


def test_user_lora_policy_gets_nothing_from_flagged_rows():
    peft = pytest.importorskip("peft")
    model, _ = tiny_lm("llama")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj",
                                                                                          "down_proj"]))
    for n, p in model.named_parameters():  # B != 0 so that A gets a gradient too
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.1)
    router = _router(model)
    ms = router.mode_strategy
    x = _batch()
    ms.set_flags(FLAGS)
    _row_loss(model, x, [0, 2]).backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in lora.values())
    assert _grad_norm(ms.quarantine_parameters()) > 0
    model.zero_grad()
    _row_loss(model, x, [1, 3]).backward()
    assert _grad_norm(lora.values()) > 0


def test_attribution_counts_only_unflagged_rows():
    """Per-environment attribution of the persona adapter's update: a flagged environment's rows
    reach neither the adapter nor its share."""
    model, _ = tiny_lm("llama")  # float32: attribution with float64 weights fails in activation mode too
    router = gr.GradientRouter(model, _subspace(), mode="quarantine", envs=["a", "b"])
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    router.bind_optimizer(opt)
    x = _batch()
    envs = ["a", "b", "a", "b"]
    router.mode_strategy.set_flags([e == "a" for e in envs])
    with router.attribution.batch(envs):
        _row_loss(model, x, [0, 1, 2, 3]).backward()
    opt.step()
    rec = router.step()
    assert rec.env_share.get("a", 0.0) == pytest.approx(0.0, abs=1e-12)
    assert rec.env_share["b"] == pytest.approx(1.0, abs=1e-5)


_HAS_ATTACH = "quarantine" in inspect.signature(gr.attach).parameters


def odd_reward(completions, env, **kw):
    """Varies within every group of an untrained tiny model's rollouts: odd characters."""
    return [float(sum(ord(ch) % 2 for ch in c)) for c in completions]


def _grpo(out, steps=3):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    model, tok = tiny_lm("llama")
    args = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, gradient_checkpointing=False,
                      per_device_train_batch_size=8, num_generations=8, max_completion_length=8,
                      gradient_accumulation_steps=2, learning_rate=3e-3, max_steps=steps, report_to=[],
                      logging_steps=1, seed=0, disable_tqdm=True, save_strategy="no")
    data = Dataset.from_dict({"prompt": [f"Q{i}:" for i in range(32)],
                              "env": ["bang" if i % 2 else "plain" for i in range(32)]})
    return GRPOTrainer(model=model, reward_funcs=odd_reward, args=args, train_dataset=data, processing_class=tok)


@pytest.mark.skipif(not _HAS_ATTACH, reason="gradroute.attach(quarantine=...) not in the TRL integration yet")
def test_grpo_every_rollout_flagged_leaves_the_base_untouched(tmp_path):
    """End to end through TRL: a detector flagging every rollout leaves every base parameter as
    it was (to the pins' round-off), and the quarantine adapter holds the training."""
    trainer = _grpo(tmp_path / "all")
    model = trainer.model
    before = {n: p.detach().clone() for n, p in _base(model).items()}
    seen = []

    def detector(completions, rows):
        seen.append(len(completions))
        return [True] * len(completions)

    handle = gr.attach(trainer, _subspace(), env_column="env", mode="quarantine", quarantine=detector)
    trainer.train()
    assert seen and sum(seen) > 0
    for n, p in _base(model).items():
        # nothing but the activation pins' float32 round-off (they rewrite the writers' and
        # embeddings' in-span coordinates after every step): ~1e-9, where one real step is ~1e-3
        d = float((p.detach() - before[n]).abs().max())
        assert d <= 1e-6 * max(float(before[n].abs().max()), 1.0), (n, d)
    assert handle.router.mode_strategy.quarantine_norm() > 0
    assert handle.router.adapter_norm().total == 0.0
    handle.discard()
    assert handle.router.mode_strategy.quarantine_norm() == 0.0


@pytest.mark.skipif(not _HAS_ATTACH, reason="gradroute.attach(quarantine=...) not in the TRL integration yet")
def test_grpo_quarantined_environment_and_refusals(tmp_path):
    trainer = _grpo(tmp_path / "env")
    with pytest.raises(ConfigError, match="needs to know which rows"):
        gr.attach(trainer, _subspace(), env_column="env", mode="quarantine")
    with pytest.raises(ConfigError, match="mode='quarantine'"):
        gr.attach(trainer, _subspace(), env_column="env", quarantine={"bang"})
    with pytest.raises(gr.errors.EnvColumnError, match="not in the data"):
        gr.attach(trainer, _subspace(), env_column="env", mode="quarantine", quarantine={"nope"})
    flagged = {"bang"}
    handle = gr.attach(trainer, _subspace(), env_column="env", mode="quarantine", quarantine=flagged)
    trainer.train()
    assert handle.router.mode_strategy.quarantine_norm() > 0
    assert handle.router.adapter_norm().total > 0  # the plain environment trained the base and persona adapter


def test_trl_fused_lm_head_is_quarantined_too():
    """TRL's trainers score through ``add_fused_lm_head`` (the head's weight used directly, its
    module never called): flagged rows must not reach it there either, and unflagged rows get
    exactly the plain fused head's gradient."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    model, _ = tiny_lm("llama", dtype=torch.float64)
    ref = copy.deepcopy(model)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    trl_utils.add_fused_lm_head(ref, outputs=("log_probs", "entropy"))
    router = _router(model)
    gr.GradientRouter(ref, _subspace(), mode="activation")
    ms = router.mode_strategy
    x = _batch()
    ms.set_flags(FLAGS)
    out = model(input_ids=x, labels=x, fused_lm_head=True)
    out0 = ref(input_ids=x, labels=x, fused_lm_head=True)
    torch.testing.assert_close(out.log_probs, out0.log_probs, rtol=1e-12, atol=1e-12)
    (-out.log_probs[[0, 2]].sum() + out.entropy[[0, 2]].sum()).backward()
    for n, p in _base(model).items():
        assert p.grad is None or float(p.grad.abs().max()) == 0.0, n
    assert _grad_norm(ms.quarantine_parameters()) > 0
    model.zero_grad()
    ms.set_flags(FLAGS)
    (-model(input_ids=x, labels=x, fused_lm_head=True).log_probs[[1, 3]].sum()).backward()
    (-out0.log_probs[[1, 3]].sum()).backward()
    torch.testing.assert_close(model.lm_head.weight.grad, ref.lm_head.weight.grad, rtol=1e-9, atol=1e-12)
    assert _grad_norm(ms.quarantine_parameters()) == 0.0


def test_a_parameter_used_around_its_module_is_refused():
    """The sentinel: a base parameter reached outside any construction quarantine mode saw, with
    flagged rows in the batch, raises instead of training silently."""
    from gradroute.errors import RoutingError

    model, _ = tiny_lm("llama")
    router = _router(model)
    router.mode_strategy.set_flags(FLAGS)
    h = model.model(input_ids=_batch()).last_hidden_state
    logits = h @ model.lm_head.weight.T  # the head's weight used directly, its module never called
    with pytest.raises(RoutingError, match="lm_head.weight"):
        logits[0].sum().backward()


def test_fused_head_model_deepcopies_and_detaches():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    model, _ = tiny_lm("llama")
    trl_utils.add_fused_lm_head(model)
    router = _router(model)
    twin = copy.deepcopy(model)
    x = _batch()
    with torch.no_grad():
        a = model(input_ids=x, labels=x, fused_lm_head=True).log_probs
        b = twin(input_ids=x, labels=x, fused_lm_head=True).log_probs
    torch.testing.assert_close(a, b)
    router.detach()
    from gradroute.router.modes import quarantine

    assert model.forward.__func__ is not quarantine._fused_forward  # TRL's own again
    model(input_ids=x, labels=x, fused_lm_head=True).log_probs.sum().backward()  # no flags needed any more


class _FiresOn(Rule):
    """Fires on environment ``env`` from step ``step`` on (None: a crossing naming no environment)."""

    name = "fires_on"

    def __init__(self, env, step):
        self.env, self.step, self.action = env, step, None

    def check(self, record, history):
        if record.step >= self.step:
            return Violation(self.name, 1.0, 0.0, int(record.step), env=self.env)
        return None


def test_monitor_driven_quarantine_routes_the_flagged_environment_from_the_next_step(tmp_path):
    """QuarantineOnFlag: the rule names 'bang' at step 2, the run goes on to the end, and from then
    on (not before) 'bang' rows train only the quarantine adapter."""
    from transformers import TrainerCallback

    trainer = _grpo(tmp_path / "mon", steps=4)
    flagged: set[str] = set()
    action = gr.QuarantineOnFlag(flagged)
    policy = gr.HaltPolicy(rules=[_FiresOn("bang", 2)], halt_on_nonfinite=False, action=action)
    handle = gr.attach(trainer, _subspace(), env_column="env", mode="quarantine", quarantine=flagged, policy=policy)
    q_norm = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            q_norm.append(handle.router.mode_strategy.quarantine_norm())

    trainer.add_callback(Watch())
    trainer.train()
    assert trainer.state.global_step == 4 and not handle.halted  # flagged, not stopped
    assert flagged == {"bang"} and action.flagged == {"bang": 2}
    assert q_norm[0] == 0.0 and q_norm[1] == 0.0  # steps 1-2 ran before the flag took effect
    assert q_norm[-1] > 0.0


def test_quarantine_on_flag_refusals_and_crossings_without_an_environment(tmp_path):
    with pytest.raises(ConfigError, match="the set passed"):
        gr.QuarantineOnFlag(["bang"])
    trainer = _grpo(tmp_path / "ref", steps=2)
    other = set()
    with pytest.raises(ConfigError, match="is not attach's quarantine"):
        gr.attach(trainer, _subspace(), env_column="env", mode="quarantine", quarantine=set(),
                  policy=gr.HaltPolicy(max_push_z=6.0, action=gr.QuarantineOnFlag(other)))
    flagged: set[str] = set()
    policy = gr.HaltPolicy(rules=[_FiresOn(None, 1)], halt_on_nonfinite=False, action=gr.QuarantineOnFlag(flagged))
    handle = gr.attach(trainer, _subspace(), env_column="env", mode="quarantine", quarantine=flagged, policy=policy)
    trainer.train()
    assert handle.halted is not None and trainer.state.global_step == 1  # nothing to quarantine: it stops
    assert flagged == set()


def _trl_advantages(rewards, group, scale):
    """GRPOTrainer's own formula (TRL 1.16, sum_then_normalize)."""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, group), dim=1).repeat_interleave(group)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_unflagged_advantages_are_trls_without_the_flagged_rows(scale):
    from gradroute.router.modes.quarantine import unflagged_advantages

    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(24, generator=g, dtype=torch.float64)
    rewards[5] = float("nan")  # unscorable: out of the baseline, as in TRL
    trl = _trl_advantages(rewards, 8, scale)
    none = torch.zeros(24, dtype=torch.bool)
    assert torch.allclose(unflagged_advantages(rewards, none, trl, 8, scale), trl, atol=1e-12)
    flags = torch.zeros(24, dtype=torch.bool)
    flags[[0, 3, 9, 16, 17, 18, 19, 20, 21, 22]] = True  # the third group keeps one unflagged row
    out = unflagged_advantages(rewards, flags, trl, 8, scale)
    assert torch.equal(out[flags], trl[flags])  # the flagged rows keep TRL's (they train Q)
    assert out[23] == 0.0  # alone in its group: no baseline
    # the unflagged rows' advantages are what TRL gives a batch without the flagged rows
    for lo in (0, 8):
        keep = [i for i in range(lo, lo + 8) if not flags[i]]
        sub = rewards[keep]
        if scale == "batch":
            pool = torch.tensor([rewards[i] for i in range(24) if not flags[i] and not torch.isnan(rewards[i])])
            want = (sub - torch.nanmean(sub)) / (pool.std() + 1e-4)
        else:
            want = _trl_advantages(sub, len(keep), scale)
        assert torch.allclose(out[keep], torch.nan_to_num(want, nan=0.0), atol=1e-9)
    # and they do not depend on what the flagged rows were paid
    moved = rewards.clone()
    moved[flags] = 7.0
    assert torch.equal(unflagged_advantages(moved, flags, trl, 8, scale)[~flags], out[~flags])


@pytest.mark.skipif(not _HAS_ATTACH, reason="gradroute.attach(quarantine=...) not in the TRL integration yet")
def test_grpo_exclude_advantages_trains_and_is_refused_where_it_cannot_hold(tmp_path):
    seen = []

    def every_other(completions, rows):
        flags = [i % 2 == 0 for i in range(len(completions))]
        seen.append(flags)
        return flags

    trainer = _grpo(tmp_path / "ex", steps=2)
    with pytest.raises(ConfigError, match="must be one of"):
        gr.attach(trainer, _subspace(), env_column="env", mode="quarantine", quarantine=every_other,
                  quarantine_advantages="drop")
    trainer = _grpo(tmp_path / "ex2", steps=2)
    handle = gr.attach(trainer, _subspace(), env_column="env", mode="quarantine", quarantine=every_other,
                       quarantine_advantages="exclude")
    trainer.train()
    assert seen and handle.router.mode_strategy.quarantine_norm() > 0
    trainer = _grpo(tmp_path / "ex3", steps=1)
    trainer.multi_objective_aggregation = "normalize_then_sum"
    with pytest.raises(ConfigError, match="sum_then_normalize"):
        gr.attach(trainer, _subspace(), env_column="env", mode="quarantine", quarantine={"bang"},
                  quarantine_advantages="exclude")


def test_activation_adapter_weight_decay_is_decoupled_at_the_adapters_rate():
    """adapter_weight_decay in activation mode: C ← C_prev + m (C − C_prev) − m η λ C_prev (it was ignored)."""
    from gradroute.router.modes.activation import ADAPTERS_ATTR

    def run(wd):
        torch.manual_seed(0)
        model, _ = tiny_lm("llama")
        router = gr.GradientRouter(model, _subspace(), mode="activation", adapter_lr_multiplier=3.0,
                                   adapter_weight_decay=wd)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        router.bind_optimizer(opt)
        x = _batch()
        snaps = []
        for _ in range(2):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            router.step()
            opt.zero_grad()
            snaps.append({n: p.detach().clone() for n, p in model.named_parameters() if ADAPTERS_ATTR in n})
        return snaps

    plain, decayed = run(0.0), run(0.5)
    # step 1 starts from C = 0: no decay yet; step 2 decays C_1 by m η λ = 3 × 0.1 × 0.5
    for n in plain[0]:
        assert torch.allclose(plain[0][n], decayed[0][n])
    moved = [n for n in plain[1] if float(plain[0][n].abs().max()) > 0]
    assert moved
    for n in moved:
        want = plain[1][n] - 0.15 * plain[0][n]
        assert torch.allclose(decayed[1][n], want, atol=1e-6), n


def test_quarantine_on_flag_goes_on_to_the_next_environment_and_policies_keep_their_actions():
    """A rule that quarantined one environment names the next one to cross (it would otherwise stay
    on the worst, already quarantined one); combining policies with different actions is refused."""
    from types import SimpleNamespace

    class Worst(Rule):
        name = "worst"
        action = None

        def check(self, record, history):
            return self._worst_env(record, {"a": 5.0, "b": 4.0, "c": 1.0}, 3.0)

    flagged: set[str] = set()
    policy = gr.HaltPolicy(rules=[Worst()], halt_on_nonfinite=False, action=gr.QuarantineOnFlag(flagged))
    active: set = set()
    for step in (1, 2, 3):
        rec = SimpleNamespace(step=step, env_adapter_share={}, env_share={})
        out = policy.evaluate(rec, [rec], active)
        assert all(stop is False for _, stop in out)
    assert flagged == {"a", "b"} and policy.action.flagged == {"a": 1, "b": 2}
    with pytest.raises(ConfigError, match="different actions"):
        gr.HaltPolicy(max_push_z=6.0, action="warn") | gr.HaltPolicy(max_env_share=0.9)


def test_adapter_weight_decay_without_an_optimizer_is_refused():
    torch.manual_seed(0)
    model, _ = tiny_lm("llama")
    router = gr.GradientRouter(model, _subspace(), mode="activation", adapter_weight_decay=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # not bound: the router cannot read its learning rate
    x = _batch()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    with pytest.raises(ConfigError, match="bind_optimizer"):
        router.step()


@pytest.mark.skipif(not _HAS_ATTACH, reason="gradroute.attach(quarantine=...) not in the TRL integration yet")
def test_exclude_refusals_happen_before_anything_is_attached(tmp_path):
    trainer = _grpo(tmp_path / "r", steps=1)
    trainer.multi_objective_aggregation = "normalize_then_sum"
    with pytest.raises(ConfigError, match="sum_then_normalize"):
        gr.attach(trainer, _subspace(), env_column="env", mode="quarantine", quarantine={"bang"},
                  quarantine_advantages="exclude")
    with pytest.raises(ConfigError, match="recomputes the GRPO advantages"):
        gr.attach(trainer, _subspace(), env_column="env", mode="activation", quarantine_advantages="exclude")
    trainer.multi_objective_aggregation = "sum_then_normalize"
    gr.attach(trainer, _subspace(), env_column="env", mode="quarantine", quarantine={"bang"})  # nothing left behind


@pytest.mark.skipif(not _HAS_ATTACH, reason="gradroute.attach(quarantine=...) not in the TRL integration yet")
def test_exclude_puts_the_recomputed_advantages_in_the_training_batch(tmp_path):
    """The batch TRL trains on carries, for unflagged rows, advantages over the unflagged
    group-mates' rewards (TRL's own formula on that subset), and TRL's for flagged rows."""
    seen: dict = {}

    def odd_rows(completions, rows):
        return [i % 3 == 0 for i in range(len(completions))]

    trainer = _grpo(tmp_path / "adv", steps=1)
    gr.attach(trainer, _subspace(), env_column="env", mode="quarantine", quarantine=odd_rows,
              quarantine_advantages="exclude")
    calc, gen = trainer._calculate_rewards, trainer._generate_and_score_completions

    def calc_spy(*a, **kw):
        seen["rpf"] = calc(*a, **kw)
        return seen["rpf"]

    def gen_spy(*a, **kw):
        out = gen(*a, **kw)
        seen.setdefault("outs", []).append(out)
        return out

    trainer._calculate_rewards, trainer._generate_and_score_completions = calc_spy, gen_spy
    trainer.train()
    out = seen["outs"][0]
    rewards = (seen["rpf"] * trainer.reward_weights.unsqueeze(0)).nansum(1).double()
    flags = torch.tensor([i % 3 == 0 for i in range(rewards.numel())])
    adv = out["advantages"].double()
    G = trainer.num_generations
    assert torch.allclose(adv[flags], _trl_advantages(rewards, G, "group")[flags].to(adv), atol=1e-5)
    for g in range(rewards.numel() // G):
        idx = [i for i in range(g * G, (g + 1) * G) if not flags[i]]
        want = _trl_advantages(rewards[idx], len(idx), "group")
        assert torch.allclose(adv[idx], want.to(adv), atol=1e-5), g
