"""A job's peak memory, estimated from the model's config.json and the job's spec.

The engine streams one decoder layer at a time, so a layerwise method's peak is one
layer's weights in float32, the calibration activations entering and leaving it
(``num_samples × seq_len × hidden × 4`` each), its Hessians (GPTQ: one ``in × in``
float32 matrix per distinct input), the MLP's intermediates for one batch of
``BATCH_TOKENS`` tokens, the widest stored linear input (GPTQ keeps the closing
linear's inputs, ``num_samples × seq_len × intermediate × 4``, until it is solved;
above ``STORED_INPUTS_MAX_BYTES`` it computes them again instead),
the embeddings, and a fixed runtime overhead. Measured on a real worker (bench/
worker_memory.py), those last two terms were most of a layer's working set.
bitsandbytes quantizes while transformers loads, so its peak is the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OVERHEAD_BYTES = 512 * 1024**2
BATCH_TOKENS = 4096  # workers/engine/pipeline.py runs a layer over batches of this many tokens
STORED_INPUTS_MAX_BYTES = 256 * 1024**2  # workers/engine/methods/gptq.py: above it, inputs are recomputed
WORK_BYTES = 4  # the engine computes in float32
DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}
LAYERWISE_WITH_HESSIANS = {"gptq"}
WHOLE_MODEL = {"bnb-4bit", "bnb-8bit"}


def _shape(config: dict[str, Any]) -> dict[str, int] | None:
    cfg = config.get("text_config") or config
    h = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    if not isinstance(h, int) or not isinstance(layers, int) or h <= 0 or layers <= 0:
        return None
    heads = cfg.get("num_attention_heads") or cfg.get("n_head") or 1
    head_dim = cfg.get("head_dim") or h // max(1, heads)
    return {
        "h": h, "layers": layers, "heads": heads, "head_dim": head_dim,
        "kv": cfg.get("num_key_value_heads") or heads,
        "i": cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * h,
        "experts": cfg.get("num_local_experts") or cfg.get("num_experts") or 1,
        "vocab": cfg.get("vocab_size") or 0,
        "tied": bool(config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True))),
        "dtype": DTYPE_BYTES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16").replace("torch.", ""), 2),
    }


def estimate_peak_bytes(config: dict[str, Any], *, method: str, num_samples: int, seq_len: int) -> int | None:
    """Estimate the job's peak memory in bytes; None when config.json does not say enough."""
    sh = _shape(config)
    if sh is None:
        return None
    h, i, q = sh["h"], sh["i"], sh["heads"] * sh["head_dim"]
    attention = h * q + 2 * h * sh["kv"] * sh["head_dim"] + q * h
    layer_params = attention + 3 * h * i * sh["experts"]
    embeddings = sh["vocab"] * h * (1 if sh["tied"] else 2)
    if method in WHOLE_MODEL:
        return int((sh["layers"] * layer_params + embeddings) * sh["dtype"] + OVERHEAD_BYTES)
    activations = 2 * num_samples * seq_len * h * WORK_BYTES
    intermediates = 3 * BATCH_TOKENS * i * WORK_BYTES  # gate, up and their product for one batch
    hessians = stored = 0
    if method in LAYERWISE_WITH_HESSIANS:
        hessians = WORK_BYTES * (2 * h * h + q * q + i * i)
        stored = min(num_samples * seq_len * i * WORK_BYTES, STORED_INPUTS_MAX_BYTES)  # kept until it is solved
    return int(layer_params * WORK_BYTES + activations + intermediates + hessians + stored
               + embeddings * sh["dtype"] + OVERHEAD_BYTES)


def estimate_for_spec(config: dict[str, Any], spec: dict[str, Any]) -> int | None:
    """The estimate for a job's stored (public) spec."""
    cal = spec.get("calibration") or {}
    return estimate_peak_bytes(config, method=spec.get("method", ""), num_samples=int(cal.get("num_samples") or 128),
                               seq_len=int(cal.get("seq_len") or 512))


def estimate_at_submit(public_spec: dict[str, Any]) -> int | None:
    """The estimate when config.json can be read cheaply here (a local source); None otherwise.

    Hub and S3 sources are estimated by the first worker that fetches them.
    """
    model = public_spec.get("model") or {}
    if model.get("source") != "local":
        return None
    path = Path(str(model.get("path", ""))) / "config.json"
    try:
        if not path.is_file() or path.stat().st_size > 1024 * 1024:
            return None
        return estimate_for_spec(json.loads(path.read_text(encoding="utf-8")), public_spec)
    except (OSError, ValueError):
        return None
