"""The layer loop: capture, quantize or replay, checkpoint, report, free — one layer at a time."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel

from workers.engine import ENGINE_VERSION
from workers.engine.activations import Activations, Spool
from workers.engine.calibration import calibration_ids
from workers.engine.checkpoint import Checkpoints, tensor_digest
from workers.engine.heap import _libc, configure_heap, release_heap  # noqa: F401  (_libc: tests probe it)
from workers.engine.methods import LayerContext, Method
from workers.engine.model import StreamedModel

log = logging.getLogger(__name__)

BATCH_TOKENS = 4096


@dataclass
class LayerReport:
    """What the loop tells its caller at every layer boundary."""

    index: int
    total: int
    seconds: float
    losses: dict[str, float]
    resumed: bool
    eta_seconds: float | None


@dataclass
class QuantizeRequest:
    source_dir: Path
    method: str
    options: BaseModel
    calibration: Any  # quantfarm.spec.Calibration
    evaluate: bool = False
    evaluation: Any = None  # quantfarm.spec.Evaluation
    base_model: str = ""
    read_upload: Callable[[str], str] | None = None
    hub_token: str | None = None  # the job's own token for a hub: calibration dataset (never the worker's)
    formats: list[str] | None = None  # None: the method's natural format
    source_revision: str | None = None  # the Hub commit (or S3 listing digest) the source was fetched at
    gate: Any = None  # quantfarm.quality.Gate: its task set (read through read_upload) is scored here


@dataclass
class LoopStats:
    computed: list[int] = field(default_factory=list)
    replayed: list[int] = field(default_factory=list)
    seconds: float = 0.0


def batches_of(ids: torch.Tensor) -> list[torch.Tensor]:
    size = max(1, BATCH_TOKENS // ids.shape[1])
    return list(ids.split(size))


def fingerprint_parts(model: StreamedModel, method: Method, calib: torch.Tensor | None) -> dict[str, Any]:
    return {
        "engine_version": ENGINE_VERSION,
        "source_files": model.shards.file_hashes(),
        "method": method.describe(),
        "calibration": tensor_digest(calib) if calib is not None else None,
        "batch_tokens": BATCH_TOKENS,
        "compute": {"device": model.device.type, "dtype": str(model.dtype)},
    }


def run_layers(
    model: StreamedModel,
    method: Method,
    calib: torch.Tensor | None,
    ckpt: Checkpoints,
    on_layer: Callable[[LayerReport], None] | None = None,
    spool: Spool | None = None,
) -> LoopStats:
    """Quantize every decoder layer in order, replaying the ones already checkpointed.

    A replayed layer goes through exactly the same ``apply`` + forward as a fresh
    one, so the activations (and therefore the bytes) of a resumed run equal an
    uninterrupted one. The activations live in ``spool`` (default: RAM); its
    files are removed when the loop ends, normally or not.
    """
    configure_heap()
    spool = spool or Spool()
    try:
        return _layers(model, method, calib, ckpt, on_layer, spool)
    finally:
        spool.close()


def _layers(model, method, calib, ckpt, on_layer, spool: Spool) -> LoopStats:
    done = ckpt.open()
    stats = LoopStats()
    total = model.num_layers
    needs_inputs = method.requires_calibration
    token_batches = batches_of(calib) if (needs_inputs and calib is not None) else []
    # Layers after the last checkpoint need activations; the ones before only need replaying.
    inputs = model.capture_inputs(token_batches, spool) if needs_inputs else Activations(spool)
    t_start = time.monotonic()
    for i in range(total):
        t0 = time.monotonic()
        resumed = i in done
        if resumed and not needs_inputs:
            stats.replayed.append(i)
            _report(on_layer, i, total, 0.0, ckpt, True, stats, t_start)
            continue
        layer = model.load_layer(i)
        inputs = model.inputs_for(i, inputs)
        wants_next = needs_inputs and i + 1 < total
        nxt = None
        if resumed:
            tensors = ckpt.load(i)
            stats.replayed.append(i)
            if wants_next and method.next_from_source:  # the source layer's outputs, before apply
                nxt = model.forward_layer(layer, inputs, drain=True)
        else:
            out = method.quantize_layer(LayerContext(model, i, layer, inputs, wants_next))
            tensors, nxt = out.tensors, out.next_inputs
            out.next_inputs = None
            assert_finite(i, tensors)
            if wants_next and method.next_from_source and nxt is None:
                raise RuntimeError(f"{method.name} must return the source layer's outputs as next_inputs")
        if wants_next and nxt is None:
            # ``apply`` overwrites every tensor a method changes, so a fresh layer and a
            # replayed one compute with identical weights from here on. A layer whose next
            # inputs are known (or not needed) is released as it is: nothing computes with it.
            method.apply(model.arch.at(i), layer, tensors)
            nxt = model.forward_layer(layer, inputs, drain=True)
        inputs.release()
        inputs = nxt if wants_next else Activations(spool)
        model.release(layer)
        release_heap()
        seconds = time.monotonic() - t0
        if not resumed:
            ckpt.save(i, tensors, {"losses": out.losses, "seconds": round(seconds, 3), **out.stats})
            stats.computed.append(i)
        del tensors
        _report(on_layer, i, total, seconds, ckpt, resumed, stats, t_start)
    stats.seconds = time.monotonic() - t_start
    return stats


def assert_finite(i: int, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a layer whose quantized tensors hold NaN or inf (a solver blow-up must not be exported)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all()):  # fp8: via float
            raise RuntimeError(f"layer {i}: {name} is not finite after quantization")


def _report(on_layer, i, total, seconds, ckpt, resumed, stats, t_start) -> None:
    if on_layer is None:
        return
    # From this attempt's computed layers only: replayed ones take a fraction of the time.
    n = len(stats.computed)
    if n:
        per = sum(ckpt.layers[j].get("seconds", 0) for j in stats.computed) / n
    elif stats.replayed:
        per = None  # only replays so far: nothing measured yet
    else:
        per = (time.monotonic() - t_start) / max(i + 1, 1)
    eta = None if per is None else round(per * (total - i - 1), 1)
    on_layer(LayerReport(i, total, seconds, ckpt.layers.get(i, {}).get("losses", {}), resumed, eta))


def prepare(req: QuantizeRequest, device: torch.device, method: Method,
            dtype: torch.dtype | None = None) -> tuple[StreamedModel, torch.Tensor | None]:
    """Open the source (computing in ``dtype``, None: the device's choice) and tokenize the calibration set (when the method needs one)."""
    model = StreamedModel(req.source_dir, device, dtype)
    if not method.requires_calibration:
        return model, None
    return model, calibration_ids(req.calibration, load_tokenizer(req.source_dir), read_upload=req.read_upload,
                                  hub_token=req.hub_token)


def load_tokenizer(source_dir: Path):
    from transformers import AutoTokenizer

    from quantfarm.errors import NotAModel

    try:
        return AutoTokenizer.from_pretrained(source_dir)
    except (OSError, ValueError, TypeError) as exc:
        raise NotAModel(f"The model at {source_dir} has no usable tokenizer: {str(exc)[:200]}") from None
