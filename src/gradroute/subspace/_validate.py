"""Input checks shared by the :class:`~gradroute.subspace.Subspace` value type and its importers:
direction arrays, layer keys (and their ``L<int>``/``M<name>`` spelling in files), integers."""

from __future__ import annotations

import operator
from typing import Any

import torch

from ..errors import DegenerateDirectionsError, FileFormatError, SubspaceError, UnknownLayerError
from ..layers import LayerKey

_F32_MAX = float(torch.finfo(torch.float32).max)


def _as_tensor(x: Any, what: str = "directions") -> torch.Tensor:
    """A real, finite-in-float32 numeric tensor (on CPU) from a tensor or array-like; anything
    else raises :class:`SubspaceError` / :class:`DegenerateDirectionsError`."""
    if torch.is_tensor(x):
        T = x.detach().to("cpu")
    else:
        import numpy as np

        if x is None or isinstance(x, str | bytes | dict | set):
            raise SubspaceError(f"{what} must be a tensor or an array of numbers, got {type(x).__name__} {x!r:.60}.",
                                "pass a torch tensor, numpy array or nested list of floats, (k x d) or (d,).")
        try:
            arr = np.asarray(x)
            if arr.dtype == object or arr.dtype.kind not in "biufc":
                raise TypeError(f"dtype {arr.dtype}")
            T = torch.from_numpy(arr)
        except (TypeError, ValueError) as e:
            raise SubspaceError(f"{what} must be numbers, got {type(x).__name__} that numpy reads as {e}.",
                                "pass a torch tensor, numpy array or nested list of floats, (k x d) or (d,).") from None
    if T.is_complex():
        raise SubspaceError(f"{what} are complex ({T.dtype}); directions in the residual stream are real.",
                            "pass the real part explicitly (tensor.real) if that is what you mean.")
    if T.dtype == torch.bool or not (T.is_floating_point() or T.dtype in (torch.int8, torch.int16, torch.int32,
                                                                          torch.int64, torch.uint8)):
        raise SubspaceError(f"{what} have dtype {T.dtype}, not a number type.", "pass float values.")
    if T.is_floating_point() and T.numel() and T.dtype == torch.float64:
        finite = torch.isfinite(T)
        if bool(finite.all()) and float(T.abs().max()) > _F32_MAX:
            raise DegenerateDirectionsError(
                f"{what} hold values up to {float(T.abs().max()):.3g}, beyond float32's range ({_F32_MAX:.3g}): "
                "they would become inf.",
                "rescale the directions (only their span matters), e.g. divide each row by its norm.")
    return T


def _key_str(key: LayerKey) -> str:
    return f"L{key}" if isinstance(key, int) else f"M{key}"


def _key_from_str(s: Any) -> LayerKey:
    if isinstance(s, str) and s.startswith("L") and s[1:].lstrip("-").isdigit():
        return int(s[1:])
    if isinstance(s, str) and s.startswith("M") and len(s) > 1:
        return s[1:]
    raise FileFormatError(f"bad layer key {s!r} in subspace file.",
                          "re-create the subspace with Subspace.save (keys are 'L<int>' or 'M<module name>').")


def _check_key(key: Any) -> LayerKey:
    if isinstance(key, bool) or not isinstance(key, int | str):
        raise UnknownLayerError(
            f"layer key {key!r} must be an int (residual layer) or a str (module/hook name).",
            "use integer layers (L = output of block L) or module names as keys.",
        )
    if isinstance(key, int) and key < -1:
        raise UnknownLayerError(
            f"layer {key} is negative; only -1 (the embeddings) is allowed below 0.",
            "layers count block outputs from 0 (see gradroute.layers).",
        )
    return key


def _int_layer(L: Any) -> int:
    j = _index(L)
    if j is None and isinstance(L, str) and L.strip().lstrip("-").isdigit():
        j = int(L)
    if j is None:
        raise UnknownLayerError(f"layer {L!r} is not a layer number.", "pass integer layers (L = output of block L).")
    return j


def _index(x: Any) -> int | None:
    """``x`` as an int if it is an integer (Python, numpy or 0-d torch), else None."""
    if isinstance(x, bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None
