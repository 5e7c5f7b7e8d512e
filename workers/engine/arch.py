"""What each supported architecture looks like, as data.

One ``Arch`` per family, keyed by ``config.model_type``. The layer loop reads
these tables; it never branches on class names.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantfarm.errors import UnsupportedArchitecture


@dataclass(frozen=True)
class LinearGroup:
    """Linears (names relative to a decoder layer) that read the same input.

    ``prev`` is the op whose output is that input (AWQ folds its scales there);
    ``inspect`` is the module whose output AWQ measures while searching scales.
    """

    names: tuple[str, ...]
    prev: str | None = None
    inspect: str | None = None
    closes: str | None = None  # the sub-module whose output is this (single) linear's output


@dataclass(frozen=True)
class Arch:
    name: str
    layers: str  # dotted path of the ModuleList of decoder layers
    pre: tuple[str, ...]  # modules run before layer 0 (embeddings)
    post: tuple[str, ...]  # modules run after the last layer (final norm, head)
    groups: tuple[LinearGroup, ...]  # in execution order
    head: str = "lm_head"
    embed: str = "model.embed_tokens"
    # AWQ leaves these linears unclipped: their outputs go through a softmax, where
    # clipping hurts more than the per-linear output error it minimises shows.
    awq_no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    # Norms that compute ``x * (offset + weight)`` (Gemma: 1); AWQ folds ``1/s`` into ``offset + weight``.
    norm_offset: float = 0.0
    attn: str = "sdpa"  # attention implementation (Gemma 2's logit softcapping needs "eager")

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g.names)


_LLAMA_GROUPS = (
    LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "self_attn"),
    LinearGroup(("self_attn.o_proj",), "self_attn.v_proj", "self_attn.o_proj", closes="self_attn"),
    LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "mlp"),
    LinearGroup(("mlp.down_proj",), "mlp.up_proj", "mlp.down_proj", closes="mlp"),
)


def _llama_like(name: str) -> Arch:
    return Arch(
        name=name,
        layers="model.layers",
        pre=("model.embed_tokens",),
        post=("model.norm", "lm_head"),
        groups=_LLAMA_GROUPS,
    )


# Gemma 2 and 3 norm the attention and MLP outputs too; the MLP reads pre_feedforward_layernorm.
_GEMMA_GROUPS = (
    _LLAMA_GROUPS[0],
    _LLAMA_GROUPS[1],
    LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "pre_feedforward_layernorm", "mlp"),
    _LLAMA_GROUPS[3],
)

# Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj. Neither fused linear's
# output rows line up with the next linear's inputs, so o_proj and down_proj get no scales.
_PHI3_GROUPS = (
    LinearGroup(("self_attn.qkv_proj",), "input_layernorm", "self_attn"),
    LinearGroup(("self_attn.o_proj",), None, "self_attn.o_proj", closes="self_attn"),
    LinearGroup(("mlp.gate_up_proj",), "post_attention_layernorm", "mlp"),
    LinearGroup(("mlp.down_proj",), None, "mlp.down_proj", closes="mlp"),
)


def _gemma(name: str, attn: str = "sdpa") -> Arch:
    return Arch(name=name, layers="model.layers", pre=("model.embed_tokens",), post=("model.norm", "lm_head"),
                groups=_GEMMA_GROUPS, norm_offset=1.0, attn=attn)


ARCHITECTURES: dict[str, Arch] = {
    "gemma2": _gemma("gemma2", attn="eager"),
    "gemma3_text": _gemma("gemma3_text"),
    "phi3": Arch(name="phi3", layers="model.layers", pre=("model.embed_tokens",), post=("model.norm", "lm_head"),
                 groups=_PHI3_GROUPS, awq_no_clip=("self_attn.qkv_proj",)),
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3"),
    "opt": Arch(
        name="opt",
        layers="model.decoder.layers",
        pre=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
        post=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
        groups=(
            LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn_layer_norm", "self_attn"),
            LinearGroup(("self_attn.out_proj",), "self_attn.v_proj", "self_attn.out_proj", closes="self_attn"),
            LinearGroup(("fc1",), "final_layer_norm", "fc1"),
            LinearGroup(("fc2",), "fc1", "fc2"),
        ),
        embed="model.decoder.embed_tokens",
    ),
}


def arch_for(config) -> Arch:
    """Return the table entry for a transformers config, or raise UnsupportedArchitecture."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"Architecture {model_type!r} is not supported; supported architectures: {supported}.",
            details={"model_type": model_type, "supported": sorted(ARCHITECTURES)},
        )
    return arch
