"""GGUF Q4_K_M: our k-quants decode exactly as the gguf package decodes them, the tensor types follow
llama-quantize's Q4_K_M mix, transformers' GGUF loader computes the engine's decoded model, and the
importance matrix lowers the output error of a trained model."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from quantfarm import spec
from storage.artifacts import LocalStore
from tests.workers.engine_methods.helpers import CALIB, CPU, sample_ids
from workers.engine.kquants import quantize_q4_k, quantize_q6_k
from workers.engine.methods.gguf import tensor_type, use_more_bits, write_model
from workers.engine.pipeline import QuantizeRequest
from workers.engine.run import quantize

pytestmark = pytest.mark.trains  # trains its model (tests/support/trained.py) when the cache is empty

Q4KM = spec.GGUFOptions(quant_type="Q4_K_M")


def _matrix() -> np.ndarray:
    """Gaussian rows with the cases a block search trips on: zeros, a constant, all-negative, one outlier."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 512)) * 0.02).astype(np.float32)
    w[1] = 0
    w[2, :256] = 0.01
    w[3] = -np.abs(w[3])
    w[4, 7] = 0.9
    return w


@pytest.mark.parametrize("fn, qtype, bound", [(quantize_q4_k, "Q4_K", 0.08), (quantize_q6_k, "Q6_K", 0.02)])
def test_k_quant_blocks_decode_as_the_gguf_package_decodes_them(fn, qtype, bound):
    import gguf

    w = _matrix()
    imatrix = (np.random.default_rng(1).random(512) ** 4 * 10).astype(np.float32)
    t = gguf.GGMLQuantizationType[qtype]
    errs = {}
    for name, qw in (("plain", None), ("imatrix", imatrix)):
        packed, decoded = fn(w, qw)
        assert packed.dtype == np.uint8 and packed.shape == (64, 2 * gguf.GGML_QUANT_SIZES[t][1])
        assert np.array_equal(gguf.quants.dequantize(packed, t).reshape(w.shape), decoded)  # bit for bit
        assert not decoded[1].any() and np.abs(decoded[2, :256] - 0.01).max() < 1e-4
        normal = np.r_[0, 5:64]
        assert np.linalg.norm(decoded[normal] - w[normal]) / np.linalg.norm(w[normal]) < bound
        errs[name] = float((np.square(decoded - w) * imatrix).sum())
    assert errs["imatrix"] < 0.9 * errs["plain"]  # the weighted search favours the important columns
    with pytest.raises(ValueError, match="multiple of 256"):
        fn(w[:, :384])


def test_the_q4_k_m_mix_is_llama_quantizes():
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]

    def t(name, shape=(512, 256), tied=False):
        return tensor_type("Q4_K_M", name, shape, n_layers=8, tied=tied)

    assert [t(f"blk.{i}.attn_v.weight") for i in range(8)] == ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert [t(f"blk.{i}.ffn_down.weight") for i in (0, 1)] == ["Q6_K", "Q4_K"]
    assert {t(f"blk.0.{n}.weight") for n in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")} == {"Q4_K"}
    assert (t("output.weight"), t("token_embd.weight"), t("token_embd.weight", tied=True)) == ("Q6_K", "Q4_K", "Q6_K")
    # rows that do not split into super-blocks fall back as llama-quantize does
    assert (t("blk.1.ffn_down.weight", (256, 384)), t("blk.0.ffn_down.weight", (256, 384))) == ("Q5_0", "Q8_0")
    assert (t("output.weight", (512, 384)), t("blk.1.attn_q.weight", (8, 100))) == ("Q8_0", "F16")
    assert (t("blk.0.attn_norm.weight", (256,)), tensor_type("Q8_0", "blk.0.attn_q.weight", (8, 100), n_layers=8, tied=False)) == ("F32", "F32")


def _req(source, **options):
    return QuantizeRequest(source_dir=source, method="gguf", options=spec.GGUFOptions(quant_type="Q4_K_M", **options),
                           calibration=CALIB, base_model="org/tiny")


@pytest.fixture(scope="module")
def wide(tiny_source):
    """Rows of 256 (hidden) and of 384 (ffn_down's input: the fallback types)."""
    return tiny_source("llama", hidden=256, intermediate=384)


@pytest.fixture(scope="module")
def q4km_run(wide, tmp_path_factory):
    d = tmp_path_factory.mktemp("q4km")
    return d / "out", quantize(_req(wide, imatrix=True), LocalStore(d / "ckpt"), d / "out", device=CPU)


def test_reader_round_trip_of_types_shapes_metadata_and_tokenizer(wide, q4km_run):
    import gguf
    from transformers import AutoTokenizer

    out, res = q4km_run
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert reader.fields["llama.embedding_length"].contents() == 256
    tok = AutoTokenizer.from_pretrained(wide)
    assert reader.fields["tokenizer.ggml.tokens"].contents()[: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {n: types[n] for n in ("token_embd.weight", "output.weight", "blk.0.attn_v.weight", "blk.1.attn_v.weight",
                                  "blk.0.ffn_down.weight", "blk.1.ffn_down.weight", "blk.0.attn_q.weight", "blk.0.ffn_up.weight",
                                  "blk.0.attn_norm.weight")} == {
        "token_embd.weight": "Q4_K", "output.weight": "Q6_K", "blk.0.attn_v.weight": "Q4_K", "blk.1.attn_v.weight": "Q6_K",
        "blk.0.ffn_down.weight": "Q5_0", "blk.1.ffn_down.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_K",
        "blk.0.ffn_up.weight": "Q4_K", "blk.0.attn_norm.weight": "F32"}
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    assert shapes["blk.0.ffn_down.weight"] == [384, 256] and shapes["blk.0.attn_k.weight"] == [256, 128]  # ne0 (columns) first
    assert res.quantization_config == {"quant_method": "gguf", "quant_type": "Q4_K_M", "file": "model.gguf", "imatrix": True}
    assert res.metrics["gguf_tensor_types"] == {"F32": 5, "Q4_K": 12, "Q5_0": 1, "Q6_K": 2, "Q8_0": 1}


def _decoded_model(source, keep):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    model.load_state_dict(keep, strict=False)
    return model


def test_transformers_gguf_loader_computes_the_engines_decoded_model(wide, tmp_path):
    from transformers import AutoModelForCausalLM

    keep: dict = {}
    write_model(wide, tmp_path / "model.gguf", Q4KM, name="tiny", keep=keep)
    ids = sample_ids(1000)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32).eval()(ids).logits
        ref = _decoded_model(wide, keep)(ids).logits
        src = AutoModelForCausalLM.from_pretrained(wide, dtype=torch.float32).eval()(ids).logits
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    assert float((got - src).norm() / src.norm()) > 1e-3  # 4-bit rounding did change the outputs


def test_a_rerun_with_the_importance_matrix_writes_the_same_bytes(wide, q4km_run, tmp_path):
    out, _ = q4km_run
    quantize(_req(wide, imatrix=True), LocalStore(tmp_path / "ckpt"), tmp_path / "out", device=CPU)
    for name in ("model.gguf", "README.md"):
        assert hashlib.sha256((tmp_path / "out" / name).read_bytes()).digest() == hashlib.sha256((out / name).read_bytes()).digest()


def test_the_importance_matrix_pass_spills_to_the_scratch_folder_with_the_same_bytes(wide, q4km_run, tmp_path, monkeypatch):
    """Its activations go through the job's spool as the layer-wise methods' do: beyond the RAM bound (here 0)
    every batch is a file in the scratch folder, removed at the end, and the output is byte for byte the same."""
    from workers.engine import activations

    written = []
    keep = activations.Spool.keep

    def counting_keep(self, t):
        entry = keep(self, t)
        if not isinstance(entry, torch.Tensor):
            written.append(entry.path)
        return entry

    monkeypatch.setattr(activations.Spool, "keep", counting_keep)
    out, _ = q4km_run
    quantize(_req(wide, imatrix=True), LocalStore(tmp_path / "ckpt"), tmp_path / "out", device=CPU,
             activations_dir=tmp_path / "scratch", activations_ram_bytes=0)
    assert len(written) >= 3 and all(p.is_relative_to(tmp_path / "scratch") for p in written)  # 2 layers' outputs and more
    assert not (tmp_path / "scratch").exists() or not any((tmp_path / "scratch").rglob("*.bin"))
    assert (tmp_path / "out" / "model.gguf").read_bytes() == (out / "model.gguf").read_bytes()


@pytest.fixture(scope="module")
def trained_wide():
    """The trained test Llama at hidden 256, so every linear's rows split into k-quant super-blocks."""
    from tests.conftest import CACHE
    from tests.support.trained import trained_llama

    return trained_llama(CACHE, hidden=256, intermediate=512, layers=2, steps=600)


def test_the_importance_matrix_lowers_the_output_error_of_a_trained_model(trained_wide, tmp_path):
    """On held-out windows (never calibrated on), against the float model: every linear's output error
    summed (the error the importance matrix weighs), and the rise in next-token loss. (The 4-bit token
    embeddings, which no activation weighs, dominate the logits' own error and keep it within a percent.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantfarm.spec import Calibration, Evaluation
    from workers.engine.calibration import calibration_ids, evaluation_ids
    from workers.engine.imatrix import collect_imatrix

    tok = AutoTokenizer.from_pretrained(trained_wide)
    imatrix = collect_imatrix(trained_wide, CPU, calibration_ids(Calibration(num_samples=32, seq_len=128), tok))
    assert set(imatrix) >= {"model.layers.1.mlp.down_proj.weight", "lm_head.weight"} and imatrix["lm_head.weight"].shape == (256,)
    held = evaluation_ids(Evaluation(max_windows=64), tok, 128)
    decoded = {}
    for name, im in (("plain", None), ("imatrix", imatrix)):
        decoded[name] = {}
        write_model(trained_wide, tmp_path / f"{name}.gguf", Q4KM, name="t", imatrix=im, keep=decoded[name])
    model = AutoModelForCausalLM.from_pretrained(trained_wide, dtype=torch.float32).eval()
    linear_err = {"plain": 0.0, "imatrix": 0.0}

    def hook(weight_name):
        def pre(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            for name in linear_err:
                linear_err[name] += float((x @ (decoded[name][weight_name] - module.weight).T).square().sum())
        return pre

    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(hook(n + ".weight"))

    def loss(m):
        logits = m(held).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), held[:, 1:].reshape(-1)))

    with torch.no_grad():
        ref = loss(model)
        rise = {}
        for name in decoded:
            q = AutoModelForCausalLM.from_pretrained(trained_wide, dtype=torch.float32).eval()
            q.load_state_dict(decoded[name], strict=False)
            rise[name] = loss(q) - ref
    assert linear_err["imatrix"] < 0.9 * linear_err["plain"], linear_err
    # The loss rises are within evaluation noise of each other at this size, and which is lower depends on the
    # trained weights (a model trained on a CPU with AVX512/AMX gave 0.00074 with the matrix against 0.00056
    # without; the model trained on earlier AVX2 hosts had it lower): both stay small, neither more than noise above.
    assert max(rise.values()) < 0.005 and rise["imatrix"] < rise["plain"] + 0.001, rise
