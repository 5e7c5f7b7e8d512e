"""GGUF for llama.cpp and Ollama: Q8_0 straight from the float weights, one ``.gguf`` file.

Q8_0 is llama.cpp's 8-bit type: blocks of 32 weights share one fp16 scale
``absmax / 127``. Every 2-D weight whose rows split into whole blocks is
quantized (the embeddings and output head too, as ``llama-quantize`` does);
norms and biases stay float32. No calibration is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workers.engine.methods.base import EngineJob, Method, Quantized
from workers.engine.model import read_config

BLOCK = 32
GGUF_FILE = "model.gguf"  # one name for every quant type, so load commands need no options


def q8_0(data: np.ndarray) -> tuple[np.ndarray, int]:
    """Quantize a 2-D float32 array to Q8_0 when its rows split into blocks; else keep it float32."""
    import gguf

    if data.ndim == 2 and data.shape[1] % BLOCK == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float32), gguf.GGMLQuantizationType.F32


class GGUFMethod(Method):
    name = "gguf"
    format = "gguf"
    requires_calibration = False

    def file_name(self) -> str:
        return GGUF_FILE

    def quantization_config(self) -> dict[str, Any]:
        return {"quant_method": "gguf", "quant_type": self.options.quant_type, "file": self.file_name()}

    def quantize(self, job: EngineJob) -> Quantized:
        import gguf

        from workers.engine.gguf_writer import write_gguf

        (fmt, out_dir), = job.outputs.items()
        job.stage("exporting")
        config = read_config(job.req.source_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / self.file_name()
        write_gguf(job.req.source_dir, path, config=config, name=job.req.base_model or "model",
                   file_type=gguf.LlamaFileType.MOSTLY_Q8_0, convert=lambda _name, data: q8_0(data))
        from workers.engine.bnb import loaded_perplexities
        from workers.engine.tasks_gate import loaded_generations

        loaders = _loaders(job, path)
        return Quantized(configs={fmt: self.quantization_config()}, perplexities=loaded_perplexities(*loaders),
                         generations=loaded_generations(*loaders))


def _loaders(job: EngineJob, path: Path):
    """The source, and the GGUF file loaded back through transformers' GGUF loader (as a user would)."""
    from transformers import AutoModelForCausalLM

    from workers.engine.bnb import _load

    def source():
        return _load(job.req.source_dir, job.device)

    def reloaded():
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, device_map={"": str(job.device)}).eval()

    return source, reloaded
