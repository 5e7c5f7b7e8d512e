"""Output formats: one writer each, found through the farm's registry by name."""

from __future__ import annotations

from quantfarm import registry
from quantfarm.errors import BadRequest
from workers.engine.formats.base import FormatWriter


def writer_for(name: str, natural: str | None = None) -> FormatWriter:
    """Instantiate the writer of format ``name``; unknown names list the valid ones.

    A method writing its own ``natural`` format needs no conversion: its checkpoint is that format.
    """
    if name == natural:
        from workers.engine.formats.native import NativeWriter

        return NativeWriter(name)
    entry = registry.format_entry(name)
    if entry is None:
        raise BadRequest(f"Unknown format {name!r}; the engine writes: {', '.join(registry.format_names())}.", code="unknown_format")
    return registry.load_object(entry.writer)(name)


__all__ = ["FormatWriter", "writer_for"]
