"""The blob-store interface shared by storage (implementations) and the engine (checkpoints)."""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from quantfarm.paths import safe_join

CHUNK = 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


def walk_files(root: Path) -> Iterator[Path]:
    """Yield every regular file under ``root`` in a stable order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


class BlobStore(ABC):
    """Keys are '/'-separated relative paths. Missing keys raise KeyError."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def get_file(self, key: str, dest: Path) -> None: ...

    @abstractmethod
    def open(self, key: str) -> BinaryIO: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def uri(self, key: str) -> str: ...

    def presigned_url(self, key: str, expires: int = 3600) -> str | None:
        """Return a URL a client can download from directly, or None if unsupported."""
        return None

    def prepare(self) -> None:
        """Make the store ready at process start-up (create the farm's bucket); default: nothing."""

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def upload_dir(self, prefix: str, root: Path) -> list[FileEntry]:
        """Upload every file under ``root`` to ``prefix/`` and return their entries."""
        entries = []
        for path in walk_files(root):
            rel = path.relative_to(root).as_posix()
            self.put_file(f"{prefix.rstrip('/')}/{rel}", path)
            entries.append(FileEntry(rel, path.stat().st_size, sha256_file(path)))
        return entries

    def download_prefix(self, prefix: str, dest: Path) -> list[Path]:
        """Download every key under ``prefix/`` into ``dest`` keeping relative paths."""
        prefix = prefix.rstrip("/") + "/"
        out = []
        for key in self.list(prefix):
            target = safe_join(dest, key[len(prefix):])  # a listed key never writes outside dest
            self.get_file(key, target)
            out.append(target)
        return out


class PrefixedStore(BlobStore):
    """A view of another store under a fixed key prefix."""

    def __init__(self, inner: BlobStore, prefix: str):
        self.inner = inner
        self.prefix = prefix.strip("/")

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key.lstrip('/')}"

    def put_file(self, key, path):
        self.inner.put_file(self._k(key), path)

    def put_bytes(self, key, data):
        self.inner.put_bytes(self._k(key), data)

    def get_bytes(self, key):
        return self.inner.get_bytes(self._k(key))

    def get_file(self, key, dest):
        self.inner.get_file(self._k(key), dest)

    def open(self, key):
        return self.inner.open(self._k(key))

    def exists(self, key):
        return self.inner.exists(self._k(key))

    def size(self, key):
        return self.inner.size(self._k(key))

    def list(self, prefix):
        n = len(self.prefix) + 1
        return [k[n:] for k in self.inner.list(self._k(prefix))]

    def delete(self, key):
        self.inner.delete(self._k(key))

    def uri(self, key):
        return self.inner.uri(self._k(key))

    def presigned_url(self, key, expires=3600):
        return self.inner.presigned_url(self._k(key), expires)
