"""Quantize with llm-compressor (GPTQModifier, W4A16-style group scheme) on the shared windows.

Runs in bench/.cache/venvs/llmc (llm-compressor pins its own transformers).
The output is a compressed-tensors checkpoint (``pack-quantized``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from _child import (
    T_START,
    load_windows,
    model_type,
    parser,
    pin_threads,
    versions,
    warm_imports,
    write_result,
)


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--dtype", default="float32", help="model dtype; auto: the checkpoint's (what its examples load)")
    ap.add_argument("--actorder", default="none", help="none, static, group, or default (GPTQModifier's own default)")
    a = ap.parse_args()
    threads = pin_threads()

    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warm_imports(model_type(a.model))
    t_imports = time.perf_counter() - T_START
    windows = load_windows(a.calib)
    n, seq_len = windows.shape
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=a.bits, type="int", symmetric=True, strategy="group", group_size=a.group_size),
    )
    order = {} if a.actorder == "default" else {"actorder": None if a.actorder == "none" else a.actorder}
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], dampening_frac=a.damp, block_size=128, **order)
    shutil.rmtree(a.out, ignore_errors=True)

    t0, c0 = time.perf_counter(), time.process_time()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=a.dtype if a.dtype == "auto" else getattr(torch, a.dtype))
    tok = AutoTokenizer.from_pretrained(a.model)
    t_load = time.perf_counter() - t0
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=n, max_seq_length=seq_len,
            batch_size=a.batch_size, shuffle_calibration_samples=False)
    t_solve = time.perf_counter() - t0 - t_load
    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)
    t_quant = time.perf_counter() - t0
    qcfg = json.loads(Path(a.out, "config.json").read_text()).get("quantization_config", {})
    write_result(
        a.result, tool="llm-compressor", method="gptq", threads=threads, import_seconds=round(t_imports, 3),
        quant_seconds=round(t_quant, 3), quant_cpu_seconds=round(time.process_time() - c0, 3), load_seconds=round(t_load, 3), solve_seconds=round(t_solve, 3),
        quantization_config=qcfg, dtype=str(model.dtype), versions=versions("llmcompressor", "compressed-tensors", "torch", "transformers"),
    )


if __name__ == "__main__":
    main()
