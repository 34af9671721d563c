"""Bad input or a bug in ixgs: how the command line tells them apart (exit status 2 or 1).

Bad input is what the user can fix: :class:`InputError` (and its subclasses ``ScanError``,
``OutputError``), an ``OSError`` (a path that cannot be read or written), and a ``ValueError`` that
ixgs raised itself, with a ``raise`` statement in its own code (every validator names the file,
view, field or option). A ``ValueError`` raised inside numpy, torch, scipy or the standard library
while ixgs was computing is not a refusal but a bug, as is any other exception.
"""
from __future__ import annotations

import traceback
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


class InputError(ValueError):
    """Input that cannot be used (a file, view, field, option or output path); the message names it."""


def is_bad_input(error: BaseException) -> bool:
    """Whether ``error`` is the user's to fix (exit 2) rather than a bug in ixgs (exit 1)."""
    if isinstance(error, (InputError, OSError)):
        return True
    if not isinstance(error, ValueError) or error.__traceback__ is None:
        return False
    frame = traceback.extract_tb(error.__traceback__)[-1]
    try:
        ours = Path(frame.filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        return False
    return ours and (frame.line or "").lstrip().startswith("raise")
