"""Shared steps of the engine tests: run a job, rebuild the engine's fake-quantized model, hash outputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from quantfarm.spec import Calibration, Evaluation, GPTQOptions, RTNOptions
from quantfarm.store import walk_files
from storage.artifacts import LocalStore
from workers.engine.arch import arch_for
from workers.engine.checkpoint import Checkpoints
from workers.engine.methods import method_for
from workers.engine.pipeline import QuantizeRequest
from workers.engine.run import EngineResult, quantize

CPU = torch.device("cpu")
SMALL_CALIBRATION = dict(num_samples=8, seq_len=64)
OPTIONS = {"gptq": GPTQOptions, "rtn": RTNOptions}


def request(source: Path, method: str = "gptq", *, calibration: dict | None = None, evaluate: bool = False,
            evaluation: dict | None = None, **options) -> QuantizeRequest:
    return QuantizeRequest(
        source_dir=Path(source),
        method=method,
        options=OPTIONS[method](**options),
        calibration=Calibration(**(calibration or SMALL_CALIBRATION)),
        evaluate=evaluate,
        evaluation=Evaluation(**(evaluation or {"max_windows": 4})),
        base_model="test/tiny",
    )


def run_job(source: Path, work: Path, method: str = "gptq", *, store: LocalStore | None = None, out: Path | None = None,
            on_layer=None, max_shard_bytes: int = 2 * 1024**3, spill: Path | None = None, **kw) -> tuple[EngineResult, LocalStore]:
    """Quantize ``source`` with checkpoints in ``work/ckpt`` (or ``store``) into ``work/out`` (or ``out``).

    ``spill``: every activation batch goes to files in that folder (a RAM bound of 0) instead of staying in RAM.
    """
    store = store or LocalStore(work / "ckpt")
    res = quantize(request(source, method, **kw), store, out or work / "out", device=CPU, on_layer=on_layer,
                   max_shard_bytes=max_shard_bytes, activations_dir=spill, activations_ram_bytes=0 if spill else None)
    return res, store


def open_checkpoints(store: LocalStore) -> Checkpoints:
    """The job's checkpoints, opened with the fingerprint parts its manifest recorded."""
    parts = json.loads(store.get_bytes("manifest.json"))["parts"]
    ckpt = Checkpoints(store, parts)
    ckpt.open()
    return ckpt


def fake_quantized(source: Path, store: LocalStore, method: str, **options):
    """The source model in float32 with every decoder layer's weights set by ``method.apply``.

    This is the engine's own idea of the quantized model, built with plain
    transformers modules and no quantization kernel.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, device_map="cpu")
    arch = arch_for(model.config)
    m = method_for(method, OPTIONS[method](**options))
    ckpt = open_checkpoints(store)
    for i, layer in enumerate(model.get_submodule(arch.layers)):
        m.apply(arch.at(i), layer, ckpt.load(i))
    return model.eval()


def load_exported(out: Path, bits: int):
    """Load an exported GPTQ folder the way users do, with the exact torch kernel on CPU."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    model = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, device_map="cpu", quantization_config=GPTQConfig(bits=bits, backend="gptq_torch"),
    )
    return model.eval()


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in walk_files(root)}
