"""Bad inputs, table-driven: every one gives a GradrouteError with a "Fix:" (API), or one line and a
non-zero exit status (CLI); nothing invalid is accepted silently. Checkpoints cannot lie.

One row (or test) per defect of issue 12; the id names the defect.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradroute as gr
from gradroute import _io
from gradroute.errors import (
    CheckpointError,
    ConfigError,
    EnvColumnError,
    FileFormatError,
    GradrouteError,
    GradrouteWarning,
    ProbeDataError,
    SubspaceError,
)
from gradroute.monitor import load_log, read_records, step_from_json
from gradroute.policy import HaltPolicy, NonFiniteRewardRule
from gradroute.testing import tiny_lm

D = 64  # the tiny models' hidden size


def _fix(e: BaseException) -> None:
    assert isinstance(e, GradrouteError), f"{type(e).__name__}: {e}"
    assert "Fix:" in str(e) and str(e).split("Fix:", 1)[1].strip(), str(e)


def _sub() -> gr.Subspace:
    g = torch.Generator().manual_seed(0)
    return gr.Subspace.from_directions({1: torch.randn(2, D, generator=g)})


# ---------------------------------------------------------------------------------------- API
def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _st_file(tmp: Path, tensors: dict, name="d.safetensors") -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(tmp / name))
    return tmp / name


def _saved_sub(tmp: Path, edit=None, remove=None) -> Path:
    p = _sub().save(tmp / "s.subspace")
    if edit:
        meta = json.loads((p / "subspace.json").read_text())
        edit(meta)
        (p / "subspace.json").write_text(json.dumps(meta))
    if remove:
        (p / remove).unlink()
    return p


def _probe(**kw):
    model, tok = tiny_lm("llama")
    base = dict(positive=["ab", "cd", "ef"], negative=["gh", "ij", "kl"], layers=[1], progress=False)
    base.update(kw)
    return gr.Subspace.from_probe(model, tok, **base)


class _BigVocabTok:
    """A tokenizer whose ids go beyond the tiny model's 101 embeddings."""

    pad_token_id = 0
    eos_token_id = 0

    def __init__(self):
        _, self.tok = tiny_lm("llama")

    def __len__(self):
        return 5000

    def __call__(self, text, **kw):
        out = self.tok(text, **kw)
        out["input_ids"] = [i + 4000 for i in out["input_ids"]]
        return out

    def __getattr__(self, name):
        return getattr(self.tok, name)


def _probe_big_vocab():
    model, _ = tiny_lm("llama")
    return gr.Subspace.from_probe(model, _BigVocabTok(), positive=["ab", "cd"], negative=["ef", "gh"],
                                  layers=[1], progress=False)


API_CASES = [
    # HaltPolicy: typed errors with a fix; no silent acceptance
    ("policy_bool_threshold", lambda t: HaltPolicy(max_adapter_norm=True), ConfigError, "max_adapter_norm"),
    ("policy_inf_min_norm", lambda t: HaltPolicy(max_env_share=0.8, env_share_min_norm=math.inf), ConfigError,
     "never fire"),
    ("policy_inf_threshold", lambda t: HaltPolicy(max_adapter_norm=math.inf), ConfigError, "never fire"),
    ("policy_negative_min_std", lambda t: gr.policy.ActivationDriftRule(3.0, min_std=-1), ConfigError, "min_std"),
    ("policy_bool_window", lambda t: HaltPolicy(max_growth=1.0, growth_window=True), ConfigError, "growth_window"),
    ("policy_bad_share", lambda t: HaltPolicy(max_env_share=1.5), ConfigError, "max_env_share"),
    ("policy_bad_action", lambda t: HaltPolicy(action="halt"), ConfigError, "action"),
    ("policy_rule_not_rule", lambda t: HaltPolicy(rules=["x"]), ConfigError, "Rule"),
    ("policy_bad_nonfinite_rewards", lambda t: HaltPolicy(max_nonfinite_rewards=-1), ConfigError, "max_nonfinite"),
    ("policy_halt_on_nonfinite_str", lambda t: HaltPolicy(halt_on_nonfinite="no"), ConfigError, "halt_on_nonfinite"),
    # Subspace constructors
    ("directions_str", lambda t: gr.Subspace.from_directions({1: "abc"}), SubspaceError, "numbers"),
    ("directions_none", lambda t: gr.Subspace.from_directions({1: None}), SubspaceError, "tensor"),
    ("directions_objects", lambda t: gr.Subspace.from_directions({1: [object(), object()]}), SubspaceError, "numbers"),
    ("directions_complex", lambda t: gr.Subspace.from_directions({1: torch.randn(1, D, dtype=torch.complex64)}),
     SubspaceError, "complex"),
    ("directions_overflow", lambda t: gr.Subspace.from_directions({1: torch.full((1, D), 1e39, dtype=torch.float64)}),
     SubspaceError, "float32"),
    ("directions_empty", lambda t: gr.Subspace.from_directions({1: torch.zeros(0, D)}), SubspaceError, "non-empty"),
    ("directions_names_str", lambda t: gr.Subspace.from_directions({1: torch.randn(1, D)}, names="ab"),
     SubspaceError, "names"),
    ("directions_names_none", lambda t: gr.Subspace.from_directions({1: torch.randn(1, D)}, names=[None]),
     SubspaceError, "names"),
    ("persona_vectors_1_row", lambda t: gr.Subspace.from_persona_vectors(torch.randn(1, D)), FileFormatError,
     "n_layers + 1"),
    ("assistant_axis_0_rows", lambda t: gr.Subspace.from_assistant_axis(torch.zeros(0, D)), FileFormatError,
     "no rows"),
    ("persona_vectors_str_layers", lambda t: gr.Subspace.from_persona_vectors(torch.randn(4, D), layers=["x"]),
     SubspaceError, "layer"),
    ("union_not_subspace", lambda t: _sub().union(3), SubspaceError, "Subspace"),
    ("overlap_not_subspace", lambda t: _sub().overlap("x"), SubspaceError, "Subspace"),
    ("random_like_seed_str", lambda t: _sub().random_like(seed="a"), SubspaceError, "seed"),
    ("axes_dim_str", lambda t: gr.Subspace.from_axes({"x": [0]}, dim="3"), SubspaceError, "dim"),
    ("axes_out_of_range", lambda t: gr.Subspace.from_axes({"x": [5]}, dim=3), SubspaceError, "axis"),
    ("rtol_str", lambda t: gr.Subspace.from_directions({1: torch.randn(D)}, rtol="x"), SubspaceError, "rtol"),
    ("layers_float", lambda t: gr.Subspace.from_assistant_axis(torch.randn(3, D), layers=[1.5]), SubspaceError,
     "layer"),
    ("policy_nan", lambda t: HaltPolicy(max_adapter_norm=float("nan")), ConfigError, "max_adapter_norm"),
    ("policy_or_int", lambda t: HaltPolicy() | 3, ConfigError, "HaltPolicy"),
    ("load_log_missing", lambda t: load_log(t / "nolog"), FileFormatError, "no gradroute log"),
    # files
    ("file_empty_safetensors", lambda t: gr.Subspace.from_file(_st_file(t, {})), FileFormatError, "no tensors"),
    ("file_zero_bytes", lambda t: gr.Subspace.from_file(_write(t / "z.safetensors", b"")), FileFormatError,
     "safetensors"),
    ("file_complex_npy", lambda t: gr.Subspace.from_file(
        (np.save(t / "c.npy", np.ones((1, D), dtype=np.complex64)), t / "c.npy")[1], layers=[1]),
     SubspaceError, "complex"),
    ("file_overflow_npy", lambda t: gr.Subspace.from_file(
        (np.save(t / "o.npy", np.full((1, D), 1e39)), t / "o.npy")[1], layers=[1]), SubspaceError, "float32"),
    ("file_strings_npy", lambda t: gr.Subspace.from_file(
        (np.save(t / "s.npy", np.array([["a"] * D])), t / "s.npy")[1], layers=[1]), GradrouteError, ""),
    ("file_missing", lambda t: gr.Subspace.from_file(t / "nope.npy", layers=[1]), FileFormatError, "does not exist"),
    ("pt_not_tensor", lambda t: gr.Subspace.from_persona_vectors(
        (torch.save({"a": 1}, t / "x.pt"), t / "x.pt")[1]), FileFormatError, ""),
    ("load_missing_tensor_file", lambda t: gr.Subspace.load(_saved_sub(t, remove="subspace.safetensors")),
     FileFormatError, "subspace.safetensors"),
    ("load_format_version_str", lambda t: gr.Subspace.load(_saved_sub(t, edit=lambda m: m.update(format_version="1"))),
     FileFormatError, "format_version"),
    ("save_over_existing_dir", lambda t: (_sub().save(t / "o"), gr.Subspace.from_directions(
        {1: torch.randn(1, D)}).save(t / "o")), FileFormatError, "overwrite"),
    ("save_over_file", lambda t: _sub().save(_write(t / "f", "x")), FileFormatError, "not a directory"),
    ("sha256_missing_file", lambda t: _io.sha256_file(t / "router_state.safetensors"), FileFormatError,
     "router_state.safetensors"),
    # from_probe
    ("probe_batch_size_0", lambda t: _probe(batch_size=0), ProbeDataError, "batch_size"),
    ("probe_string_labels", lambda t: _probe(positive=None, negative=None, texts=["a", "b", "c", "d"],
                                             labels=["pos", "neg", "pos", "neg"]), ProbeDataError, "labels"),
    ("probe_pca_k0", lambda t: _probe(method="pca", k=0), ProbeDataError, "k must"),
    ("probe_pca_k_gt_pairs", lambda t: _probe(method="pca", k=10), ProbeDataError, "pairs"),
    ("probe_text_none", lambda t: _probe(positive=["a", None]), ProbeDataError, "positive[1]"),
    ("probe_vocab", lambda t: _probe_big_vocab(), ProbeDataError, "token ids"),
]


@pytest.mark.parametrize("name,fn,err,match", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(tmp_path, name, fn, err, match):
    with pytest.raises(GradrouteError) as e:
        fn(tmp_path)
    assert isinstance(e.value, err), f"{type(e.value).__name__}: {e.value}"
    assert match in str(e.value)
    _fix(e.value)


def test_persona_vectors_two_rows_still_work():
    sub = gr.Subspace.from_persona_vectors(torch.randn(3, D))  # 2 blocks: layers -1, 0
    assert sub.layers == (-1, 0)


def test_save_same_subspace_twice_and_overwrite_flag(tmp_path):
    s = _sub()
    s.save(tmp_path / "a")
    s.save(tmp_path / "a")  # the same content: no harm
    other = gr.Subspace.from_directions({1: torch.randn(1, D)})
    other.save(tmp_path / "a", overwrite=True)
    assert gr.Subspace.load(tmp_path / "a") == other


# ------------------------------------------------------------------------ Subspace: hypothesis
_keys = st.one_of(st.integers(-3, 6), st.sampled_from(["blk", "", True, None, 1.5]))
_values = st.one_of(
    st.integers(0, 3).flatmap(lambda k: st.lists(
        st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=k * 8, max_size=k * 8
    ).map(lambda xs, k=k: np.array(xs, dtype=np.float64).reshape(k, 8) if k else np.zeros((0, 8)))),
    st.lists(st.floats(-1e40, 1e40, allow_nan=False), min_size=8, max_size=8).map(np.array),
    st.sampled_from(["abc", None, [None, 1.0], {"a": 1}, b"xx", 3.0]),
    st.integers(1, 3).map(lambda k: torch.randn(k, 8, dtype=torch.complex64)),
    st.integers(1, 3).map(lambda k: torch.randn(k, 8, 2)),
    st.integers(1, 4).map(lambda k: torch.randn(k, 8, dtype=torch.float16)),
)
_names = st.one_of(st.none(), st.sampled_from(["a", ["a"], ["a", "a"], ["a", "b"], [1, 2], {0: ["x"]}]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dirs=st.dictionaries(_keys, _values, min_size=0, max_size=3), names=_names,
       on_degenerate=st.sampled_from(["error", "drop", "warn", "maybe"]))
def test_subspace_constructors_give_a_subspace_or_a_typed_error(dirs, names, on_degenerate):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sub = gr.Subspace.from_directions(dirs, names=names, on_degenerate=on_degenerate)
        except GradrouteError as e:
            _fix(e)
            return
    for L in sub.layers:
        U = sub.basis(L)
        assert U.dtype == torch.float32 and torch.isfinite(U).all()
        assert float((U.T @ U - torch.eye(U.shape[1])).abs().max()) < 1e-5


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 4), d=st.integers(0, 6), kind=st.sampled_from(["pv", "aa"]),
       scale=st.sampled_from([1.0, 1e39, float("nan")]))
def test_peer_importers_give_a_subspace_or_a_typed_error(rows, d, kind, scale):
    T = torch.randn(rows, d, dtype=torch.float64) * scale
    fn = gr.Subspace.from_persona_vectors if kind == "pv" else gr.Subspace.from_assistant_axis
    try:
        sub = fn(T)
    except GradrouteError as e:
        _fix(e)
        return
    for L in sub.layers:
        U = sub.basis(L)
        assert float((U.T @ U - torch.eye(U.shape[1])).abs().max()) < 1e-5


# ---------------------------------------------------------------------------------- damaged logs
def _log(tmp: Path, *lines: bytes) -> Path:
    good = [json.dumps({"type": "header"}).encode(),
            json.dumps({"type": "step", "step": 1, "adapter_norm": 0.1}).encode()]
    tail = [json.dumps({"type": "step", "step": 2, "adapter_norm": 0.2}).encode()]
    (tmp / "gradroute.jsonl").write_bytes(b"\n".join(good + list(lines) + tail) + b"\n")
    return tmp


LOG_CASES = [
    ("non_utf8", b"\xff\xfe{garbage"),
    ("json_list", b"[1, 2, 3]"),
    ("json_number", b"42"),
    ("resume_without_from_step", b'{"type": "resume"}'),
    ("crossing_step_null", b'{"type": "crossing", "step": null, "rule": "x"}'),
    ("step_without_step", b'{"type": "step", "adapter_norm": 1.0}'),
    ("checkpoint_without_path", b'{"type": "checkpoint", "step": 1}'),
    ("not_json", b"this is not json"),
]


@pytest.mark.parametrize("name,line", LOG_CASES, ids=[c[0] for c in LOG_CASES])
def test_damaged_log_is_read_with_one_counting_warning(tmp_path, name, line):
    run = _log(tmp_path, line, line)
    with pytest.warns(GradrouteWarning, match="skipped 2 damaged line") as w:
        df = load_log(run)
    assert len([x for x in w if issubclass(x.category, GradrouteWarning)]) == 1
    assert df["step"].tolist() == [1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert gr.last_clean_checkpoint(run) is None
        from gradroute.cli import main

        assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0


def test_torn_last_line_is_not_damage(tmp_path):
    (tmp_path / "gradroute.jsonl").write_text('{"type": "step", "step": 1}\n{"type": "step", "st')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_records(tmp_path)) == 1


# ----------------------------------------------------------------------------------- NaN rewards
def test_nonfinite_rewards_are_counted_logged_and_can_halt(tmp_path):
    model, _ = tiny_lm("llama")
    router = gr.GradientRouter(model, _sub(), envs=["a", "b"])
    mon = gr.DriftMonitor(router, tmp_path, HaltPolicy(max_nonfinite_rewards=2), raise_on_halt=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    stops = []
    for step in range(3):
        router.record_rewards(["a"] * (1 + step) + ["b"], [float("nan")] * (1 + step) + [1.0])
        router.snapshot()
        out = model(input_ids=torch.randint(3, 100, (2, 6)), labels=torch.randint(3, 100, (2, 6)))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        stops.append(mon.observe(router.step(env_ids=["a", "b"], observe=False), step=step + 1))
    recs = [r for r in read_records(tmp_path) if r["type"] == "step"]
    assert recs[0]["nonfinite_rewards"] == {"a": 1} and recs[1]["nonfinite_rewards_total"] == {"a": 3}
    assert stops == [False, True, False]  # 3 > 2 at step 2; the rule stays active after
    assert mon.halt["rule"] == "max_nonfinite_rewards" and mon.halt["env"] == "a"
    assert NonFiniteRewardRule(0).check(step_from_json({"step": 1, "nonfinite_rewards_total": {"x": 1}}), []) is not None


def _none_reward(completions, env, **kw):
    return [None if e == "bang" else float(c.count("a")) for c, e in zip(completions, env)]


@pytest.mark.slow
def test_grpo_none_rewards_are_counted_per_environment(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tok = tiny_lm("llama")
    ds = Dataset.from_dict({"prompt": [f"Q{i}:" for i in range(16)], "env": ["bang", "plain"] * 8})
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=8,
                      num_generations=4, max_completion_length=6, max_steps=2, report_to=[], logging_steps=1,
                      seed=0, disable_tqdm=True, save_strategy="no")
    trainer = GRPOTrainer(model=model, reward_funcs=_none_reward, args=args, train_dataset=ds, processing_class=tok)
    gr.attach(trainer, _sub(), env_column="env", policy=HaltPolicy(max_nonfinite_rewards=1000))
    with pytest.warns(GradrouteWarning, match="NaN/None rewards"):
        trainer.train()
    steps = [r for r in read_records(tmp_path) if r["type"] == "step"]
    total = steps[-1]["nonfinite_rewards_total"]
    assert set(total) == {"bang"} and total["bang"] > 0
    assert "bang" not in (steps[0].get("reward") or {})  # not averaged in as 0.0


# ---------------------------------------------------------------------------------------- attach
def _trainer(out, env=("math", "hack")):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model, _ = tiny_lm("llama")
    ids = torch.randint(3, 100, (16, 8), generator=torch.Generator().manual_seed(0)).tolist()
    envs = [env[i % len(env)] for i in range(16)]
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids, "env": envs})
    args = TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, disable_tqdm=True, save_strategy="no")
    return Trainer(model=model, args=args, train_dataset=ds)


def _attach_twice(t):
    tr = _trainer(t)
    gr.attach(tr, _sub())
    gr.attach(tr, _sub())


ATTACH_CASES = [
    ("attach_twice", _attach_twice, ConfigError, "already attached"),
    ("attach_subspace_bad_path", lambda t: gr.attach(_trainer(t), str(t / "persona.subspace")), FileFormatError,
     "persona.subspace"),
    ("attach_subspace_int", lambda t: gr.attach(_trainer(t), 3), SubspaceError, "Subspace"),
    ("attach_policy_dict", lambda t: gr.attach(_trainer(t), _sub(), policy={"max_adapter_norm": 1.0}), ConfigError,
     "HaltPolicy"),
    ("attach_env_none", lambda t: gr.attach(_trainer(t, env=("math", None)), _sub()), EnvColumnError, "None"),
    ("attach_not_trainer", lambda t: gr.attach(object(), _sub()), ConfigError, "Trainer"),
]


@pytest.mark.parametrize("name,fn,err,match", ATTACH_CASES, ids=[c[0] for c in ATTACH_CASES])
def test_attach_bad_input(tmp_path, name, fn, err, match):
    with pytest.raises(GradrouteError) as e:
        fn(tmp_path)
    assert isinstance(e.value, err) and match in str(e.value), str(e.value)
    _fix(e.value)


def test_attach_loads_a_subspace_path(tmp_path):
    _sub().save(tmp_path / "p.subspace")
    h = gr.attach(_trainer(tmp_path / "run"), str(tmp_path / "p.subspace"))
    assert h.router.subspace == _sub()
    h.detach()
    h2 = gr.attach(h.trainer, _sub())  # after detach, attaching again is fine
    h.trainer.train()
    assert load_log(tmp_path / "run")["step"].tolist() == [1, 2]  # each step once
    h2.detach()


# ----------------------------------------------------------------------------------- checkpoints
def _ckpt_run(out, steps=6, poison_at=None, policy=None, resume=None):
    """A tiny routed Trainer run with checkpoints every 2 steps; ``poison_at``: weights become NaN
    before that step (a NaN loss follows)."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if poison_at is not None and state.global_step == poison_at - 1:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))

    torch.manual_seed(0)
    model, _ = tiny_lm("llama")
    ids = torch.randint(3, 100, (64, 8), generator=torch.Generator().manual_seed(0)).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids, "env": ["math", "hack"] * 32})
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, seed=0,
                             logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[Poison()])
    handle = gr.attach(trainer, _sub(), env_column="env", policy=policy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return handle


@pytest.fixture(scope="module")
def ckpt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    _ckpt_run(out)
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    log = dst / "gradroute.jsonl"  # the log names checkpoints by path: point it at the copy
    log.write_text(log.read_text().replace(str(src), str(dst)))
    return dst


def test_manifest_covers_every_gradroute_file(ckpt_run):
    state = ckpt_run / "checkpoint-4" / "gradroute"
    body = _io.verify_manifest(state)
    files = {p.relative_to(state).as_posix() for p in state.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(body["files"]) == files
    assert {"router.json", "router_state.safetensors", "subspace/subspace.json",
            "subspace/subspace.safetensors"} <= files


def _reverse_envs(state: Path) -> None:
    meta = json.loads((state / "router.json").read_text())
    meta["envs"] = list(reversed(meta["envs"]))
    (state / "router.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


DAMAGE = [
    ("router_json_envs_reversed", _reverse_envs, "router.json"),
    ("router_state_missing", lambda s: (s / "router_state.safetensors").unlink(), "router_state.safetensors"),
    ("subspace_missing", lambda s: (s / "subspace" / "subspace.safetensors").unlink(), "subspace.safetensors"),
    ("manifest_missing", lambda s: (s / "manifest.json").unlink(), "manifest.json"),  # a crash before it
    ("extra_file", lambda s: (s / "notes.txt").write_text("x"), "notes.txt"),
]


@pytest.mark.parametrize("name,damage,named", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_checkpoint_is_refused_naming_the_last_complete_one(ckpt_run, tmp_path, name, damage, named):
    run = _copy(ckpt_run, tmp_path / "run")
    damage(run / "checkpoint-6" / "gradroute")
    with pytest.raises(CheckpointError) as e:
        _io.verify_manifest(run / "checkpoint-6" / "gradroute")
    assert named in str(e.value)
    from gradroute.monitor import last_complete_checkpoint

    assert last_complete_checkpoint(run) == run / "checkpoint-4"
    with pytest.raises(CheckpointError) as e:
        _ckpt_run(run, steps=8, resume=str(run / "checkpoint-6"))
    msg = str(e.value)
    assert named in msg and ("incomplete" in msg or "damaged" in msg or "modified" in msg)
    assert str(run / "checkpoint-4") in msg.split("Fix:", 1)[1]
    assert gr.last_clean_checkpoint(run) == run / "checkpoint-4"  # the damaged one is not "clean"


def test_resume_true_never_resumes_from_a_nonfinite_checkpoint(tmp_path):
    run = tmp_path / "nan"
    h = _ckpt_run(run, steps=8, poison_at=5, policy=HaltPolicy())
    assert h.halted and h.halted["rule"] == "nonfinite_update" and h.halted["step"] == 5
    assert (run / "checkpoint-5").is_dir()  # the halt checkpoint, with NaN weights
    assert gr.last_clean_checkpoint(run) == run / "checkpoint-4"
    with pytest.raises(CheckpointError) as e:
        _ckpt_run(run, steps=8, resume=True)
    msg = str(e.value)
    assert "checkpoint-5" in msg and "NaN" in msg and str(run / "checkpoint-4") in msg.split("Fix:", 1)[1]
    # the clean one resumes
    h2 = _ckpt_run(run, steps=8, resume=str(run / "checkpoint-4"))
    assert h2.router.steps == 8 and math.isfinite(h2.router.adapter_norm().total)


# -------------------------------------------------------------------------------------------- CLI
def _texts_file(tmp: Path, body: bytes) -> Path:
    return _write(tmp / "t.jsonl", body)


def _adapter(tmp: Path, ckpt_run: Path) -> Path:
    from gradroute.cli import main

    out = tmp / "ad"
    assert main(["adapter", "export", str(ckpt_run / "checkpoint-6" / "gradroute"), "--base", "model",
                 "--out", str(out)]) == 0
    return out


CLI_CASES = [
    ("merge_out_existing_file", lambda t, c: ["adapter", "merge", str(_adapter(t, c)), "--out",
                                              str(_write(t / "f.bin", "x"))], "existing file"),
    ("model_missing_dir", lambda t, c: ["subspace", "build", "--model", str(t / "missing"), "--texts",
                                        str(_texts_file(t, b'{"text": "a", "label": 1}\n')), "--out", str(t / "o")],
     "no such file"),
    ("model_not_a_model_dir", lambda t, c: ["subspace", "build", "--model", str(t), "--texts",
                                            str(_texts_file(t, b'{"text": "a", "label": 1}\n')), "--out",
                                            str(t / "o")], "not a model directory"),
    ("report_out_file", lambda t, c: ["report", str(c), "--out", str(_write(t / "r.txt", "x"))], "existing file"),
    ("report_missing_run", lambda t, c: ["report", str(t / "nope")], "not a directory"),
    ("export_out_file", lambda t, c: ["adapter", "export", str(c / "checkpoint-6" / "gradroute"), "--out",
                                      str(_write(t / "e.txt", "x"))], "existing file"),
    ("export_out_existing_dir", lambda t, c: ["adapter", "export", str(c / "checkpoint-6" / "gradroute"), "--out",
                                              str((t / "d").mkdir() or _write(t / "d" / "x", "x").parent)],
     "--force"),
    ("discard_other_architecture", lambda t, c: ["adapter", "discard", str(_adapter(t, c)), "--model", "tiny:gpt2",
                                                 "--out", str(t / "disc")], "does not fit"),
    ("texts_binary", lambda t, c: ["subspace", "build", "--model", "tiny:llama", "--texts",
                                   str(_texts_file(t, b'{"text": "a", "label": 1}\n\xff\xfe\x00\x01\n')),
                                   "--out", str(t / "o")], "UTF-8"),
    ("texts_bare_number", lambda t, c: ["subspace", "build", "--model", "tiny:llama", "--texts",
                                        str(_texts_file(t, b'{"text": "a", "label": 1}\n42\n')), "--out",
                                        str(t / "o")], "not an object"),
    ("pca_k0", lambda t, c: ["subspace", "build", "--model", "tiny:llama", "--method", "pca", "--k", "0", "--texts",
                             str(_texts_file(t, b'{"text": "ab", "label": 1}\n{"text": "cd", "label": 0}\n'
                                             b'{"text": "ef", "label": 1}\n{"text": "gh", "label": 0}\n')),
                             "--out", str(t / "o"), "--layers", "1"], "k must"),
    ("subspace_out_existing", lambda t, c: ["subspace", "import", str((np.save(t / "v.npy", np.ones((1, D))),
                                                                       t / "v.npy")[1]),
                                            "--format", "file", "--layers", "1", "--out",
                                            str(_write(t / "dd.txt", "x").parent)], "--force"),
    ("inspect_missing", lambda t, c: ["subspace", "inspect", str(t / "nope")], "subspace directory"),
    ("unknown_option", lambda t, c: ["subspace", "inspect", "x", "--nope"], "unrecognized"),
]


@pytest.mark.parametrize("name,argv,match", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, ckpt_run, capsys, name, argv, match):
    from gradroute.cli import main

    args = argv(tmp_path, ckpt_run)
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "Fix:" in err and match in err, err


def test_cli_merge_onto_a_file_does_not_claim_success(tmp_path, ckpt_run, capsys):
    from gradroute.cli import main

    target = _write(tmp_path / "model.bin", "keep me")
    assert main(["adapter", "merge", str(_adapter(tmp_path, ckpt_run)), "--out", str(target)]) != 0
    assert "saved to" not in capsys.readouterr().out and target.read_text() == "keep me"


def test_cli_debug_shows_the_traceback(tmp_path):
    from gradroute.cli import main

    with pytest.raises(GradrouteError):
        main(["--debug", "subspace", "inspect", str(tmp_path / "nope")])
    with pytest.raises(GradrouteError):
        main(["subspace", "inspect", str(tmp_path / "nope"), "--debug"])


def test_cli_force_overwrites(tmp_path, ckpt_run):
    from gradroute.cli import main

    out = tmp_path / "ad"
    state = str(ckpt_run / "checkpoint-6" / "gradroute")
    assert main(["adapter", "export", state, "--out", str(out)]) == 0
    assert main(["adapter", "export", state, "--out", str(out)]) == 2
    assert main(["adapter", "export", state, "--out", str(out), "--force"]) == 0


def test_errors_cross_process_boundaries_as_themselves():
    """Worker processes (demo/claims --jobs) send errors to the parent by pickling: a
    GradrouteError comes back as the same class with the same problem and fix, once."""
    import pickle

    from gradroute.errors import ConfigError, DriftHalt

    e = pickle.loads(pickle.dumps(ConfigError("bad x.", "do y.")))
    assert type(e) is ConfigError and e.problem == "bad x." and e.fix == "do y." and str(e).count("Fix:") == 1
    d = pickle.loads(pickle.dumps(DriftHalt({"rule": "max_adapter_norm", "step": 3})))
    assert type(d) is DriftHalt and d.record["step"] == 3 and str(d).count("Fix:") == 1
