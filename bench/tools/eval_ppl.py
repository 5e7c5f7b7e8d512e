"""Perplexity of one model directory on the held-out windows, the same way for every tool.

Runs in our venv. ``--kind dense`` loads plain fp32 weights (the source model,
or a peer's output dequantized by densify.py); ``--kind gptq`` loads a
``quant_method: gptq`` checkpoint through transformers + gptqmodel with the
exact ``gptq_torch`` CPU kernel in fp32; ``--kind awq`` loads an AWQ GEMM
checkpoint through transformers + gptqmodel; ``ct`` a compressed-tensors folder through
transformers + compressed-tensors (decompressed); ``gguf`` a ``model.gguf`` through
transformers' GGUF loader; ``bnb`` a bitsandbytes folder as saved; ``peft`` a bitsandbytes
base with the PEFT adapter in ``adapter/``.
"""

from __future__ import annotations

import time

from _child import load_windows, parser, perplexity, pin_threads, versions, write_result


def load(model_dir: str, kind: str):
    import torch
    from transformers import AutoModelForCausalLM

    if kind == "dense":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if kind == "gptq":
        import json
        from pathlib import Path

        from transformers import GPTQConfig

        bits = json.loads((Path(model_dir) / "config.json").read_text())["quantization_config"]["bits"]
        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, device_map="cpu", quantization_config=GPTQConfig(bits=bits, backend="gptq_torch"))
    if kind == "awq":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="cpu")
    if kind == "ct":
        from transformers import CompressedTensorsConfig

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="cpu",
                                                    quantization_config=CompressedTensorsConfig(run_compressed=False))
    if kind == "gguf":
        return AutoModelForCausalLM.from_pretrained(model_dir, gguf_file="model.gguf", dtype=torch.float32)
    if kind == "bnb":
        return AutoModelForCausalLM.from_pretrained(model_dir, device_map={"": "cpu"})
    if kind == "peft":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(model_dir, device_map={"": "cpu"})
        return PeftModel.from_pretrained(base, model_dir, subfolder="adapter")
    raise ValueError(kind)


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--eval", required=True, help="held-out windows .pt")
    ap.add_argument("--kind", choices=["dense", "gptq", "awq", "ct", "gguf", "bnb", "peft"], default="dense")
    a = ap.parse_args()
    pin_threads()
    t0 = time.perf_counter()
    model = load(a.model, a.kind)
    ppl, nll, count = perplexity(model, load_windows(a.eval))
    write_result(a.result, perplexity=ppl, nll_sum=nll, tokens=count, kind=a.kind, seconds=round(time.perf_counter() - t0, 2),
                 versions=versions("torch", "transformers", "gptqmodel"))


if __name__ == "__main__":
    main()
