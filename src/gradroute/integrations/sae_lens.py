"""sae-lens: SAE decoder rows as residual-stream directions.

``W_dec`` is ``[d_sae, d_in]``; row i is latent i's write direction (not guaranteed unit norm).
The residual layer comes from ``cfg.metadata.hook_name`` via
:func:`gradroute.layers.layer_from_hook_name`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import FileFormatError, SAEError
from ..layers import layer_from_hook_name


def load_sae(source: Any, device: str = "cpu") -> Any:
    """An sae-lens SAE from an object (returned as is) or a folder saved with ``save_model``."""
    if not isinstance(source, str | Path):
        if not hasattr(source, "W_dec"):
            raise SAEError(
                f"{type(source).__name__} is not an SAE (it has no W_dec).",
                "pass an sae_lens SAE or the folder it was saved to.",
            )
        return source
    path = Path(source)
    if not (path / "cfg.json").is_file():
        raise FileFormatError(
            f"{path} is not a saved SAE folder (no cfg.json).",
            "pass the folder written by SAE.save_model(), or load the SAE with "
            "sae_lens.SAE.from_pretrained(release, sae_id) and pass the object.",
        )
    from sae_lens import SAE

    try:
        return SAE.load_from_disk(str(path), device=device)
    except Exception as e:  # sae-lens raises assorted errors for bad folders
        raise FileFormatError(f"could not load the SAE in {path} ({type(e).__name__}: {e}).") from e


def _meta_get(meta: Any, key: str) -> Any:
    if meta is None:
        return None
    if isinstance(meta, dict):
        return meta.get(key)
    getter = getattr(meta, "get", None)
    if callable(getter):
        try:
            return getter(key)
        except Exception:
            pass
    return getattr(meta, key, None)


def sae_directions(source: Any, latents: Sequence[int], layer: int | None = None) -> dict[str, Any]:
    """Raw decoder rows for ``latents`` plus where they live (layer, hook, sizes, provenance)."""
    sae = load_sae(source)
    W = sae.W_dec.detach().to("cpu", torch.float32)
    d_sae, d_in = W.shape
    latents = [int(i) for i in latents]
    if not latents:
        raise SAEError("no latents given.", "pass latents=[i, ...] (indices of SAE features).")
    bad = [i for i in latents if not (0 <= i < d_sae)]
    if bad:
        raise SAEError(
            f"latent ids {bad} are out of range: the SAE has {d_sae} latents (0..{d_sae - 1}).",
            "check the latent indices (e.g. on Neuronpedia) for this exact SAE.",
        )
    cfg = getattr(sae, "cfg", None)
    meta = getattr(cfg, "metadata", None)
    hook_name = _meta_get(meta, "hook_name") or getattr(cfg, "hook_name", None)
    if layer is None:
        if hook_name is None:
            raise SAEError("the SAE config names no hook, so its layer is unknown.", "pass layer=L.")
        layer = layer_from_hook_name(hook_name)
    arch = cfg.architecture() if callable(getattr(cfg, "architecture", None)) else None
    return {
        "directions": W[latents],
        "layer": int(layer),
        "hook_name": hook_name,
        "d_in": d_in,
        "d_sae": d_sae,
        "latents": latents,
        "path": str(source) if isinstance(source, str | Path) else None,
        "release": _meta_get(meta, "release"),
        "sae_id": _meta_get(meta, "sae_id"),
        "model_name": _meta_get(meta, "model_name"),
        "architecture": arch,
    }
