"""The layer-wise methods' ``quantize``: calibrate, solve or replay each layer, write every format."""

from __future__ import annotations

from workers.engine.checkpoint import Checkpoints, recorded_dtype
from workers.engine.evaluate import perplexity_pair
from workers.engine.export import export
from workers.engine.formats import writer_for
from workers.engine.methods.base import EngineJob, LayerwiseMethod, Quantized
from workers.engine.pipeline import fingerprint_parts, prepare, run_layers
from workers.engine.tasks_gate import streamed_generations


def run_layerwise(method: LayerwiseMethod, job: EngineJob) -> Quantized:
    """Quantize layer by layer with checkpoints, then export each format from the same codes.

    The checkpoint holds the natural format's tensors; every other format is a
    deterministic rewrite of them, so a resumed job writes the same bytes.
    """
    job.stage("calibrating")
    model, calib = prepare(job.req, job.device, method, recorded_dtype(job.checkpoint_store, job.device))
    fingerprint = fingerprint_parts(model, method, calib)
    ckpt = Checkpoints(job.checkpoint_store, fingerprint)
    stats = run_layers(model, method, calib, ckpt, job.on_layer, job.spool("quantize"))
    job.stage("exporting")
    configs = {}
    for fmt, out_dir in job.outputs.items():
        configs[fmt] = export(model, method, writer_for(fmt, method.format), ckpt, out_dir, max_shard_bytes=job.max_shard_bytes)
    return Quantized(
        configs=configs,
        perplexities=lambda ids: perplexity_pair(model, method, ckpt, ids, job.spool("evaluate")),
        layers_total=model.num_layers,
        layers_computed=stats.computed,
        layers_replayed=stats.replayed,
        layer_losses=ckpt.losses(),
        job_metrics=expert_metrics(ckpt),
        generations=streamed_generations(model, method, ckpt),
        source_files=fingerprint["source_files"],  # hashed once, for the fingerprint and the provenance alike
    )


def expert_metrics(ckpt: Checkpoints) -> dict:
    """Tokens the router sent each expert, and the experts rounded to nearest, per layer (MoE models only)."""
    layers = sorted(ckpt.layers.items())
    experts = {str(i): m["expert_tokens"] for i, m in layers if m.get("expert_tokens")}
    if not experts:
        return {}
    return {"expert_tokens": experts, "rtn_experts": {str(i): m["rtn_experts"] for i, m in layers if m.get("rtn_experts")}}
