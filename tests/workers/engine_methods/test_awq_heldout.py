"""AWQ is never worse than plain rounding on held-out calibration windows.

Every 4th calibration window is kept out of the α and clip searches; a group's
scales, and a linear's clip, are kept only where they lower the output error on
those windows. On a model where scaling cannot help (every weight already on the
4-bit grid, so plain rounding is exact), AWQ must write plain rounding's codes
and leave the norms alone; on a model with activation outliers it must still
scale (so the test can tell a working search from one that always gives up).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantfarm.spec import AWQOptions
from storage.artifacts import LocalStore
from tests.support.models import make_tiny_model
from tests.workers.engine_methods.helpers import CPU, awq_request, checkpoint_layers
from workers.engine.arch import ARCHITECTURES
from workers.engine.awq_pack import dequantize_awq
from workers.engine.methods import method_for
from workers.engine.methods.awq import GroupInputs, awq_quantize, gram_error, heldout_masks
from workers.engine.run import quantize

GROUP = 64
STEP = 2.0**-5  # fp16- and fp32-exact


def _on_grid(model_dir: Path) -> Path:
    """Put every decoder linear's weights on an exact 4-bit asymmetric grid: round-to-nearest loses nothing.

    Each group of 64 columns holds integers in [-7, 8] times ``STEP`` and hits both
    ends, so its scale is ``STEP`` and its zero 7 exactly. Any scaling or clipping
    moves weights off the grid and can only add error.
    """
    gen = torch.Generator().manual_seed(5)
    for f in sorted(model_dir.glob("*.safetensors")):
        sd = load_file(f)
        for name, t in sd.items():
            if t.dim() == 2 and ".layers." in name and name.endswith("proj.weight"):
                q = torch.randint(-7, 9, t.shape, generator=gen).float()
                q.view(t.shape[0], -1, GROUP)[..., 0] = -7
                q.view(t.shape[0], -1, GROUP)[..., 1] = 8
                sd[name] = (q * STEP).to(t.dtype)
        save_file(sd, f, metadata={"format": "pt"})
    return model_dir


def test_every_fourth_window_is_held_out_across_batches():
    batches = [(torch.zeros(3, 8, 4), {}), (torch.zeros(3, 8, 4), {})]
    masks = heldout_masks(batches)
    assert [m.tolist() for m in masks] == [[False, False, False], [True, False, False]]
    assert heldout_masks([(torch.zeros(1, 8, 4), {})]) == [None]  # one window: nothing to hold out
    rec = GroupInputs(x=[torch.arange(24.0).view(3, 2, 4)], held=[torch.tensor([False, True, False])])
    assert torch.equal(next(rec.heldout_x()), torch.arange(8.0, 16.0).view(1, 2, 4))
    assert torch.equal(next(rec.search_x()), torch.arange(24.0).view(3, 2, 4)[[0, 2]])


def test_where_scaling_cannot_help_awq_writes_plain_rounding(tmp_path, tokenizer_dir):
    source = _on_grid(make_tiny_model(tmp_path / "src", "llama", tokenizer_dir=tokenizer_dir, kv_heads=4))
    options = dict(group_size=GROUP)
    quantize(awq_request(source, **options), LocalStore(tmp_path / "ckpt"), tmp_path / "out", device=CPU)

    arch = ARCHITECTURES["llama"]
    src = load_file(source / "model.safetensors")
    for i, tensors in enumerate(checkpoint_layers(tmp_path / "ckpt")):
        prefix = f"{arch.layers}.{i}."
        for name in arch.linears:
            W = src[prefix + name + ".weight"]
            rtn = awq_quantize(W, group_size=GROUP, zero_point=True)
            got = dequantize_awq({k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")}, GROUP, "gemm")
            # Plain rounding is exact here, and AWQ's output equals it: not a single weight moved.
            assert torch.equal(rtn.dequantize(), W.float())
            assert torch.equal(got.float(), W.float()), f"layer {i} {name}: AWQ scaled or clipped where it could only hurt"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert torch.equal(tensors[f"{norm}.weight"], src[prefix + norm + ".weight"])


def test_with_activation_outliers_the_scales_are_kept(awq_run):
    run = awq_run("llama", group_size=GROUP)
    src = load_file(run.source / "model.safetensors")
    layers = checkpoint_layers(run.ckpt)
    folded = [n for i, t in enumerate(layers) for n in ("input_layernorm", "post_attention_layernorm")
              if not torch.equal(t[f"{n}.weight"], src[f"model.layers.{i}.{n}.weight"])]
    assert folded, "AWQ fell back to plain rounding everywhere, even with outlier channels"


def test_the_kept_scales_lower_the_heldout_error():
    """The decision itself: scaled rounding is kept only when its held-out error is lower."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 256, generator=gen)
    x[..., :4] *= 30  # outlier channels
    lin = torch.nn.Linear(256, 128, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.05, generator=gen)
    layer = torch.nn.ModuleDict({"fc": lin})
    method = method_for("awq", AWQOptions(group_size=GROUP))
    rec = GroupInputs(x=[x], held=heldout_masks([(x, {})]))
    G = rec.gram(heldout=True)
    from workers.engine.arch import LinearGroup

    group = LinearGroup(("fc",), "prev", "fc")
    s = method.search_scale(layer, group, rec)
    W = lin.weight.data
    scaled = gram_error(method._fake(W * s) / s - W, G)
    plain = gram_error(method._fake(W) - W, G)
    assert method.scales_help(layer, group, s, G) == (scaled < plain)
    assert scaled < plain  # with outliers, scaling wins on held-out windows
    assert not method.scales_help(layer, group, torch.ones(256), G)  # s = 1 is plain rounding: no gain, not kept
