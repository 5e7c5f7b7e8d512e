"""GGUF Q8_0: the gguf package reads back every tensor, the metadata and the tokenizer; transformers' GGUF loader
computes the engine's dequantized model."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from quantfarm import spec
from quantfarm.errors import UnsupportedArchitecture
from storage.artifacts import LocalStore
from storage.hub import check_card, check_quantization_config
from tests.workers.engine_methods.helpers import CALIB, CPU, sample_ids
from workers.engine.gguf_writer import permute_qk
from workers.engine.pipeline import QuantizeRequest
from workers.engine.run import quantize


def _req(source):
    return QuantizeRequest(source_dir=source, method="gguf", options=spec.GGUFOptions(), calibration=CALIB, base_model="org/tiny")


@pytest.fixture(scope="module")
def gguf_run(tiny_source, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    source = tiny_source("llama")
    return source, d / "out", quantize(_req(source), LocalStore(d / "ckpt"), d / "out", device=CPU)


def _dequantized_source(source):
    """The source with every 2-D weight rounded through Q8_0 and back: what a Q8_0 runtime computes with."""
    import gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    Q8 = gguf.GGMLQuantizationType.Q8_0
    for _, p in model.named_parameters():
        if p.dim() == 2:
            q = gguf.quants.quantize(p.data.numpy(), Q8)
            p.data = torch.from_numpy(gguf.quants.dequantize(q, Q8).copy()).reshape(p.shape)
    return model


def test_reader_round_trip_of_tensors_metadata_and_tokenizer(gguf_run):
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    source, out, res = gguf_run
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.gguf"]
    reader = gguf.GGUFReader(out / "model.gguf")
    config = AutoConfig.from_pretrained(source)

    def field(name):
        f = reader.fields[name]
        return f.contents()

    assert field("general.architecture") == "llama" and field("general.name") == "org/tiny"
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.feed_forward_length")) == (2, 128, 256)
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert field("llama.context_length") == config.max_position_embeddings
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0 and field("general.quantization_version") == 2
    tok = AutoTokenizer.from_pretrained(source)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.tokens")[: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (0, 1)

    tensors = {t.name: t for t in reader.tensors}
    weights = {}
    for f in source.glob("*.safetensors"):
        weights.update(load_file(f))
    assert len(tensors) == len(weights)
    q = tensors["blk.1.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.Q8_0 and list(map(int, q.shape)) == [128, 128]  # GGUF lists ne0 first
    assert tensors["blk.1.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    W = weights["model.layers.1.self_attn.q_proj.weight"].numpy()
    back = gguf.quants.dequantize(q.data, q.tensor_type).reshape(W.shape)
    permuted = permute_qk(W, 4)
    step = np.abs(permuted).reshape(-1, 32).max(axis=1) / 127  # each block's scale (stored in fp16: up to 127 x 2^-11 more)
    assert bool((np.abs(back - permuted).reshape(-1, 32) <= step[:, None] * 0.57).all())
    assert not np.allclose(back, W, atol=1e-2)  # the rows really are in llama.cpp's order
    norm = tensors["blk.1.attn_norm.weight"]
    assert np.array_equal(np.asarray(norm.data), weights["model.layers.1.input_layernorm.weight"].numpy())


def test_transformers_gguf_loader_computes_the_dequantized_model(gguf_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, out, res = gguf_run
    ids = sample_ids(1000)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()(ids).logits
        ref = _dequantized_source(source)(ids).logits
        src = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()(ids).logits
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    assert float((got - src).norm() / src.norm()) > 1e-5  # Q8_0 did round the weights
    text = "def add(a, b):\n    return a + b\n"
    assert AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")(text)["input_ids"][-12:] == AutoTokenizer.from_pretrained(source)(text)["input_ids"][-12:]


def test_card_tells_llama_cpp_and_ollama_how_to_load_it_and_the_hub_accepts_it(gguf_run):
    _, out, res = gguf_run
    card = (out / "README.md").read_text()
    assert 'llama-cli -m "<this repo or folder>/model.gguf"' in card and "ollama create" in card and 'gguf_file="model.gguf"' in card
    qc = check_quantization_config(out)
    assert qc == {"quant_method": "gguf"} and "gguf" in check_card(out, qc)["tags"]
    assert res.quantization_config == {"quant_method": "gguf", "quant_type": "Q8_0", "file": "model.gguf"}
    assert res.metrics["size_bytes_after"] == (out / "model.gguf").stat().st_size < res.metrics["size_bytes_before"] / 3


def test_a_rerun_writes_the_same_bytes(gguf_run, tmp_path):
    source, out, _ = gguf_run
    quantize(_req(source), LocalStore(tmp_path / "ckpt"), tmp_path / "out", device=CPU)
    for name in ("model.gguf", "README.md"):
        assert hashlib.sha256((tmp_path / "out" / name).read_bytes()).digest() == hashlib.sha256((out / name).read_bytes()).digest()


def test_an_architecture_without_a_gguf_mapping_names_the_ones_it_has(tiny_source, tmp_path):
    with pytest.raises(UnsupportedArchitecture, match="GGUF export supports llama, mistral, qwen2, not 'opt'"):
        quantize(_req(tiny_source("opt")), LocalStore(tmp_path / "ckpt"), tmp_path / "out", device=CPU)


def test_a_tokenizer_linking_outside_the_model_is_not_read(tiny_source, tmp_path):
    import shutil

    from quantfarm.errors import UnsupportedModel

    src = tmp_path / "src"
    shutil.copytree(tiny_source("llama"), src)
    secret = tmp_path / "secret.json"
    secret.write_text((src / "tokenizer.json").read_text())
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to(secret)
    with pytest.raises(UnsupportedModel, match="links outside the model folder"):
        quantize(_req(src), LocalStore(tmp_path / "ckpt"), tmp_path / "out", device=CPU)


# llama.cpp's split regexes per tokenizer.ggml.pre name (src/llama-vocab.cpp), applied in order, each to the
# pieces the previous one left: a stand-in for llama.cpp's tokenizer, which CI does not have.
LLAMA_CPP_SPLIT = {
    "gpt-2": [r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                r"\p{N}+", r"[0-9][0-9][0-9]"],
}


def _llama_cpp_split(name: str, text: str) -> list[str]:
    import regex

    pieces = [text]
    for rx in LLAMA_CPP_SPLIT[name]:
        out = []
        for p in pieces:
            at = 0
            for m in regex.finditer(rx, p):
                out += [p[at:m.start()]] * (m.start() > at) + [m.group()]
                at = m.end()
            out += [p[at:]] * (at < len(p))
        pieces = out
    return pieces


def test_llama_cpp_splits_text_as_transformers_does_by_the_declared_pre_tokenizer(gguf_run):
    """The file's ``tokenizer.ggml.pre`` names the split llama.cpp makes before BPE; a wrong name (the writer once
    wrote ``default``) makes llama.cpp tokenize code differently from the model's own tokenizer."""
    import gguf
    from transformers import AutoTokenizer

    source, out, _ = gguf_run
    pre = gguf.GGUFReader(out / "model.gguf").fields["tokenizer.ggml.pre"].contents()
    text = "def f(x, n=12345):\n    return x.y[0] + 'it''s'  # don't\n\n\tz = a->b == c ~ d | 7.5e-3\n"
    hf = [text[a:b] for _, (a, b) in AutoTokenizer.from_pretrained(source).backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    assert _llama_cpp_split(pre, text) == hf
    assert _llama_cpp_split("default", text) != hf  # the check tells the names apart


def test_a_pre_tokenizer_llama_cpp_has_no_name_for_is_refused(tiny_source, tmp_path):
    import json
    import shutil

    from quantfarm.errors import UnsupportedModel

    src = tmp_path / "src"
    shutil.copytree(tiny_source("llama"), src)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    (src / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UnsupportedModel, match=r"pre-tokenizer \(Metaspace\) has no llama.cpp equivalent"):
        quantize(_req(src), LocalStore(tmp_path / "ckpt"), tmp_path / "out", device=CPU)
