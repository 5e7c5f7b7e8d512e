"""The compose deployment: it validates, Flower needs credentials, the dashboard reads only metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.api.test_service import _parse_metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "quantfarm.json"


def _config() -> dict:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install docker-compose)")
    out = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True,
                         cwd=ROOT, env={"PATH": "/usr/bin:/bin", "QUANTFARM_SECRET_KEY": "a-long-enough-secret-key"})
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_compose_validates_and_flower_refuses_to_run_without_credentials(tmp_path):
    flower = _config()["services"]["flower"]
    assert flower["ports"][0]["host_ip"] == "127.0.0.1" if isinstance(flower["ports"][0], dict) else flower["ports"][0].startswith("127.0.0.1:")
    assert flower["command"][:2] == ["sh", "-c"]
    script = flower["command"][2].replace("$$", "$")
    assert '--basic-auth="$FLOWER_BASIC_AUTH"' in script and script.count("exec celery") == 1
    refused = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert refused.returncode == 1 and "set FLOWER_BASIC_AUTH" in refused.stderr
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "celery").write_text('#!/bin/sh\necho "$@"\n')
    (fake / "celery").chmod(0o755)
    ran = subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                         env={"PATH": f"{fake}:/usr/bin:/bin", "FLOWER_BASIC_AUTH": "ops:s3cret"})
    assert ran.stdout.split() == ["--broker=redis://redis:6379/0", "flower", "--port=5555", "--basic-auth=ops:s3cret"]


def test_prometheus_scrapes_the_api_and_grafana_gets_the_dashboard():
    services = _config()["services"]
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (target,) = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target == "api:8000" and "8000" in " ".join(services["api"]["command"])
    workers = prom["scrape_configs"][1]["static_configs"][0]["targets"]
    scraped = {t.split(":")[0] for t in workers}
    assert scraped == {name for name, svc in services.items() if svc.get("environment", {}).get("QUANTFARM_METRICS_PORT") == "9100"}
    mounts = " ".join(str(v.get("source", v)) + ":" + str(v.get("target", "")) if isinstance(v, dict) else v for v in services["grafana"]["volumes"])
    assert "deploy/grafana/dashboards" in mounts and "/var/lib/grafana/dashboards" in mounts
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/quantfarm.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    (source,) = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    dash = json.loads(DASHBOARD.read_text())
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {source["uid"]}
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_dashboard_reads_only_metrics_the_farm_exports(lite):
    """Names from the API's /metrics and the workers' own endpoint (workers/metrics.py), nothing else."""
    from prometheus_client import generate_latest

    from workers.metrics import REGISTRY

    client = lite.test_client()
    client.get("/healthz")
    client.get("/v1/jobs")
    text = client.get("/metrics").get_data(as_text=True) + generate_latest(REGISTRY).decode()
    exported = {name for name, _ in _parse_metrics(text)}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):  # families with no samples yet (no finished job)
        suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}.get(kind, ("",))
        exported |= {name + s for s in suffixes}
    dash = json.loads(DASHBOARD.read_text())
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\b(quantfarm_[a-z0-9_]+)", target["expr"]))
    assert used, "the dashboard queries nothing"
    missing = {name for name in used if name not in exported}
    assert not missing, f"the dashboard queries metrics nothing exports: {sorted(missing)}"
