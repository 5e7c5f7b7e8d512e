"""GGUF for llama.cpp and Ollama: Q8_0 or Q4_K_M straight from the float weights, one ``.gguf`` file.

Q8_0 is llama.cpp's 8-bit type: blocks of 32 weights share one fp16 scale
``absmax / 127``. Q4_K_M is llama-quantize's mix of k-quants (``kquants.py``): Q4_K
for most 2-D weights, Q6_K for the output head (or the tied embeddings) and for
``attn_v`` / ``ffn_down`` on the layers its ``use_more_bits`` picks, and its fallbacks
(Q5_0, Q8_0, F16) for rows that do not split into 256-weight super-blocks. Norms and
biases stay float32. With ``imatrix`` a calibration pass collects each linear's mean
squared input activations, and the k-quant search weighs errors by them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workers.engine.methods.base import EngineJob, Method, Quantized
from workers.engine.model import read_config

BLOCK = 32
GGUF_FILE = "model.gguf"  # one name for every quant type, so load commands need no options


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quantize's choice of the layers whose attn_v / ffn_down get more bits in Q4_K_M."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_type(quant_type: str, name: str, shape: tuple[int, ...], *, n_layers: int, tied: bool) -> str:
    """The GGML type llama-quantize gives tensor ``name`` (llama.cpp's name, shape rows x columns)."""
    cols = shape[-1]
    if len(shape) != 2 or not name.endswith(".weight") or "_norm" in name:
        return "F32"
    if quant_type == "Q8_0":
        return "Q8_0" if cols % BLOCK == 0 else "F32"
    qtype = "Q4_K"
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "Q6_K" if cols % 256 == 0 else "Q8_0"
    if name.endswith(("attn_v.weight", "ffn_down.weight")) and use_more_bits(int(name.split(".")[1]), n_layers):
        qtype = "Q6_K"
    if cols % 256:
        qtype = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}[qtype]
        if cols % BLOCK:
            qtype = "F16"
    return qtype


def encode(data: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """(GGUF data, GGMLQuantizationType, the float32 weights it decodes to) of a float32 tensor."""
    import gguf

    from workers.engine.kquants import quantize_q4_k, quantize_q6_k

    t = gguf.GGMLQuantizationType[qtype]
    if qtype in ("F32", "F16"):
        out = data.astype(np.float32 if qtype == "F32" else np.float16)
        return out, t, out.astype(np.float32)
    if qtype in ("Q4_K", "Q6_K"):
        packed, decoded = (quantize_q4_k if qtype == "Q4_K" else quantize_q6_k)(data, imatrix)
        return packed, t, decoded
    packed = gguf.quants.quantize(data, t)  # Q8_0, Q5_0: round to nearest (an importance matrix is not used)
    return packed, t, gguf.quants.dequantize(packed, t).reshape(data.shape)


def file_type(quant_type: str) -> int:
    import gguf

    return {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M}[quant_type]


def write_model(source_dir: Path, path: Path, options, *, name: str, imatrix: dict[str, np.ndarray] | None = None,
                keep: dict | None = None) -> dict[str, str]:
    """Write ``source_dir`` as one GGUF file of ``options.quant_type``; return gguf name -> type name.

    ``imatrix`` maps source weight names to per-column importances; ``keep`` (a dict)
    receives the decoded weights under their source names (see ``write_gguf``).
    """
    from workers.engine.gguf_writer import gguf_names, write_gguf
    from workers.engine.shards import ShardReader

    config = read_config(source_dir)
    names = ShardReader(source_dir).names()
    tied = not any(n.endswith("lm_head.weight") for n in names)
    by_gguf = {g: imatrix[n] for n, g in gguf_names(config, imatrix).items()} if imatrix else {}

    def convert(target: str, data: np.ndarray):
        qtype = tensor_type(options.quant_type, target, data.shape, n_layers=config.num_hidden_layers, tied=tied)
        return encode(data, qtype, by_gguf.get(target))

    return write_gguf(source_dir, path, config=config, name=name, file_type=file_type(options.quant_type),
                      convert=convert, keep=keep)


class GGUFMethod(Method):
    name = "gguf"
    format = "gguf"

    @property
    def requires_calibration(self) -> bool:  # only the importance matrix needs a calibration pass
        return bool(self.options.imatrix)

    def file_name(self) -> str:
        return GGUF_FILE

    def quantization_config(self) -> dict[str, Any]:
        cfg = {"quant_method": "gguf", "quant_type": self.options.quant_type, "file": self.file_name()}
        if self.options.imatrix:
            cfg["imatrix"] = True
        return cfg

    def quantize(self, job: EngineJob) -> Quantized:
        (fmt, out_dir), = job.outputs.items()
        imatrix = None
        if self.options.imatrix:
            from workers.engine.imatrix import collect_imatrix
            from workers.engine.pipeline import calibration_ids, load_tokenizer

            job.stage("calibrating")
            ids = calibration_ids(job.req.calibration, load_tokenizer(job.req.source_dir), read_upload=job.req.read_upload,
                                  hub_token=job.req.hub_token)
            imatrix = collect_imatrix(job.req.source_dir, job.device, ids, job.spool("imatrix"))
        job.stage("exporting")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / self.file_name()
        types = write_model(job.req.source_dir, path, self.options, name=job.req.base_model or "model", imatrix=imatrix)
        counts: dict[str, int] = {}
        for t in types.values():
            counts[t] = counts.get(t, 0) + 1
        from workers.engine.bnb import loaded_perplexities
        from workers.engine.tasks_gate import loaded_generations

        loaders = _loaders(job, path)
        return Quantized(configs={fmt: self.quantization_config()}, perplexities=loaded_perplexities(*loaders),
                         generations=loaded_generations(*loaders), job_metrics={"gguf_tensor_types": dict(sorted(counts.items()))})


def _loaders(job: EngineJob, path: Path):
    """The source, and the GGUF file loaded back through transformers' GGUF loader (as a user would)."""
    from transformers import AutoModelForCausalLM

    from workers.engine.bnb import _load

    def source():
        return _load(job.req.source_dir, job.device)

    def reloaded():
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, device_map={"": str(job.device)}).eval()

    return source, reloaded
