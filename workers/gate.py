"""The quality gate: does a quantized model clear the bar its job set?"""

from __future__ import annotations

from typing import Any


def gate_verdict(gate, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """Return the gate's numbers and whether they pass (None without a gate).

    Each bar the gate sets is checked; a bar that was not measured (no
    perplexity, no task scores) fails: it was not cleared.
    """
    if gate is None:
        return None
    verdict: dict[str, Any] = {}
    checks: list[bool] = []
    if gate.max_ppl_increase_pct is not None:
        before, after = metrics.get("perplexity_before"), metrics.get("perplexity_after")
        increase = round((after / before - 1) * 100, 4) if before and after is not None else None
        verdict.update(max_ppl_increase_pct=gate.max_ppl_increase_pct, perplexity_before=before, perplexity_after=after,
                       ppl_increase_pct=increase)
        checks.append(increase is not None and increase <= gate.max_ppl_increase_pct)
    if gate.task_set_upload_id is not None:
        before, after = metrics.get("task_exact_match_before"), metrics.get("task_exact_match_after")
        drop = round((before - after) * 100, 4) if before is not None and after is not None else None
        verdict.update(task_count=metrics.get("task_count"), exact_match_before=before, exact_match_after=after,
                       exact_match_drop_pct=drop)
        if gate.min_exact_match is not None:
            verdict["min_exact_match"] = gate.min_exact_match
            checks.append(after is not None and after >= gate.min_exact_match)
        if gate.max_exact_match_drop_pct is not None:
            verdict["max_exact_match_drop_pct"] = gate.max_exact_match_drop_pct
            checks.append(drop is not None and drop <= gate.max_exact_match_drop_pct)
    return {**verdict, "passed": all(checks)}


def gate_message(verdict: dict[str, Any]) -> str:
    """Say which bars the job missed, with the numbers."""
    missed = []
    if "max_ppl_increase_pct" in verdict:
        if verdict["ppl_increase_pct"] is None:
            missed.append("perplexity was not measured before and after")
        elif verdict["ppl_increase_pct"] > verdict["max_ppl_increase_pct"]:
            missed.append(f"held-out perplexity rose {verdict['ppl_increase_pct']:.2f}% ({verdict['perplexity_before']} -> "
                          f"{verdict['perplexity_after']}), over the {verdict['max_ppl_increase_pct']}% allowed")
    if "exact_match_after" in verdict:
        before, after = verdict["exact_match_before"], verdict["exact_match_after"]
        if after is None:
            missed.append("the task set was not scored")
        else:
            scores = f"exact match {before:.2%} -> {after:.2%} on {verdict['task_count']} tasks"
            if "min_exact_match" in verdict and after < verdict["min_exact_match"]:
                missed.append(f"{scores}, under the {verdict['min_exact_match']:.2%} required")
            if "max_exact_match_drop_pct" in verdict and verdict["exact_match_drop_pct"] > verdict["max_exact_match_drop_pct"]:
                missed.append(f"{scores}, a drop of {verdict['exact_match_drop_pct']:.2f} points, over the "
                              f"{verdict['max_exact_match_drop_pct']} allowed")
    return f"Quality gate failed: {'; '.join(missed) or 'a bar was not cleared'}. The artifact is kept (kind gate_failed) and was not published."
