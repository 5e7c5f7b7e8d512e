"""A self-contained HTML rendering of the OpenAPI document (no CDN: farms run offline)."""

from __future__ import annotations

import json
import re
from typing import Any

from flask import render_template_string
from markupsafe import Markup, escape

METHOD_ORDER = ("get", "post", "put", "patch", "delete")


def prose(text: str) -> Markup:
    """Escape ``text`` and render its `backticked` words as code."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def type_html(schema: dict[str, Any]) -> Markup:
    """Render a JSON schema's type as short HTML, linking referenced models."""
    if "$ref" in schema:
        name = _ref_name(schema["$ref"])
        return Markup('<a href="#schema-{0}">{0}</a>').format(name)
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return Markup(" | ").join(type_html(s) for s in schema[key])
    if "const" in schema:
        return Markup("<code>{}</code>").format(json.dumps(schema["const"]))
    if "enum" in schema:
        return Markup(" | ").join(Markup("<code>{}</code>").format(json.dumps(v)) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        return Markup("array of ") + type_html(schema.get("items", {}))
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return Markup("map of string → ") + type_html(schema["additionalProperties"])
    text = kind if isinstance(kind, str) else "any"
    if schema.get("format"):
        text += f" ({schema['format']})"
    return Markup(escape(text))


def _constraints(schema: dict[str, Any]) -> str:
    names = {"minimum": "≥", "exclusiveMinimum": ">", "maximum": "≤", "exclusiveMaximum": "<",
             "minItems": "min items", "maxItems": "max items", "minLength": "min length", "maxLength": "max length"}
    parts = [f"{label} {schema[k]}" for k, label in names.items() if k in schema]
    if schema.get("writeOnly"):
        parts.append("write-only")
    return ", ".join(parts)


def _schema_rows(schema: dict[str, Any]) -> list[dict[str, Any]]:
    required = set(schema.get("required", []))
    rows = []
    for name, prop in schema.get("properties", {}).items():
        rows.append({
            "name": name,
            "type": type_html(prop),
            "required": name in required,
            "default": json.dumps(prop["default"]) if "default" in prop else "",
            "description": prose(prop.get("description", "")),
            "constraints": _constraints(prop),
        })
    return rows


def _operations(doc: dict[str, Any]) -> list[dict[str, Any]]:
    ops = []
    for path, item in doc["paths"].items():
        for method in METHOD_ORDER:
            if method not in item:
                continue
            op = item[method]
            body = op.get("requestBody", {}).get("content", {})
            ops.append({
                "id": op["operationId"], "method": method.upper(), "path": path, "tag": op["tags"][0],
                "summary": op["summary"], "description": prose(op.get("description", "")),
                "params": [{**p, "type": type_html(p["schema"])} for p in op.get("parameters", [])],
                "body": [{"type": ct, "schema": type_html(v["schema"])} for ct, v in body.items()],
                "responses": [
                    {"status": st, "description": r["description"],
                     "schema": Markup(", ").join(type_html(c["schema"]) for c in r.get("content", {}).values())}
                    for st, r in op["responses"].items()
                ],
            })
    return ops


def render_docs(doc: dict[str, Any]) -> str:
    """Return the HTML reference page for ``doc``."""
    schemas = [
        {"name": name, "description": prose(s.get("description", "")), "rows": _schema_rows(s),
         "variants": type_html({"oneOf": s["oneOf"]}) if "oneOf" in s else None,
         "discriminator": s.get("discriminator", {}).get("propertyName")}
        for name, s in sorted(doc["components"]["schemas"].items())
    ]
    return render_template_string(PAGE, prose=prose, info=doc["info"], ops=_operations(doc), schemas=schemas, tags=[t["name"] for t in doc["tags"]])


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ info.title }} {{ info.version }} reference</title>
<style>
body{font:15px/1.5 system-ui,sans-serif;margin:0;color:#1f2328;background:#fff}
main{max-width:980px;margin:0 auto;padding:1rem 1.25rem 4rem}
h1{margin:.5rem 0}h2{border-bottom:1px solid #d0d7de;padding-bottom:.3rem;margin-top:2.5rem}
h3{margin:1.6rem 0 .4rem;font-size:1.05rem}
code{font:13px ui-monospace,monospace;background:#f6f8fa;padding:.1rem .3rem;border-radius:4px}
table{border-collapse:collapse;width:100%;margin:.4rem 0 1rem;font-size:14px}
th,td{border:1px solid #d0d7de;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}
.m{display:inline-block;min-width:3.6rem;text-align:center;font:600 12px ui-monospace,monospace;color:#fff;border-radius:4px;padding:.15rem .3rem;margin-right:.4rem}
.GET{background:#0969da}.POST{background:#1a7f37}.DELETE{background:#cf222e}.PUT,.PATCH{background:#9a6700}
nav ul{columns:2;padding-left:1.2rem}a{color:#0969da}
.req{color:#cf222e;font-weight:600}
.visually-hidden{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}
</style></head>
<body><main>
<h1>{{ info.title }} <small>{{ info.version }}</small></h1>
<p>{{ prose(info.description) }}</p>
<p>Machine-readable: <a href="/openapi.json">/openapi.json</a> (OpenAPI 3.1).</p>
<nav aria-label="Endpoints"><ul>
{% for op in ops %}<li><a href="#op-{{ op.id }}"><span class="m {{ op.method }}">{{ op.method }}</span>{{ op.path }}</a></li>{% endfor %}
</ul></nav>
{% for tag in tags %}
<h2 id="tag-{{ tag }}">{{ tag|capitalize }}</h2>
{% for op in ops if op.tag == tag %}
<section id="op-{{ op.id }}">
<h3><span class="m {{ op.method }}">{{ op.method }}</span><code>{{ op.path }}</code> — {{ op.summary }}</h3>
{% if op.description %}<p>{{ op.description }}</p>{% endif %}
{% if op.params %}<table><caption class="visually-hidden">Parameters</caption>
<tr><th scope="col">Parameter</th><th scope="col">In</th><th scope="col">Type</th><th scope="col">Description</th></tr>
{% for p in op.params %}<tr><td><code>{{ p.name }}</code>{% if p.required %} <span class="req">*</span>{% endif %}</td><td>{{ p['in'] }}</td><td>{{ p.type }}</td><td>{{ p.description }}</td></tr>{% endfor %}
</table>{% endif %}
{% for b in op.body %}<p>Request body (<code>{{ b.type }}</code>): {{ b.schema }}</p>{% endfor %}
<table><tr><th scope="col">Status</th><th scope="col">Meaning</th><th scope="col">Body</th></tr>
{% for r in op.responses %}<tr><td>{{ r.status }}</td><td>{{ r.description }}</td><td>{{ r.schema }}</td></tr>{% endfor %}
</table>
</section>
{% endfor %}{% endfor %}
<h2 id="schemas">Schemas</h2>
{% for s in schemas %}
<section id="schema-{{ s.name }}">
<h3>{{ s.name }}</h3>
{% if s.description %}<p>{{ s.description }}</p>{% endif %}
{% if s.variants %}<p>One of {{ s.variants }}{% if s.discriminator %}, chosen by <code>{{ s.discriminator }}</code>{% endif %}.</p>{% endif %}
{% if s.rows %}<table><tr><th scope="col">Field</th><th scope="col">Type</th><th scope="col">Default</th><th scope="col">Description</th></tr>
{% for r in s.rows %}<tr><td><code>{{ r.name }}</code>{% if r.required %} <span class="req" title="required">*</span>{% endif %}</td><td>{{ r.type }}</td><td>{% if r.default %}<code>{{ r.default }}</code>{% endif %}</td><td>{{ r.description }}{% if r.constraints %} <em>({{ r.constraints }})</em>{% endif %}</td></tr>{% endfor %}
</table>{% endif %}
</section>
{% endfor %}
</main></body></html>
"""
