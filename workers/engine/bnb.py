"""The bitsandbytes path: quantize the whole model while transformers loads it, then save it.

bitsandbytes quantizes each ``nn.Linear`` as ``from_pretrained`` fills it, so
there is no layer loop, calibration or checkpoint. The artifact is what
``save_pretrained`` writes for a bnb-quantized model; it reloads with
``from_pretrained`` and no ``quantization_config`` argument.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quantfarm.errors import DependencyMissing, UnsupportedModel
from quantfarm.store import walk_files
from workers.engine.calibration import evaluation_ids
from workers.engine.card import model_card
from workers.engine.export import copy_tokenizer
from workers.engine.methods import method_for
from workers.engine.methods.bnb import BnBMethod
from workers.engine.model import read_config
from workers.engine.pipeline import QuantizeRequest, batches_of, load_tokenizer
from workers.engine.shards import ShardReader


def _require_bnb() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DependencyMissing("bitsandbytes methods require bitsandbytes: `pip install bitsandbytes`.") from None


def _device_map(device: torch.device) -> dict[str, str]:
    return {"": str(device)}


def _load(path: Path, device: torch.device, **kwargs):
    from transformers import AutoModelForCausalLM

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(path, device_map=_device_map(device), dtype="auto", **kwargs)
    except ValueError as exc:
        raise UnsupportedModel(f"transformers cannot load this model as a causal LM: {str(exc)[:300]}") from None
    return model.eval()


def source_skeleton(source_dir: Path):
    """The source model on ``meta``: its default skips and its memory footprint without loading weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = read_config(source_dir)
    src = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, src) if isinstance(src, str) else src
    try:
        with init_empty_weights(include_buffers=False), contextlib.redirect_stdout(io.StringIO()):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as exc:
        raise UnsupportedModel(f"transformers cannot build this model as a causal LM: {exc}") from None


@torch.no_grad()
def perplexity(model, ids: torch.Tensor) -> float:
    """Next-token perplexity of a loaded model on ``ids``, in the engine's batches."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches_of(ids):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    return math.exp(total / count)


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _evaluate(req: QuantizeRequest, out_dir: Path, device: torch.device, config) -> dict[str, Any]:
    """Perplexity of the source and of the saved artifact, reloaded as a user would."""
    max_pos = getattr(config, "max_position_embeddings", None) or 2048
    seq_len = min(req.calibration.seq_len, max_pos)
    ids = evaluation_ids(req.evaluation, load_tokenizer(req.source_dir), seq_len)
    source = _load(req.source_dir, device)
    before = perplexity(source, ids)
    _free(source)
    reloaded = _load(out_dir, device)  # no quantization_config: it comes from config.json
    after = perplexity(reloaded, ids)
    _free(reloaded)
    return {"perplexity_before": round(before, 4), "perplexity_after": round(after, 4), "eval_tokens": int(ids.numel())}


def quantize_bnb(
    req: QuantizeRequest,
    out_dir: Path,
    *,
    device: torch.device,
    on_stage: Callable[[str], None] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
):
    """Load ``req.source_dir`` through bitsandbytes and save the quantized model into ``out_dir``.

    Raises DependencyMissing without bitsandbytes, NotAModel / UnsupportedModel
    for sources transformers cannot load as a causal LM, BadRequest for a
    method that is not bitsandbytes.
    """
    from workers.engine.run import EngineResult

    stage = on_stage or (lambda _s: None)
    method = method_for(req.method, req.options)
    if not isinstance(method, BnBMethod):
        from quantfarm.errors import BadRequest

        raise BadRequest(f"quantize_bnb runs bitsandbytes methods, not {req.method!r}.")
    _require_bnb()
    t0 = time.monotonic()
    stage("exporting")  # bitsandbytes quantizes while loading; loading and saving are one step
    skeleton = source_skeleton(req.source_dir)
    footprint_before = skeleton.get_memory_footprint()
    from transformers.quantizers.base import get_keys_to_not_convert

    bnb_config = method.bnb_config(get_keys_to_not_convert(skeleton))
    config = skeleton.config
    _free(skeleton)

    model = _load(req.source_dir, device, quantization_config=bnb_config)
    footprint_after = model.get_memory_footprint()
    # Save before any forward pass: an NF4 model saved after a CPU forward reloads corrupted.
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=max_shard_bytes)
    _free(model)
    copy_tokenizer(req.source_dir, out_dir)
    qconfig = json.loads((out_dir / "config.json").read_text()).get("quantization_config", {})
    metrics: dict[str, Any] = {
        "size_bytes_before": ShardReader(req.source_dir).total_bytes(),
        "size_bytes_after": sum(p.stat().st_size for p in walk_files(out_dir) if p.suffix == ".safetensors"),
        "memory_footprint_before": int(footprint_before),
        "memory_footprint_after": int(footprint_after),
        "quantize_seconds": round(time.monotonic() - t0, 3),
    }

    evaluation = None
    if req.evaluate:
        stage("evaluating")
        t1 = time.monotonic()
        evaluation = _evaluate(req, out_dir, device, config)
        metrics.update(evaluation)
        metrics["evaluate_seconds"] = round(time.monotonic() - t1, 3)

    metrics["source"] = {"revision": req.source_revision, "files": ShardReader(req.source_dir).file_hashes()}
    card = model_card(
        base_model=req.base_model, method=method.name, fmt=method.format, options=req.options.model_dump(mode="json"),
        quantization_config=qconfig, calibration=None, source=metrics["source"],
        evaluation={**evaluation, **{k: metrics[k] for k in ("size_bytes_before", "size_bytes_after", "memory_footprint_before", "memory_footprint_after")}} if evaluation else None,
    )
    (out_dir / "README.md").write_text(card)
    return EngineResult(
        out_dir=out_dir, layers_total=0, layers_computed=[], layers_replayed=[],
        metrics=metrics, quantization_config=qconfig,
    )
