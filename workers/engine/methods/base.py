"""The small interface every layer-wise quantization method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from workers.engine.arch import Arch
from workers.engine.model import Batch, StreamedModel


@dataclass
class LayerContext:
    """What a method sees of one decoder layer: its loaded module and its inputs."""

    model: StreamedModel
    index: int
    layer: nn.Module
    inputs: list[Batch]

    @property
    def arch(self) -> Arch:
        return self.model.arch


@dataclass
class LayerOutput:
    """The layer's checkpoint: tensors keyed relative to the layer, plus per-linear loss."""

    tensors: dict[str, torch.Tensor]
    losses: dict[str, float] = field(default_factory=dict)
    # The layer's outputs with the quantized weights, when the method computed them on the way
    # (they must equal a plain forward after ``apply``); None: the loop runs that forward.
    next_inputs: list | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # per-layer facts for the job's metrics (expert token counts)


class Method(ABC):
    """One quantization method.

    ``quantize_layer`` returns the tensors that replace the layer's weights in the
    exported checkpoint; ``apply`` makes a loaded layer compute exactly as a kernel
    reading those tensors would. The loop calls ``apply`` both after a fresh
    solve and when replaying a checkpoint, so both paths produce the same bytes.
    """

    name: ClassVar[str]
    format: ClassVar[str]
    requires_calibration: ClassVar[bool] = True
    required_packages: ClassVar[tuple[str, ...]] = ()
    layerwise: ClassVar[bool] = True  # False: quantizes the whole model at load time (bitsandbytes)
    # True: the next layer sees the source layer's outputs (AWQ searches on float activations,
    # as llm-awq and AutoAWQ do); False: it sees the quantized layer's outputs (GPTQ).
    next_from_source: ClassVar[bool] = False

    def __init__(self, options):
        self.options = options

    @abstractmethod
    def quantize_layer(self, ctx: LayerContext) -> LayerOutput: ...

    @abstractmethod
    def apply(self, arch: Arch, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None: ...

    @abstractmethod
    def quantization_config(self) -> dict[str, Any]: ...

    def replaced_weights(self, arch: Arch) -> set[str]:
        """Source tensor names (relative to a layer) the checkpoint drops."""
        return {f"{n}.weight" for n in arch.linears}

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "options": self.options.model_dump(mode="json")}


def set_weight(layer: nn.Module, name: str, weight: torch.Tensor) -> None:
    lin = layer.get_submodule(name)
    lin.weight.data = weight.to(device=lin.weight.device, dtype=lin.weight.dtype)
