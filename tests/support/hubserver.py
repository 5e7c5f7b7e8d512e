"""A stand-in for the Hugging Face Hub's HTTP API, for tests only.

The real Hub is unreachable from this machine, so the tests point the real
``huggingface_hub`` client (``HF_ENDPOINT`` / ``settings.hf_endpoint``) at this
threaded ``http.server``. It implements just the endpoints that
``snapshot_download``, ``create_repo``, ``create_branch``, ``repo_info`` and
``upload_folder`` call, keeps repos, branches and commits in memory, and
records every upload so tests can assert the files and the card. To play a
connection that breaks half-way, it can drop the connection of the commit that
comes once N files have landed (before applying it, or after: the commit lands
but its answer is lost), and it keeps every file path it received, in order.

Simplifications, on purpose: every file is committed inline (the preupload
answer is always ``regular``), where the real Hub would ask for LFS/Xet
transfers of large binaries, whose storage protocol (Xet CAS) is far outside a
stand-in; commit ids are SHA-1s of the commit content, not git objects. Tokens
are checked against a table (write access, readable repos), and ``README.md``
metadata is validated like the Hub does for ``base_model`` (a Hub model id).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_API_VERBS = {"revision", "tree", "refs", "preupload", "commit", "branch"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, bytes]
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    private: bool
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def commit(self, branch: str, message: str, files: dict[str, bytes], deleted: set[str] = frozenset()) -> Commit:
        parent = self.branches.get(branch)
        base = dict(self.commits[parent].files) if parent else {}
        base.update(files)
        for path in deleted:
            base.pop(path, None)
        digest = hashlib.sha1(json.dumps([parent, message, sorted((p, git_blob_sha1(b)) for p, b in base.items())]).encode())
        c = Commit(digest.hexdigest(), message, base, parent)
        self.commits[c.sha] = c
        self.branches[branch] = c.sha
        return c

    def resolve(self, rev: str) -> Commit | None:
        sha = self.branches.get(rev, rev)
        return self.commits.get(sha)


@dataclass
class Upload:
    repo_id: str
    branch: str
    message: str
    files: dict[str, bytes]
    commit: str


class HubServer:
    """The stand-in Hub; use as a context manager and point ``endpoint`` at it."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        # token -> {"write": bool, "read": set of repo ids it may read even if private/gated}
        self.tokens: dict[str, dict] = {}
        self.uploads: list[Upload] = []
        self.created: list[dict] = []  # create_repo payloads
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, bearer token)
        self._faults: list[tuple[str, int]] = []
        self.received: list[str] = []  # every file path a landed commit carried, in order (repeats show re-sends)
        self.dropped = 0
        self._drop: tuple[int, bool, int] | None = None  # (after this many files, land first, times left)
        self._lock = threading.RLock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "HubServer":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- test helpers -------------------------------------------------------------------

    def add_token(self, token: str, *, write: bool = True, read: set[str] | None = None) -> None:
        self.tokens[token] = {"write": write, "read": set(read or ())}

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False, gated: bool = False,
                 branch: str = "main") -> str:
        """Create a repo holding ``files``; return the commit sha."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id, private, gated))
            return repo.commit(branch, "initial", files).sha

    def fail_next(self, path_part: str, n: int = 1, status: int = 500) -> None:
        """Answer the next ``n`` requests whose path contains ``path_part`` with ``status``."""
        with self._lock:
            self._faults.extend([(path_part, status)] * n)

    def drop_after_files(self, n: int, *, landed: bool = False, times: int = 1) -> None:
        """Drop the connection of the next ``times`` commits that come once ``n`` files have landed, unanswered.

        ``landed``: apply the commit first (its files land, the client never hears so).
        """
        with self._lock:
            self._drop = (n, landed, times)

    def _take_drop(self) -> bool | None:
        """None: answer this commit; else drop it, applying it first when True."""
        with self._lock:
            if self._drop is None or len(self.received) < self._drop[0]:
                return None
            n, landed, times = self._drop
            self._drop = (n, landed, times - 1) if times > 1 else None
            self.dropped += 1
            return landed

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].resolve(rev).files)

    # --- request handling ---------------------------------------------------------------------

    def _take_fault(self, path: str) -> int | None:
        with self._lock:
            for i, (part, status) in enumerate(self._faults):
                if part in path:
                    del self._faults[i]
                    return status
        return None

    def _can_read(self, repo: Repo, token: str | None) -> bool:
        if not repo.private and not repo.gated:
            return True
        t = self.tokens.get(token or "")
        return bool(t and (repo.repo_id in t["read"] or (repo.private and not repo.gated and t["write"])))

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            # -- plumbing
            def _send(self, status, body=b"", headers=None, content_type="application/json"):
                if isinstance(body, (dict, list)):
                    body = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, status, code=None, message="error"):
                headers = {"X-Error-Message": message}
                if code:
                    headers["X-Error-Code"] = code
                self._send(status, {"error": message}, headers)

            def _body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def _token(self) -> str | None:
                auth = self.headers.get("authorization") or ""
                return auth[7:] if auth.lower().startswith("bearer ") else None

            def _dispatch(self):
                url = urlsplit(self.path)
                parts = [unquote(p) for p in url.path.split("/") if p]
                token = self._token()
                body = self._body() if self.command in ("POST", "PUT") else b""
                with hub._lock:
                    hub.requests.append((self.command, url.path, token))
                fault = hub._take_fault(url.path)
                if fault:
                    return self._error(fault, message="injected failure")
                with hub._lock:
                    if parts[:2] == ["api", "repos"] and parts[2:] == ["create"]:
                        return self._create(json.loads(body or b"{}"), token)
                    if parts[:2] == ["api", "validate-yaml"]:
                        return self._validate_yaml(json.loads(body or b"{}"))
                    if parts[:2] == ["api", "models"]:
                        return self._api(parts[2:], parse_qs(url.query), token, body)
                    if "resolve" in parts:
                        i = parts.index("resolve")
                        return self._resolve("/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2:]), token)
                return self._error(404, message="no such endpoint in the stand-in")

            do_GET = do_POST = do_HEAD = do_PUT = _dispatch

            # -- endpoints
            def _repo(self, repo_id, token, write=False) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None or not hub._can_read(repo, token):
                    if repo is not None and repo.gated and token:
                        self._error(403, "GatedRepo", "Access to this gated repo is restricted")
                    else:
                        self._error(401 if not token else 404, "RepoNotFound", "Repository not found")
                    return None
                if write and not (hub.tokens.get(token or "") or {}).get("write"):
                    self._error(403, None, "You don't have the rights to write to this repo")
                    return None
                return repo

            def _create(self, payload, token):
                if not (hub.tokens.get(token or "") or {}).get("write"):
                    return self._error(401, None, "Invalid credentials in Authorization header")
                repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
                hub.created.append(payload)
                url = f"{hub.endpoint}/{repo_id}"
                if repo_id in hub.repos:
                    return self._send(409, {"error": "You already created this model repo", "url": url})
                private = payload.get("visibility") == "private" or bool(payload.get("private"))
                hub.repos[repo_id] = repo = Repo(repo_id, private)
                repo.commit("main", "initial commit", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
                return self._send(200, {"url": url, "name": repo_id, "id": repo_id})

            def _validate_yaml(self, payload):
                text = payload.get("content", "")
                m = re.match(r"^---\n(.*?)\n---", text, re.S)
                errors = []
                if m:
                    import yaml

                    meta = yaml.safe_load(m.group(1)) or {}
                    bases = meta.get("base_model") or []
                    for b in [bases] if isinstance(bases, str) else bases:
                        if not _REPO_ID.match(str(b)):
                            errors.append({"message": f'"base_model" with value "{b}" is not valid. Use a model id from https://hf.co/models.'})
                return self._send(400 if errors else 200, {"errors": errors, "warnings": []})

            def _api(self, parts, query, token, body):
                if len(parts) >= 2 and parts[1] not in _API_VERBS:
                    repo_id, rest = "/".join(parts[:2]), parts[2:]
                else:
                    repo_id, rest = parts[0], parts[1:]
                verb = rest[0] if rest else "revision"
                repo = self._repo(repo_id, token, write=verb in ("preupload", "commit", "branch"))
                if repo is None:
                    return
                rev = rest[1] if len(rest) > 1 else "main"
                if verb == "refs":
                    return self._send(200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()],
                                            "converts": [], "tags": []})
                if verb == "branch":
                    if rev in repo.branches:
                        return self._error(409, None, "Reference already exists")
                    start = json.loads(body or b"{}").get("startingPoint") or "main"
                    repo.branches[rev] = repo.resolve(start).sha
                    return self._send(200, {})
                commit = repo.resolve(rev)
                if commit is None and verb != "commit":
                    return self._error(404, "RevisionNotFound", "Invalid rev id")
                if verb == "revision":
                    return self._send(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.sha, "private": repo.private,
                                            "gated": repo.gated, "siblings": [{"rfilename": p} for p in sorted(commit.files)]})
                if verb == "tree":
                    return self._send(200, [{"type": "file", "oid": git_blob_sha1(b), "size": len(b), "path": p}
                                            for p, b in sorted(commit.files.items())])
                if verb == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                         "oid": git_blob_sha1(commit.files[f["path"]]) if f["path"] in commit.files else None}
                        for f in files]})
                if verb == "commit":
                    return self._commit(repo, rev, body)
                return self._error(404, message="no such endpoint in the stand-in")

            def _commit(self, repo: Repo, branch: str, body: bytes):
                if branch not in repo.branches:
                    return self._error(404, "RevisionNotFound", "Invalid rev id")
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(x["value"] for x in lines if x["key"] == "header")
                files, deleted = {}, set()
                for item in lines:
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        deleted.add(item["value"]["path"])
                    elif item["key"] == "lfsFile":
                        return self._error(400, None, "the stand-in only takes inline files")
                drop = hub._take_drop()
                if drop is not None:
                    if drop:
                        self._land(repo, branch, header, files, deleted)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return None
                c = self._land(repo, branch, header, files, deleted)
                return self._send(200, {"commitUrl": f"{hub.endpoint}/{repo.repo_id}/commit/{c.sha}", "commitOid": c.sha,
                                        "success": True, "pullRequestUrl": None})

            def _land(self, repo: Repo, branch: str, header: dict, files: dict[str, bytes], deleted: set[str]) -> Commit:
                c = repo.commit(branch, header["summary"], files, deleted)
                hub.uploads.append(Upload(repo.repo_id, branch, header["summary"], files, c.sha))
                hub.received.extend(files)
                return c

            def _resolve(self, repo_id, rev, path, token):
                repo = self._repo(repo_id, token)
                if repo is None:
                    return
                commit = repo.resolve(rev)
                if commit is None:
                    return self._error(404, "RevisionNotFound", "Invalid rev id")
                if path not in commit.files:
                    return self._error(404, "EntryNotFound", "Entry not found")
                data = commit.files[path]
                headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_sha1(data)}"'}
                return self._send(200, data, headers, content_type="application/octet-stream")

        return Handler
