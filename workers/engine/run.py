"""One quantization end to end, for any caller: a worker, a script, a test, a bench."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from quantfarm import registry
from quantfarm.errors import BadRequest
from quantfarm.store import BlobStore, sha256_file, walk_files
from workers.engine.calibration import evaluation_ids
from workers.engine.card import model_card
from workers.engine.checkpoint import fingerprint, recorded_dtype
from workers.engine.methods import EngineJob, Method, Quantized, method_for
from workers.engine.model import read_config
from workers.engine.pipeline import LayerReport, QuantizeRequest, fingerprint_parts, load_tokenizer, prepare
from workers.engine.shards import ShardReader
from workers.engine.tasks_gate import task_scores


@dataclass
class FormatOutput:
    """One written format: its folder and the quantization_config in its config.json."""

    format: str
    out_dir: Path
    quantization_config: dict[str, Any]
    size_bytes: int


@dataclass
class EngineResult:
    out_dir: Path
    layers_total: int
    layers_computed: list[int]
    layers_replayed: list[int]
    metrics: dict[str, Any]
    layer_losses: dict[int, dict[str, float]] = field(default_factory=dict)
    quantization_config: dict[str, Any] = field(default_factory=dict)
    outputs: list[FormatOutput] = field(default_factory=list)  # the first is ``out_dir``


def _weights_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in walk_files(d) if p.suffix == ".safetensors" or p.suffix == ".gguf")


def format_dirs(method: str, formats: list[str] | None, out_dir: Path) -> dict[str, Path]:
    """Where each format goes: the first into ``out_dir``, the others beside it (``<out_dir>-<format>``).

    Raises BadRequest for a format the method cannot write, listing the ones it can.
    """
    entry = registry.method_entry(method)
    valid = entry.formats if entry else ()
    wanted = list(formats or valid[:1])
    bad = [f for f in wanted if f not in valid]
    if bad or not wanted:
        raise BadRequest(f"{method} writes {', '.join(valid) or 'nothing'}, not {', '.join(bad)}.", code="unsupported_format")
    return {f: out_dir if i == 0 else out_dir.with_name(f"{out_dir.name}-{f}") for i, f in enumerate(wanted)}


def quantize(
    req: QuantizeRequest,
    checkpoint_store: BlobStore,
    out_dir: Path,
    *,
    device: torch.device,
    on_layer: Callable[[LayerReport], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    activations_dir: Path | None = None,
    activations_ram_bytes: int | None = None,
) -> EngineResult:
    """Quantize ``req.source_dir`` into ``out_dir`` (and one folder per further format), checkpointing.

    Raises the farm's job errors (NotAModel, UnsupportedArchitecture,
    CalibrationError, CheckpointMismatch, ...) and whatever ``on_layer`` raises
    (JobCancelled) after the layer's checkpoint is safely written.
    """
    method = method_for(req.method, req.options)
    job = EngineJob(req, checkpoint_store, format_dirs(req.method, req.formats, out_dir), device, on_layer, on_stage, max_shard_bytes,
                    activations_dir, activations_ram_bytes)
    t0 = time.monotonic()
    q = method.quantize(job)
    outputs = [FormatOutput(f, d, q.configs[f], _weights_bytes(d)) for f, d in job.outputs.items()]
    shards = ShardReader(req.source_dir)
    metrics: dict[str, Any] = {
        "size_bytes_before": shards.total_bytes(),
        # Provenance: the Hub commit (or S3 listing digest) fetched and every source file's sha256.
        "source": {"revision": req.source_revision, "files": q.source_files or shards.file_hashes()},
        "size_bytes_after": outputs[0].size_bytes,
        **q.metrics,
        "quantize_seconds": round(time.monotonic() - t0, 3),
        **q.job_metrics,
    }
    if len(outputs) > 1:
        metrics["formats"] = {o.format: {"size_bytes": o.size_bytes} for o in outputs}
    evaluation = _evaluate(req, q, job) if req.evaluate else {}
    if req.gate is not None and req.gate.task_set_upload_id is not None:
        stage = (lambda _name: None) if req.evaluate else job.stage  # already evaluating: one stage event
        evaluation.update(task_scores(req, q.generations, load_tokenizer(req.source_dir), stage))
    metrics.update(evaluation)
    for o in outputs:
        _write_card(req, method, o, q, metrics, evaluation or None)
    return EngineResult(
        out_dir=out_dir, layers_total=q.layers_total, layers_computed=q.layers_computed, layers_replayed=q.layers_replayed,
        metrics=metrics, layer_losses=q.layer_losses, quantization_config=outputs[0].quantization_config, outputs=outputs,
    )


def result_fingerprint(req: QuantizeRequest, device: torch.device, extra: dict[str, Any] | None = None,
                       checkpoint_store: BlobStore | None = None) -> str:
    """A digest of everything that shapes ``req``'s outputs, byte for byte, computed without quantizing.

    The checkpoint's own parts (engine version, weight and config hashes, method and options,
    calibration tokens, compute device and dtype) plus the other source files (tokenizer), the
    formats, the evaluation, the card's base model and source revision, and the caller's ``extra``.
    The compute dtype is the one the run will use: the dtype recorded by the job's checkpoints in
    ``checkpoint_store`` when it has some (a resumed job keeps it), else this worker's choice.
    Raises what opening the model or tokenizing the calibration set raises.
    """
    method = method_for(req.method, req.options)
    dtype = recorded_dtype(checkpoint_store, device) if checkpoint_store is not None else None
    model, calib = prepare(req, device, method, dtype)
    parts = fingerprint_parts(model, method, calib)
    weights = set(parts["source_files"])
    others = {p.relative_to(req.source_dir).as_posix(): p for p in walk_files(req.source_dir)}
    parts.update(
        other_files={k: sha256_file(p) for k, p in sorted(others.items()) if k not in weights},
        formats=list(format_dirs(req.method, req.formats, Path("out"))),
        evaluation=req.evaluation.model_dump(mode="json") if (req.evaluate and req.evaluation is not None) else None,
        base_model=req.base_model, source_revision=req.source_revision, extra=extra or {},
    )
    return fingerprint(parts)


def _evaluate(req: QuantizeRequest, q: Quantized, job: EngineJob) -> dict[str, Any]:
    """Perplexity of the source and of the quantized model on the held-out windows."""
    job.stage("evaluating")
    t1 = time.monotonic()
    max_pos = getattr(read_config(req.source_dir), "max_position_embeddings", None) or 2048
    seq_len = min(req.calibration.seq_len, max_pos)
    ids = evaluation_ids(req.evaluation, load_tokenizer(req.source_dir), seq_len)
    before, after = q.perplexities(ids)
    return {
        "perplexity_before": round(before, 4), "perplexity_after": round(after, 4), "eval_tokens": int(ids.numel()),
        "evaluate_seconds": round(time.monotonic() - t1, 3),
    }


def _write_card(req: QuantizeRequest, method: Method, out: FormatOutput, q: Quantized, metrics: dict, evaluation: dict | None) -> None:
    figures = None
    if evaluation:
        figures = {k: v for k, v in evaluation.items() if k not in ("evaluate_seconds", "task_seconds")}
        figures.update(size_bytes_before=metrics["size_bytes_before"], size_bytes_after=out.size_bytes, **q.metrics)
    calib = req.calibration.model_dump(mode="json", exclude_none=True) if method.requires_calibration else None
    card = model_card(
        base_model=req.base_model, method=method.name, fmt=out.format, options=req.options.model_dump(mode="json"),
        quantization_config=out.quantization_config, calibration=calib, evaluation=figures, source=metrics["source"],
    )
    (out.out_dir / "README.md").write_text(card)
