"""Load one quantized output through transformers (+ gptqmodel kernels) and generate a few tokens.

Runs in our venv. Checks what a user would do first: the folder loads, the logits
are finite, and greedy generation produces tokens. ``--kind gptq`` loads a
``quant_method: gptq`` folder, ``--kind awq`` an AWQ GEMM folder.
"""

from __future__ import annotations

import time

from _child import parser, pin_threads, versions, write_result


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=["gptq", "awq"], required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new-tokens", type=int, default=16)
    a = ap.parse_args()
    pin_threads()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    t0 = time.perf_counter()
    kw: dict = {"device_map": a.device}
    if a.device == "cpu":  # the exact torch kernels; GPUs pick their fast kernels themselves
        kw["dtype"] = torch.float32
        if a.kind == "gptq":
            kw["quantization_config"] = GPTQConfig(bits=4, backend="gptq_torch")
    else:
        kw["dtype"] = torch.float16
    model = AutoModelForCausalLM.from_pretrained(a.model, **kw)
    tok = AutoTokenizer.from_pretrained(a.model)
    t_load = time.perf_counter() - t0
    ids = tok("def main():\n    ", return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=a.new_tokens, do_sample=False, min_new_tokens=a.new_tokens)
    new = out[0, ids.shape[1]:]
    write_result(a.result, tool="generate", kind=a.kind, load_seconds=round(t_load, 3), finite=bool(torch.isfinite(logits).all()),
                 new_tokens=int(new.numel()), text=tok.decode(new), versions=versions("torch", "transformers", "gptqmodel"))


if __name__ == "__main__":
    main()
