"""Caller-controlled names turned into paths, checked the way PEP 706's ``data`` tar filter checks members.

A store key, an S3 object key below a model prefix, a shard name from an index
file: each is a ``/``-separated relative name. It may not be empty, start with
``/``, hold an empty segment (``a//b``), a ``.`` or ``..`` segment, a backslash
or a NUL, and once joined to its folder and resolved (symlinks followed) it
must still lie inside that folder.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafePath(ValueError):
    """A name that would leave its folder, or is not a plain relative name."""

    def __init__(self, name: str, why: str):
        super().__init__(f"{name!r} {why}")
        self.name = name
        self.why = why


def safe_relpath(name: str) -> str:
    """Return ``name`` if it is a clean relative ``/``-separated name; raise UnsafePath otherwise."""
    if not isinstance(name, str):
        raise UnsafePath(repr(name), "is not a string")
    if not name:
        raise UnsafePath(name, "is empty")
    if "\x00" in name or "\\" in name:
        raise UnsafePath(name, "holds a NUL or a backslash")
    if name.startswith("/"):
        raise UnsafePath(name, "is absolute")
    for part in name.split("/"):
        if part == "":
            raise UnsafePath(name, "has an empty segment")
        if part in (".", ".."):
            raise UnsafePath(name, f"has a {part!r} segment")
    return name


def safe_join(root: Path | str, name: str) -> Path:
    """Return ``root / name`` after checking ``name`` and that the resolved result stays inside ``root``."""
    base = Path(root).resolve()
    target = base / safe_relpath(name)
    if not target.resolve().is_relative_to(base):
        raise UnsafePath(name, "resolves outside its folder")
    return target


def is_regular_file(path: Path) -> bool:
    """Return whether ``path`` itself (not what a symlink names) is a regular file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def is_inside(path: Path | str, root: Path | str) -> bool:
    """Return whether ``path``, symlinks resolved, is ``root`` or lies below it."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def copy_regular_file(src: Path, dest: Path) -> bool:
    """Copy ``src`` to ``dest`` only if ``src`` is a regular file, never following a symlink.

    Returns False (and writes nothing) for a symlink, a device, a FIFO, a
    socket, a directory or a missing file. The check and the read use one
    file descriptor, so the file cannot be swapped for a link in between.
    """
    if not is_regular_file(src):  # never even open a device or a FIFO
        return False
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # ELOOP for a symlink, ENOENT, ENXIO for a FIFO without a writer...
        return False
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        with open(dest, "wb") as out:
            while block := f.read(1024 * 1024):
                out.write(block)
    return True
