"""A model skeleton on the meta device whose modules are filled from the shards on demand."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantfarm.errors import NotAModel, UnsupportedModel
from workers.engine.activations import Activations, Spool
from workers.engine.arch import Arch, arch_for
from workers.engine.shards import ShardReader

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, dict[str, Any]]  # hidden states and the layer's keyword arguments


class _Captured(Exception):
    def __init__(self, args, kwargs):
        self.args_, self.kwargs_ = args, kwargs


def resolve_device(name: str) -> torch.device:
    """Turn the ``device`` setting (auto | cpu | cuda[:N]) into a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


_cpu_bf16: bool | None = None  # the worker's ``cpu_bf16`` setting; None: ask the CPU


def prefer_cpu_bf16(value: bool | None) -> None:
    """Apply the ``cpu_bf16`` setting for this process: True/False force bf16 compute on CPU on/off, None asks the CPU."""
    global _cpu_bf16
    _cpu_bf16 = value


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16)."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def compute_dtype(source: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype activations are computed in, from the source's dtype and the device.

    On GPU a half source computes in its own dtype. On a CPU that multiplies bf16
    in hardware a bf16 source computes in bf16 (~6x fp32's matmul speed there);
    without those instructions bf16 matmuls run ~10x slower than fp32, so it
    computes in float32, as does fp16 on every CPU (no fast fp16 path, and bf16
    would drop 3 of its mantissa bits). float32 sources stay float32 everywhere.
    """
    if device.type == "cuda" and source in (torch.float16, torch.bfloat16):
        return source
    if device.type == "cpu" and source == torch.bfloat16 and (native_bf16() if _cpu_bf16 is None else _cpu_bf16):
        return torch.bfloat16
    return torch.float32


def read_config(model_dir: Path):
    """Load a transformers config, turning every failure into a clear job error."""
    from transformers import AutoConfig

    if not (Path(model_dir) / "config.json").is_file():
        raise NotAModel(f"{model_dir} has no config.json; it does not look like a Hugging Face model directory.")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        raise NotAModel(f"config.json in {model_dir} could not be read: {exc}") from None


class StreamedModel:
    """The model's modules exist on ``meta``; ``materialize`` loads one at a time.

    ``dtype``: the compute dtype (None: ``compute_dtype`` of the source's dtype and the device).
    """

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.dir = Path(model_dir)
        self.config = read_config(self.dir)
        self.arch: Arch = arch_for(self.config)
        self.shards = ShardReader(self.dir)
        self.shards.rename(self.arch.renames)
        self.device = device
        src = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None) or torch.float32
        self.source_dtype = getattr(torch, src) if isinstance(src, str) else src
        self.dtype = dtype or compute_dtype(self.source_dtype, device)  # a resumed job's recorded dtype, if given
        try:
            with init_empty_weights(include_buffers=False), contextlib.redirect_stdout(io.StringIO()):
                self.model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype, attn_implementation=self.arch.attn)
        except ValueError as exc:
            raise UnsupportedModel(f"transformers cannot build this model as a causal LM: {exc}") from None
        self.model.eval()
        if self.arch.moe is not None:  # one nn.Linear per expert, named as the checkpoint names them
            from workers.engine.moe import install

            install(self.model.get_submodule(self.arch.layers), self.arch, self.config)
        for module in self.model.modules():  # rotary tables etc. are real buffers; put them where we compute
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.device.type != "meta":
                    module._buffers[name] = buf.to(device)
        self.layers: nn.ModuleList = self.model.get_submodule(self.arch.layers)
        self.num_layers = len(self.layers)
        self.layer_kwargs: list[list[dict[str, Any]]] | None = None  # per layer and batch, where layers differ

    # --- loading -----------------------------------------------------------------

    def layer_prefix(self, i: int) -> str:
        return f"{self.arch.layers}.{i}."

    def module(self, path: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return None

    def _load(self, module: nn.Module, prefix: str, overrides: dict[str, torch.Tensor] | None = None) -> None:
        expected = module.state_dict().keys()
        tensors = self.shards.load_prefix(prefix)
        if overrides:
            tensors.update(overrides)
        missing = [k for k in expected if k not in tensors]
        if missing and prefix == self.arch.head + "." and missing == ["weight"]:
            tensors["weight"] = self.shards.get(self.arch.embed + ".weight")  # tied embeddings
            missing = []
        if missing:
            raise NotAModel(f"The weights are missing tensors for {prefix}: {', '.join(missing[:5])}.")
        sd = {k: tensors[k].to(self.device, self.dtype if tensors[k].is_floating_point() else tensors[k].dtype) for k in expected}
        module.load_state_dict(sd, strict=True, assign=True)

    def materialize(self, path: str) -> nn.Module | None:
        """Load a non-layer module (embedding, norm, head) onto the compute device."""
        module = self.module(path)
        if module is not None:
            self._load(module, path + ".")
        return module

    def load_layer(self, i: int, overrides: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Load decoder layer ``i``'s weights (with ``overrides`` replacing source tensors)."""
        layer = self.layers[i]
        self._load(layer, self.layer_prefix(i), overrides)
        return layer

    @staticmethod
    def release(module: nn.Module | None) -> None:
        """Drop a module's weights back to ``meta``; computed buffers (Gemma's embedding scale) stay."""
        if module is not None:
            kept = [(m, n, m._buffers[n]) for m in module.modules() for n in m._non_persistent_buffers_set
                    if m._buffers.get(n) is not None]
            module.to("meta")
            for m, n, buf in kept:
                m._buffers[n] = buf

    # --- running -----------------------------------------------------------------

    @torch.no_grad()
    def capture_inputs(self, token_batches: list[torch.Tensor], spool: Spool | None = None) -> Activations:
        """Run the embeddings and record what layer 0 receives for each batch, kept by ``spool`` (default: RAM).

        Every layer's keyword arguments are recorded too, with the layers passing
        their input through untouched: models that mix attention kinds (Gemma's
        sliding and global layers) give each kind its own mask and rotary tables.
        ``inputs_for`` hands them to the right layer.
        """
        pre = [self.materialize(p) for p in self.arch.pre]
        last = self.num_layers - 1
        seen: list[list[dict[str, Any]]] = [[] for _ in range(self.num_layers)]

        def passthrough(i: int):
            def forward(*args, **kwargs):
                kwargs = dict(kwargs)
                hidden = args[0] if args else kwargs.pop("hidden_states")
                seen[i].append(kwargs)
                if i == 0:
                    first.append(hidden)
                if i == last:
                    raise _Captured(args, kwargs)
                return hidden
            return forward

        first = Activations(spool or Spool())
        for i, layer in enumerate(self.layers):
            layer.forward = passthrough(i)
        try:
            for ids in token_batches:
                try:
                    self.model(input_ids=ids.to(self.device), use_cache=False)
                except _Captured:
                    continue
                raise RuntimeError("the last layer was never reached")  # pragma: no cover
        finally:
            for layer in self.layers:
                del layer.forward
            for m in pre:
                self.release(m)
        differs = any(kw.get(k) is not k0[k] or kw.keys() != k0.keys() for per in seen[1:] for kw, k0 in zip(per, seen[0]) for k in k0)
        self.layer_kwargs = seen if differs else None
        return first.with_rest([(kw,) for kw in seen[0]])

    def inputs_for(self, i: int, inputs: Activations) -> Activations:
        """``inputs`` with layer ``i``'s own keyword arguments (masks, rotary tables) where they differ."""
        if self.layer_kwargs is None:
            return inputs
        return inputs.with_rest([(kw,) for kw in self.layer_kwargs[i]])

    @staticmethod
    @torch.no_grad()
    def forward_layer(layer: nn.Module, inputs: Activations, *, drain: bool = False) -> Activations:
        """Run the batches through one layer, kept by the inputs' spool; the kwargs carry over unchanged.

        With ``drain`` each input batch is forgotten once it has run, so the inputs
        and outputs together take one sequence and one batch.
        """
        outs = Activations(inputs.spool)
        for hidden, kwargs in (inputs.drain() if drain else inputs):
            o = layer(hidden, **kwargs)
            del hidden
            outs.append((o[0] if isinstance(o, tuple) else o, kwargs))
            del o
        return outs

    @torch.no_grad()
    def head_nll(self, inputs: Activations, token_batches: list[torch.Tensor]) -> tuple[float, int]:
        """Apply the final norm and head; return (sum of next-token NLL, token count)."""
        post = [self.materialize(p) for p in self.arch.post]
        cap = getattr(self.config, "final_logit_softcapping", None)
        total, count = 0.0, 0
        try:
            for (hidden, _), ids in zip(inputs, token_batches):
                h = hidden
                for m in post:
                    if m is not None:
                        h = m(h)
                logits = h[:, :-1].float()
                if cap:  # Gemma caps the logits: cap * tanh(logits / cap)
                    logits = torch.tanh(logits / cap) * cap
                target = ids[:, 1:].to(self.device)
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
                total += float(nll)
                count += target.numel()
        finally:
            for m in post:
                self.release(m)
        return total, count
