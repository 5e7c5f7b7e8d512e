"""Publish a finished artifact to a Hugging Face Hub repo.

Before anything leaves the worker, the output is checked: ``config.json`` must
carry ``quantization_config`` (a checkpoint pushed without it loads as garbage,
GPTQModel issue #1211) and the card must carry the Hub metadata. Then the repo
is created (private by default) if missing, the branch too, and the files go
up in resumable pieces: commits of at most ``hub_commit_bytes`` (weight shards
first, the card and config last, so the branch looks complete only when it is).
A failure half-way (a server error, a dropped connection) is retried with
backoff, and every try, like a retried job, first reads the branch's tree and
sends only the files whose bytes are not there yet: what already landed, even
by a commit whose answer was lost, is never sent again.
"""

from __future__ import annotations

import json
import logging
import os
import hashlib
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from quantfarm.errors import PublishError, StorageUnavailable
from quantfarm.settings import Settings
from quantfarm.spec import HubDestination
from quantfarm.store import walk_files

log = logging.getLogger(__name__)

T = TypeVar("T")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_FRONT = re.compile(r"\A---\n(.*?)\n---\n", re.S)


def expected_bits(qconfig: dict[str, Any]) -> int | None:
    if qconfig.get("load_in_4bit"):
        return 4
    if qconfig.get("load_in_8bit"):
        return 8
    return qconfig.get("bits")


def check_quantization_config(out_dir: Path) -> dict[str, Any]:
    """Return ``config.json``'s ``quantization_config``; raise PublishError if it is missing.

    A GGUF artifact carries its quantization inside the ``.gguf`` file and has no config.json.
    """
    path = out_dir / "config.json"
    if not path.exists() and any(out_dir.glob("*.gguf")):
        return {"quant_method": "gguf"}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PublishError(f"Refusing to publish: {path.name} is missing or unreadable ({type(exc).__name__}).") from None
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or not qc.get("quant_method"):
        raise PublishError(
            "Refusing to publish: config.json has no quantization_config, so loaders would read the packed "
            "weights as plain ones (GPTQModel issue #1211). Re-export the artifact."
        )
    return qc


def card_metadata(readme: str) -> dict[str, Any]:
    """Return the YAML header of a model card ({} if there is none)."""
    m = _FRONT.match(readme)
    if not m:
        return {}
    meta = yaml.safe_load(m.group(1))
    return meta if isinstance(meta, dict) else {}


def check_card(out_dir: Path, qconfig: dict[str, Any]) -> dict[str, Any]:
    """Return the card's metadata; raise PublishError if a Hub field is missing.

    Required: ``library_name``, ``pipeline_tag``, and ``tags`` naming the
    method and the bit width (``4-bit``).
    """
    path = out_dir / "README.md"
    if not path.is_file():
        raise PublishError("Refusing to publish: the artifact has no model card (README.md).")
    meta = card_metadata(path.read_text(encoding="utf-8"))
    tags = [str(t) for t in meta.get("tags") or []]
    missing = [k for k in ("library_name", "pipeline_tag") if not meta.get(k)]
    if qconfig["quant_method"] not in tags:
        missing.append(f"tags: {qconfig['quant_method']}")
    bits = expected_bits(qconfig)
    if bits and f"{bits}-bit" not in tags:
        missing.append(f"tags: {bits}-bit")
    if missing:
        raise PublishError(f"Refusing to publish: the model card lacks Hub metadata ({', '.join(missing)}).")
    return meta


def _hub_card(readme: str) -> str | None:
    """Return the card with a ``base_model`` the Hub would reject removed, or None if it is fine.

    The Hub refuses a commit whose ``base_model`` is not a Hub model id, and
    local or s3:// sources have none.
    """
    meta = card_metadata(readme)
    base = meta.get("base_model")
    if base is None or all(_REPO_ID.match(str(b)) for b in ([base] if isinstance(base, str) else base)):
        return None
    m = _FRONT.match(readme)
    header = "\n".join(line for line in m.group(1).split("\n") if not line.startswith("base_model:"))
    return f"---\n{header}\n---\n" + readme[m.end():]


def _stage(out_dir: Path, card: str, staging: Path) -> Path:
    # Hard links: a second view of the artifact with only README.md replaced, no bytes copied.
    for src in walk_files(out_dir):
        dest = staging / src.relative_to(out_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dest)
        except OSError:
            shutil.copy2(src, dest)
    (staging / "README.md").unlink()
    (staging / "README.md").write_text(card, encoding="utf-8")
    return staging


def _transient(exc: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        return status >= 500 or status == 429
    return isinstance(exc, httpx2.TransportError)


def _with_retries(what: str, call: Callable[[], T], *, attempts: int, backoff: float, endpoint: str) -> T:
    """Run ``call``, retrying transient Hub failures; map the rest to farm errors."""
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            if _transient(exc) and attempt < attempts:
                delay = random.uniform(0, backoff * 2 ** (attempt - 1))
                log.warning("hub %s failed (%s); retry %d/%d in %.1fs", what, type(exc).__name__, attempt, attempts - 1, delay)
                time.sleep(delay)
                continue
            if _transient(exc):
                raise StorageUnavailable(
                    f"The Hugging Face Hub at {endpoint} kept failing during {what} ({_why(exc)}) after {attempts} attempts; retry the job later."
                ) from exc
            if isinstance(exc, HfHubHTTPError):
                status = exc.response.status_code if exc.response is not None else 0
                if status in (401, 403):
                    raise PublishError(f"Hub {what} was refused (HTTP {status}): the destination token lacks write access.") from exc
                raise PublishError(f"Hub {what} failed (HTTP {status}): {_server_message(exc)}") from exc
            if isinstance(exc, ValueError):  # huggingface_hub's invalid-metadata and bad-argument errors
                raise PublishError(f"Hub {what} failed: {str(exc)[:500]}") from exc
            raise
    raise AssertionError("unreachable")


def _why(exc: BaseException) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"HTTP {status}" if status else type(exc).__name__


def _server_message(exc) -> str:
    msg = getattr(exc, "server_message", None) or str(exc).splitlines()[0]
    return str(msg)[:300]


def publish_to_hub(
    out_dir: Path, dest: HubDestination, token: str | None, job_id: str, settings: Settings, *,
    attempts: int = 4, backoff: float = 2.0,
) -> tuple[str, str]:
    """Upload ``out_dir`` to ``dest``; return the repo URL and the commit sha.

    Raises PublishError when the artifact is not fit to publish (nothing is
    uploaded then), when the token lacks write access, or when an existing repo
    is public but ``dest.private`` asks for a private one; StorageUnavailable
    when the Hub keeps failing after the retries.
    """
    from huggingface_hub import HfApi

    from storage.sources import hub_auth, hub_endpoint

    out_dir = Path(out_dir)
    qconfig = check_quantization_config(out_dir)
    check_card(out_dir, qconfig)
    endpoint = hub_endpoint(settings)
    api = HfApi(endpoint=endpoint, token=hub_auth(token))
    retry = dict(attempts=attempts, backoff=backoff, endpoint=endpoint)

    _with_retries("create_repo", lambda: api.create_repo(dest.repo_id, private=dest.private, exist_ok=True), **retry)
    info = _with_retries("repo_info", lambda: api.model_info(dest.repo_id), **retry)
    if dest.private and not info.private:
        raise PublishError(f"Hub repo {dest.repo_id} already exists and is public; refusing to push a private result into it.")
    if dest.branch:
        _with_retries("create_branch", lambda: api.create_branch(dest.repo_id, branch=dest.branch, exist_ok=True), **retry)

    bits = expected_bits(qconfig)
    message = f"Quantfarm job {job_id}: {qconfig['quant_method']}" + (f" {bits}-bit" if bits else "")
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".hub-") as tmp:
        card = _hub_card((out_dir / "README.md").read_text(encoding="utf-8"))
        folder = _stage(out_dir, card, Path(tmp)) if card is not None else out_dir
        pieces = _pieces(folder, settings.hub_commit_bytes)
        sha = _with_retries("upload", lambda: _push_missing(api, dest, folder, pieces, message, job_id), **retry)
    url = f"{endpoint}/{dest.repo_id}" + (f"/tree/{dest.branch}" if dest.branch else "")
    log.info("job %s: published to %s at commit %s", job_id, url, sha)
    return url, sha


_WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def _pieces(folder: Path, limit: int) -> list[list[str]]:
    """The folder's files in commit order, grouped into pieces of at most ``limit`` bytes (a bigger file alone).

    Weights first, then the rest (tokenizer, index), ``config.json`` and the card last: the last
    piece is the one that makes the branch loadable.
    """
    last = {"config.json": 2, "README.md": 3}
    files = sorted((p.relative_to(folder).as_posix() for p in walk_files(folder)),
                   key=lambda f: (0 if f.endswith(_WEIGHTS) else last.get(f, 1), f))
    pieces: list[list[str]] = []
    size = 0
    for f in files:
        n = (folder / f).stat().st_size
        if not pieces or size + n > limit:
            pieces.append([])
            size = 0
        pieces[-1].append(f)
        size += n
    return pieces


def _landed(folder: Path, path: str, remote) -> bool:
    """Whether the branch already holds ``path`` with the local bytes (LFS by sha256, regular by git blob id)."""
    if remote is None or remote.size != (folder / path).stat().st_size:
        return False
    if remote.lfs is not None:
        digest = hashlib.sha256()
        with open(folder / path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest() == remote.lfs.sha256
    digest = hashlib.sha1(b"blob %d\0" % remote.size)
    with open(folder / path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == remote.blob_id


def _push_missing(api, dest: HubDestination, folder: Path, pieces: list[list[str]], message: str, job_id: str) -> str:
    """Commit each piece's files the branch lacks (one commit per piece); return the branch's head."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.hf_api import RepoFile

    tree = {e.path: e for e in api.list_repo_tree(dest.repo_id, revision=dest.branch, recursive=True) if isinstance(e, RepoFile)}
    head = None
    for i, piece in enumerate(pieces, 1):
        missing = [f for f in piece if not _landed(folder, f, tree.get(f))]
        if len(missing) < len(piece):
            log.info("job %s: %d of piece %d's %d files already on the Hub; not sent again", job_id, len(piece) - len(missing), i, len(piece))
        if not missing:
            continue
        title = message if i == len(pieces) else f"{message} (part {i} of {len(pieces)})"
        commit = api.create_commit(
            dest.repo_id, operations=[CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in missing],
            commit_message=title, commit_description=f"Uploaded by Quantfarm for job {job_id}.", revision=dest.branch,
        )
        head = commit.oid
    if head is None:  # everything was there already (a republish, or a retry after the last commit landed)
        head = api.model_info(dest.repo_id, revision=dest.branch).sha
    return head
