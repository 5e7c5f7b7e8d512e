"""What each supported architecture looks like, as data.

One ``Arch`` per family, keyed by ``config.model_type``. The layer loop reads
these tables; it never branches on class names.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    # Consecutive groups with the same ``stage`` (a sparse block) and ``step`` get their inputs
    # in one pass that ends once the block has returned; each keeps its own statistics.
    stage: str | None = None
    step: int = 0
    expert: int | None = None  # the routed expert these linears belong to


@dataclass(frozen=True)
class MoESpec:
    """Where a sparse block lives and what its experts look like."""

    block: str  # the block's module path in a layer ("mlp")
    num_experts: str  # config attribute: routed experts per block
    intermediate: str  # config attribute: each expert's width
    linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    shared: bool = False  # a shared expert beside the routed ones: {shared}.{gate,up,down}_proj
    shared_name: str = "shared_expert"  # its module in the block (DeepSeek: shared_experts)
    shared_gate: str | None = "shared_expert_gate"  # a sigmoid gate on its output (Qwen2-MoE); None: added as is
    # Layers with a dense MLP instead, as config attributes say (each optional): how many of the
    # first layers (DeepSeek: first_k_dense_replace), which layers by index (Qwen: mlp_only_layers),
    # and a period (Qwen: decoder_sparse_step; layer i is sparse where (i + 1) % step == 0); with
    # ``dense_without_experts`` (Qwen), a config with no experts makes every layer dense.
    # ``dense``: the groups of that MLP.
    dense_first: str | None = None
    dense_listed: str | None = None
    sparse_step: str | None = None
    dense_without_experts: bool = False
    dense: tuple[LinearGroup, ...] = ()


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
    moe: MoESpec | None = None  # sparse blocks; ``groups`` then lists attention only until ``arch_for``
    # Regex renames from the source's tensor names to the modules' (and the export's) names.
    renames: tuple[tuple[str, str], ...] = ()
    # (config attribute, groups): where the config sets the attribute, these groups replace ``groups``
    # (DeepSeek-V2's low-rank queries, q_lora_rank); the first match wins.
    variants: tuple[tuple[str, tuple[LinearGroup, ...]], ...] = ()
    # Each decoder layer's groups where layers differ (dense MLPs before sparse blocks); set by ``arch_for``.
    # ``groups`` then holds every kind's groups, for names only: per-layer work reads ``at(i).groups``.
    layer_groups: tuple[tuple[LinearGroup, ...], ...] = ()

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for g in self.groups for n in g.names))

    def at(self, i: int) -> Arch:
        """The entry for decoder layer ``i``: its own groups where layers differ, else this one."""
        if not self.layer_groups:
            return self
        return replace(self, groups=self.layer_groups[i], layer_groups=())

    def sparse(self, i: int) -> bool:
        """Whether decoder layer ``i`` holds a sparse block."""
        return self.moe is not None and any(g.stage == self.moe.block for g in self.at(i).groups)


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


def moe_groups(spec: MoESpec, n: int) -> tuple[LinearGroup, ...]:
    """The linear groups of a sparse block with ``n`` experts, in execution order.

    One norm feeds every expert and the router, so the gate/up groups get no AWQ
    scales (clip and rounding only); each down_proj folds its scales into its up_proj.
    """
    p, (g, u, d) = spec.block, spec.linears
    ins = [LinearGroup((f"{p}.experts.{e}.{g}", f"{p}.experts.{e}.{u}"), None, f"{p}.experts.{e}", stage=p, expert=e)
           for e in range(n)]
    outs = [LinearGroup((f"{p}.experts.{e}.{d}",), f"{p}.experts.{e}.{u}", f"{p}.experts.{e}.{d}", stage=p, step=1, expert=e)
            for e in range(n)]
    if spec.shared:
        s = f"{p}.{spec.shared_name}"
        ins.append(LinearGroup((f"{s}.gate_proj", f"{s}.up_proj"), None, s, stage=p))
        outs.append(LinearGroup((f"{s}.down_proj",), f"{s}.up_proj", f"{s}.down_proj", stage=p, step=1))
    return (*ins, *outs)


def _moe(name: str, spec: MoESpec, renames: tuple[tuple[str, str], ...] = ()) -> Arch:
    return Arch(name=name, layers="model.layers", pre=("model.embed_tokens",), post=("model.norm", "lm_head"),
                groups=_LLAMA_GROUPS[:2], moe=spec, renames=renames)


# DeepSeek-V2 multi-head latent attention (q_lora_rank unset, as in V2-Lite): q_proj and the
# compressed kv_a_proj_with_mqa read the input norm; kv_b_proj expands the normed latent. o_proj
# reads values that kv_b_proj interleaves with keys per head, so it gets no scales.
_MLA_GROUPS = (
    LinearGroup(("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"), "input_layernorm", "self_attn"),
    LinearGroup(("self_attn.kv_b_proj",), "self_attn.kv_a_layernorm", "self_attn.kv_b_proj"),
    LinearGroup(("self_attn.o_proj",), None, "self_attn.o_proj", closes="self_attn"),
)
# With low-rank queries (q_lora_rank set, as in the full V2) q_a_proj replaces q_proj beside
# kv_a_proj_with_mqa, and q_b_proj expands the normed query latent.
_MLA_LORA_GROUPS = (
    LinearGroup(("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), "input_layernorm", "self_attn"),
    LinearGroup(("self_attn.q_b_proj",), "self_attn.q_a_layernorm", "self_attn.q_b_proj"),
    *_MLA_GROUPS[1:],
)

# Mixtral checkpoints say block_sparse_moe.experts.N.w1/w3/w2; transformers, GPTQModel and the
# quantized checkpoints it reads say mlp.experts.N.gate_proj/up_proj/down_proj.
_MIXTRAL_RENAMES = (
    (r"\.block_sparse_moe\.", ".mlp."),
    (r"(\.experts\.\d+)\.w1\.", r"\1.gate_proj."),
    (r"(\.experts\.\d+)\.w3\.", r"\1.up_proj."),
    (r"(\.experts\.\d+)\.w2\.", r"\1.down_proj."),
)

# Qwen MoE configs may make any layer dense (a plain MLP of intermediate_size), by index or by period.
_QWEN_DENSE = {"dense_listed": "mlp_only_layers", "sparse_step": "decoder_sparse_step", "dense_without_experts": True,
               "dense": _LLAMA_GROUPS[2:]}


ARCHITECTURES: dict[str, Arch] = {
    "mixtral": _moe("mixtral", MoESpec("mlp", "num_local_experts", "intermediate_size"), _MIXTRAL_RENAMES),
    "qwen2_moe": _moe("qwen2_moe", MoESpec("mlp", "num_experts", "moe_intermediate_size", shared=True, **_QWEN_DENSE)),
    "qwen3_moe": _moe("qwen3_moe", MoESpec("mlp", "num_experts", "moe_intermediate_size", **_QWEN_DENSE)),
    "deepseek_v2": replace(_moe("deepseek_v2", MoESpec("mlp", "n_routed_experts", "moe_intermediate_size", shared=True,
                                                       shared_name="shared_experts", shared_gate=None,
                                                       dense_first="first_k_dense_replace", dense=_LLAMA_GROUPS[2:])),
                           groups=_MLA_GROUPS, variants=(("q_lora_rank", _MLA_LORA_GROUPS),),
                           awq_no_clip=("self_attn.q_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa")),
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
    for attr, groups in arch.variants:
        if getattr(config, attr, None):
            arch = replace(arch, groups=groups)
            break
    if arch.moe is not None:
        arch = _with_sparse_blocks(arch, config)
    return arch


def _whole(config, attr: str, default: int, model_type: str, least: int = 0) -> int:
    """A config attribute that must be a whole number of at least ``least`` (a hostile config says anything)."""
    value = getattr(config, attr, None)
    value = default if value is None else value
    if type(value) is not int or value < least:
        raise UnsupportedArchitecture(f"{attr} must be a whole number of at least {least}, not {value!r}.",
                                      details={"model_type": model_type})
    return value


def sparse_layers(arch: Arch, config) -> list[bool]:
    """Which decoder layers hold a sparse block, as the config's dense-layer attributes say."""
    spec, name = arch.moe, arch.name
    layers = _whole(config, "num_hidden_layers", 0, name, least=1)
    experts = _whole(config, spec.num_experts, 0, name, least=0 if spec.dense_without_experts else 1)
    first = _whole(config, spec.dense_first, 0, name) if spec.dense_first else 0
    step = _whole(config, spec.sparse_step, 1, name, least=1) if spec.sparse_step else 1
    listed = (getattr(config, spec.dense_listed, None) or []) if spec.dense_listed else []
    if not isinstance(listed, (list, tuple)) or any(type(i) is not int for i in listed):
        raise UnsupportedArchitecture(f"{spec.dense_listed} must be a list of layer indices, not {listed!r}.",
                                      details={"model_type": name})
    return [experts > 0 and i >= first and i not in listed and (i + 1) % step == 0 for i in range(layers)]


def _with_sparse_blocks(arch: Arch, config) -> Arch:
    """``arch`` with its sparse block's groups, and per-layer groups where some layers are dense."""
    spec = arch.moe
    flags = sparse_layers(arch, config)
    sparse = arch.groups + moe_groups(spec, getattr(config, spec.num_experts))
    if all(flags):
        return replace(arch, groups=sparse)
    dense = arch.groups + spec.dense
    names = dense + (sparse[len(arch.groups):] if any(flags) else ())
    return replace(arch, groups=names, layer_groups=tuple(sparse if s else dense for s in flags))
