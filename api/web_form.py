"""The submit form's fields and the form → API body mapping, derived from the spec and the registry.

Pure functions (no routes): ``api.web`` renders them and posts the body through the jobs service.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from werkzeug.datastructures import MultiDict

from quantfarm import registry
from quantfarm.spec import BUILTIN_DATASETS, Calibration, Destination, HubDestination, HubSource, JobBase, method_names, method_options

SOURCES = (("hub", "Hugging Face Hub"), ("s3", "S3 URI"), ("local", "Local path"))
CALIB_KINDS = (("builtin", "Built-in set"), ("texts", "My own texts"), ("hub", "Hub dataset"))
SECRET_FIELDS = ("model.token", "destination.hub.token", "webhooks.0.secret")
_FIXED_CHECKBOXES = ("evaluate", "reuse", "destination.store", "destination.hub.private")
_UNSET = object()


# --- the form's fields, from the spec's JSON schema ----------------------------------


def option_fields(method: str) -> list[dict[str, Any]]:
    """Describe one method's option inputs from the schema the API validates with (read-only)."""
    return _option_fields(method, registry.generation())


@functools.lru_cache(maxsize=256)
def _option_fields(method: str, _generation: int) -> list[dict[str, Any]]:
    schema = method_options()[method].model_json_schema()
    fields = []
    for name, prop in schema["properties"].items():
        choices = prop.get("enum") or ([prop["const"]] if "const" in prop else None)
        kind = "select" if choices else {"boolean": "checkbox", "integer": "number", "number": "number", "array": "list"}.get(prop.get("type"), "text")
        default = prop.get("default", [] if kind == "list" else None)
        fields.append({
            "name": name,
            "input": f"options.{method}.{name}",
            "id": f"f-options-{method}-{name}".replace("_", "-"),
            "label": prop.get("title", name),
            "help": prop.get("description", ""),
            "kind": kind,
            "choices": choices,
            "default": default,
            "min": prop.get("minimum"),
            "max": prop.get("maximum"),
            "step": "any" if prop.get("type") == "number" else "1",
        })
    return fields


def format_fields(method: str) -> list[dict[str, Any]]:
    """One checkbox per format the method can write (each becomes one artifact)."""
    entry = registry.method_entry(method)
    return [{
        "name": f, "input": f"formats.{method}.{f}", "id": f"f-formats-{method}-{f}",
        "help": "The method's own format" if i == 0 else f"Also write {f} from the same quantization",
    } for i, f in enumerate(entry.formats if entry else ())]


def calibration_limits() -> dict[str, dict[str, Any]]:
    props = Calibration.model_json_schema()["properties"]
    return {k: {"default": props[k]["default"], "min": props[k].get("minimum"), "max": props[k].get("maximum")} for k in ("num_samples", "seq_len")}


def default_values() -> dict[str, Any]:
    """Return the form's initial values: the spec's defaults."""
    limits = calibration_limits()
    job = JobBase.model_fields
    values: dict[str, Any] = {
        "model.source": "hub", "model.revision": HubSource.model_fields["revision"].default, "method": method_names()[0],
        "calibration.kind": "builtin", "calibration.builtin": f"builtin:{BUILTIN_DATASETS[0]}",
        "calibration.num_samples": str(limits["num_samples"]["default"]),
        "calibration.seq_len": str(limits["seq_len"]["default"]),
        "evaluate": job["evaluate"].default, "reuse": job["reuse"].default, "priority": str(job["priority"].default),
        "destination.store": Destination.model_fields["store"].default,
        "destination.hub.private": HubDestination.model_fields["private"].default,
    }
    for m in method_names():
        for i, f in enumerate(format_fields(m)):
            values[f["input"]] = i == 0
        for f in option_fields(m):
            d = f["default"]
            values[f["input"]] = d if f["kind"] == "checkbox" else (", ".join(d) if isinstance(d, list) else str(d))
    return values


def submitted_values(form: MultiDict) -> dict[str, Any]:
    """Return what the user typed, with checkboxes as booleans (for re-rendering)."""
    values: dict[str, Any] = {k: v for k, v in form.items()}
    boxes = list(_FIXED_CHECKBOXES) + [f["input"] for m in method_names() for f in option_fields(m) if f["kind"] == "checkbox"]
    boxes += [f["input"] for m in method_names() for f in format_fields(m)]
    for name in boxes:
        values[name] = name in form
    return values


# --- form -> API body -------------------------------------------------------------------


def form_text(form: MultiDict, name: str) -> str:
    """Return a form field stripped of surrounding blanks ("" when absent)."""
    return (form.get(name) or "").strip()


def _number(raw: str) -> Any:
    # Unparseable input goes to the validator as typed, so the user sees its message.
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            continue
    return raw


def _option_value(field: dict, form: MultiDict) -> Any:
    raw = form_text(form, field["input"])
    if field["kind"] in ("number", "text", "select") and raw == "":
        return _UNSET  # an emptied box (or a select the form did not send) means "use the default"
    if field["kind"] == "checkbox":
        return field["input"] in form
    if field["kind"] == "select":
        return next((c for c in field["choices"] if str(c) == raw), raw)
    if field["kind"] == "list":
        return [p.strip() for p in raw.split(",") if p.strip()]
    return _number(raw) if field["kind"] == "number" else raw


def _model(form: MultiDict) -> dict[str, Any]:
    source = form_text(form, "model.source")
    keys = {"hub": ("repo_id", "revision", "token"), "s3": ("uri",), "local": ("path",)}.get(source, ())
    model: dict[str, Any] = {"source": source}
    for key in keys:
        if form_text(form, f"model.{key}"):
            model[key] = form_text(form, f"model.{key}")
    return model


def _calibration(form: MultiDict) -> dict[str, Any]:
    calib: dict[str, Any] = {}
    kind = form_text(form, "calibration.kind")
    if kind == "builtin":
        calib["dataset"] = form_text(form, "calibration.builtin")
    elif kind == "hub":
        name = form_text(form, "calibration.hub")
        calib["dataset"] = name if name.startswith("hub:") else f"hub:{name}"
    elif kind == "texts":
        raw = (form.get("calibration.texts") or "").replace("\r\n", "\n")
        calib["texts"] = [b.strip() for b in re.split(r"\n[ \t]*\n", raw) if b.strip()]
    for key in ("num_samples", "seq_len"):
        if form_text(form, f"calibration.{key}"):
            calib[key] = _number(form_text(form, f"calibration.{key}"))
    return calib


def form_to_body(form: MultiDict) -> dict[str, Any]:
    """Turn the submitted form into the JSON body POST /v1/jobs takes."""
    method = form_text(form, "method")
    body: dict[str, Any] = {"model": _model(form), "method": method, "calibration": _calibration(form)}
    if method in method_names():
        values = {f["name"]: _option_value(f, form) for f in option_fields(method)}
        body["options"] = {k: v for k, v in values.items() if v is not _UNSET}
        formats = [f["name"] for f in format_fields(method) if f["input"] in form]
        if formats:
            body["formats"] = formats
    body["evaluate"] = "evaluate" in form
    body["reuse"] = "reuse" in form
    dest: dict[str, Any] = {"store": "destination.store" in form}
    if form_text(form, "destination.hub.repo_id"):
        hub = {"repo_id": form_text(form, "destination.hub.repo_id"), "private": "destination.hub.private" in form}
        for key in ("branch", "token"):
            if form_text(form, f"destination.hub.{key}"):
                hub[key] = form_text(form, f"destination.hub.{key}")
        dest["hub"] = hub
    body["destination"] = dest
    if form_text(form, "webhooks.0.url"):
        hook = {"url": form_text(form, "webhooks.0.url")}
        if form_text(form, "webhooks.0.secret"):
            hook["secret"] = form_text(form, "webhooks.0.secret")
        body["webhooks"] = [hook]
    if form_text(form, "priority"):
        body["priority"] = _number(form_text(form, "priority"))
    return body


def field_errors(fields: dict[str, str], form: MultiDict) -> dict[str, str]:
    """Map the API's ``details.fields`` keys onto the form's input names."""
    method = form_text(form, "method")
    kind = form_text(form, "calibration.kind")
    known = set(default_values()) | {"model.repo_id", "model.token", "model.uri", "model.path", "calibration.texts",
                                     "calibration.hub", "destination.hub.repo_id", "destination.hub.branch",
                                     "destination.hub.token", "webhooks.0.url", "webhooks.0.secret", "calibration", "destination",
                                     "model", "webhooks"}
    out: dict[str, str] = {}
    for key, msg in fields.items():
        name = key
        if key.startswith("options.") and method in method_names():
            name = f"options.{method}.{key.split('.')[1]}"
        elif key.startswith("formats") and format_fields(method):
            name = format_fields(method)[0]["input"]
        elif key == "calibration.dataset":
            name = "calibration.hub" if kind == "hub" else "calibration.builtin"
        elif key.startswith("calibration.texts"):
            name = "calibration.texts"
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        name = name if name in known else "form"
        out[name] = f"{out[name]}; {msg}" if name in out else msg
    return out
