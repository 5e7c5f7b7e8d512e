"""One registry of quantization methods and output formats; every list of them derives from it.

A method names its options model, its engine class (imported only by the
workers, as ``module:Class``), its tags and the formats it can write (its
natural format first). A format names its writer. The spec's job union, the web
form and the OpenAPI document are built from here, so adding a method or a
format is one module plus one ``register_*`` line.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel


@dataclass(frozen=True)
class FormatEntry:
    """An output layout: its writer in the engine and how a runtime loads it."""

    name: str
    writer: str  # "module:Class" of the engine's writer
    title: str
    runtimes: tuple[str, ...] = ()  # serving stacks that read it, for the card and the job page
    accepts: Callable[[BaseModel], str | None] | None = None  # options -> why they cannot be written, or None


@dataclass(frozen=True)
class MethodEntry:
    """A quantization method: what the API accepts and what the engine runs."""

    name: str
    options: type[BaseModel]
    engine: str  # "module:Class" of the engine's method
    formats: tuple[str, ...]  # the natural format first
    schema_name: str  # OpenAPI name prefix: "<schema_name>Job"
    summary: str
    tags: tuple[str, ...] = field(default=())

    @property
    def natural_format(self) -> str:
        return self.formats[0]


_METHODS: dict[str, MethodEntry] = {}
_FORMATS: dict[str, FormatEntry] = {}
_generation = [0]


def register_format(entry: FormatEntry) -> FormatEntry:
    """Add (or replace) an output format."""
    _FORMATS[entry.name] = entry
    _generation[0] += 1
    return entry


def register_method(entry: MethodEntry) -> MethodEntry:
    """Add (or replace) a method. Raises ValueError for a format nobody registered."""
    unknown = [f for f in entry.formats if f not in _FORMATS]
    if not entry.formats or unknown:
        raise ValueError(f"method {entry.name!r} names unregistered formats {unknown}; registered: {', '.join(_FORMATS)}")
    _METHODS[entry.name] = entry
    _generation[0] += 1
    return entry


def unregister_method(name: str) -> None:
    """Remove a method (tests add and remove their own)."""
    if _METHODS.pop(name, None) is not None:
        _generation[0] += 1


def generation() -> int:
    """A number that changes whenever the registry does (for caches built from it)."""
    return _generation[0]


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def methods() -> tuple[MethodEntry, ...]:
    return tuple(_METHODS.values())


def method_entry(name: str) -> MethodEntry | None:
    return _METHODS.get(name)


def format_entry(name: str) -> FormatEntry | None:
    return _FORMATS.get(name)


def format_names() -> tuple[str, ...]:
    return tuple(_FORMATS)


def load_object(path: str) -> Any:
    """Import ``module:attr``."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _compressed_accepts(options: BaseModel) -> str | None:
    """compressed-tensors pack-quantized: 4 or 8 bits, groups of consecutive columns."""
    bits = getattr(options, "bits", None)
    if bits not in (4, 8):
        return f"pack-quantized takes 4- or 8-bit codes, not {bits}-bit"
    if getattr(options, "desc_act", False) and not getattr(options, "static_groups", False) and getattr(options, "group_size", -1) != -1:
        return "act-order without static_groups permutes the groups; set static_groups"
    return None


def _builtins() -> None:
    from quantfarm import options as o

    for fmt in (
        FormatEntry("gptq", "workers.engine.formats.native:NativeWriter", "GPTQ", ("transformers", "vllm")),
        FormatEntry("awq", "workers.engine.formats.native:NativeWriter", "AWQ", ("transformers", "vllm")),
        FormatEntry("bitsandbytes", "workers.engine.formats.native:NativeWriter", "bitsandbytes", ("transformers",)),
        FormatEntry("compressed-tensors", "workers.engine.formats.compressed:CompressedTensorsWriter", "compressed-tensors",
                    ("vllm", "transformers"), _compressed_accepts),
        FormatEntry("bitsandbytes-peft", "workers.engine.formats.native:NativeWriter", "bitsandbytes + PEFT adapter", ("peft",)),
        FormatEntry("gguf", "workers.engine.formats.native:NativeWriter", "GGUF", ("llama.cpp", "ollama", "transformers")),
    ):
        register_format(fmt)
    engine = "workers.engine.methods"
    for m in (
        MethodEntry("gptq", o.GPTQOptions, f"{engine}.gptq:GPTQMethod", ("gptq", "compressed-tensors"), "GPTQ",
                    "Second-order, calibrated; 2–8 bits. Best quality per bit.", ("gptq",)),
        MethodEntry("awq", o.AWQOptions, f"{engine}.awq:AWQMethod", ("awq", "compressed-tensors"), "AWQ",
                    "Activation-aware scaling, calibrated; 4 bits.", ("awq",)),
        MethodEntry("bnb-4bit", o.BnB4Options, f"{engine}.bnb:BnB4Method", ("bitsandbytes",), "BnB4",
                    "bitsandbytes NF4/FP4; no calibration.", ("bitsandbytes", "4-bit")),
        MethodEntry("bnb-8bit", o.BnB8Options, f"{engine}.bnb:BnB8Method", ("bitsandbytes",), "BnB8",
                    "bitsandbytes LLM.int8(); no calibration.", ("bitsandbytes", "8-bit")),
        MethodEntry("fp8", o.FP8Options, f"{engine}.fp8:FP8Method", ("compressed-tensors",), "FP8",
                    "FP8 W8A8 (per-channel weights, dynamic per-token activations); no calibration. For H100-class GPUs.",
                    ("fp8", "8-bit")),
        MethodEntry("gguf", o.GGUFOptions, f"{engine}.gguf:GGUFMethod", ("gguf",), "GGUF",
                    "GGUF for llama.cpp and Ollama: Q8_0, or Q4_K_M k-quants with an optional importance matrix from calibration.", ("gguf", "llama.cpp")),
        MethodEntry("loftq", o.LoftQOptions, f"{engine}.loftq:LoftQMethod", ("bitsandbytes-peft",), "LoftQ",
                    "NF4 base plus LoftQ-initialised LoRA adapters, ready for QLoRA fine-tuning; no calibration.",
                    ("loftq", "peft", "bitsandbytes", "4-bit")),
        MethodEntry("rtn", o.RTNOptions, f"{engine}.rtn:RTNMethod", ("gptq", "compressed-tensors"), "RTN",
                    "Round-to-nearest; fastest, no calibration.", ("rtn",)),
    ):
        register_method(m)


_builtins()
