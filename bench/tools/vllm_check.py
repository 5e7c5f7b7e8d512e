"""Load one quantized output in vLLM and generate a few tokens (GPU only; vLLM must be installed).

Runs in our venv. vLLM picks its own kernel from the folder's quantization_config
(GPTQ: gptq_marlin or gptq; AWQ: awq_marlin or awq); fp16 is the dtype both take.
"""

from __future__ import annotations

import time

from _child import parser, versions, write_result


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=16)
    a = ap.parse_args()

    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=a.model, dtype="float16", gpu_memory_utilization=0.3, enforce_eager=True, max_model_len=512)
    t_load = time.perf_counter() - t0
    (res,) = llm.generate(["def main():\n    "], SamplingParams(max_tokens=a.new_tokens, temperature=0, min_tokens=a.new_tokens))
    out = res.outputs[0]
    write_result(a.result, tool="vllm", load_seconds=round(t_load, 3), new_tokens=len(out.token_ids), text=out.text,
                 quantization=llm.llm_engine.model_config.quantization, versions=versions("vllm", "torch"))


if __name__ == "__main__":
    main()
