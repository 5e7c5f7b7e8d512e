"""docker-compose.yml runs the farm with auth on and refuses to start without a secret key."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) is not installed")


def _config(**env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QUANTFARM_")}
    return subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"], env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_compose_validates_with_auth_on_for_every_farm_process():
    res = _config(QUANTFARM_SECRET_KEY="a-long-enough-secret-key")
    assert res.returncode == 0, res.stderr
    services = yaml.safe_load(res.stdout)["services"]
    farm = [name for name, svc in services.items() if "QUANTFARM_DATABASE_URL" in (svc.get("environment") or {})]
    assert {"api", "migrate", "service"} <= set(farm) and any(n.startswith("worker") for n in farm)
    for name in farm:
        env = services[name]["environment"]
        assert env["QUANTFARM_AUTH"] == "on" and env["QUANTFARM_SECRET_KEY"] == "a-long-enough-secret-key", name


def test_compose_without_a_secret_key_says_how_to_make_one():
    res = _config()
    assert res.returncode != 0 and "quantfarm secrets new-key" in res.stderr
