"""One quantization end to end, for any caller: a worker, a script, a test, a bench."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from quantfarm.store import BlobStore, walk_files
from workers.engine.calibration import evaluation_ids
from workers.engine.bnb import quantize_bnb
from workers.engine.card import model_card
from workers.engine.checkpoint import Checkpoints
from workers.engine.evaluate import perplexity_pair
from workers.engine.export import export
from workers.engine.methods import METHODS
from workers.engine.pipeline import LayerReport, QuantizeRequest, fingerprint_parts, load_tokenizer, prepare, run_layers


@dataclass
class EngineResult:
    out_dir: Path
    layers_total: int
    layers_computed: list[int]
    layers_replayed: list[int]
    metrics: dict[str, Any]
    layer_losses: dict[int, dict[str, float]] = field(default_factory=dict)
    quantization_config: dict[str, Any] = field(default_factory=dict)


def _weights_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in walk_files(d) if p.suffix == ".safetensors")


def quantize(
    req: QuantizeRequest,
    checkpoint_store: BlobStore,
    out_dir: Path,
    *,
    device: torch.device,
    on_layer: Callable[[LayerReport], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> EngineResult:
    """Quantize ``req.source_dir`` into ``out_dir``, checkpointing into ``checkpoint_store``.

    Raises the farm's job errors (NotAModel, UnsupportedArchitecture,
    CalibrationError, CheckpointMismatch, ...) and whatever ``on_layer`` raises
    (JobCancelled) after the layer's checkpoint is safely written.
    """
    if not METHODS[req.method].layerwise:  # bitsandbytes quantizes while transformers loads
        return quantize_bnb(req, out_dir, device=device, on_stage=on_stage, max_shard_bytes=max_shard_bytes)
    stage = on_stage or (lambda _s: None)
    t0 = time.monotonic()
    stage("calibrating")
    model, method, tokenizer, calib = prepare(req, device)
    parts = fingerprint_parts(model, method, calib)
    ckpt = Checkpoints(checkpoint_store, parts)
    source = {"revision": req.source_revision, "files": parts["source_files"]}
    stats = run_layers(model, method, calib, ckpt, on_layer)
    t_quant = time.monotonic() - t0

    stage("exporting")
    export(model, method, ckpt, out_dir, max_shard_bytes=max_shard_bytes)
    metrics: dict[str, Any] = {
        "size_bytes_before": model.shards.total_bytes(),
        "size_bytes_after": _weights_bytes(out_dir),
        "quantize_seconds": round(t_quant, 3),
        "source": source,
    }
    experts = {str(i): m["expert_tokens"] for i, m in sorted(ckpt.layers.items()) if m.get("expert_tokens")}
    if experts:  # tokens the router sent each expert, per layer and sparse block
        metrics["expert_tokens"] = experts
        metrics["rtn_experts"] = {str(i): m["rtn_experts"] for i, m in sorted(ckpt.layers.items()) if m.get("rtn_experts")}

    evaluation = None
    if req.evaluate:
        stage("evaluating")
        t1 = time.monotonic()
        max_pos = getattr(model.config, "max_position_embeddings", None) or 2048
        seq_len = min(req.calibration.seq_len, max_pos)
        tok = tokenizer or load_tokenizer(req.source_dir)
        ids = evaluation_ids(req.evaluation, tok, seq_len)
        before, after = perplexity_pair(model, method, ckpt, ids)
        evaluation = {"perplexity_before": round(before, 4), "perplexity_after": round(after, 4), "eval_tokens": int(ids.numel())}
        metrics.update(evaluation)
        metrics["evaluate_seconds"] = round(time.monotonic() - t1, 3)

    options = req.options.model_dump(mode="json")
    calib_desc = req.calibration.model_dump(mode="json", exclude_none=True) if method.requires_calibration else None
    card = model_card(
        base_model=req.base_model, method=method.name, fmt=method.format, options=options,
        quantization_config=method.quantization_config(), calibration=calib_desc,
        evaluation={**evaluation, "size_bytes_before": metrics["size_bytes_before"], "size_bytes_after": metrics["size_bytes_after"]} if evaluation else None,
        source=source,
    )
    (out_dir / "README.md").write_text(card)
    return EngineResult(
        out_dir=out_dir,
        layers_total=model.num_layers,
        layers_computed=stats.computed,
        layers_replayed=stats.replayed,
        metrics=metrics,
        layer_losses=ckpt.losses(),
        quantization_config=method.quantization_config(),
    )
