"""LoftQ: an NF4 base plus LoRA adapters chosen so that base + adapter approximates the float weights.

For each adapted linear, alternate (LoftQ, Li et al. 2023): quantize the part
the adapter does not carry, ``Q = nf4(W - B A)``, then refit the adapter to what
the quantization lost, ``B A = rank-r SVD of (W - Q)``. Quantization uses
bitsandbytes' own NF4 (blocks of 64, double quantization), so the saved base
holds exactly the ``Q`` of the last step. The artifact is a bitsandbytes
checkpoint (it loads with a plain ``from_pretrained``) and a PEFT adapter in
``adapter/`` that ``PeftModel.from_pretrained`` puts on it, ready for QLoRA.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from quantfarm.errors import DependencyMissing
from quantfarm.options import BnB4Options
from workers.engine.methods.base import EngineJob, Method, Quantized
from workers.engine.methods.bnb import BnB4Method

ADAPTER_DIR = "adapter"
BLOCKSIZE = 64


def nf4_roundtrip(W: torch.Tensor) -> torch.Tensor:
    """``W`` through bitsandbytes' NF4 (blocks of 64, double quantization) and back, in float32."""
    import bitsandbytes.functional as F

    q, state = F.quantize_4bit(W.contiguous(), blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
    return F.dequantize_4bit(q, state).float()


@torch.no_grad()
def loftq(W: torch.Tensor, rank: int, iterations: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (base weight to quantize, B ``[out, r]``, A ``[r, in]``) with ``nf4(base) + B A`` close to ``W``.

    ``base`` is ``W - B A`` in the model's ``dtype``: the exact values the NF4 quantizer will see.
    """
    W = W.float()
    B = torch.zeros(W.shape[0], rank)
    A = torch.zeros(rank, W.shape[1])
    for _ in range(iterations):
        base = (W - B @ A).to(dtype)
        Q = nf4_roundtrip(base)
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        root = S[:rank].sqrt()
        B, A = U[:, :rank] * root, root[:, None] * Vh[:rank]
    return (W - B @ A).to(dtype), B, A


class LoftQMethod(Method):
    name = "loftq"
    format = "bitsandbytes-peft"
    requires_calibration = False

    def quantization_config(self) -> dict[str, Any]:
        o = self.options
        return {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                "loftq": {"bits": o.bits, "rank": o.rank, "iterations": o.iterations, "adapter": ADAPTER_DIR}}

    def _targets(self, model, linears: tuple[str, ...]) -> list[str]:
        wanted = self.options.target_modules or list(linears)
        return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
                and any(n == t or n.endswith("." + t) for t in wanted)]

    def quantize(self, job: EngineJob) -> Quantized:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise DependencyMissing("loftq requires peft: `pip install peft`.") from None
        from workers.engine.arch import arch_for
        from workers.engine.bnb import _free, _load, loaded_perplexities, quantize_bnb
        from workers.engine.export import copy_tokenizer
        from workers.engine.tasks_gate import loaded_generations

        (fmt, out_dir), = job.outputs.items()
        job.stage("exporting")
        model = _load(job.req.source_dir, torch.device("cpu"))
        targets = self._targets(model, tuple(arch_for(model.config).linears))
        adapters = {}
        for name in targets:
            lin = model.get_submodule(name)
            base, B, A = loftq(lin.weight.data, self.options.rank, self.options.iterations, lin.weight.dtype)
            lin.weight.data = base
            adapters[name] = (B, A)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            _free(model)
            copy_tokenizer(job.req.source_dir, Path(tmp))
            bnb = BnB4Method(BnB4Options(quant_type="nf4", double_quant=True, compute_dtype="float32"))
            sub = EngineJob(_with_source(job.req, Path(tmp)), None, {fmt: out_dir}, job.device, max_shard_bytes=job.max_shard_bytes)
            inner = quantize_bnb(bnb, sub)
        self._save_adapter(job, out_dir, targets, adapters)

        def source():
            return _load(job.req.source_dir, job.device)

        def tuned():
            from peft import PeftModel

            return PeftModel.from_pretrained(_load(out_dir, job.device), out_dir / ADAPTER_DIR).eval()

        config = {**inner.configs[fmt], "loftq": self.quantization_config()["loftq"]}
        return Quantized(configs={fmt: config}, perplexities=loaded_perplexities(source, tuned), metrics=inner.metrics,
                         generations=loaded_generations(source, tuned))

    def _save_adapter(self, job: EngineJob, out_dir: Path, targets: list[str], adapters: dict) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        o = self.options
        skeleton = AutoModelForCausalLM.from_pretrained(job.req.source_dir, dtype=torch.float32)
        lora = LoraConfig(r=o.rank, lora_alpha=o.rank, lora_dropout=0.0, target_modules=targets, init_lora_weights=False,
                          task_type="CAUSAL_LM")
        peft_model = get_peft_model(skeleton, lora)
        for name, (B, A) in adapters.items():
            module = peft_model.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.data = A.contiguous()
            module.lora_B["default"].weight.data = B.contiguous()
        peft_model.save_pretrained(out_dir / ADAPTER_DIR)
        (out_dir / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # PEFT's stub card names the scratch path; ours covers both
        cfg = json.loads((out_dir / ADAPTER_DIR / "adapter_config.json").read_text())
        cfg["target_modules"] = sorted(cfg["target_modules"])  # a set in peft: fix its order so reruns write the same bytes
        cfg["base_model_name_or_path"] = job.req.base_model or None  # never the worker's scratch path
        (out_dir / ADAPTER_DIR / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _with_source(req, source: Path):
    from dataclasses import replace

    return replace(req, source_dir=source)
