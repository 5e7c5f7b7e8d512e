"""A gate's task set: JSONL lines ``{"prompt": ..., "answer": ...}``, read by the API (to refuse early) and the worker.

Bounded on purpose: the gate generates greedily for every prompt twice (source
and quantized model), so the file, the number of prompts and their lengths are
capped here, in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from quantfarm.errors import ValidationFailed

MAX_BYTES = 1024 * 1024  # a task set is prompts, not a corpus
MAX_TASKS = 200
MAX_PROMPT_CHARS = 4000
MAX_ANSWER_CHARS = 500
FIELD = "gate.task_set_upload_id"


@dataclass(frozen=True)
class Task:
    prompt: str
    answer: str


def _bad(why: str) -> ValidationFailed:
    return ValidationFailed({FIELD: why}, f"The gate's task set cannot be used: {why}.")


def check_size(size_bytes: int) -> None:
    """Raise ValidationFailed for a task set file over ``MAX_BYTES`` (checked before reading it)."""
    if size_bytes > MAX_BYTES:
        raise _bad(f"the file is {size_bytes} bytes; a task set holds at most {MAX_BYTES} bytes (JSONL, one task a line)")


def parse_task_set(text: str) -> list[Task]:
    """Parse JSONL tasks; blank lines are skipped.

    Raises ValidationFailed (field ``gate.task_set_upload_id``) naming the first
    bad line: not JSON, not an object, a missing, non-string, empty or overlong
    ``prompt``/``answer``, unknown keys, no tasks, or more than ``MAX_TASKS``.
    """
    check_size(len(text.encode("utf-8")))
    tasks: list[Task] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise _bad(f"line {n} is not JSON; write one object per line: {{\"prompt\": ..., \"answer\": ...}}") from None
        if not isinstance(row, dict):
            raise _bad(f"line {n} is not a JSON object with prompt and answer")
        extra = sorted(set(row) - {"prompt", "answer"})
        if extra:
            raise _bad(f"line {n} has unknown keys {', '.join(extra)}; only prompt and answer")
        for key, limit in (("prompt", MAX_PROMPT_CHARS), ("answer", MAX_ANSWER_CHARS)):
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                raise _bad(f"line {n} needs a non-empty string {key!r}")
            if len(value) > limit:
                raise _bad(f"line {n}: {key} is {len(value)} characters; at most {limit}")
        tasks.append(Task(row["prompt"], row["answer"]))
        if len(tasks) > MAX_TASKS:
            raise _bad(f"more than {MAX_TASKS} tasks; the gate scores at most {MAX_TASKS} prompts")
    if not tasks:
        raise _bad("the file holds no tasks")
    return tasks


def first_line(text: str) -> str:
    """What a generation is scored on: its first line, stripped (a model goes on past the answer)."""
    return text.strip().split("\n", 1)[0].strip()
