"""A pydantic validation error as the API shows it: ``{"dotted.field": "why"}``, with the discriminators' tags dropped."""

from __future__ import annotations

from pydantic import ValidationError

from quantfarm import registry


def _field_path(loc: tuple) -> str:
    # Pydantic puts the discriminators' tags ("gptq", "hub") into the location; drop them.
    parts = list(loc)
    if parts and parts[0] in registry.method_names():
        parts = parts[1:]
    if len(parts) > 1 and parts[0] == "model" and parts[1] in ("hub", "s3", "local", "upload"):
        del parts[1]
    return ".".join(str(p) for p in parts) or "body"


def _message(err: dict) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "union_tag_invalid":
        expected = err.get("ctx", {}).get("expected_tags", "")
        return f"unknown value {err.get('ctx', {}).get('tag')!r}; expected one of {expected}"
    if kind == "union_tag_not_found":
        return "field required"
    if kind == "missing":
        return "field required"
    msg = err["msg"]
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


def validation_fields(exc: ValidationError) -> dict[str, str]:
    """Turn a pydantic error into ``{"dotted.field": "why"}``."""
    fields: dict[str, str] = {}
    for err in exc.errors():
        loc = tuple(err["loc"])
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            tag = err.get("ctx", {}).get("discriminator", "")
            name = tag.strip("'") if tag else "method"
            loc = loc + (name,)
        path = _field_path(loc)
        msg = _message(err)
        entry = registry.method_entry(str(loc[0])) if loc else None
        if err["type"] == "literal_error" and entry and len(loc) > 1 and loc[1] == "formats":
            msg = f"{entry.name} cannot write {err.get('input')!r}; it writes: {', '.join(entry.formats)}"
        fields[path] = f"{fields[path]}; {msg}" if path in fields else msg
    return fields
