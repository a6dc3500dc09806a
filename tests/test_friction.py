"""A new user's first hour (issue 23): the recipe's console and summary, fast failures for model
names that cannot load, one-line errors, where reports go, messages cut between words."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from gradroute.cli import main as cli
from gradroute.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "grpo_routed.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("grpo_routed", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["grpo_routed"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _args(out, sub, *extra):
    return ["--config", "recipes/configs/grpo_tiny.yaml", "--output_dir", str(out), "--gradroute_subspace", str(sub),
            *extra]


# ------------------------------------------------------------------------------ recipe console
def test_a_halt_is_said_on_the_console_and_the_summary_is_typed_json(tmp_path, monkeypatch, capsys, tiny_subspace):
    """Adapter norms of the tiny run are 0.063, 0.089, ...: a 0.07 limit halts at step 2."""
    import gradroute as gr

    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    summary = _recipe().main(_args(out, tiny_subspace, "--max_steps", "4", "--save_steps", "1",
                                   "--gradroute_policy", "max_adapter_norm=0.07"))
    text = (out / "summary.json").read_text()
    assert json.loads(text) == summary
    assert '"True"' not in text and '"None"' not in text and '"False"' not in text
    assert summary["routed"] is True and summary["peft"] is False
    assert summary["resumed_from"] is None and summary["rotated_to"] is None
    halt, clean = summary["halt"], gr.last_clean_checkpoint(out)
    assert halt["rule"] == "max_adapter_norm" and halt["step"] == summary["steps"] == 2
    assert clean is not None and summary["last_clean_checkpoint"] == clean.name  # relative to the run directory
    assert halt["checkpoint"] == f"checkpoint-{halt['step']}" and summary["adapter"] == "persona_adapter"
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("gradroute: ")]
    assert said[0] == (f"gradroute: halted at step 2: rule max_adapter_norm, value {halt['value']:.4g} > "
                       "threshold 0.07.")
    assert said[1].startswith("gradroute: top environments: ")
    assert f"last clean checkpoint: {clean}" in said[2] and f"--resume_from_checkpoint {clean}" in said[2]


def test_halt_message_names_environment_layer_and_a_missing_clean_checkpoint():
    halt = {"rule": "activation_z", "value": 9.123, "threshold": 6.0, "step": 8, "top_envs": [["hack", 9.12]],
            "detail": "environment 'hack', layer 3", "env": "hack"}
    msg = _recipe().halt_message(halt, Path("runs/x/checkpoint-6"))
    assert msg.splitlines()[0] == ("gradroute: halted at step 8: rule activation_z (environment 'hack', layer 3), "
                                   "value 9.123 > threshold 6.")
    assert "top environments: hack 9.12." in msg and "--resume_from_checkpoint runs/x/checkpoint-6" in msg
    assert "no clean checkpoint (none was saved before step 8)" in _recipe().halt_message(halt, None)


def test_summary_values_are_typed(tmp_path):
    typed = _recipe().typed
    got = typed({"a": tmp_path / "run" / "checkpoint-3", "b": tmp_path / "elsewhere", "nan": float("nan"),
                 "flag": True, "none": None, "pairs": [("x", 0.5)]}, tmp_path / "run")
    assert got == {"a": "checkpoint-3", "b": str((tmp_path / "elsewhere").resolve()), "nan": None, "flag": True,
                   "none": None, "pairs": [["x", 0.5]]}
    json.dumps(got, allow_nan=False)


def test_the_recipe_leaves_out_library_noise_but_keeps_its_progress_bar(tmp_path, monkeypatch, capfd, saved_tiny_lm,
                                                                        tiny_subspace):
    """Loading a saved model (weight-loading bar), saving (shard bars), TRL's deprecated
    gradient-checkpointing calls (FutureWarnings): none of it reaches the console."""
    import transformers

    monkeypatch.chdir(ROOT)
    before = transformers.logging.get_verbosity()
    # a user's default level (other tests, e.g. recipes run in-process, may leave it at ERROR, which
    # makes TrainingArguments turn the progress bar off)
    transformers.logging.set_verbosity_warning()
    verbosity = transformers.logging.get_verbosity()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _recipe().main(_args(tmp_path / "run", tiny_subspace, "--model_name_or_path", str(saved_tiny_lm),
                                 "--max_steps", "2"))
    finally:
        after = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity(before)
    noisy = [w for w in caught if issubclass(w.category, FutureWarning | DeprecationWarning)]
    assert not noisy, [str(w.message) for w in noisy]
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err and "Generating train split" not in err
    assert "2/2" in err  # the training progress bar stays
    assert after == verbosity  # restored for whoever imported the recipe


def test_the_tiny_config_uses_no_deprecated_names():
    from trl import GRPOConfig, ModelConfig, TrlParser

    recipe = _recipe()
    parser = TrlParser((recipe.GRPOScriptArguments, GRPOConfig, ModelConfig, recipe.GradrouteArguments))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, args, _, _ = parser.parse_args_and_config(["--config", str(ROOT / "recipes/configs/grpo_tiny.yaml")])
    assert args.activation_checkpointing is False
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def _script(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(RECIPE), *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("case", ["missing_config", "non_empty_output_dir"])
def test_recipe_errors_are_one_line(tmp_path, case):
    if case == "missing_config":
        r, match = _script("--config", str(tmp_path / "nope.yaml")), "no such file"
    else:
        (tmp_path / "old").mkdir()
        (tmp_path / "old" / "gradroute.jsonl").write_text("{}\n")
        r, match = _script("--config", "recipes/configs/grpo_tiny.yaml", "--output_dir", str(tmp_path / "old")), \
            "not empty"
    err = r.stderr.strip()
    assert r.returncode == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("grpo_routed.py: error: ") and "Fix:" in err, err
    assert match in err


def test_resume_last_without_a_checkpoint_is_a_typed_error(tmp_path):
    recipe = _recipe()
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        recipe.resume_checkpoint(str(tmp_path), True)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        recipe.resume_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-9"))
    (tmp_path / "checkpoint-3").mkdir()
    assert recipe.resume_checkpoint(str(tmp_path), True) == tmp_path / "checkpoint-3"


# ------------------------------------------------------------------------ model names, no network
@pytest.fixture
def no_retries(monkeypatch, tmp_path):
    """An empty Hugging Face cache; any sleep (huggingface_hub's retry loop waits between tries)
    or any from_pretrained call fails the test."""
    import time

    import transformers
    from huggingface_hub import constants

    from gradroute.integrations import transformers as gr_tf

    def boom(*a, **kw):
        raise AssertionError("a download or retry was attempted")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(time, "sleep", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    monkeypatch.setattr(gr_tf, "_REACHABLE", set())
    return gr_tf


def _closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there: connections are refused at once


def test_an_unreachable_hub_name_fails_at_once(no_retries, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", _closed_port_endpoint())
    with pytest.raises(ConfigError) as e:
        no_retries.load_model_and_tokenizer("some-org/not-a-model")
    assert "cannot be reached" in e.value.problem and "some-org/not-a-model" in e.value.problem
    assert "HF_HUB_OFFLINE=1" in e.value.fix and "save_pretrained" in e.value.fix and "tiny:" in e.value.fix


def test_local_paths_and_bad_names_fail_without_touching_the_network(no_retries, monkeypatch, tmp_path):
    def no_network(*a):
        raise AssertionError("the hub was asked about a local path")

    monkeypatch.setattr(no_retries, "_hub_reachable", no_network)
    for name, match in [("./missing", "no such file"), (str(tmp_path / "missing"), "no such file"),
                        ("a/b/c", "no such file"), ("bad..name", "valid hub name"),
                        (str(tmp_path), "not a model directory")]:
        with pytest.raises(ConfigError, match=match):
            no_retries.load_model_and_tokenizer(name)


def test_offline_mode_and_the_cache_are_honoured(no_retries, monkeypatch, tmp_path):
    from huggingface_hub import constants

    snapshot = tmp_path / "hf-cache" / "models--some-org--cached" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc")
    monkeypatch.setattr(no_retries, "_hub_reachable", lambda *a: False)
    assert no_retries.check_model_source("some-org/cached") == {"local_files_only": True}  # unreachable: the cache
    monkeypatch.setattr(no_retries, "_hub_reachable", lambda *a: True)
    assert no_retries.check_model_source("some-org/cached") == {}  # reachable: as usual (updates, revisions)

    def no_network(*a):
        raise AssertionError("the hub was asked in offline mode")

    monkeypatch.setattr(no_retries, "_hub_reachable", no_network)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert no_retries.check_model_source("some-org/cached") == {}
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        no_retries.check_model_source("some-org/not-cached")


def test_the_cli_says_an_unreachable_hub_in_one_line(no_retries, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(no_retries, "_hub_reachable", lambda *a: False)
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert cli(["subspace", "build", "--model", "some-org/not-a-model", "--texts", str(texts),
                "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be reached" in err and "HF_HUB_OFFLINE=1" in err


# ------------------------------------------------------------------------------------ CLI
def test_report_goes_into_the_run_by_default(tmp_path, monkeypatch, capsys):
    from gradroute.monitor import RunLog

    run = tmp_path / "runs" / "demo"
    log = RunLog(run / "gradroute.jsonl")
    log.write({"type": "header", "mode": "update", "subspace_hash": "abc"})
    for n in (1, 2, 3):
        log.write({"type": "step", "step": n, "adapter_norm": 0.1 * n, "update_norm": 0.1,
                   "adapter_norm_per_layer": {"2": 0.1 * n}, "env_adapter_share": {"a": 0.6, "b": 0.4},
                   "env_adapter_norm": {"a": 0.06 * n, "b": 0.04 * n}})
    log.close()
    monkeypatch.chdir(tmp_path)
    assert cli(["report", str(run)]) == 0
    assert (run / "report" / "report.md").is_file()
    assert not list(tmp_path.glob("*-report"))  # nothing in the working directory


def test_report_help_says_the_default():
    from gradroute.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["report"]
    assert "RUN_DIR/report" in sub.format_help()


def test_messages_are_cut_between_words(tmp_path, capsys, tiny_subspace):
    from gradroute.cli._common import short
    from gradroute.testing import save_tiny_lm

    words = " ".join(f"word{i}" for i in range(200))
    cut = short(words, 100)
    assert cut.endswith(" ...") and cut[:-4] in words and words[len(cut) - 4] == " "
    sentence = "A sentence that is long enough to be kept whole."
    assert short(" ".join([sentence] * 10), 120) == f"{sentence} {sentence} ..."  # cut after a sentence
    # PEFT's size-mismatch message: its first mismatch is said whole
    import gradroute as gr
    from gradroute.integrations.transformers import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("tiny:llama")
    gr.GradientRouter(model, gr.Subspace.load(tiny_subspace)).save_adapter(tmp_path / "ad")
    wide = save_tiny_lm(tmp_path / "wide", "llama", hidden_size=32)
    capsys.readouterr()
    assert cli(["adapter", "discard", str(tmp_path / "ad"), "--model", str(wide), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "size mismatch" in err and "the shape in current model is torch.Size(" in err, err
