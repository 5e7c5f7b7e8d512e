"""GPTQ's solve alone (factor + column sweep) on one real-geometry layer, this tree against another commit's, alternating.

The weights are layer 0 of the bench's random bf16 Llama at TinyLlama-1.1B's geometry (``bench.gptq_peers``); each
group's Hessian comes from correlated, unevenly scaled random bf16 activations (8,192 tokens, seeded), so both trees
solve the same problems. ``--ref`` names a commit whose ``workers/engine/quant.py`` (it imports only torch) is loaded
beside this tree's; either API is driven (``factor_hessian`` now, ``prepare_hinv`` before). Prints wall and CPU seconds
per group and phase, each round, and the GPTQ objective of each solve (equal up to float reassociation).

    .venv/bin/python -m bench.gptq_solve --ref HEAD~2 --rounds 3
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_quant(ref: str | None):
    """This tree's quant module, or the one of commit ``ref`` (loaded from its text under another name)."""
    if ref is None:
        from workers.engine import quant

        return quant
    text = subprocess.run(["git", "show", f"{ref}:workers/engine/quant.py"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "quant_ref.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("quant_ref", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["quant_ref"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def problems(layers_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each group's stacked weight and a Hessian of its input width."""
    from safetensors.torch import load_file

    from workers.engine.quant import accumulate_hessian

    sd = load_file(str(layers_dir / "model.safetensors"))
    p = "model.layers.0."
    weights = {
        "q/k/v": torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]),
        "o": sd[p + "self_attn.o_proj.weight"],
        "gate/up": torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]),
        "down": sd[p + "mlp.down_proj.weight"],
    }
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, W in weights.items():
        d = W.shape[1]
        mix = torch.eye(d) + 0.2 * torch.randn(d, d, generator=g) / d**0.5
        X = (torch.randn(8192, d, generator=g) @ mix * torch.exp(torch.randn(d, generator=g))).bfloat16()
        out[name] = (W, accumulate_hessian(None, 0, X)[0])
    return out


def solve(quant, W: torch.Tensor, H: torch.Tensor) -> tuple[float, float, float, float, float]:
    """(factor wall, factor CPU, sweep wall, sweep CPU, objective) of one default GPTQ solve (w4 g128, static act-order)."""
    kw = {"bits": 4, "group_size": 128, "sym": True, "static_groups": True}
    t0, c0 = time.perf_counter(), time.process_time()
    prepared = (quant.factor_hessian(H, 0.01, True),) if hasattr(quant, "factor_hessian") else quant.prepare_hinv(H, 0.01, True)
    t1, c1 = time.perf_counter(), time.process_time()
    res = quant.gptq_quantize(W, *prepared, **kw)
    t2, c2 = time.perf_counter(), time.process_time()
    return t1 - t0, c1 - c0, t2 - t1, c2 - c1, res.loss


def main() -> None:
    from bench.gpu_check import model as random_model
    from bench.gptq_peers import GEOMETRIES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", help="a commit to time against this tree (alternating)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    arch, dims = GEOMETRIES["tinyllama"]
    probs = problems(random_model(dims, 2, arch))
    trees = {"this tree": load_quant(None)}
    if a.ref:
        trees[a.ref] = load_quant(a.ref)
    print("| round | tree | " + " | ".join(f"{n} factor s (CPU)" for n in probs) + " | " + " | ".join(f"{n} sweep s (CPU)" for n in probs)
          + " | total s | objective (sum) |")
    print("|" + "---|" * (2 * len(probs) + 4))
    for r in range(a.rounds):
        for label, quant in trees.items():
            rows = {n: solve(quant, W, H) for n, (W, H) in probs.items()}
            f = " | ".join(f"{v[0]:.2f} ({v[1]:.2f})" for v in rows.values())
            s = " | ".join(f"{v[2]:.2f} ({v[3]:.2f})" for v in rows.values())
            total = sum(v[0] + v[2] for v in rows.values())
            print(f"| {r + 1} | {label} | {f} | {s} | {total:.2f} | {sum(v[4] for v in rows.values()):.6g} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
