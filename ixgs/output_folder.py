"""The one policy for every folder ixgs writes: scans, reconstructions, the demo, R2-Gaussian scenes,
standardization pairs, outputs kept by the Slicer module.

* An existing folder is replaced only when it is provably an earlier output of ours: it holds
  :data:`MARKER`, which only this module writes (JSON: format, kind, ixgs version, the exact list of
  files written), of the same kind, and nothing but those files. An empty folder may be replaced
  too (nothing is lost). Anything else is refused, naming the folder and some of its foreign files.
* Never the input, nor a folder that contains it (symlinks resolved), nor a symbolic link.
* The new output is written into a hidden sibling (``.NAME.ixgs-partial-XXXX``), completed by its
  marker, then swapped in: the old output is renamed aside (``.NAME.ixgs-old-XXXX``), the new one
  renamed in, the old one deleted. A crash at any moment leaves one complete output: at worst under
  the aside name, and the next run to the same output renames it back.
* A lock file next to the output (``.NAME.ixgs-lock``: pid, host, start time; created exclusively)
  refuses a second concurrent run; it is stale once its pid is dead (same host). Under that lock,
  hidden siblings left by a killed run are provably ours and swept.

:func:`reserve` checks all of it (and that the parent folder can be written) before any work, with
messages naming the path the caller was given, never a hidden temporary one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

from . import __version__
from .errors import InputError

MARKER = ".ixgs-output"
FORMAT = "ixgs.output"
_PARTIAL = "ixgs-partial-"
_ASIDE = "ixgs-old-"
_OWNER = ".ixgs-partial"  # inside a partial folder: the run that writes it
_NAMED = 3  # foreign files named in a refusal

_held: dict[str, int] = {}  # lock file -> nesting depth in this process (reserve is reentrant)


class OutputError(InputError):
    """An output path that must not, or cannot, be written; the message names it."""


def check_output(path: str | os.PathLike, kind: str, inputs: Iterable = ()) -> Path:
    """Refuse (:class:`OutputError`) unless ``path`` may receive a new output of ``kind``.

    ``inputs`` are the paths the run reads (``None`` entries are ignored). Returns the absolute
    output path (parent folder resolved, last name kept). Changes nothing on disk.
    """
    shown = str(path)
    absolute = Path(os.path.abspath(path))
    if absolute.name == "":
        raise OutputError(f"{shown}: cannot be an output folder")
    target = absolute.parent.resolve() / absolute.name
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if source == target or target in source.parents:
            what = "is" if source == target else "contains"
            raise OutputError(f"{shown}: {what} the input {given}; refusing to replace it (choose another output)")
    if target.is_symlink():
        raise OutputError(f"{shown}: is a symbolic link; refusing to replace it")
    if not os.path.lexists(target):
        return target
    if not target.is_dir():
        raise OutputError(f"{shown}: exists and is not a folder; refusing to replace it")
    entries = sorted(os.listdir(target))
    if not entries:
        return target
    record = _read_marker(target)
    if record is None:
        raise OutputError(f"{shown}: exists and is not an ixgs output (no {MARKER} marker; it holds "
                          f"{_some(entries)}); refusing to replace it")
    if record["kind"] != kind:
        raise OutputError(f"{shown}: is an ixgs {record['kind']} output, not a {kind} output; refusing to replace it")
    foreign = _foreign_files(target, record)
    if foreign:
        raise OutputError(f"{shown}: holds files ixgs did not write ({_some(foreign)}); refusing to replace it")
    return target


@contextlib.contextmanager
def reserve(path: str | os.PathLike, kind: str, inputs: Iterable = ()) -> Iterator[Path]:
    """Check ``path`` (:func:`check_output`), create missing parent folders and hold the output's
    lock until the block ends; first sweeps what a killed run to the same output left behind.

    Reentrant in one process, so a command can reserve its output before long work and the writer
    it finally calls reserves it again. Yields the absolute output path.
    """
    inputs = list(inputs)
    target = check_output(path, kind, inputs)
    lock = target.parent / f".{target.name}.ixgs-lock"
    key = str(lock)
    if key in _held:
        _held[key] += 1
        try:
            yield target
        finally:
            _held[key] -= 1
        return
    created = _make_parents(target.parent, path)
    try:
        handle = _acquire(lock, path)
    except BaseException:
        _remove_empty(created)
        raise
    _held[key] = 1
    try:
        _sweep(target)
        check_output(path, kind, inputs)  # again: the sweep may have restored an interrupted swap
        yield target
    finally:
        del _held[key]
        os.close(handle)
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)
        _remove_empty(created)


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, kind: str, inputs: Iterable = ()) -> Iterator[Path]:
    """Yield an empty hidden folder to write an output of ``kind`` into; when the block succeeds it
    replaces ``path`` (marker written last), on any exception or interrupt it is deleted.

    Everything :func:`reserve` checks is checked before the block runs.
    """
    inputs = list(inputs)
    with reserve(path, kind, inputs) as target:
        temporary = None
        try:
            temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_PARTIAL}", dir=target.parent))
            (temporary / _OWNER).write_text(json.dumps(_owner()))
            yield temporary
            os.remove(temporary / _OWNER)
            _write_marker(temporary, kind)
            check_output(path, kind, inputs)  # nothing was put there meanwhile
            _swap_in(temporary, target)
        except BaseException:
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)
            raise


def is_output(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a complete ixgs output: a valid marker and only the files it lists."""
    record = _read_marker(Path(folder))
    return record is not None and not _foreign_files(Path(folder), record)


def _read_marker(folder: Path) -> dict | None:
    marker = folder / MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(record, dict) and record.get("format") == FORMAT and isinstance(record.get("kind"), str)
            and isinstance(record.get("files"), list) and all(isinstance(f, str) for f in record["files"])):
        return None
    return record


def _foreign_files(folder: Path, record: dict) -> list[str]:
    """Entries under ``folder`` that the marker does not list (links and special files always are);
    stops once there are more than can be named."""
    listed = set(record["files"]) | {MARKER}
    foreign = []
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs) + sorted(files):
            full = os.path.join(root, name)
            relative = Path(full).relative_to(folder).as_posix()
            regular = os.path.isdir(full) if name in dirs else os.path.isfile(full)
            if os.path.islink(full) or not regular or (name in files and relative not in listed):
                foreign.append(relative)
        if len(foreign) > _NAMED:
            break
    return foreign


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMED])
    return shown + (f" and {len(names) - _NAMED} more" if len(names) > _NAMED else "")


def _write_marker(folder: Path, kind: str) -> None:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    record = {"format": FORMAT, "kind": kind, "ixgs_version": __version__,
              "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    (folder / MARKER).write_text(json.dumps(record, indent=1))


def _swap_in(temporary: Path, target: Path) -> None:
    """Old output aside, new one in, old one deleted; an interrupt before the new one is in puts
    the old one back."""
    aside = target.parent / f".{target.name}.{_ASIDE}{secrets.token_hex(4)}"
    try:
        if os.path.lexists(target):
            os.rename(target, aside)
        os.rename(temporary, target)
    except BaseException:
        if not os.path.lexists(target) and os.path.lexists(aside):
            os.rename(aside, target)
        raise
    if os.path.lexists(aside):
        try:
            shutil.rmtree(aside)
        except BaseException:
            shutil.rmtree(aside, ignore_errors=True)
            raise


def _sweep(target: Path) -> None:
    """Under the output's lock no other run writes it: remove our hidden siblings a killed run left
    (and rename an output left aside by an interrupted swap back into place)."""
    pattern = re.compile(re.escape(f".{target.name}.") + f"({_PARTIAL}|{_ASIDE})" + r"[A-Za-z0-9_]+")
    found = [(match.group(1), Path(entry.path)) for entry in os.scandir(target.parent)
             if (match := pattern.fullmatch(entry.name)) and entry.is_dir(follow_symlinks=False)]
    for role, folder in sorted(found, key=lambda item: item[0] != _ASIDE):  # asides first
        empty = not any(folder.iterdir())
        if role == _ASIDE and (empty or is_output(folder)):
            if not os.path.lexists(target):
                os.rename(folder, target)
            else:
                shutil.rmtree(folder)
        elif role == _PARTIAL and (empty or (folder / _OWNER).is_file()):
            shutil.rmtree(folder)


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _acquire(lock: Path, shown) -> int:
    """Create the lock file exclusively (an open descriptor, kept until release)."""
    for _ in range(3):
        try:
            handle = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if _break_stale(lock):
                continue
            owner = _read_owner(lock)
            who = f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}" if owner else "unknown"
            raise OutputError(f"{shown}: another ixgs run is writing it ({who}); wait for it to finish, "
                              f"or delete {lock} if no ixgs run is active") from None
        except OSError as error:
            raise OutputError(f"{shown}: cannot write in its folder {lock.parent} ({error.strerror})") from None
        os.write(handle, json.dumps(_owner()).encode())
        return handle
    raise OutputError(f"{shown}: its lock {lock} keeps changing; is another ixgs run starting?")


def _read_owner(lock: Path) -> dict | None:
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _break_stale(lock: Path) -> bool:
    """Remove a lock whose run is gone; True if it was removed."""
    if os.name == "nt":  # a live run holds its lock open, and Windows refuses to delete an open file
        try:
            os.remove(lock)
        except OSError:
            return False
        return True
    owner = _read_owner(lock)
    if owner is None or owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
        return False
    except ProcessLookupError:
        pass
    except PermissionError:  # alive, another user's
        return False
    if _read_owner(lock) != owner:  # replaced meanwhile by a live run
        return False
    with contextlib.suppress(FileNotFoundError):
        os.remove(lock)
    return True


def _make_parents(parent: Path, shown) -> list[Path]:
    """Create the missing folders above the output (mkdir -p); returns those created."""
    missing = []
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{shown}: cannot be created, {parent} is not a folder")
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except OSError as error:
            _remove_empty(created)
            raise OutputError(f"{shown}: cannot create the folder {folder} ({error.strerror})") from None
        created.append(folder)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return
