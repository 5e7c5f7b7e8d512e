"""Turn a quantized checkpoint into plain dequantized fp32 weights (run in the tool's own venv).

Loads ``--model`` with transformers (which reads compressed-tensors through
the installed compressed-tensors: llm-compressor's venv), computes the
perplexity there as a cross-check, and writes every weight as the float it
computes with, so that all tools are scored by one evaluator in one venv.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from _child import load_windows, parser, perplexity, pin_threads, versions, write_result


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--eval", required=True, help="held-out windows .pt")
    a = ap.parse_args()
    pin_threads()
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ppl, nll, count = perplexity(model, load_windows(a.eval))
    dense = _dense_state(model)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in dense.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((Path(a.model) / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in Path(a.model).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, out / f.name)
    write_result(a.result, perplexity=ppl, nll_sum=nll, tokens=count, seconds=round(time.perf_counter() - t0, 2),
                 tensors=len(dense), versions=versions("torch", "transformers", "compressed-tensors"))


def _dense_state(model) -> dict:
    """Every parameter as the fp32 tensor the forward uses (quantized linears dequantized)."""
    import torch

    out = {}
    for name, mod in model.named_modules():
        w = _dequantized_weight(mod)
        if w is not None:
            out[f"{name}.weight"] = w.float().cpu()
            if getattr(mod, "bias", None) is not None:
                out[f"{name}.bias"] = mod.bias.detach().float().cpu()
    for name, p in model.state_dict().items():
        base = name.rsplit(".", 1)[0]
        if name in out or f"{base}.weight" in out and not name.endswith(("weight", "bias")):
            continue
        if p.is_floating_point() and not any(name.endswith(s) for s in ("weight_scale", "weight_zero_point", "weight_g_idx", "scales", "qzeros", "qweight", "weight_global_scale")):
            out[name] = p.detach().float().cpu()
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _dequantized_weight(mod):
    import torch

    if isinstance(mod, torch.nn.Linear) and hasattr(mod, "weight_scale"):
        # compressed-tensors keeps the fake-quantized weight after decompression; re-apply its quantizer to be sure.
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize

        args = mod.quantization_scheme.weights
        zp = getattr(mod, "weight_zero_point", None)
        return fake_quantize(mod.weight.detach(), mod.weight_scale, zp, args)
    return None


if __name__ == "__main__":
    main()
