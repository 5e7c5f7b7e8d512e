"""The CLI's side of the HTTP API: a small client and the request bodies it builds.

The CLI talks only to the API (QUANTFARM_URL); it never touches the database.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


class CliError(Exception):
    """An error to print as ``error: <code>: <message>`` before exiting non-zero."""

    def __init__(self, code: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.message, self.details = code, message, details or {}


class Client:
    """A thin JSON client for the farm's HTTP API."""

    def __init__(self, base_url: str, timeout: float = 30.0, api_key: str | None = None):
        import requests

        self.base, self.timeout, self.http = base_url.rstrip("/"), timeout, requests.Session()
        if api_key:
            self.http.headers["Authorization"] = f"Bearer {api_key}"

    @classmethod
    def from_settings(cls, settings) -> "Client":
        """Return a client for QUANTFARM_URL that sends QUANTFARM_API_KEY."""
        key = settings.api_key.get_secret_value() if settings.api_key is not None else None
        return cls(settings.api_url, api_key=key)

    def delete(self, path: str) -> Any:
        return self.call("DELETE", path)

    def call(self, method: str, path: str, **kwargs) -> Any:
        """Send a request and return its JSON body; raises CliError for API and connection errors."""
        import requests

        try:
            resp = self.http.request(method, self.base + path, timeout=self.timeout, **kwargs)
        except requests.ConnectionError:
            raise CliError("connection_failed", f"could not reach the Quantfarm API at {self.base}; is it running? "
                           "Set QUANTFARM_URL (or --url) to its address.") from None
        except requests.Timeout:
            raise CliError("timeout", f"the Quantfarm API at {self.base} did not answer within {self.timeout:g} s") from None
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = {}
            body = body if isinstance(body, dict) else {}
            raise CliError(body.get("error") or f"http_{resp.status_code}", body.get("message") or resp.reason or "request failed",
                           body.get("details"))
        if not resp.content:
            return {}
        try:
            return resp.json()
        except ValueError:  # a proxy's page, say: not the Quantfarm API
            raise CliError("bad_response", f"{self.base}{path} answered {resp.status_code} with something that is not JSON "
                           f"({resp.headers.get('content-type') or 'no content type'}); is QUANTFARM_URL the Quantfarm API?") from None

    def get(self, path: str, **params) -> Any:
        return self.call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None, **kwargs) -> Any:
        return self.call("POST", path, json=body, **kwargs) if body is not None else self.call("POST", path, **kwargs)


# --- building a job spec from arguments ------------------------------------------------


def model_source(arg: str) -> dict[str, str]:
    """Turn ``/abs/path``, ``s3://...``, ``upload:<id>`` or ``org/name[@rev]`` into a model source."""
    if arg.startswith("s3://"):
        return {"source": "s3", "uri": arg}
    if arg.startswith("upload:"):
        return {"source": "upload", "upload_id": arg[len("upload:"):]}
    if arg.startswith(("/", "./", "../", "~")):
        return {"source": "local", "path": os.path.abspath(os.path.expanduser(arg))}
    repo, _, rev = arg.partition("@")
    return {"source": "hub", "repo_id": repo, **({"revision": rev} if rev else {})}


def _value(text: str) -> Any:
    # key=value options: JSON when it parses (numbers, booleans, lists), else a plain string.
    try:
        return json.loads(text)
    except ValueError:
        return text


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError("bad_argument", f"{flag} takes key=value, got {item!r}")
        out[key] = value
    return out


def _calibration(client: Client, a: argparse.Namespace) -> dict[str, Any]:
    calib: dict[str, Any] = {}
    if a.calib:
        if a.calib.startswith("upload:"):
            calib["upload_id"] = a.calib[len("upload:"):]
        elif os.path.isfile(a.calib):
            calib["upload_id"] = _upload(client, a.calib)
        else:
            calib["dataset"] = a.calib
    if a.samples is not None:
        calib["num_samples"] = a.samples
    if a.seq_len is not None:
        calib["seq_len"] = a.seq_len
    return calib


def _upload(client: Client, path: str) -> str:
    with open(path, "rb") as f:
        meta = client.call("POST", "/v1/uploads", files={"file": (os.path.basename(path), f, "text/plain")})
    print(f"uploaded {path} as {meta['id']}", file=sys.stderr)
    return meta["id"]


def build_spec(client: Client, a: argparse.Namespace) -> dict[str, Any]:
    """Return the POST /v1/jobs body; only options given on the command line are sent."""
    options: dict[str, Any] = {}
    for key, value in (("bits", a.bits), ("group_size", a.group_size), ("sym", a.sym), ("desc_act", a.desc_act)):
        if value is not None:
            options[key] = value
    options.update({k: _value(v) for k, v in _pairs(a.option, "--option").items()})
    spec: dict[str, Any] = {"model": model_source(a.model), "method": a.method}
    if options:
        spec["options"] = options
    calib = _calibration(client, a)
    if calib:
        spec["calibration"] = calib
    if a.evaluate is not None:
        spec["evaluate"] = a.evaluate
    if a.hub_repo:
        spec["destination"] = {"store": True, "hub": {"repo_id": a.hub_repo}}
    if a.webhook:
        spec["webhooks"] = [{"url": u} for u in a.webhook]
    if a.label:
        spec["labels"] = _pairs(a.label, "--label")
    if a.priority is not None:
        spec["priority"] = a.priority
    if a.format:
        spec["formats"] = a.format
    return spec
