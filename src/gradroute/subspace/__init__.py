"""Persona subspaces: the :class:`Subspace` value type and the ways to build one.

- :mod:`.core`: :class:`Subspace` (per-layer orthonormal bases, raw directions, names,
  provenance; its algebra and :meth:`Subspace.from_directions`, the constructor that
  orthonormalizes);
- :mod:`.provenance`: :class:`Provenance`;
- :mod:`.importers`: ``from_axes``, ``from_probe``, ``from_sae``, ``from_persona_vectors``,
  ``from_assistant_axis``, ``from_file`` as plain functions (the classmethods of the same
  names call them);
- :mod:`.io`: the file format (``save``, ``load``).

Importing this package loads no framework: the importers import transformers / sae-lens on
call.
"""

from __future__ import annotations

import inspect as _inspect

from ..errors import DegenerateDirectionsError
from . import importers as _importers
from .core import Subspace
from .io import FORMAT_VERSION, META_FILE, TENSOR_FILE
from .provenance import Provenance


def _give_delegators_their_signatures() -> None:
    """``help(Subspace.from_probe)`` and editors show :func:`importers.from_probe`'s parameters,
    although the classmethod forwards ``*args, **kwargs`` (one signature, in the function)."""
    for name in _importers.__all__:
        func = getattr(_importers, name)
        sig = _inspect.signature(func)
        cls_param = _inspect.Parameter("cls", _inspect.Parameter.POSITIONAL_OR_KEYWORD)
        getattr(Subspace, name).__func__.__signature__ = sig.replace(parameters=[cls_param, *sig.parameters.values()])


_give_delegators_their_signatures()

__all__ = ["FORMAT_VERSION", "META_FILE", "TENSOR_FILE", "DegenerateDirectionsError", "Provenance", "Subspace"]
