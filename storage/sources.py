"""Fetch a job's model (``local``, ``s3://`` or Hub) into a directory the engine can read.

Hub and S3 models land in a cache shared by the jobs of one worker machine,
keyed by repo + resolved commit (or bucket + object ETags), with a size limit
(``model_cache_bytes``) enforced least-recently-used first. Entries appear
atomically (download to a temp dir, then rename) and are guarded by file locks,
so concurrent jobs never see half a model and eviction never removes a model a
job is holding. Tokens never appear in messages or logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from quantfarm.errors import JobError, ModelNotFound, NotAModel, StorageUnavailable, ValidationFailed
from quantfarm.paths import UnsafePath, is_inside, safe_join, safe_relpath
from quantfarm.settings import Settings
from quantfarm.spec import HubSource, LocalSource, ModelSource, S3Source
from quantfarm.store import walk_files

log = logging.getLogger(__name__)

# What a causal LM needs: weights, configs, tokenizer files, chat templates. Root files only
# (see ``_HUB_IGNORE``): subfolders hold other formats (original/, onnx/) we never read.
MODEL_FILES = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_HUB_IGNORE = ["*/*"]


@dataclass(frozen=True)
class FetchedModel:
    path: Path
    source: str
    revision: str | None = None  # resolved Hub commit, or a digest of the S3 listing


def model_cache_dir(settings: Settings) -> Path:
    return settings.resolved_scratch_dir / "model-cache"


def fetch_model(source: Any, secrets: dict[str, str], settings: Settings, scratch: Path, *,
                hold: contextlib.ExitStack | None = None) -> Path:
    """Return a local directory holding the model ``source`` names.

    ``hold``, when given, keeps the cache entry from being evicted until it closes.
    Raises ModelNotFound (no such model/revision/prefix, or no access) and
    StorageUnavailable (the Hub or the S3 endpoint cannot be reached).
    """
    return fetch(source, secrets, settings, scratch, hold=hold).path


def fetch(source: Any, secrets: dict[str, str], settings: Settings, scratch: Path, *,
          hold: contextlib.ExitStack | None = None) -> FetchedModel:
    """Like ``fetch_model``, also returning the resolved revision."""
    if isinstance(source, dict):
        from pydantic import TypeAdapter

        source = TypeAdapter(ModelSource).validate_python(source)
    if isinstance(source, LocalSource):
        return _checked(FetchedModel(_local_folder(source.path, settings), "local"))
    cache = ModelCache(model_cache_dir(settings), settings.model_cache_bytes) if settings.model_cache_bytes > 0 else None
    if isinstance(source, S3Source):
        return _checked(_fetch_s3(source, secrets.get("model.s3"), settings, cache, scratch, hold))
    if isinstance(source, HubSource):
        return _checked(_fetch_hub(source, secrets.get("model.token"), settings, cache, scratch, hold))
    raise ModelNotFound(f"Model source {getattr(source, 'source', source)!r} is not supported yet; use hub, s3 or local.",
                        code="unsupported_source")


def _checked(model: FetchedModel) -> FetchedModel:
    """Refuse a shard index naming files outside the folder: every loader joins those names to it."""
    try:
        weight_map = json.loads((model.path / "model.safetensors.index.json").read_text())["weight_map"]
        names = list(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return model  # no index, or a malformed one the engine reports as not a model
    for name in names:
        try:
            safe_join(model.path, name)
        except (UnsafePath, TypeError):
            raise NotAModel(f"model.safetensors.index.json names shard {name!r}, which is not a file inside the model folder.",
                            details={"file": str(name)}) from None
    return model


def _place(cache: "ModelCache | None", key: str, fill: Callable[[Path], None], scratch: Path,
           hold: contextlib.ExitStack | None) -> Path:
    if cache is None:  # caching off: every job downloads into its own scratch dir
        target = scratch / "model"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        fill(target)
        return target
    return cache.get(key, fill, hold)


# --- local ---------------------------------------------------------------------------------


def check_local_path(path: str, roots: list[Path]) -> Path:
    """Return ``path`` with symlinks resolved if it lies under one of ``roots``; raise ValidationFailed otherwise."""
    if not roots:
        raise ValidationFailed({"model.path": "local model sources are off on this farm: an operator must list the "
                                              "folders jobs may read in QUANTFARM_LOCAL_ROOTS"})
    try:
        real = os.path.realpath(path) if path.startswith("/") else None
    except (OSError, ValueError):  # a NUL in the path
        real = None
    # ``real`` is resolved already: only each root is (is_inside would resolve both, a realpath more per root). Both are
    # normalised absolute paths, so "inside" is the root itself or the root and a separator as a prefix (compared as
    # strings: no Path objects on a submit's path).
    if real is None or not any(_within(real, os.path.realpath(root)) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise ValidationFailed({"model.path": f"must be a folder under one of the local roots ({allowed})"})
    return Path(real)


def _within(real: str, root: str) -> bool:
    """Whether the resolved path ``real`` is the resolved ``root`` or lies under it."""
    return real == root or real.startswith(root if root.endswith("/") else root + "/")


def _local_folder(path: str, settings: Settings) -> Path:
    """Check a ``local`` source again on the worker: under a root, a real folder, no links leaving it."""
    try:
        real = check_local_path(path, settings.local_roots)
    except ValidationFailed as exc:
        raise ModelNotFound(f"Model path {path} is refused on this worker: {exc.fields['model.path']}.") from None
    if not real.is_dir():
        raise ModelNotFound(f"Model path {path}: no such directory on this worker.")
    try:
        entries = list(os.scandir(real))  # the engine reads the folder's top level only
    except OSError as exc:
        raise ModelNotFound(f"Model path {path} cannot be read on this worker ({exc.strerror}).") from None
    for entry in entries:
        if entry.is_symlink() and not is_inside(entry.path, real):
            raise ModelNotFound(f"Model path {path}: {entry.name} is a symlink to a file outside the model folder; "
                                "copy the file into the folder instead.", details={"file": entry.name})
        if not (entry.is_file() or entry.is_dir()):  # a device, FIFO, socket or dangling link
            raise ModelNotFound(f"Model path {path}: {entry.name} is not a regular file or folder; remove it.",
                                details={"file": entry.name})
    return real


# --- S3 -----------------------------------------------------------------------------------


def source_store(settings: Settings, bucket: str, creds: dict[str, str] | None):
    """The store a job's ``s3://`` source is read through: with the job's own keys, else unsigned.

    Never the farm's keys: with them any caller could read whatever bucket the farm can (its own
    artifact bucket, other teams' results included).
    """
    from pydantic import SecretStr

    from storage.s3 import S3Store

    if not creds:
        return S3Store.from_settings(settings, bucket=bucket, prefix="", create_bucket=False, anonymous=True)
    own = settings.model_copy(update={"s3_access_key_id": creds["access_key_id"],
                                      "s3_secret_access_key": SecretStr(creds["secret_access_key"])})
    return S3Store.from_settings(own, bucket=bucket, prefix="", create_bucket=False)


def _fetch_s3(source: S3Source, creds: dict[str, str] | None, settings: Settings, cache, scratch: Path, hold) -> FetchedModel:
    bucket, _, prefix = source.uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    store = source_store(settings, bucket, creds)
    try:
        objects = store.list_objects(prefix)
        if not objects:
            raise ModelNotFound(f"No objects under {source.uri}; check the bucket and prefix.")
        digest = hashlib.sha256(
            "\n".join(f"{o['key']}\0{o['size']}\0{o['etag']}" for o in objects).encode()
        ).hexdigest()[:16]
        names = _object_names(source.uri, objects, len(prefix) + 1 if prefix else 0)

        def fill(tmp: Path) -> None:
            for key, name in names:
                store.get_file(key, safe_join(tmp, name))

        key = _safe(f"s3--{bucket}--{prefix}") + f"--{digest}"
        return FetchedModel(_place(cache, key, fill, scratch, hold), "s3", digest)
    except JobError as exc:
        if exc.code == "storage_error":  # no such bucket, access denied: the model cannot be read
            raise ModelNotFound(f"Cannot read the model at {source.uri}: {exc.message}") from exc
        raise


def _object_names(uri: str, objects: list[dict], strip: int) -> list[tuple[str, str]]:
    """Pair each object key with its path below the model folder; refuse keys that would leave it."""
    out = []
    for o in objects:
        if o["key"].endswith("/") and o["size"] == 0:  # a console's "folder" marker, not a file
            continue
        try:
            out.append((o["key"], safe_relpath(o["key"][strip:])))
        except UnsafePath as exc:
            raise ModelNotFound(
                f"Refusing the model at {uri}: object key {o['key']!r} is not a safe relative file name "
                f"({exc.why}); rename it in the bucket.",
                details={"key": o["key"]},
            ) from None
    return out


# --- the Hub ----------------------------------------------------------------------------------


def hub_endpoint(settings: Settings) -> str:
    from huggingface_hub import constants

    return (settings.hf_endpoint or constants.ENDPOINT).rstrip("/")


def hub_auth(token: str | None) -> str | bool:
    """The ``token`` argument for huggingface_hub and datasets: the job's token, or False, never the worker's own.

    ``None`` would make them fall back to the worker's ``HF_TOKEN`` or cached login, so a job that brings
    no credential could read gated models or push wherever the farm's account may.
    """
    return token if token else False


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str, endpoint: str, has_token: bool) -> Iterator[None]:
    """Turn huggingface_hub failures into ModelNotFound / StorageUnavailable."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    access = "the job's token lacks access to it" if has_token else "no token was given (set model.token)"
    try:
        yield
    except GatedRepoError as exc:
        raise ModelNotFound(f"Hub model {repo_id} is gated and {access}; accept its terms on the Hub with the token's account.") from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFound(f"Hub model {repo_id} has no revision {revision!r}.") from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFound(f"Hub model {repo_id} was not found, or it is private and {access}.") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            raise ModelNotFound(f"Hub model {repo_id}: {access}.") from exc
        raise StorageUnavailable(f"The Hugging Face Hub at {endpoint} answered HTTP {status} for {repo_id}; retry the job later.") from exc
    except (LocalEntryNotFoundError, httpx2.TransportError) as exc:
        raise StorageUnavailable(f"The Hugging Face Hub at {endpoint} is unreachable ({type(exc).__name__}); retry the job later.") from exc


def _fetch_hub(source: HubSource, token: str | None, settings: Settings, cache, scratch: Path, hold) -> FetchedModel:
    from huggingface_hub import HfApi, snapshot_download

    endpoint = hub_endpoint(settings)
    auth = hub_auth(token)
    with _hub_errors(source.repo_id, source.revision, endpoint, token is not None):
        sha = HfApi(endpoint=endpoint, token=auth).model_info(source.repo_id, revision=source.revision, token=auth).sha

    def fill(tmp: Path) -> None:
        with _hub_errors(source.repo_id, source.revision, endpoint, token is not None):
            snapshot_download(
                source.repo_id, revision=sha, local_dir=tmp, token=auth, endpoint=endpoint,
                allow_patterns=MODEL_FILES, ignore_patterns=_HUB_IGNORE, max_workers=4,
            )
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's local-dir bookkeeping
        if not any(tmp.glob("*.safetensors")):
            raise NotAModel(f"Hub model {source.repo_id}@{sha[:12]} has no .safetensors weights at its root.")

    key = _safe(f"hub--{source.repo_id.replace('/', '--')}") + f"--{sha}"
    path = _place(cache, key, fill, scratch, hold)
    log.info("model %s@%s ready at %s", source.repo_id, sha[:12], path)
    return FetchedModel(path, "hub", sha)


# --- the cache ---------------------------------------------------------------------------------


def _safe(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:120]
    return f"{clean}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in walk_files(path) if not p.is_symlink())


class ModelCache:
    """Directories keyed by name under ``root``, evicted LRU beyond ``limit`` bytes.

    Each entry has a lock file ``<key>.lock``: held exclusively while the entry
    is downloaded or evicted, shared while a job uses it. Its mtime is the
    entry's last use.
    """

    def __init__(self, root: Path, limit: int):
        self.root = Path(root)
        self.limit = limit
        self.root.mkdir(parents=True, exist_ok=True)

    def _lock(self, key: str) -> int:
        return os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def get(self, key: str, fill: Callable[[Path], None], hold: contextlib.ExitStack | None = None) -> Path:
        """Return the entry ``key``, calling ``fill(tmp_dir)`` to create it if missing."""
        entry = self.root / key
        fd = self._lock(key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one download per key; others wait and then reuse it
            if not entry.is_dir():
                tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
                tmp.mkdir()
                try:
                    fill(tmp)
                    os.replace(tmp, entry)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                log.info("model cache: added %s", key)
            os.utime(self.root / f"{key}.lock")
            fcntl.flock(fd, fcntl.LOCK_SH)
            self.evict(keep=key)
        except BaseException:
            os.close(fd)
            raise
        if hold is not None:
            hold.callback(os.close, fd)
        else:
            os.close(fd)
        return entry

    def entries(self) -> list[tuple[float, str, int]]:
        """Return ``(last_used, key, bytes)`` for each complete entry, oldest first."""
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and not p.name.startswith(".tmp-"):
                lock = self.root / f"{p.name}.lock"
                used = lock.stat().st_mtime if lock.exists() else 0.0
                out.append((used, p.name, _dir_size(p)))
        return sorted(out)

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least-recently-used entries until the cache fits; return what went."""
        entries = self.entries()
        total = sum(size for _, _, size in entries)
        removed = []
        for _used, key, size in entries:
            if total <= self.limit:
                break
            if key == keep:
                continue
            fd = self._lock(key)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a job is using it (or downloading it)
                os.close(fd)
                continue
            try:
                gone = self.root / f".tmp-evict-{key}-{uuid.uuid4().hex[:8]}"
                os.replace(self.root / key, gone)
                shutil.rmtree(gone, ignore_errors=True)
                total -= size
                removed.append(key)
            finally:
                os.close(fd)
        if removed:
            log.info("model cache: evicted %s to stay under %d bytes", ", ".join(removed), self.limit)
        if total > self.limit:
            log.warning("model cache holds %d bytes, over its %d-byte limit: the rest is in use", total, self.limit)
        return removed
