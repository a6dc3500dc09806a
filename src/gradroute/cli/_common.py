"""Checks shared by the CLI commands: model paths, output paths, typed errors from frameworks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError, FileFormatError


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


def short(text: Any, limit: int = 300) -> str:
    """``text`` on one line, cut to about ``limit`` characters at a sentence end or between words
    (never mid-word), with " ..." when something was cut."""
    text = one_line(text)
    if len(text) <= limit:
        return text
    head = text[: limit + 1]
    end = head.rfind(". ")
    if end >= limit // 2:
        return head[: end + 1] + " ..."
    return head.rsplit(" ", 1)[0].rstrip(",;:") + " ..."


def load_model(name_or_path: str, option: str = "--model", tokenizer: bool = True) -> tuple[Any, Any]:
    """Model (and tokenizer, None when the directory has none) from ``tiny:<arch>``, a local
    model directory or a hub name; every failure is a :class:`ConfigError` naming ``option``."""
    from ..integrations.transformers import check_model_source, load_model_and_tokenizer, looks_like_path

    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ConfigError(f"{option} is empty.", f"pass {option} with a model directory or hub name.")
    if not name_or_path.startswith("tiny:"):
        p = Path(name_or_path).expanduser()
        if looks_like_path(name_or_path) and not p.exists():
            raise ConfigError(f"{option} {name_or_path}: no such file or directory.",
                              f"pass {option} with an existing model directory (one with config.json) or a hub name.")
        if p.exists() and not (p.is_dir() and (p / "config.json").is_file()):
            raise ConfigError(f"{option} {name_or_path} is not a model directory (no config.json in it).",
                              f"pass {option} with a directory written by save_pretrained, or a hub name.")
    try:
        return load_model_and_tokenizer(name_or_path)
    except (OSError, ValueError, KeyError) as e:
        if not tokenizer or name_or_path.startswith("tiny:"):
            raise _model_error(option, name_or_path, e) from None
        try:  # a model directory without tokenizer files
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(name_or_path, **check_model_source(name_or_path)), None
        except (OSError, ValueError, KeyError) as e2:
            raise _model_error(option, name_or_path, e2) from None


def _model_error(option: str, name: str, e: Exception) -> ConfigError:
    first = short(str(e).strip().splitlines()[0], 200) if str(e).strip() else type(e).__name__
    return ConfigError(f"{option} {name} could not be loaded as a causal LM ({type(e).__name__}: {first}).",
                       f"pass {option} with a local model directory (config.json + weights) or, with network "
                       "access, a hub name; gradroute's tiny test models are tiny:llama, tiny:gpt2, ...")


def check_out_dir(out: str, force: bool = False, *, allow_existing: bool = False) -> Path:
    """Refuse an ``--out`` that is a file, or a non-empty directory unless ``force`` (or
    ``allow_existing``, for outputs that are meant to be regenerated in place)."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise FileFormatError(f"--out {out} is an existing file; a directory is written there.",
                              "pass --out with a new directory (or remove the file).")
    if p.is_dir() and any(p.iterdir()) and not (force or allow_existing):
        raise FileFormatError(f"--out {out} already exists and is not empty; writing would overwrite it.",
                              "pass --out with a new directory, or add --force to overwrite.")
    if p.parent != p and p.parent.exists() and not p.parent.is_dir():
        raise FileFormatError(f"--out {out}: {p.parent} is a file, not a directory.", "choose another path.")
    return p


def check_saved(out: Path, what: str = "config.json") -> None:
    """Fail if a save that reported no error wrote nothing (transformers only logs some failures)."""
    if not (out / what).is_file():
        raise FileFormatError(f"nothing was written to {out} ({what} is missing).",
                              "check that --out is a writable directory path and try again.")
