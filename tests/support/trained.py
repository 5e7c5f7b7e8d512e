"""A small Llama trained on Python stdlib sources, for quality tests and the bench.

A random model has nothing for quantization to lose, so comparing methods needs a
model that has learnt something. The default one (4 layers, hidden 128) trains in
about three minutes of one CPU core to a held-out perplexity of ~38 (random: ~1000).
Half the steps reach ~60 in half the time, but 4-bit rounding then moves its loss
so little that GPTQ's edge over RTN is within evaluation noise. It is cached (tests/support/models.py ``built_once``): built once across test processes, in a private
directory renamed into place, so a killed training never leaves a half model.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tests.support.models import TOKENIZER_VOCAB, built_once, train_tokenizer

MARKER = "quantfarm-trained.json"
EVAL_WINDOWS = 256


@dataclass(frozen=True)
class TrainSpec:
    """Everything that determines the trained weights (and so the cache directory)."""

    hidden: int = 128
    intermediate: int = 384
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    vocab: int = TOKENIZER_VOCAB
    steps: int = 1400
    batch: int = 8  # 1400 x 8 x 128 = 1.4M tokens: held-out perplexity ~38 (256 windows)
    seq_len: int = 128
    lr: float = 4e-3
    warmup: int = 30
    weight_decay: float = 0.1
    seed: int = 0
    train_chars: int = 1_500_000

    def dirname(self) -> str:
        return (f"trained-llama-h{self.hidden}-i{self.intermediate}-l{self.layers}-a{self.heads}-kv{self.kv_heads}"
                f"-v{self.vocab}-s{self.steps}-b{self.batch}x{self.seq_len}-lr{self.lr:g}-wd{self.weight_decay:g}-seed{self.seed}")


def trained_llama(cache_dir: Path, *, threads: int | None = None, dtype: torch.dtype = torch.float32, log=print, **overrides) -> Path:
    """Return the directory of a trained tiny Llama under ``cache_dir``, training it once.

    ``overrides`` are ``TrainSpec`` fields (a bigger model for the bench: ``hidden=256,
    layers=8, steps=1500``). The directory holds safetensors weights, config,
    generation config, tokenizer and ``quantfarm-trained.json`` with the held-out
    perplexity before and after training. The weights do not depend on ``threads``
    (one and two threads give the same bytes); by default training takes the cores
    this process has to itself (``train_threads``).
    """
    spec = TrainSpec(**overrides)
    cache_dir = Path(cache_dir)
    tag = "" if dtype == torch.float32 else f"-{str(dtype).removeprefix('torch.')}"
    tokenizer_dir = train_tokenizer(cache_dir / f"tokenizer-{spec.vocab}" if spec.vocab != TOKENIZER_VOCAB else cache_dir / "tokenizer", spec.vocab)

    def build(work: Path) -> None:
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(threads or train_threads())
        try:
            report = _train(spec, tokenizer_dir, work, dtype)
        finally:
            torch.set_num_threads(prev_threads)
        (work / MARKER).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        log(f"trained {spec.dirname() + tag}: held-out perplexity {report['perplexity_random']:.1f} (random init) -> "
            f"{report['perplexity']:.2f} after {spec.steps} steps in {report['seconds']:.0f} s")

    return built_once(cache_dir / (spec.dirname() + tag), MARKER, build)


def train_threads() -> int:
    """Two threads when this process has the machine's two cores; one beside another test process (pytest-xdist)."""
    return 1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, len(os.sched_getaffinity(0))))


def trained_report(model_dir: Path) -> dict:
    """The marker's contents: spec, losses and perplexities of a trained model."""
    return json.loads((Path(model_dir) / MARKER).read_text())


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def heldout_perplexity(model, windows: torch.Tensor, batch: int = 16) -> float:
    """exp of the mean next-token loss over ``windows [n, seq_len]``."""
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        logits = model(input_ids=chunk).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"))
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


def heldout_windows(tokenizer, seq_len: int, max_windows: int = EVAL_WINDOWS) -> torch.Tensor:
    """The engine's own held-out evaluation windows (stdlib files never used for calibration).

    A few dozen windows come from a handful of files and swing the perplexity by a
    third; 256 windows (32k tokens at seq_len 128) span many files.
    """
    from quantfarm.spec import Evaluation
    from workers.engine.calibration import evaluation_ids

    return evaluation_ids(Evaluation(max_windows=max_windows), tokenizer, seq_len)


def _build(spec: TrainSpec):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config)


def _lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine down to 10%


def _train(spec: TrainSpec, tokenizer_dir: Path, work: Path, dtype: torch.dtype) -> dict:
    from transformers import AutoTokenizer

    from workers.engine.calibration import builtin_code_texts

    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    stream = _token_stream(tokenizer, builtin_code_texts(holdout=False, max_chars=spec.train_chars))
    evals = heldout_windows(tokenizer, spec.seq_len)
    model = _build(spec)
    ppl_random = heldout_perplexity(model, evals)

    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(spec.seed)
    losses = []
    model.train()
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, spec)
        starts = torch.randint(0, len(stream) - spec.seq_len - 1, (spec.batch,), generator=gen)
        ids = torch.stack([stream[s:s + spec.seq_len] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))

    ppl = heldout_perplexity(model, evals)
    work.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(work)
    tokenizer.save_pretrained(work)
    return {
        "spec": asdict(spec),
        "dtype": str(dtype),
        "train_tokens": len(stream),
        "final_train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "perplexity_random": round(ppl_random, 2),
        "perplexity": round(ppl, 3),
        "eval_windows": list(evals.shape),
        "seconds": round(time.monotonic() - t0, 1),
    }
