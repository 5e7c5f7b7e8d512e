"""Write a Hugging Face causal LM as one GGUF file (llama.cpp, Ollama): tensors, metadata and tokenizer.

Names and the q/k row order follow llama.cpp's ``convert_hf_to_gguf.py``; the
tokenizer is a byte-level BPE (``gpt2``) vocabulary with its merges, read from
``tokenizer.json``. Source tensors are read one at a time; the converted ones
are held until the file is written (the artifact's size in memory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from quantfarm.errors import UnsupportedArchitecture, UnsupportedModel
from quantfarm.paths import UnsafePath, is_regular_file, safe_join
from workers.engine.shards import ShardReader


@dataclass(frozen=True)
class GGUFArch:
    """How one transformers architecture is written: llama.cpp's name for it and whether q/k rows are permuted."""

    model_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool


GGUF_ARCHITECTURES = {
    "llama": GGUFArch("LLAMA", True),
    "mistral": GGUFArch("LLAMA", True),
    "qwen2": GGUFArch("QWEN2", False),
}


def gguf_arch(config) -> GGUFArch:
    """Return the table entry of ``config.model_type``; raise UnsupportedArchitecture listing the known ones."""
    arch = GGUF_ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UnsupportedArchitecture(
            f"GGUF export supports {', '.join(sorted(GGUF_ARCHITECTURES))}, not {config.model_type!r}.",
        )
    return arch


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for rotary q/k weights (interleaved halves per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of ``permute_qk``: back to transformers' row order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _metadata(writer, config, name: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)


# tokenizer.json's Split regex (before a ByteLevel step that does not split) -> llama.cpp's name for that pre-tokenizer
_SPLIT_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the split a ``tokenizer.json`` pre-tokenizer makes.

    llama.cpp splits text by the regexes of that name before BPE; a name whose split
    differs (its ``default`` also cuts digit runs and punctuation apart) makes it
    tokenize the text differently from transformers. Unknown splits are refused.
    """
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space", False):
        return "gpt-2"  # ByteLevel's own split is GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space", False):
        name = _SPLIT_PRE.get((steps[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise UnsupportedModel(
        "GGUF export writes byte-level BPE tokenizers that split text as GPT-2, Llama 3 or Qwen2 do; "
        f"this tokenizer's pre-tokenizer ({', '.join(str(k) for k in kinds)}) has no llama.cpp equivalent we know.")


def _tokenizer(writer, source_dir: Path, config) -> None:
    """A byte-level BPE vocabulary (``gpt2`` in llama.cpp's terms) from ``tokenizer.json``."""
    try:
        path = safe_join(source_dir, "tokenizer.json").resolve()  # a link may point within the folder, never out of it
    except UnsafePath:
        raise UnsupportedModel("tokenizer.json links outside the model folder; GGUF export will not read it.") from None
    if not is_regular_file(path):
        raise UnsupportedModel("GGUF export needs a fast tokenizer (tokenizer.json) to embed the vocabulary.")
    tok = json.loads(path.read_text())
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedModel(f"GGUF export writes byte-level BPE vocabularies, not {model.get('type')!r} ones.")
    pre = pre_tokenizer_name(tok.get("pre_tokenizer"))
    vocab = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab.update(special)
    size = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED
    for text, i in vocab.items():
        tokens[i], types[i] = text, (3 if text in special else 1)  # CONTROL / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        if isinstance(getattr(config, key, None), int):
            add(getattr(config, key))


def _name_map(config):
    import gguf

    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, gguf_arch(config).model_arch), config.num_hidden_layers)


def gguf_names(config, hf_names) -> dict[str, str]:
    """Source tensor name -> llama.cpp's name, for the names llama.cpp has."""
    names = _name_map(config)
    found = {n: names.get_name(n, try_suffixes=(".weight", ".bias")) for n in hf_names}
    return {n: g for n, g in found.items() if g is not None}


def write_gguf(
    source_dir: Path, out_file: Path, *, config, name: str, file_type: int,
    convert: Callable[[str, np.ndarray], tuple[np.ndarray, int, np.ndarray]],
    keep: dict[str, torch.Tensor] | None = None,
) -> dict[str, str]:
    """Write ``out_file``; return gguf name -> type name.

    ``convert(gguf_name, float32 array)`` returns (data, GGMLQuantizationType, the
    float32 weights the data decodes to). With ``keep``, each decoded tensor is
    stored there under its source name, in the source's row order: the model a
    runtime reading the file computes with.
    """
    import gguf

    arch = gguf_arch(config)
    model_arch = getattr(gguf.MODEL_ARCH, arch.model_arch)
    names = _name_map(config)
    writer = gguf.GGUFWriter(out_file, gguf.MODEL_ARCH_NAMES[model_arch])
    _metadata(writer, config, name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # as llama-quantize writes it
    _tokenizer(writer, source_dir, config)
    shards = ShardReader(source_dir)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    written: dict[str, str] = {}
    for hf_name in shards.names():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UnsupportedModel(f"GGUF export has no llama.cpp name for tensor {hf_name!r}.")
        data = shards.get(hf_name).to(torch.float32).numpy()
        heads = None
        if arch.permute_qk and target.endswith("attn_q.weight"):
            heads = config.num_attention_heads
        elif arch.permute_qk and target.endswith("attn_k.weight"):
            heads = kv_heads
        out, qtype, decoded = convert(target, data if heads is None else permute_qk(data, heads))
        if keep is not None:
            decoded = decoded.reshape(data.shape)
            keep[hf_name] = torch.from_numpy(np.ascontiguousarray(decoded if heads is None else unpermute_qk(decoded, heads)))
        writer.add_tensor(target, out, raw_dtype=qtype)
        written[target] = gguf.GGMLQuantizationType(qtype).name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written
