"""Quantization methods: one class each, found through the farm's registry by name."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from quantfarm import registry
from quantfarm.errors import BadRequest
from workers.engine.methods.base import EngineJob, LayerContext, LayerOutput, LayerwiseMethod, Method, Quantized


class _Engines(Mapping):
    """Method name -> engine class, read live from ``quantfarm.registry``."""

    def __getitem__(self, name: str) -> type[Method]:
        entry = registry.method_entry(name)
        if entry is None:
            raise KeyError(name)
        return registry.load_object(entry.engine)

    def __iter__(self) -> Iterator[str]:
        return iter(registry.method_names())

    def __len__(self) -> int:
        return len(registry.method_names())


METHODS: Mapping[str, type[Method]] = _Engines()


def method_for(name: str, options) -> Method:
    """Instantiate the method called ``name``; unknown names list the valid ones."""
    if name not in METHODS:
        raise BadRequest(
            f"Unknown method {name!r}; the engine implements: {', '.join(sorted(METHODS))}.",
            code="unknown_method",
        )
    return METHODS[name](options)


__all__ = ["METHODS", "EngineJob", "LayerContext", "LayerOutput", "LayerwiseMethod", "Method", "Quantized", "method_for"]
