"""Write the quantized model in the standard layout loaders already read."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantfarm.paths import UnsafePath, copy_regular_file, safe_join
from workers.engine.checkpoint import Checkpoints
from workers.engine.formats.base import FormatWriter
from workers.engine.formats.native import NativeWriter
from workers.engine.methods import Method
from workers.engine.model import StreamedModel

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def _layer_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".", 1)[0])


def output_tensor_names(model: StreamedModel, method: Method, ckpt: Checkpoints, writer: FormatWriter | None = None) -> list[tuple[str, int | None, str]]:
    """Every output tensor as (name, layer or None, where it comes from: 'source' | 'ckpt')."""
    writer = writer or NativeWriter(method.format)
    prefix = model.arch.layers + "."
    dropped: dict[int, set[str]] = {}  # per layer: a model's layers may differ (dense MLPs before sparse blocks)
    out: dict[str, tuple[int | None, str]] = {}
    for name in model.shards.names():
        layer = _layer_of(name, prefix)
        if layer is not None and layer not in dropped:
            dropped[layer] = writer.replaced_weights(method, model.arch.at(layer))
        rel = name[len(model.layer_prefix(layer)):] if layer is not None else None
        if rel is not None and rel in dropped[layer]:
            continue
        out[name] = (layer, "source")
    for i, entry in ckpt.layers.items():
        for rel in writer.tensor_names(method, model, list(entry["tensors"])):
            out[f"{model.layer_prefix(i)}{rel}"] = (i, "ckpt")
    return [(n, *out[n]) for n in sorted(out)]


def write_weights(
    model: StreamedModel, method: Method, ckpt: Checkpoints, out_dir: Path, max_shard_bytes: int, writer: FormatWriter | None = None,
) -> dict[str, str]:
    """Write sharded safetensors (with an index when there is more than one shard)."""
    writer = writer or NativeWriter(method.format)
    names = output_tensor_names(model, method, ckpt, writer)
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def tensor(name: str, layer: int | None, origin: str) -> torch.Tensor:
        if origin == "source":
            return model.shards.get(name)
        if layer not in cache:
            cache.clear()
            cache[layer] = writer.layer_tensors(method, model, ckpt.load(layer))
        return cache[layer][name[len(model.layer_prefix(layer)):]]

    shards: list[dict[str, torch.Tensor]] = [{}]
    written: list[str] = []
    size = 0
    weight_map: dict[str, int] = {}
    total = 0

    def flush() -> None:
        tmp = out_dir / f".shard-{len(written):05d}.safetensors"
        save_file(shards[-1], tmp, metadata={"format": "pt"})
        written.append(tmp.name)
        shards[-1] = {}

    for name, layer, origin in names:
        t = tensor(name, layer, origin).contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shards[-1][name] = t
        weight_map[name] = len(written)
        size += nbytes
        total += nbytes
    flush()

    n = len(written)
    final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, name in zip(written, final):
        (out_dir / tmp).rename(out_dir / name)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {k: final[v] for k, v in weight_map.items()}


def write_config(model: StreamedModel, qconfig: dict, out_dir: Path) -> dict:
    config = json.loads((model.dir / "config.json").read_text())
    config["quantization_config"] = qconfig
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def copy_tokenizer(source: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer files that are regular files inside ``source`` (never a device, FIFO or outside link)."""
    copied = []
    for name in TOKENIZER_FILES:
        try:
            src = safe_join(source, name).resolve()  # a link may point within the folder, never out of it
        except UnsafePath:
            log.warning("not copying %s: it links outside the model folder", name)
            continue
        if copy_regular_file(src, out_dir / name):
            copied.append(name)
    return copied


def export(
    model: StreamedModel, method: Method, writer: FormatWriter, ckpt: Checkpoints, out_dir: Path, *, max_shard_bytes: int,
) -> dict:
    """Write one format's weights, config and tokenizer files into an empty ``out_dir``; return its quantization_config."""
    writer.check(method)
    qconfig = writer.quantization_config(method, model)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_weights(model, method, ckpt, out_dir, max_shard_bytes, writer)
    write_config(model, qconfig, out_dir)
    copy_tokenizer(model.dir, out_dir)
    return qconfig
