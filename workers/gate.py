"""The quality gate: does a quantized model clear the bar its job set?"""

from __future__ import annotations

from typing import Any


def gate_verdict(gate, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """Return the gate's numbers and whether they pass (None without a gate).

    Without both perplexities (evaluation did not run) the gate fails: a bar
    that was not measured is not cleared.
    """
    if gate is None:
        return None
    before, after = metrics.get("perplexity_before"), metrics.get("perplexity_after")
    verdict: dict[str, Any] = {"max_ppl_increase_pct": gate.max_ppl_increase_pct, "perplexity_before": before,
                               "perplexity_after": after}
    if not before or after is None:
        return {**verdict, "ppl_increase_pct": None, "passed": False}
    increase = round((after / before - 1) * 100, 4)
    return {**verdict, "ppl_increase_pct": increase, "passed": increase <= gate.max_ppl_increase_pct}


def gate_message(verdict: dict[str, Any]) -> str:
    if verdict["ppl_increase_pct"] is None:
        return "The quality gate could not be checked: the job has no perplexity before and after."
    return (f"Quality gate failed: held-out perplexity rose {verdict['ppl_increase_pct']:.2f}% "
            f"({verdict['perplexity_before']} -> {verdict['perplexity_after']}), over the {verdict['max_ppl_increase_pct']}% allowed. "
            "The artifact is kept (kind gate_failed) and was not published.")
