"""llama.cpp itself loads our GGUF, tokenizes text as transformers does and computes the same perplexity.

Runs only where ``LLAMA_CPP_BIN`` names a llama.cpp build's binary folder holding
``llama-perplexity`` (CI has none and skips it; ``bench/llamacpp.py`` is the full comparison).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from quantfarm import spec
from storage.artifacts import LocalStore
from tests.workers.engine_methods.helpers import CALIB, CPU
from workers.engine.pipeline import QuantizeRequest
from workers.engine.run import quantize

BIN = Path(os.environ.get("LLAMA_CPP_BIN", "")) / "llama-perplexity"
pytestmark = pytest.mark.skipif(not os.environ.get("LLAMA_CPP_BIN") or not BIN.is_file(),
                                reason="set LLAMA_CPP_BIN to a llama.cpp build's bin folder to run")
N_CTX, CHUNKS = 64, 8


@pytest.mark.parametrize("quant_type", ["Q8_0", "Q4_K_M"])
def test_llama_cpp_tokenizes_and_scores_our_gguf_as_transformers_does(tiny_source, tmp_path, quant_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.engine.calibration import builtin_code_texts

    source = tiny_source("llama", hidden=256, intermediate=384)  # rows of 256: Q4_K and Q6_K, not only their fallbacks
    req = QuantizeRequest(source_dir=source, method="gguf", options=spec.GGUFOptions(quant_type=quant_type), calibration=CALIB)
    quantize(req, LocalStore(tmp_path / "ckpt"), tmp_path / "out", device=CPU)
    text = "".join(builtin_code_texts(holdout=True, max_chars=20_000))
    (tmp_path / "held.txt").write_text(text)
    r = subprocess.run([str(BIN), "-m", str(tmp_path / "out" / "model.gguf"), "-f", str(tmp_path / "held.txt"), "-c", str(N_CTX),
                        "-b", str(N_CTX), "--chunks", str(CHUNKS), "-t", "2", "--kl-divergence-base", str(tmp_path / "base.kld")],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    # llama-perplexity prints "[k]running perplexity," after each chunk; the last lines of its output are sometimes cut
    running = [float(x) for x in re.findall(r"\[\d+\]([\d.]+),", r.stdout)]
    assert len(running) >= CHUNKS // 2, r.stdout[-2000:]

    raw = (tmp_path / "base.kld").read_bytes()  # "_logits_", n_ctx, n_vocab, n_chunk, then the tokens it scored
    n_ctx, _, n_chunk = np.frombuffer(raw[8:20], dtype=np.int32)
    tokens = np.frombuffer(raw[20:20 + 4 * n_ctx * n_chunk], dtype=np.int32).astype(np.int64)
    assert (n_ctx, n_chunk) == (N_CTX, CHUNKS)
    assert tokens.tolist() == AutoTokenizer.from_pretrained(source)(text, add_special_tokens=False)["input_ids"][: len(tokens)]

    ids = torch.from_numpy(tokens).view(n_chunk, n_ctx)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)
    first = n_ctx // 2  # llama-perplexity scores the second half of each window
    nll = -logp[:, first:-1].gather(-1, ids[:, first + 1:, None])[: len(running)].mean()
    assert running[-1] == pytest.approx(math.exp(float(nll)), rel=0.01)
