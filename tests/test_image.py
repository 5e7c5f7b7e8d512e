"""The production image: runs as a non-root user that owns its state, and bakes no local state in.

No Docker daemon runs here, so the Dockerfile and .dockerignore are read as Docker reads them
(instructions with continuations; ignore patterns with ``**``); tests/test_compose_auth.py runs
``docker-compose config`` on the stack.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    """Return the Dockerfile's (INSTRUCTION, arguments) pairs, continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def env_of(instrs) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instrs:
        if word == "ENV":
            env.update(dict(tok.split("=", 1) for tok in shlex.split(rest)))
    return env


def test_the_image_runs_as_a_non_root_user_that_owns_its_state():
    instrs = instructions()
    users = [i for i, (w, _) in enumerate(instrs) if w == "USER"]
    assert users, "the Dockerfile has no USER: the farm would run as root"
    last = users[-1]
    user, _, group = instrs[last][1].partition(":")
    assert user not in ("root", "0") and group not in ("root", "0")
    assert user.isdigit(), "a numeric USER lets runAsNonRoot verify it"
    # Every RUN (which needs root) comes before it; what runs after is the service.
    assert all(w not in ("RUN", "COPY", "ADD") for w, _ in instrs[last + 1:])
    runs = " && ".join(rest for w, rest in instrs if w == "RUN")
    name = re.search(rf"useradd [^&]*--uid {user} [^&]*?(\S+)\s*(?:&&|$)", runs)
    assert name, f"no useradd creates uid {user}"
    env = env_of(instrs)
    home = env["QUANTFARM_HOME"]
    assert re.search(rf"install -d -o {name.group(1)} -g \S+ -m 07\d\d {re.escape(home)}\b", runs), "QUANTFARM_HOME must be the user's"
    assert env["HOME"].startswith("/home/") and f"--home-dir {env['HOME']} --create-home" in runs
    assert env["HF_HOME"].startswith(env["HOME"] + "/")  # the Hub cache is writable too


def _regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context (a left-out folder takes its contents along)."""
    parts = path.split("/")
    for n in range(1, len(parts) + 1):
        prefix, out = "/".join(parts[:n]), False
        for p in patterns:
            negate = p.startswith("!")
            if _regex(p.lstrip("!")).match(prefix):
                out = not negate
        if out:
            return True
    return False


def test_dockerignore_keeps_local_state_out_of_the_image():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in (".quantfarm/quantfarm.db", ".quantfarm/artifacts/jobs/x/model.safetensors", ".venv/bin/python",
                 "test-output/cache/tiny-llama/config.json", ".git", ".git/config", "api/__pycache__/app.cpython-311.pyc",
                 ".env", "sub/.quantfarm/quantfarm.db", "quantfarm.egg-info/PKG-INFO", "bench/.cache/x", "notes.db"):
        assert ignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "quantfarm/cli.py", "api/templates/base.html", "api/static/app.css",
                 "migrations/alembic.ini", "migrations/versions/0001_initial.py", "storage/models.py", "workers/engine/quant.py"):
        assert not ignored(path, patterns), path
