"""The model card (README.md) that travels with every artifact.

It holds no timestamps or job ids, so a resumed job writes the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import json
from typing import Any

from quantfarm import registry
from quantfarm.loading import load_instructions
from workers.engine import ENGINE_VERSION


def _yaml_list(items: list[str]) -> str:
    return "\n".join(f"- {json.dumps(i)}" for i in items)


def model_card(
    *,
    base_model: str,
    method: str,
    fmt: str,
    options: dict[str, Any],
    quantization_config: dict[str, Any],
    calibration: dict[str, Any] | None,
    evaluation: dict[str, Any] | None,
    source: dict[str, Any] | None = None,
) -> str:
    """Render the card with Hub metadata in its YAML header.

    ``source`` (``{"revision": ..., "files": {name: sha256}}``) says exactly which
    weights were quantized: the Hub commit the job resolved and every source file's hash.
    """
    bits = options.get("bits") or (4 if method == "bnb-4bit" else 8 if method == "bnb-8bit" else None)
    entry = registry.method_entry(method)
    tags = ["quantfarm", method, fmt, "quantized"] + list(entry.tags if entry else ()) + ([f"{bits}-bit"] if bits else [])
    tags = list(dict.fromkeys(tags))  # each tag once (rtn writes gptq: method and format can agree)
    header = [
        "---",
        f"base_model: {json.dumps(base_model)}" if base_model else None,
        "base_model_relation: quantized" if base_model else None,
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        _yaml_list(tags),
        "---",
    ]
    lines = [l for l in header if l is not None]
    title = base_model or "model"
    lines += [
        "",
        f"# {title} — {method.upper()}{f' {bits}-bit' if bits else ''}",
        "",
        f"Quantized by Quantfarm (engine {ENGINE_VERSION}) with **{method}** into the `{fmt}` format.",
        "",
        "## Quantization",
        "",
        "| option | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in sorted(options.items())]
    lines += ["", "`quantization_config` (also in `config.json`):", "", "```json", json.dumps(quantization_config, indent=2, sort_keys=True), "```", ""]
    if calibration:
        lines += ["## Calibration", ""]
        lines += [f"- {k}: `{json.dumps(v)}`" for k, v in sorted(calibration.items()) if k != "texts"]
        if "texts" in calibration:
            lines.append(f"- texts: {len(calibration['texts'])} given inline")
        lines.append("")
    if source:
        lines += ["## Source", ""]
        if source.get("revision"):
            lines.append(f"- revision: `{source['revision']}`")
        lines += [f"- `{name}` sha256 `{digest}`" for name, digest in sorted((source.get("files") or {}).items())]
        lines.append("")
    lines += ["## Evaluation", ""]
    if evaluation:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(evaluation.items())]
    else:
        lines.append("Not evaluated.")
    lines += ["", "## How to load", ""]
    for how in load_instructions(fmt, "<this repo or folder>"):
        lines += [f"With {how['runtime']}:", "", f"```{how['language']}", how["code"], "```", ""]
    return "\n".join(lines)
