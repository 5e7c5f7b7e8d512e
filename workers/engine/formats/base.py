"""The small interface every output format's writer implements."""

from __future__ import annotations

from typing import Any

import torch

from workers.engine.arch import Arch
from workers.engine.methods.base import LayerwiseMethod
from workers.engine.model import StreamedModel


class FormatWriter:
    """Turn a layer-wise method's checkpointed tensors into one format's tensors and config."""

    def __init__(self, name: str):
        self.name = name

    def check(self, method: LayerwiseMethod) -> None:
        """Raise BadRequest when ``method``'s codes cannot be written in this format."""

    def replaced_weights(self, method: LayerwiseMethod, arch: Arch) -> set[str]:
        """Source tensor names (relative to a layer) the output drops."""
        return method.replaced_weights(arch)

    def tensor_names(self, method: LayerwiseMethod, model: StreamedModel, names: list[str]) -> list[str]:
        """The output names (relative to a layer) of a layer whose checkpoint holds ``names``."""
        return list(names)

    def layer_tensors(self, method: LayerwiseMethod, model: StreamedModel, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One layer's output tensors from its checkpointed tensors."""
        return tensors

    def quantization_config(self, method: LayerwiseMethod, model: StreamedModel) -> dict[str, Any]:
        return method.output_config(model)
