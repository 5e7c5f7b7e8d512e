"""Artifact stores behind the one ``BlobStore`` interface."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from quantfarm.errors import BadRequest, QuantfarmError, StorageUnavailable
from quantfarm.paths import UnsafePath, safe_join
from quantfarm.settings import Settings
from quantfarm.store import BlobStore

log = logging.getLogger(__name__)


def _inside(root: Path, key: str) -> Path:
    try:
        return safe_join(root, key)
    except UnsafePath as exc:
        raise BadRequest(f"Invalid artifact path {key!r}: it {exc.why}.", code="invalid_path") from None


class LocalStore(BlobStore):
    """A directory on a filesystem every process of the farm can reach."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return _inside(self.root, key)

    def _atomic_write(self, key: str, writer) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: Path) -> None:
        def write(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, 1024 * 1024)

        self._atomic_write(key, write)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def get_file(self, key: str, dest: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise KeyError(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise KeyError(key) from None

    def list(self, prefix: str) -> list[str]:
        base = _inside(self.root, prefix.strip("/")) if prefix.strip("/") else self.root
        if base.is_file():
            return [prefix.strip("/")]
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                keys.append((Path(dirpath) / name).relative_to(self.root).as_posix())
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()


class StoreNotReady(RuntimeError):
    """The artifact store could not be made ready at start-up; the message says why."""


def make_store(settings: Settings, *, prepare: bool = True) -> BlobStore:
    """Build the artifact store the settings name and, by default, make it ready (see ``prepare_store``)."""
    if settings.store == "s3":
        from storage.s3 import S3Store

        store: BlobStore = S3Store.from_settings(settings)
    else:
        store = LocalStore(settings.resolved_artifact_dir)
    if prepare:
        prepare_store(store, settings.store_startup_wait_seconds)
    return store


def prepare_store(store: BlobStore, wait_seconds: float, *, sleep=time.sleep) -> None:
    """Make ``store`` ready before any job touches it, or raise ``StoreNotReady`` saying why.

    An unreachable endpoint (still starting, say) is retried with backoff for
    ``wait_seconds``; a refusal (bad credentials, no right to create the bucket)
    fails at once.
    """
    deadline = time.monotonic() + wait_seconds
    delay = 0.25
    while True:
        try:
            store.prepare()
            return
        except StorageUnavailable as exc:
            if time.monotonic() + delay > deadline:
                raise StoreNotReady(f"The artifact store is not reachable after {wait_seconds:g}s: {exc.message}") from exc
            log.warning("artifact store not reachable yet (%s); retrying in %.2fs", exc.message, delay)
            sleep(delay)
            delay = min(delay * 2, 5.0)
        except QuantfarmError as exc:
            raise StoreNotReady(f"The artifact store cannot be used: {exc.message}") from exc
