"""The reversible patch registry: every attribute gradroute replaces on a trainer, undone by
:meth:`gradroute.Handle.detach`.

A patch sets an instance attribute (``trainer.<name> = new``) and remembers what the
instance's ``__dict__`` held before (or that it held nothing, in which case the class
attribute shows through again after the undo). Patches are undone in reverse order, so
wrappers stacked on the same name unwind to the original.
"""

from __future__ import annotations

from typing import Any

UNDO_KEY = "_gradroute_undo"  # the list of (name, original) kept in the trainer's __dict__
MISSING = object()  # the name was not in the instance's __dict__ (a class attribute, or nothing)


def patch(trainer: Any, name: str, new: Any) -> None:
    """Replace ``trainer.<name>``, remembering the original so :func:`undo` can restore it."""
    log = trainer.__dict__.setdefault(UNDO_KEY, [])
    log.append((name, trainer.__dict__.get(name, MISSING)))
    setattr(trainer, name, new)


def undo(trainer: Any) -> None:
    """Restore every attribute :func:`patch` replaced on ``trainer``, newest first."""
    for name, original in reversed(trainer.__dict__.pop(UNDO_KEY, [])):
        if original is MISSING:
            trainer.__dict__.pop(name, None)
        else:
            setattr(trainer, name, original)


_patch = patch  # the name trl.py used
