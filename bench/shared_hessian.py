"""GPTQ solve time: one shared Hessian/inverse with stacked rows vs one solve per linear.

q/k/v (and gate/up) read the same input, so their Hessians are identical. The
engine (``GPTQMethod.solve_group``) accumulates it once, inverts it once and
runs one column sweep over the stacked rows. The alternative accumulates,
inverts and sweeps once per linear. Both must give identical codes; this
asserts it and times both.

    .venv/bin/python -m bench.shared_hessian [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

THREADS = 2


def _inputs(tokens: int, cols: int, seed: int) -> torch.Tensor:
    """Activation-like inputs: correlated channels with a few large-magnitude ones."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scale = torch.ones(cols)
    scale[torch.randperm(cols, generator=g)[: cols // 64]] = 8.0
    return (torch.randn(tokens, cols, generator=g) @ mix) * scale


def _layer(names: list[str], rows: list[int], cols: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    root = nn.Module()
    for name, r in zip(names, rows):
        parent = root
        *path, leaf = name.split(".")
        for p in path:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        lin = nn.Linear(cols, r, bias=False)
        nn.init.normal_(lin.weight, std=cols**-0.5)
        parent.add_module(leaf, lin)
    return root


def _shared(method, layer, group, X):
    from workers.engine.quant import accumulate_hessian

    t0 = time.perf_counter()
    H, _ = accumulate_hessian(None, 0, X)
    t1 = time.perf_counter()
    out = method.solve_group(layer, group, H)
    t2 = time.perf_counter()
    return out, t1 - t0, t2 - t1


def _separate(opts, layer, group, X):
    from workers.engine.quant import accumulate_hessian, factor_hessian, gptq_quantize

    t_h = t_s = 0.0
    out = []
    for name in group.names:
        t0 = time.perf_counter()
        H, _ = accumulate_hessian(None, 0, X)  # each linear's hook sees the same input
        t1 = time.perf_counter()
        factor = factor_hessian(H, opts.damp_percent, opts.desc_act)
        res = gptq_quantize(layer.get_submodule(name).weight.data, factor, bits=opts.bits,
                            group_size=opts.group_size, sym=opts.sym, static_groups=opts.static_groups,
                            min_zero=0 if opts.sym else 1)
        t2 = time.perf_counter()
        out.append((name, res))
        t_h += t1 - t0
        t_s += t2 - t1
    return out, t_h, t_s


CASES = {
    # name: (linear names, rows of each, input columns)
    "q/k/v 2048 (GQA 4:1)": (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], [2048, 512, 512], 2048),
    "q/k/v 1024 (MHA)": (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], [1024, 1024, 1024], 1024),
    "gate/up 1024->2816": (["mlp.gate_proj", "mlp.up_proj"], [2816, 2816], 1024),
}
QUICK = {
    "q/k/v 512 (GQA 4:1)": (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], [512, 128, 128], 512),
    "gate/up 256->512": (["mlp.gate_proj", "mlp.up_proj"], [512, 512], 256),
}


def bench_case(label: str, names, rows, cols, *, tokens: int, repeats: int) -> dict:
    """Time both ways ``repeats`` times (alternating), assert identical results, return medians."""
    from quantfarm.spec import GPTQOptions
    from workers.engine.arch import LinearGroup
    from workers.engine.methods.gptq import GPTQMethod

    opts = GPTQOptions(bits=4, group_size=128, sym=True, desc_act=False, damp_percent=0.01)
    method = GPTQMethod(opts)
    group = LinearGroup(tuple(names))
    layer = _layer(names, rows, cols, seed=1)
    X = _inputs(tokens, cols, seed=2)
    shared_t, separate_t = [], []
    for r in range(repeats):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for which in order:
            if which == 0:
                a, th, ts = _shared(method, layer, group, X)
                shared_t.append((th, ts))
            else:
                b, th, ts = _separate(opts, layer, group, X)
                separate_t.append((th, ts))
    for (na, ra), (nb, rb) in zip(a, b):
        assert na == nb
        assert torch.equal(ra.codes, rb.codes), f"{label}: {na} codes differ between shared and separate solves"
        assert torch.equal(ra.scales, rb.scales) and torch.equal(ra.zeros, rb.zeros), f"{label}: {na} group parameters differ"
    med = statistics.median
    sh_solve, sep_solve = med([t[1] for t in shared_t]), med([t[1] for t in separate_t])
    sh_all, sep_all = med([t[0] + t[1] for t in shared_t]), med([t[0] + t[1] for t in separate_t])
    return {
        "case": label, "rows": "+".join(map(str, rows)), "cols": cols, "tokens": tokens, "repeats": repeats,
        "shared_solve_s": round(sh_solve, 3), "separate_solve_s": round(sep_solve, 3),
        "solve_ratio": round(sh_solve / sep_solve, 3),
        "shared_total_s": round(sh_all, 3), "separate_total_s": round(sep_all, 3),
        "total_ratio": round(sh_all / sep_all, 3), "identical_codes": True,
    }


def run(quick: bool = False) -> dict:
    torch.set_num_threads(THREADS)
    cases = QUICK if quick else CASES
    tokens, repeats = (1024, 2) if quick else (4096, 3)
    rows = [bench_case(k, *v, tokens=tokens, repeats=repeats) for k, v in cases.items()]
    return {"threads": THREADS, "cases": rows}


def table(result: dict) -> str:
    lines = [
        "| linears | rows | cols | shared solve s | separate solve s | ratio | shared incl. Hessian s | separate incl. Hessian s | ratio | identical codes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        lines.append(
            f"| {c['case']} | {c['rows']} | {c['cols']} | {c['shared_solve_s']:.3f} | {c['separate_solve_s']:.3f} | "
            f"**{c['solve_ratio']:.2f}x** | {c['shared_total_s']:.3f} | {c['separate_total_s']:.3f} | **{c['total_ratio']:.2f}x** | "
            f"{'yes' if c['identical_codes'] else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small widths, for a smoke run")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args()
    res = run(a.quick)
    print(table(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
