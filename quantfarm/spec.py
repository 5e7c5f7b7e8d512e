"""The job spec: one typed, strict description of what a job must do.

The same pydantic models validate API requests, feed the OpenAPI document and
the web form, and are stored (secrets removed) on the job row.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from quantfarm import registry
from quantfarm.errors import ValidationFailed
from quantfarm.validation import validation_fields
from quantfarm.options import AWQOptions, BnB4Options, BnB8Options, FP8Options, GGUFOptions, GPTQOptions, LoftQOptions, RTNOptions, Strict  # noqa: F401 (re-exported)
from quantfarm.quality import Evaluation, Gate  # noqa: F401 (re-exported)

BUILTIN_DATASETS = ("code",)
CREDENTIALS_REF = Field(None, description="Name of a team credential (POST /v1/credentials) to use instead of a pasted secret")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_DATASET_PART = re.compile(r"^[A-Za-z0-9._\-\[\]%+]*$")  # a config or split, e.g. wikitext-2-raw-v1, validation


# --- model sources ----------------------------------------------------------


def _one_secret(model):
    if getattr(model, "token", None) is not None and model.credentials_ref is not None:
        raise ValueError("give either token or credentials_ref, not both")
    return model


class HubSource(Strict):
    source: Literal["hub"]
    repo_id: str = Field(description="Hub model id, e.g. org/name")
    revision: str = Field("main", description="Branch, tag or commit")
    token: SecretStr | None = Field(None, description="Hub token for private models (write-only)")
    credentials_ref: str | None = CREDENTIALS_REF

    _secret = model_validator(mode="after")(_one_secret)

    @field_validator("repo_id")
    @classmethod
    def _repo(cls, v: str) -> str:
        if not _REPO_ID.match(v):
            raise ValueError("must look like 'org/name'")
        return v


class S3Source(Strict):
    source: Literal["s3"]
    uri: str = Field(description="s3://bucket/prefix/ holding the model files")
    credentials_ref: str | None = Field(None, description="Name of a team S3 credential; without one the bucket is read anonymously")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if not re.match(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$", v):
            raise ValueError("must be an s3://bucket/prefix URI")
        return v


class LocalSource(Strict):
    source: Literal["local"]
    path: str = Field(description="Absolute path on the workers' shared filesystem")

    @field_validator("path")
    @classmethod
    def _abs(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must be an absolute path")
        return v


class UploadSource(Strict):
    source: Literal["upload"]
    upload_id: str


ModelSource = Annotated[Union[HubSource, S3Source, LocalSource, UploadSource], Field(discriminator="source")]


# --- calibration, destination, webhooks -------------------------------------------


class Calibration(Strict):
    dataset: str | None = Field(None, description="builtin:<name> or hub:<dataset>[:<config>][:<split>]")
    texts: list[str] | None = Field(None, min_length=1, max_length=100_000)
    upload_id: str | None = None
    credentials_ref: str | None = Field(None, description="Name of a team Hub credential for a private hub: dataset")
    num_samples: int = Field(128, ge=1, le=4096)
    seq_len: int = Field(512, ge=16, le=16384)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.startswith("builtin:"):
            if v.split(":", 1)[1] not in BUILTIN_DATASETS:
                raise ValueError(f"unknown built-in set; choose from: {', '.join('builtin:' + b for b in BUILTIN_DATASETS)}")
            return v
        if v.startswith("hub:"):
            parts = v.split(":")[1:]
            if len(parts) > 3 or not _REPO_ID.match(parts[0]) or ".." in parts[0]:
                raise ValueError("hub:<dataset> must name a Hub dataset id like 'org/name' (never a path), "
                                 "optionally followed by :<config> and :<split>")
            if not all(_DATASET_PART.match(p) for p in parts[1:]):
                raise ValueError("the config and split after hub:<dataset> may hold only letters, digits and ._-[]%+")
            return v
        raise ValueError("must be builtin:<name> or hub:<dataset>[:<config>][:<split>]")

    @model_validator(mode="after")
    def _exactly_one(self) -> "Calibration":
        given = [n for n in ("dataset", "texts", "upload_id") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give exactly one of dataset, texts, upload_id (got {', '.join(given)})")
        if not given:
            self.dataset = "builtin:code"
        if self.credentials_ref is not None and not (self.dataset or "").startswith("hub:"):
            raise ValueError("credentials_ref only applies to a hub: dataset")
        return self


class HubDestination(Strict):
    repo_id: str
    private: bool = True
    branch: str | None = None
    token: SecretStr | None = None
    credentials_ref: str | None = CREDENTIALS_REF

    _repo = field_validator("repo_id")(HubSource._repo.__func__)
    _secret = model_validator(mode="after")(_one_secret)


class Destination(Strict):
    store: bool = Field(True, description="Keep the result in the farm's object store")
    hub: HubDestination | None = None

    @model_validator(mode="after")
    def _somewhere(self) -> "Destination":
        if not self.store and self.hub is None:
            raise ValueError("the result must go somewhere: set store or hub")
        return self


def secret_key(secret: str) -> bytes:
    """Return the HMAC key of a ``whsec_<base64>`` webhook secret.

    Decodes like the Standard Webhooks reference (prefix and padding optional).
    Raises ValueError (naming no part of the secret) if it is not base64.
    """
    raw = secret[len("whsec_"):] if secret.startswith("whsec_") else secret
    try:
        key = base64.b64decode(raw + "==", validate=False)
    except (binascii.Error, ValueError):
        raise ValueError("the webhook secret is not valid base64 after its whsec_ prefix") from None
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


class Webhook(Strict):
    url: str
    secret: SecretStr | None = Field(None, description="whsec_<base64> signing secret (write-only)")

    @field_validator("secret")
    @classmethod
    def _secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            secret_key(v.get_secret_value())
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^\s/]+", v):
            raise ValueError("must be an http(s) URL")
        return v


# --- the job ---------------------------------------------------------------------


class _JobBase(Strict):
    model: ModelSource
    calibration: Calibration = Field(default_factory=Calibration)
    destination: Destination = Field(default_factory=Destination)
    evaluate: bool = Field(True, description="Perplexity before and after on held-out windows (evaluation.max_windows bounds the cost)")
    evaluation: Evaluation = Field(default_factory=Evaluation)
    gate: Gate | None = Field(None, description="Quality bar the quantized model must clear (perplexity needs evaluate)")
    webhooks: list[Webhook] = Field(default_factory=list, max_length=10)
    priority: int = Field(0, ge=-10, le=10)
    reuse: bool = Field(True, description="Reuse the artifact of an identical earlier job (same source files, spec, calibration "
                                          "tokens and engine version), or wait for an identical running one; false computes afresh")
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)

    @model_validator(mode="after")
    def _gate_needs_evaluation(self):
        if self.gate is not None and self.gate.max_ppl_increase_pct is not None and not self.evaluate:
            raise ValueError("gate.max_ppl_increase_pct needs evaluate: true (it compares perplexity before and after)")
        return self

    @field_validator("formats", check_fields=False)
    @classmethod
    def _formats(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each format at most once")
        options = info.data.get("options")
        method = registry.method_entry(info.data.get("method", ""))
        for fmt in v:
            if method and fmt == method.natural_format:
                continue  # the method's own format takes every option it accepts
            entry = registry.format_entry(fmt)
            why = entry.accepts(options) if (entry and entry.accepts and options is not None) else None
            if why:
                raise ValueError(f"{fmt}: {why}")
        return v


JobBase = _JobBase  # the fields every method's job shares


def _job_model(entry: registry.MethodEntry) -> type[_JobBase]:
    """Build the job model of one registered method: its tag, options and formats."""
    fmts = Literal[entry.formats]  # type: ignore[valid-type]
    return create_model(
        f"{entry.schema_name}Job",
        __base__=_JobBase,
        __doc__=entry.summary,
        method=(Literal[entry.name], ...),  # type: ignore[valid-type]
        options=(entry.options, Field(default_factory=entry.options)),
        formats=(list[fmts], Field([entry.natural_format], min_length=1, max_length=len(entry.formats),
                                   description=f"Output formats, one artifact each; {entry.natural_format} by default")),
    )


@functools.lru_cache(maxsize=4)
def _models(_generation: int) -> tuple[dict[str, type[_JobBase]], TypeAdapter]:
    models = {e.name: _job_model(e) for e in registry.methods()}
    union = Annotated[Union[tuple(models.values())], Field(discriminator="method")]  # type: ignore[valid-type]
    return models, TypeAdapter(union)


def job_models() -> dict[str, type[_JobBase]]:
    """Return the job model of every registered method, by method name."""
    return _models(registry.generation())[0]


def _adapter() -> TypeAdapter:
    return _models(registry.generation())[1]


def method_names() -> tuple[str, ...]:
    """Return the registered methods' names, in registry order."""
    return registry.method_names()


def method_options() -> dict[str, type[BaseModel]]:
    """Return each registered method's options model."""
    return {e.name: e.options for e in registry.methods()}


def __getattr__(name: str):
    # Live views of the registry under their historical names.
    if name == "METHODS":
        return method_names()
    if name == "METHOD_OPTIONS":
        return method_options()
    if name.endswith("Job"):
        for model in job_models().values():
            if model.__name__ == name:
                return model
    raise AttributeError(name)


def parse_spec(data: Any) -> _JobBase:
    """Validate a request body into a job spec.

    Raises ValidationFailed with a per-field map when the body is wrong.
    """
    if not isinstance(data, dict):
        raise ValidationFailed({"body": "must be a JSON object"}, "The request body must be a JSON object.")
    try:
        return _adapter().validate_python(data)
    except ValidationError as exc:
        raise ValidationFailed(validation_fields(exc)) from None


def spec_schema() -> dict:
    """Return the JSON schema of the job spec (for OpenAPI and the web form)."""
    return _adapter().json_schema(ref_template="#/components/schemas/{model}")


def public_spec(spec: BaseModel) -> dict:
    """Return the spec as JSON with every secret removed."""
    data = spec.model_dump(mode="json", exclude_none=True)
    data["model"].pop("token", None)
    hub = data.get("destination", {}).get("hub")
    if hub:
        hub.pop("token", None)
    for hook in data.get("webhooks", []):
        hook.pop("secret", None)
        hook["url"] = mask_url(hook["url"])
    return data


def mask_url(url: str) -> str:
    """Return ``url`` with only its scheme and host: paths and queries often carry tokens."""
    from urllib.parse import urlsplit

    p = urlsplit(url)
    host = p.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{p.port}" if p.port else ""
    return f"{p.scheme}://{host}{port}/***"


def spec_secrets(spec: BaseModel) -> dict[str, str]:
    """Return the spec's secrets, keyed by where they go back."""
    out: dict[str, str] = {}
    tok = getattr(spec.model, "token", None)
    if tok is not None:
        out["model.token"] = tok.get_secret_value()
    if spec.destination.hub is not None and spec.destination.hub.token is not None:
        out["destination.hub.token"] = spec.destination.hub.token.get_secret_value()
    for i, hook in enumerate(spec.webhooks):
        out[f"webhooks.{i}.url"] = hook.url
        if hook.secret is not None:
            out[f"webhooks.{i}.secret"] = hook.secret.get_secret_value()
    return out


def load_spec(public: dict, secrets: dict[str, str] | None = None):
    """Rebuild a full spec from its stored public JSON and secrets."""
    import copy

    data = copy.deepcopy(public)
    for key, value in (secrets or {}).items():
        parts = key.split(".")
        node: Any = data
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[parts[-1]] = value
    return _adapter().validate_python(data)
