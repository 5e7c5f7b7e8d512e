"""A job's peak memory, estimated from the model's config.json and the job's spec.

The engine streams one decoder layer at a time, so a layerwise method's peak is one
layer's weights in float32, its Hessians (GPTQ: one ``in × in`` float32 matrix per
distinct input), the MLP's intermediates for one batch of ``BATCH_TOKENS`` tokens,
the calibration activations, the embeddings, and a fixed runtime overhead.
The activations entering and leaving a layer (``num_samples × seq_len × hidden × 4``
each), GPTQ's stored closing-linear inputs (``num_samples × seq_len ×
intermediate × 4``, at most ``STORED_INPUTS_MAX_BYTES``) and AWQ's recorded group
inputs and outputs (about ``5 × hidden + intermediate`` floats a token) stay in RAM
only up to ``ACTIVATIONS_RAM_BYTES`` in all; the batches beyond go to the scratch
disk (workers/engine/activations.py), so past that bound the peak holds a few
batches in flight and no longer grows with the calibration set. Measured on a real worker (bench/
worker_memory.py), those last two terms were most of a layer's working set.
A sparse (MoE) layer holds every expert, and with GPTQ every expert's Hessians at once;
where dense and sparse layers mix (DeepSeek's first_k_dense_replace) the larger one counts.
bitsandbytes quantizes while transformers loads, so its peak is the whole model.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

# A real worker's own floor (bench/worker_memory.py): ~400 MiB of anonymous memory once a job's imports are in,
# 120-170 MiB of mapped files, and the allocator's slack; 512 MiB read ~280 MiB under a measured worker's VmHWM,
# 800 MiB ~180 MiB under one at the default calibration (24 layers of width 1024, 128×512, activations spilled).
OVERHEAD_BYTES = 1000 * 1024**2
BATCH_TOKENS = 4096  # workers/engine/pipeline.py runs a layer over batches of this many tokens
STORED_INPUTS_MAX_BYTES = 256 * 1024**2  # workers/engine/methods/gptq.py: above it, inputs are recomputed
ACTIVATIONS_RAM_BYTES = 64 * 1024**2  # quantfarm/settings.py's activations_ram_bytes default: beyond it, batches spill
IN_FLIGHT_BATCHES = 3  # a layer's input batch, its output batch, and a stored input or sub-module output (GPTQ's walk)
WORK_BYTES = 4  # the engine computes in float32
DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}
LAYERWISE_WITH_HESSIANS = {"gptq"}
AWQ_RECORDS = {"awq"}  # each group's inputs, the attention's and MLP's outputs: kept for the layer's searches
WHOLE_MODEL = {"bnb-4bit", "bnb-8bit"}


def _shape(config: dict[str, Any]) -> dict[str, int] | None:
    cfg = config.get("text_config") or config
    h = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    if not isinstance(h, int) or not isinstance(layers, int) or h <= 0 or layers <= 0:
        return None
    heads = cfg.get("num_attention_heads") or cfg.get("n_head") or 1
    head_dim = cfg.get("head_dim") or h // max(1, heads)
    dense_i = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * h
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 1
    expert_i = cfg.get("moe_intermediate_size") or dense_i
    # Shared experts: Qwen2/3-MoE name their width, DeepSeek counts expert-wide ones.
    shared_i = cfg.get("shared_expert_intermediate_size") or (cfg.get("n_shared_experts") or 0) * expert_i
    return {
        "h": h, "layers": layers, "heads": heads, "head_dim": head_dim,
        "kv": cfg.get("num_key_value_heads") or heads,
        "dense_i": dense_i, "experts": experts, "expert_i": expert_i, "shared_i": shared_i,
        # DeepSeek's first layers are dense MLPs of the wider intermediate_size.
        "dense_layers": layers if experts == 1 else min(layers, max(0, int(cfg.get("first_k_dense_replace") or 0))),
        "vocab": cfg.get("vocab_size") or 0,
        "tied": bool(config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True))),
        "dtype": DTYPE_BYTES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16").replace("torch.", ""), 2),
    }


def _mlp_kinds(sh: dict[str, int]) -> list[tuple[int, int, int, int]]:
    """Each kind of MLP the layers have: (layers of it, parameters, GPTQ Hessian elements, widest intermediate).

    A sparse layer's experts (and its shared expert) each hold their own Hessians at once: one
    pass gathers them all before any is solved (workers/engine/methods/gptq.py).
    """
    h, kinds = sh["h"], []
    if sh["dense_layers"]:
        i = sh["dense_i"]
        kinds.append((sh["dense_layers"], 3 * h * i, h * h + i * i, i))
    if sh["dense_layers"] < sh["layers"]:
        e, i, si = sh["experts"], sh["expert_i"], sh["shared_i"]
        params = 3 * h * i * e + 3 * h * si + h * e
        hessians = e * (h * h + i * i) + (h * h + si * si if si else 0)
        kinds.append((sh["layers"] - sh["dense_layers"], params, hessians, max(i, si)))
    return kinds


def estimate_peak_bytes(config: dict[str, Any], *, method: str, num_samples: int, seq_len: int) -> int | None:
    """Estimate the job's peak memory in bytes; None when config.json does not say enough."""
    sh = _shape(config)
    if sh is None:
        return None
    h, q = sh["h"], sh["heads"] * sh["head_dim"]
    attention = h * q + 2 * h * sh["kv"] * sh["head_dim"] + q * h
    kinds = _mlp_kinds(sh)
    embeddings = sh["vocab"] * h * (1 if sh["tied"] else 2)
    if method in WHOLE_MODEL:
        model_params = sh["layers"] * attention + sum(n * params for n, params, _, _ in kinds)
        return int((model_params + embeddings) * sh["dtype"] + OVERHEAD_BYTES)
    tokens = num_samples * seq_len
    batch = min(tokens, max(1, BATCH_TOKENS // seq_len) * seq_len)  # tokens in one batch (workers/engine/pipeline.py)
    peak_layer = 0
    for _, params, hessian_elements, widest in kinds:
        layer = (attention + params) * WORK_BYTES
        layer += 3 * BATCH_TOKENS * widest * WORK_BYTES  # gate, up and their product for one batch
        spooled = 2 * tokens * h * WORK_BYTES  # the activations entering and leaving the layer
        if method in LAYERWISE_WITH_HESSIANS:
            layer += WORK_BYTES * (h * h + q * q + hessian_elements)  # attention's two inputs, then the MLP's
            spooled += min(tokens * widest * WORK_BYTES, STORED_INPUTS_MAX_BYTES)  # kept until solved
        if method in AWQ_RECORDS:
            spooled += tokens * (4 * h + q + widest) * WORK_BYTES
        layer += min(spooled, ACTIVATIONS_RAM_BYTES) + IN_FLIGHT_BATCHES * batch * h * WORK_BYTES
        peak_layer = max(peak_layer, layer)
    return int(peak_layer + embeddings * sh["dtype"] + OVERHEAD_BYTES)


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
        info = path.stat()  # one system call, not two (is_file, then stat)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 1024 * 1024:
            return None
        return estimate_for_spec(json.loads(path.read_text(encoding="utf-8")), public_spec)
    except (OSError, ValueError):
        return None
