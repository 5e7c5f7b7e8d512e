"""Quantize with AutoAWQ 0.2.9 (GEMM, zero point) on the shared calibration windows.

Runs in bench/.cache/venvs/autoawq (AutoAWQ needs transformers 4.51). It is
deprecated upstream but still quantizes on CPU. The windows go in as lists of
token ids, which AutoAWQ concatenates and cuts back into the same windows.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

from _child import (
    T_START,
    load_windows,
    parser,
    pin_threads,
    versions,
    warm_imports,
    write_result,
)


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--version", default="GEMM")
    a = ap.parse_args()
    threads = pin_threads()
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    import torch
    from awq import AutoAWQForCausalLM
    from transformers import PreTrainedTokenizerFast

    warm_imports()
    t_imports = time.perf_counter() - T_START
    windows = load_windows(a.calib)
    n, seq_len = windows.shape
    quant_config = {"zero_point": True, "q_group_size": a.group_size, "w_bit": 4, "version": a.version}
    shutil.rmtree(a.out, ignore_errors=True)

    t0 = time.perf_counter()
    model = AutoAWQForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32, device_map="cpu")
    # The model's tokenizer was saved by transformers 5 ("TokenizersBackend"), unknown to 4.51: read tokenizer.json directly.
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{a.model}/tokenizer.json", eos_token="</s>", bos_token="<s>", pad_token="<pad>")
    t_load = time.perf_counter() - t0
    model.quantize(tok, quant_config=quant_config, calib_data=windows.tolist(), max_calib_samples=n, max_calib_seq_len=seq_len)
    t_solve = time.perf_counter() - t0 - t_load
    model.save_quantized(a.out)
    for f in Path(a.model).glob("tokenizer*"):
        shutil.copy(f, Path(a.out) / f.name)
    t_quant = time.perf_counter() - t0
    qcfg = json.loads(Path(a.out, "config.json").read_text()).get("quantization_config", {})
    write_result(
        a.result, tool="autoawq", method="awq", threads=threads, import_seconds=round(t_imports, 3),
        quant_seconds=round(t_quant, 3), load_seconds=round(t_load, 3), solve_seconds=round(t_solve, 3),
        quantization_config=qcfg, versions=versions("autoawq", "torch", "transformers"),
    )


if __name__ == "__main__":
    main()
