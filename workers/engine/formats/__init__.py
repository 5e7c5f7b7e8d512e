"""Output formats: one writer each, found through the farm's registry by name."""

from __future__ import annotations

from quantfarm import registry
from quantfarm.errors import BadRequest
from workers.engine.formats.base import FormatWriter


def writer_for(name: str) -> FormatWriter:
    """Instantiate the writer of format ``name``; unknown names list the valid ones."""
    entry = registry.format_entry(name)
    if entry is None:
        raise BadRequest(f"Unknown format {name!r}; the engine writes: {', '.join(registry.format_names())}.", code="unknown_format")
    return registry.load_object(entry.writer)(name)


__all__ = ["FormatWriter", "writer_for"]
