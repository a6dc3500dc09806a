"""The compatibility seam (gradroute.integrations._compat): untested TRL/transformers/PEFT versions
are refused (or only warned about on request), a private name missing on a trainer is a typed
error naming it, and no other integration module touches a private name."""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from gradroute.errors import GradrouteWarning, VersionError
from gradroute.integrations import _compat

INTEGRATIONS = Path(_compat.__file__).parent
# private (or undocumented) TRL / transformers attributes gradroute uses; only _compat.py may name them
PRIVATE_NAMES = (
    "_generate_and_score_completions", "_calculate_rewards", "_set_signature_columns_if_needed",
    "_signature_columns", "_metrics", "current_gradient_accumulation_steps", "model_accepts_loss_kwargs",
    "loss_is_scaled_for_ga", "reward_weights", "get_tp_size",
)
PRIVATE = re.compile(r"\btrainer\._[a-z]"  # trainer._anything
                     r"|(?:getattr|hasattr|setattr)\(\s*trainer\s*,\s*'_[a-z]"  # getattr(trainer, '_anything')
                     r"|(?<![\w.])(?:" + "|".join(map(re.escape, PRIVATE_NAMES)) + r")\b"
                     r"|\.(?:" + "|".join(map(re.escape, PRIVATE_NAMES)) + r")\b")


def _fake_versions(monkeypatch, **versions):
    real = _compat.installed_version
    monkeypatch.setattr(_compat, "installed_version", lambda p: versions.get(p) or real(p))


def test_installed_versions_are_tested():
    _compat.check_versions()  # the test environment is the tested one
    assert _compat.is_tested("trl", "1.16.3") and _compat.is_tested("transformers", "5.24.0.dev0")
    assert not _compat.is_tested("trl", "1.17.0") and not _compat.is_tested("peft", "0.20.9")
    assert not _compat.is_tested("transformers", "not-a-version")
    assert _compat.tested_spec("trl") == "trl>=1.16,<1.17"


def test_untested_version_is_refused(monkeypatch):
    monkeypatch.delenv(_compat.ALLOW_UNTESTED_ENV, raising=False)
    _fake_versions(monkeypatch, trl="1.17.0")
    with pytest.raises(VersionError) as e:
        _compat.check_versions()
    msg = str(e.value)
    assert "trl 1.17.0" in msg and "trl>=1.16,<1.17" in msg  # the version seen and the pin
    assert f"{_compat.ALLOW_UNTESTED_ENV}=1" in e.value.fix
    assert "transformers 5" not in e.value.problem and "peft 0" not in e.value.problem  # only the untested one


def test_attach_checks_versions_first(monkeypatch):
    """attach refuses before it builds anything (the subspace here would fail to load later)."""
    import gradroute as gr

    monkeypatch.delenv(_compat.ALLOW_UNTESTED_ENV, raising=False)
    _fake_versions(monkeypatch, transformers="6.0.0")
    trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[]), args=SimpleNamespace(), model=None)
    with pytest.raises(VersionError, match="transformers 6.0.0"):
        gr.attach(trainer, "/no/such/subspace")
    assert trainer.callback_handler.callbacks == [] and "_gradroute_undo" not in vars(trainer)


def test_override_warns_instead(monkeypatch):
    monkeypatch.setenv(_compat.ALLOW_UNTESTED_ENV, "1")
    _fake_versions(monkeypatch, peft="0.23.0")
    with pytest.warns(GradrouteWarning, match="peft 0.23.0"):
        _compat.check_versions()
    monkeypatch.setenv(_compat.ALLOW_UNTESTED_ENV, "0")  # only a yes counts
    with pytest.raises(VersionError):
        _compat.check_versions()


def test_missing_private_name_is_a_typed_error():
    class Renamed:  # a trainer whose TRL renamed one hook
        def _generate_and_score_completions(self, inputs):
            return {}

    with pytest.raises(VersionError) as e:
        _compat.rl_hooks(Renamed())
    assert "'_calculate_rewards'" in e.value.problem and f"trl {_compat.installed_version('trl')}" in e.value.problem
    with pytest.raises(VersionError, match="'_signature_columns'"):
        _compat.check_trainer(SimpleNamespace(_set_signature_columns_if_needed=lambda: None), rl=False)
    with pytest.raises(VersionError, match="'completion_ids'"):
        _compat.batch_device({"prompt_ids": None})


def test_grpo_trainer_with_renamed_hook_is_refused_at_attach(tmp_path):
    """A GRPOTrainer stays RL when a hook is renamed (not carried like an SFT trainer) and attach
    names the missing hook before installing anything."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    import gradroute as gr
    from gradroute.testing import tiny_lm

    class Renamed(GRPOTrainer):
        def __getattribute__(self, name):
            if name == "_calculate_rewards":
                raise AttributeError(name)
            return super().__getattribute__(name)

    model, tok = tiny_lm("llama")
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False,
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=4, max_steps=1,
                      report_to=[], save_strategy="no", disable_tqdm=True)
    ds = Dataset.from_dict({"prompt": ["a", "b", "c", "d"], "env": ["x", "y", "x", "y"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Renamed(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=ds, processing_class=tok)
    n_callbacks = len(trainer.callback_handler.callbacks)
    assert _compat.is_rl_trainer(trainer)
    with pytest.raises(VersionError, match="_calculate_rewards"):
        gr.attach(trainer, gr.Subspace.from_directions({1: torch.randn(1, 64)}), env_column="env")
    assert len(trainer.callback_handler.callbacks) == n_callbacks and "_gradroute_undo" not in vars(trainer)


def _code(path: Path) -> str:
    """The module's code without comments and docstrings (prose may name private methods)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            body[0] = ast.Pass()
    return ast.unparse(tree)


def test_private_names_only_in_the_seam():
    assert PRIVATE.search(_code(INTEGRATIONS / "_compat.py"))  # the pattern does find them
    offenders = {}
    for path in sorted(INTEGRATIONS.glob("*.py")):
        if path.name == "_compat.py":
            continue
        hits = sorted({m.group(0) for m in PRIVATE.finditer(_code(path))})
        if hits:
            offenders[path.name] = hits
    assert not offenders, f"private TRL/transformers names outside integrations/_compat.py: {offenders}"
