"""The task gate: the source and the quantized model answer a team's prompts greedily; exact match scores them.

Generation needs every layer at every step, so unlike perplexity this holds the
whole model once (the source, then the same modules with the quantized weights
applied). The task set bounds the cost: at most ``taskset.MAX_TASKS`` prompts and
``max_new_tokens`` each.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from quantfarm.taskset import first_line, parse_task_set

DEFAULT_MAX_NEW_TOKENS = 32
Generations = Callable[[list[torch.Tensor], int], tuple[list[list[int]], list[list[int]]]]


@torch.no_grad()
def greedy(model: nn.Module, prompts: list[torch.Tensor], max_new_tokens: int, device: torch.device, eos: set[int]) -> list[list[int]]:
    """Return each prompt's greedy continuation (token ids), one prompt at a time (no padding), with a KV cache."""
    outs = []
    for ids in prompts:
        ids, past, new = ids.to(device), None, []
        for _ in range(max_new_tokens):
            o = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = o.past_key_values
            nxt = int(o.logits[0, -1].argmax())
            new.append(nxt)
            if nxt in eos:
                break
            ids = torch.tensor([[nxt]], device=device)
        outs.append(new)
    return outs


def streamed_generations(model, method, ckpt) -> Generations:
    """Generations of a layer-wise method: load every layer once, answer, apply the checkpoint, answer again."""
    from workers.engine.pipeline import release_heap

    def run(prompts: list[torch.Tensor], max_new_tokens: int):
        eos = _eos(model.config)
        loaded = [model.materialize(p) for p in (*model.arch.pre, *model.arch.post)]
        layers = [model.load_layer(i) for i in range(model.num_layers)]
        try:
            before = greedy(model.model, prompts, max_new_tokens, model.device, eos)
            for i, layer in enumerate(layers):
                method.apply(model.arch.at(i), layer, ckpt.load(i))
            after = greedy(model.model, prompts, max_new_tokens, model.device, eos)
        finally:
            for m in (*loaded, *layers):
                model.release(m)
            release_heap()
        return before, after

    return run


def loaded_generations(load_source: Callable[[], nn.Module], load_quantized: Callable[[], nn.Module]) -> Generations:
    """Generations of a method whose artifact transformers loads whole: the source, then the artifact."""
    from workers.engine.bnb import _free

    def one(load, prompts, max_new_tokens):
        model = load()
        try:
            return greedy(model, prompts, max_new_tokens, next(model.parameters()).device, _eos(model.config))
        finally:
            _free(model)

    return lambda prompts, n: (one(load_source, prompts, n), one(load_quantized, prompts, n))


def _eos(config) -> set[int]:
    eos = getattr(config, "eos_token_id", None)
    return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if isinstance(eos, int) else set())


def task_scores(req, generations: Generations | None, tokenizer, on_stage: Callable[[str], None]) -> dict[str, Any]:
    """Score the gate's task set on the source and the quantized model; return the figures for metrics and card.

    Raises ValidationFailed for a task set that no longer parses, BadRequest for a method that cannot generate.
    """
    from quantfarm.errors import BadRequest
    from workers.engine.model import read_config

    if generations is None:
        raise BadRequest(f"{req.method} cannot run a task-set gate (no way to generate with its output).", code="unsupported_gate")
    on_stage("evaluating")
    t0 = time.monotonic()
    tasks = parse_task_set(req.read_upload(req.gate.task_set_upload_id))
    max_new = req.gate.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    max_pos = getattr(read_config(req.source_dir), "max_position_embeddings", None) or 2048
    keep = max(1, max_pos - max_new)  # a prompt longer than the model's window keeps its end
    prompts = [tokenizer(t.prompt, return_tensors="pt").input_ids[:, -keep:] for t in tasks]
    before, after = generations(prompts, max_new)
    answers = [first_line(t.answer) for t in tasks]

    def score(outs: list[list[int]]) -> float:
        hits = sum(first_line(tokenizer.decode(o, skip_special_tokens=True)) == a for o, a in zip(outs, answers))
        return round(hits / len(tasks), 4)

    return {"task_count": len(tasks), "task_exact_match_before": score(before), "task_exact_match_after": score(after),
            "task_seconds": round(time.monotonic() - t0, 3)}
