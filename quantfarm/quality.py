"""What a job measures and the bar it must clear: the spec's ``evaluation`` and ``gate``."""

from __future__ import annotations

from pydantic import Field, model_validator

from quantfarm.options import Strict


class Evaluation(Strict):
    texts: list[str] | None = Field(None, min_length=1, description="Held-out text; default: built-in held-out code")
    max_windows: int = Field(64, ge=1, le=1024, description="Held-out windows of seq_len tokens; small counts are noisy")


class Gate(Strict):
    max_ppl_increase_pct: float | None = Field(
        None, ge=-100, le=1000, description="Fail the job (error quality_gate, artifact kept, never published) when held-out "
                                            "perplexity rises by more than this percentage (negative: it must fall by that much)",
    )
    task_set_upload_id: str | None = Field(
        None, description='An upload (POST /v1/uploads) of JSONL tasks {"prompt": ..., "answer": ...}; the source and the '
                          "quantized model answer each prompt greedily, scored by exact match of the first line",
    )
    min_exact_match: float | None = Field(None, ge=0, le=1, description="Fail when the quantized model's exact-match "
                                                                       "score on the task set is below this fraction")
    max_exact_match_drop_pct: float | None = Field(
        None, ge=-100, le=100, description="Fail when the exact-match score falls by more than this many percentage points "
                                           "from the source model's (negative: it must rise by that much)",
    )
    max_new_tokens: int | None = Field(None, ge=1, le=128, description="Tokens generated per task-set prompt (default 32)")

    @model_validator(mode="after")
    def _bars(self):
        task_bars = self.min_exact_match is not None or self.max_exact_match_drop_pct is not None
        if self.task_set_upload_id is None and task_bars:
            raise ValueError("min_exact_match and max_exact_match_drop_pct need a task_set_upload_id")
        if self.task_set_upload_id is not None and not task_bars:
            raise ValueError("a task_set_upload_id needs min_exact_match or max_exact_match_drop_pct")
        if self.max_ppl_increase_pct is None and self.task_set_upload_id is None:
            raise ValueError("set max_ppl_increase_pct, or a task_set_upload_id with its threshold")
        if self.max_new_tokens is not None and self.task_set_upload_id is None:
            raise ValueError("max_new_tokens applies to a task_set_upload_id only")
        return self
