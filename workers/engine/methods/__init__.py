"""Quantization methods: one class each, picked from a registry by name."""

from __future__ import annotations

from quantfarm.errors import BadRequest
from workers.engine.methods.awq import AWQMethod
from workers.engine.methods.base import LayerContext, LayerOutput, Method
from workers.engine.methods.bnb import BnB4Method, BnB8Method
from workers.engine.methods.gptq import GPTQMethod
from workers.engine.methods.rtn import RTNMethod

METHODS: dict[str, type[Method]] = {
    AWQMethod.name: AWQMethod,
    BnB4Method.name: BnB4Method,
    BnB8Method.name: BnB8Method,
    GPTQMethod.name: GPTQMethod,
    RTNMethod.name: RTNMethod,
}


def method_for(name: str, options) -> Method:
    """Instantiate the method called ``name``; unknown names list the valid ones."""
    cls = METHODS.get(name)
    if cls is None:
        raise BadRequest(
            f"Unknown method {name!r}; the engine implements: {', '.join(sorted(METHODS))}.",
            code="unknown_method",
        )
    return cls(options)


__all__ = ["METHODS", "LayerContext", "LayerOutput", "Method", "method_for"]
