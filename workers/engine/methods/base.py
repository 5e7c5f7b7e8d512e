"""The small interface every quantization method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from workers.engine.activations import Spool
from workers.engine.arch import Arch
from workers.engine.model import Batch, StreamedModel
from workers.engine.quant import QuantResult


@dataclass
class LayerContext:
    """What a method sees of one decoder layer: its loaded module and its inputs."""

    model: StreamedModel
    index: int
    layer: nn.Module
    inputs: list[Batch]
    wants_next: bool = True  # whether the next layer's inputs are needed (after the last layer they are not)

    @property
    def arch(self) -> Arch:
        return self.model.arch.at(self.index)  # this layer's groups


@dataclass
class LayerOutput:
    """The layer's checkpoint: tensors keyed relative to the layer, plus per-linear loss."""

    tensors: dict[str, torch.Tensor]
    losses: dict[str, float] = field(default_factory=dict)
    # The layer's outputs with the quantized weights, when the method computed them on the way
    # (they must equal a plain forward after ``apply``); None: the loop runs that forward.
    next_inputs: list | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # per-layer facts for the job's metrics (expert token counts)


@dataclass
class EngineJob:
    """One quantization to run: the request, where each format goes, and the caller's hooks."""

    req: Any  # workers.engine.pipeline.QuantizeRequest
    checkpoint_store: Any  # quantfarm.store.BlobStore
    outputs: dict[str, Path]  # format -> empty output folder, in the order asked for
    device: torch.device
    on_layer: Callable | None = None
    on_stage: Callable[[str], None] | None = None
    max_shard_bytes: int = 2 * 1024**3
    activations_dir: Path | None = None  # where activation batches beyond activations_ram_bytes go (None: RAM)
    activations_ram_bytes: int | None = None

    def spool(self, name: str) -> Spool:
        """A fresh spool for one walk over the layers (its files under ``activations_dir/name``)."""
        return Spool(self.activations_dir / name if self.activations_dir is not None else None, self.activations_ram_bytes)

    def stage(self, name: str) -> None:
        if self.on_stage is not None:
            self.on_stage(name)


@dataclass
class Quantized:
    """What a method's ``quantize`` leaves behind, for the one evaluate/card/metrics flow."""

    configs: dict[str, dict[str, Any]]  # format -> the quantization_config it wrote
    perplexities: Callable[[torch.Tensor], tuple[float, float]]  # ids -> (source, quantized)
    layers_total: int = 0
    layers_computed: list[int] = field(default_factory=list)
    layers_replayed: list[int] = field(default_factory=list)
    layer_losses: dict[int, dict[str, float]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # method-specific figures (memory footprints)
    job_metrics: dict[str, Any] = field(default_factory=dict)  # for the job's metrics only, not the card (expert tokens)
    # (prompts, max_new_tokens) -> greedy continuations of (source, quantized); see workers/engine/tasks_gate.py
    source_files: dict[str, str] | None = None  # the source files' sha256 when the method hashed them already
    generations: Callable[[list[torch.Tensor], int], tuple[list[list[int]], list[list[int]]]] | None = None


class Method(ABC):
    """One quantization method: whole-model ``quantize`` into every format asked for."""

    name: ClassVar[str]
    format: ClassVar[str]  # the natural format
    requires_calibration: ClassVar[bool] = True

    def __init__(self, options):
        self.options = options

    @abstractmethod
    def quantize(self, job: EngineJob) -> Quantized: ...

    @abstractmethod
    def quantization_config(self) -> dict[str, Any]: ...

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "options": self.options.model_dump(mode="json")}


class LayerwiseMethod(Method):
    """A method solved one decoder layer at a time, checkpointed and resumable.

    ``quantize_layer`` returns the tensors that replace the layer's weights in the
    exported checkpoint; ``apply`` makes a loaded layer compute exactly as a kernel
    reading those tensors would. The loop calls ``apply`` both after a fresh
    solve and when replaying a checkpoint, so both paths produce the same bytes.
    """

    # True: the next layer sees the source layer's outputs (AWQ searches on float activations,
    # as llm-awq and AutoAWQ do); False: it sees the quantized layer's outputs (GPTQ).
    next_from_source: ClassVar[bool] = False
    packed_keys: ClassVar[tuple[str, ...]] = ()  # a linear's tensors in the natural format

    def quantize(self, job: EngineJob) -> Quantized:
        from workers.engine.layerwise import run_layerwise

        return run_layerwise(self, job)

    @abstractmethod
    def quantize_layer(self, ctx: LayerContext) -> LayerOutput: ...

    @abstractmethod
    def apply(self, arch: Arch, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None: ...

    @abstractmethod
    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantResult:
        """Return the codes of one linear from its ``packed_keys`` tensors (for other formats)."""

    def int_scheme(self) -> dict[str, Any]:
        """Return ``bits``, ``group_size`` (-1: per channel) and ``sym`` of the integer codes."""
        o = self.options
        return {"bits": o.bits, "group_size": o.group_size, "sym": o.sym}

    def output_config(self, model: StreamedModel) -> dict[str, Any]:
        """The quantization_config of the natural format, for this model."""
        return self.quantization_config()

    def replaced_weights(self, arch: Arch) -> set[str]:
        """Source tensor names (relative to a layer) the checkpoint drops."""
        return {f"{n}.weight" for n in arch.linears}


def set_weight(layer: nn.Module, name: str, weight: torch.Tensor) -> None:
    lin = layer.get_submodule(name)
    lin.weight.data = weight.to(device=lin.weight.device, dtype=lin.weight.dtype)
