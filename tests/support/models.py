"""Tiny Hugging Face models built locally (the Hub is unreachable here).

Dims are multiples of 128: gptqmodel's CPU kernel, bnb nf4 and llm-compressor
break on others (an intermediate size of 688, say).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

TOKENIZER_VOCAB = 1024


def stdlib_text(max_chars: int = 2_000_000, skip_holdout: bool = True) -> list[str]:
    from workers.engine.calibration import builtin_code_texts

    return builtin_code_texts(holdout=not skip_holdout, max_chars=max_chars)


def built_once(out_dir: Path, marker: str, build: Callable[[Path], object]) -> Path:
    """``out_dir``, built by ``build(work_dir)`` once however many test processes ask at the same time.

    The first process to take the folder's lock builds it in a private folder and renames it into place when
    whole (``marker`` is a file the build writes); the others wait on the lock and find it built. A killed build
    leaves only its private folder behind, never a half-built ``out_dir``.
    """
    out_dir = Path(out_dir)
    if (out_dir / marker).is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out_dir / marker).is_file():
            return out_dir
        work = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)  # only a layout from before this lock lacks the marker
        build(work)
        if not (work / marker).is_file():
            raise RuntimeError(f"building {out_dir.name} wrote no {marker}")
        work.rename(out_dir)
    return out_dir


def train_tokenizer(out_dir: Path, vocab_size: int = TOKENIZER_VOCAB) -> Path:
    """Train a byte-level BPE on stdlib sources and save it as a transformers tokenizer."""
    return built_once(out_dir, "tokenizer.json", lambda work: _train_tokenizer(work, vocab_size))


def _train_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_text(1_000_000), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)


def tiny_config(arch: str, *, layers: int = 2, hidden: int = 128, intermediate: int = 256, vocab: int = TOKENIZER_VOCAB, heads: int = 4, kv_heads: int = 2,
                **overrides):
    """A tiny config of ``arch``; ``overrides`` set config attributes afterwards (DeepSeek's first_k_dense_replace)."""
    config = _tiny_config(arch, layers=layers, hidden=hidden, intermediate=intermediate, vocab=vocab, heads=heads, kv_heads=kv_heads)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"{arch} configs have no {key!r}")
        setattr(config, key, value)
    return config


def _tiny_config(arch: str, *, layers: int, hidden: int, intermediate: int, vocab: int, heads: int, kv_heads: int):
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "llama":
        return LlamaConfig(intermediate_size=intermediate, num_key_value_heads=kv_heads, tie_word_embeddings=False, **common)
    if arch == "mistral":
        return MistralConfig(intermediate_size=intermediate, num_key_value_heads=kv_heads, sliding_window=None, **common)
    if arch == "qwen2":
        return Qwen2Config(intermediate_size=intermediate, num_key_value_heads=kv_heads, tie_word_embeddings=True, **common)
    if arch == "qwen3":
        return Qwen3Config(intermediate_size=intermediate, num_key_value_heads=kv_heads, head_dim=hidden // heads, tie_word_embeddings=True, **common)
    if arch == "gemma2":
        from transformers import Gemma2Config

        return Gemma2Config(intermediate_size=intermediate, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                            sliding_window=32, **common)
    if arch == "gemma3_text":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(intermediate_size=intermediate, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                                sliding_window=32, layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2), **common)
    if arch == "phi3":
        from transformers import Phi3Config

        return Phi3Config(intermediate_size=intermediate, num_key_value_heads=kv_heads, tie_word_embeddings=False, **common)
    if arch == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(intermediate_size=intermediate, num_key_value_heads=kv_heads, num_local_experts=4,
                             num_experts_per_tok=2, tie_word_embeddings=False, **common)
    if arch in ("qwen2_moe", "qwen3_moe"):
        from transformers import Qwen2MoeConfig, Qwen3MoeConfig

        extra = dict(shared_expert_intermediate_size=intermediate) if arch == "qwen2_moe" else dict(head_dim=hidden // heads)
        cls = Qwen2MoeConfig if arch == "qwen2_moe" else Qwen3MoeConfig
        return cls(intermediate_size=intermediate, moe_intermediate_size=128, num_key_value_heads=kv_heads, num_experts=4,
                   num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                   tie_word_embeddings=False, **extra, **common)
    if arch == "deepseek_v2":  # V2-Lite's shape: plain q_proj, a compressed kv latent, shared + routed experts
        from transformers import DeepseekV2Config

        return DeepseekV2Config(intermediate_size=intermediate, moe_intermediate_size=128, num_key_value_heads=heads,
                                q_lora_rank=None, kv_lora_rank=128, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=128,
                                n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
                                topk_method="greedy", n_group=1, topk_group=1, tie_word_embeddings=False, **common)
    if arch == "opt":
        common.pop("max_position_embeddings")
        return OPTConfig(ffn_dim=intermediate, word_embed_proj_dim=hidden, max_position_embeddings=1024, do_layer_norm_before=True, **common)
    raise ValueError(arch)


def make_tiny_model(out_dir: Path, arch: str = "llama", *, tokenizer_dir: Path, seed: int = 0, shard: str | None = None, dtype=torch.float32, **kw) -> Path:
    """Build a random tiny model with the shared tokenizer and save it with ``save_pretrained``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(work: Path) -> None:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw)).to(dtype)
        # Random init gives near-uniform logits; widen the weights so quantization error shows in the logits.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and "embed" not in name:
                    p.mul_(3.0)
        model.save_pretrained(work, max_shard_size=shard or "2GB")
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(work)

    return built_once(out_dir, "config.json", build)


def add_bert(out_dir: Path) -> Path:
    """A BERT encoder: a real model the farm does not support (no causal LM)."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=256, hidden_size=128, num_hidden_layers=1, num_attention_heads=2, intermediate_size=256)
    BertModel(cfg).save_pretrained(out_dir)
    return out_dir


CODE_PROMPTS = ("def add(a, b):", "import os\n", "class Stack:", "for i in range(", "return self.", "while True:",
                "# the sum of", "print(", "x = [", "if __name__")


def greedy_tasks(model_dir: Path, max_new_tokens: int, prompts=CODE_PROMPTS) -> list[dict[str, str]]:
    """A gate task set the float model answers fully: its own greedy continuations (first line), through transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantfarm.taskset import first_line

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tasks = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            answer = first_line(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
            if answer:  # a continuation that starts with a newline has no first line to match
                tasks.append({"prompt": prompt, "answer": answer})
    return tasks
