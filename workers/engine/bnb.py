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
from pathlib import Path

import torch

from quantfarm.errors import DependencyMissing, UnsupportedModel
from workers.engine.export import copy_tokenizer
from workers.engine.methods.base import EngineJob, Quantized
from workers.engine.model import read_config
from workers.engine.pipeline import batches_of
from workers.engine.tasks_gate import loaded_generations


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


def loaded_perplexities(load_source, load_quantized):
    """Perplexity of two whole models loaded one after the other (the source, then the artifact)."""

    def run(ids: torch.Tensor) -> tuple[float, float]:
        values = []
        for load in (load_source, load_quantized):
            model = load()
            values.append(perplexity(model, ids))
            _free(model)
        return values[0], values[1]

    return run


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


def quantize_bnb(method, job: EngineJob) -> Quantized:
    """Load the source through bitsandbytes and save the quantized model into the job's one output.

    Raises DependencyMissing without bitsandbytes, NotAModel / UnsupportedModel
    for sources transformers cannot load as a causal LM.
    """
    _require_bnb()
    req = job.req
    (fmt, out_dir), = job.outputs.items()
    job.stage("exporting")  # bitsandbytes quantizes while loading; loading and saving are one step
    skeleton = source_skeleton(req.source_dir)
    footprint_before = skeleton.get_memory_footprint()
    from transformers.quantizers.base import get_keys_to_not_convert

    bnb_config = method.bnb_config(get_keys_to_not_convert(skeleton))
    _free(skeleton)

    model = _load(req.source_dir, job.device, quantization_config=bnb_config)
    footprint_after = model.get_memory_footprint()
    # Save before any forward pass: an NF4 model saved after a CPU forward reloads corrupted.
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=job.max_shard_bytes)
    _free(model)
    copy_tokenizer(req.source_dir, out_dir)
    qconfig = json.loads((out_dir / "config.json").read_text()).get("quantization_config", {})

    def source():
        return _load(req.source_dir, job.device)

    def reloaded():  # the saved artifact reloaded as a user would (no quantization_config argument)
        return _load(out_dir, job.device)

    return Quantized(
        configs={fmt: qconfig}, perplexities=loaded_perplexities(source, reloaded),
        generations=loaded_generations(source, reloaded),
        metrics={"memory_footprint_before": int(footprint_before), "memory_footprint_after": int(footprint_after)},
    )
