"""Hugging Face transformers: loading a model and tokenizer by hub name or local path.

Model introspection (blocks, residual hooks, writers and readers, activation collection) is
torch-only and lives in :mod:`gradroute.model`; its names are re-exported here for scripts
written against earlier versions.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

from ..model import (  # noqa: F401  (re-exported)
    ActivationSet,
    add_residual_hook,
    block_hidden,
    block_io_modules,
    collect_activations,
    decoder_layers,
    decoder_layers_path,
    model_device,
    model_hidden_size,
    model_name,
    num_layers,
    replace_hidden,
    residual_hooks,
    unwrap_model,
)


@contextlib.contextmanager
def library_bars_off() -> Iterator[None]:
    """transformers' and datasets' progress bars (weight loading, shard writing, dataset
    preparation) off, and transformers' log level saved, while the block runs; all restored on
    exit, so that importing code keeps its settings. Callers add their own warning filters."""
    import datasets
    import transformers

    tf_log = transformers.utils.logging
    verbosity, bars = tf_log.get_verbosity(), tf_log.is_progress_bar_enabled()
    ds_bars = datasets.utils.logging.is_progress_bar_enabled()
    tf_log.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        tf_log.set_verbosity(verbosity)
        if bars:
            tf_log.enable_progress_bar()
        if ds_bars:
            datasets.enable_progress_bars()


def load_model_and_tokenizer(name_or_path: str, dtype: torch.dtype | str | None = None, device: str | None = None):
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a hub name or a local path.

    ``tiny:<arch>`` (``tiny:llama``, ``tiny:gpt2``, ...) builds gradroute's deterministic tiny
    test model and character tokenizer locally (see :mod:`gradroute.testing`). The tokenizer
    gets a pad token (its EOS) if it has none. A name that cannot load (a missing path, a hub
    name with the hub unreachable and no cached copy) is a :class:`~gradroute.errors.ConfigError`
    before any download starts (see :func:`check_model_source`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path.startswith("tiny:"):
        from ..testing import tiny_lm

        model, tok = tiny_lm(name_or_path.split(":", 1)[1])
        if dtype is not None:
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return (model.to(device) if device else model), tok

    source = check_model_source(name_or_path)
    kw: dict[str, Any] = dict(source)
    if dtype is not None:
        kw["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kw)
    tok = AutoTokenizer.from_pretrained(name_or_path, **source)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if device is not None:
        model.to(device)
    return model, tok


HUB_CHECK_TIMEOUT = 3.0  # seconds for the one request that tells whether the hub can be reached

_LOCAL_FIX = ("pass an existing model directory (written by save_pretrained, with config.json), a hub name "
              "(org/model), or tiny:<arch> (gradroute's tiny test models).")
_HUB_FIX = ("use a local directory saved with save_pretrained, tiny:<arch> (gradroute's tiny test models), "
            "or set HF_HUB_OFFLINE=1 with a model already in the Hugging Face cache.")


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub name (``org/model``)."""
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1 or "\\" in name


def check_model_source(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """Check, before anything is downloaded, that ``name_or_path`` can load; returns the extra
    ``from_pretrained`` keyword arguments (``local_files_only=True`` when the hub cannot be
    reached but the model is in the Hugging Face cache).

    A local path must exist and hold ``config.json``; a hub name must be a valid repo id and
    either cached or on a reachable hub (one request with a short timeout, once per process;
    with ``HF_HUB_OFFLINE`` set, only the cache counts). Anything else is a
    :class:`~gradroute.errors.ConfigError` at once, instead of minutes of download retries.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p.is_dir() and (p / "config.json").is_file()):
            raise ConfigError(f"model {name_or_path} is not a model directory (no config.json in it).", _LOCAL_FIX)
        return {}
    if looks_like_path(name_or_path):
        raise ConfigError(f"model {name_or_path}: no such file or directory.", _LOCAL_FIX)
    try:
        validate_repo_id(name_or_path)
    except HFValidationError as e:
        raise ConfigError(f"model {name_or_path!r} is neither a local directory nor a valid hub name ({e}).",
                          _LOCAL_FIX) from None
    cached = isinstance(try_to_load_from_cache(name_or_path, "config.json", revision=revision), str)
    if getattr(constants, "HF_HUB_OFFLINE", False):
        if cached:
            return {}
        raise ConfigError(f"model {name_or_path} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set.",
                          "use a local directory saved with save_pretrained or tiny:<arch>, or download the model "
                          "once with network access (HF_HUB_OFFLINE unset).")
    if _hub_reachable(constants.ENDPOINT, HUB_CHECK_TIMEOUT):
        return {}
    if cached:
        return {"local_files_only": True}
    raise ConfigError(f"model {name_or_path} is not a local directory, not in the local Hugging Face cache, and "
                      f"the hub ({constants.ENDPOINT}) cannot be reached (no network?).", _HUB_FIX)


_REACHABLE: set[str] = set()  # endpoints that answered (asked once per process)


def _hub_reachable(endpoint: str, timeout: float) -> bool:
    """One HEAD request to ``endpoint`` with huggingface_hub's HTTP client (its proxies and
    certificates), no retries; any HTTP answer means reachable. Run in a thread so that a
    hanging DNS lookup cannot hold it past ``timeout``."""
    from huggingface_hub.utils import get_session

    if endpoint in _REACHABLE:
        return True
    answered: list[bool] = []

    def probe() -> None:
        try:
            get_session().head(endpoint, timeout=timeout)
            answered.append(True)
        except Exception:  # any transport failure: not reachable
            answered.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1)
    if answered and answered[0]:
        _REACHABLE.add(endpoint)
        return True
    return False
