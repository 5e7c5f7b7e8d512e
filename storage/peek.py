"""Read a Hub or S3 model's config.json at submit, cheaply: a few KB, the job's own credentials, bounded.

The submit path estimates a job's memory from it (quantfarm.memory) and refuses a job no
worker can hold. Anything short of a small, well-formed JSON object read quickly (no access,
no such file, a slow or failing endpoint, a huge or hostile body) gives None: the job queues
and its first worker estimates it, as for any source we cannot read here.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

from quantfarm.settings import Settings
from quantfarm.spec import HubSource, S3Source

log = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 256 * 1024  # real configs are a few KB; multimodal ones a few tens


def read_config(source: Any, secrets: dict[str, Any], settings: Settings) -> dict | None:
    """The source's config.json as a dict, or None when it cannot be read cheaply (never raises)."""
    if settings.submit_peek_seconds <= 0:
        return None
    try:
        if isinstance(source, HubSource):
            raw = _hub_bytes(source, secrets.get("model.token"), settings)
        elif isinstance(source, S3Source):
            raw = _s3_bytes(source, secrets.get("model.s3"), settings)
        else:
            return None
        if raw is None:
            return None
        config = json.loads(raw.decode("utf-8"))
    except Exception as exc:  # hostile or unreachable: the worker estimates it after fetching
        log.info("config.json of %s not read at submit (%s)", getattr(source, "source", "?"), type(exc).__name__)
        return None
    return config if isinstance(config, dict) else None


def _hub_bytes(source: HubSource, token: str | None, settings: Settings) -> bytes | None:
    import httpx2

    from storage.sources import hub_auth, hub_endpoint

    url = f"{hub_endpoint(settings)}/{quote(source.repo_id, safe='/')}/resolve/{quote(source.revision, safe='')}/config.json"
    auth = hub_auth(token)  # the job's token or none: never the worker's or the API's own
    headers = {"Authorization": f"Bearer {auth}"} if auth else {}
    timeout = httpx2.Timeout(settings.submit_peek_seconds)
    with httpx2.Client(timeout=timeout, follow_redirects=True, trust_env=False) as client:
        with client.stream("GET", url, headers=headers) as resp:
            if resp.status_code != 200:
                return None
            return _bounded(resp.iter_bytes())


def _s3_bytes(source: S3Source, creds: dict | None, settings: Settings) -> bytes | None:
    from storage.sources import source_store

    bucket, _, prefix = source.uri[len("s3://"):].partition("/")
    key = f"{prefix.strip('/')}/config.json" if prefix.strip("/") else "config.json"
    quick = settings.model_copy(update={"s3_max_attempts": 1, "s3_connect_timeout": settings.submit_peek_seconds,
                                        "s3_read_timeout": settings.submit_peek_seconds})
    store = source_store(quick, bucket, creds)  # the job's own keys, else unsigned: never the farm's
    if store.size(key) > MAX_CONFIG_BYTES:
        return None
    body = store.open(key)
    try:
        return _bounded(iter(lambda: body.read(64 * 1024), b""))
    finally:
        body.close()


def _bounded(chunks) -> bytes | None:
    """Join ``chunks``; None as soon as they pass MAX_CONFIG_BYTES."""
    out = bytearray()
    for chunk in chunks:
        out += chunk
        if len(out) > MAX_CONFIG_BYTES:
            return None
    return bytes(out)


def estimate_remote(db, spec, public: dict, team_id: str, settings: Settings) -> int | None:
    """The memory estimate of a Hub or S3 job from its config.json, read with its own credentials; None: not here."""
    if not isinstance(spec.model, (HubSource, S3Source)):  # before the imports: every local submit asks
        return None
    from types import SimpleNamespace

    from quantfarm.errors import QuantfarmError
    from quantfarm.memory import estimate_for_spec
    from quantfarm.spec import spec_secrets
    from storage.teams import job_credentials

    secrets = dict(spec_secrets(spec))
    if getattr(spec.model, "credentials_ref", None):
        try:
            with db.read() as s:
                secrets.update(job_credentials(s, SimpleNamespace(spec=public, team_id=team_id)))
        except QuantfarmError:  # no such credential: the submit's own checks name it
            return None
    config = read_config(spec.model, {k: v for k, v in secrets.items() if k in ("model.token", "model.s3")}, settings)
    if config is None:
        return None
    try:
        return estimate_for_spec(config, public)
    except (TypeError, ValueError, ArithmeticError, AttributeError):  # numbers of the wrong type in a hostile config
        return None
