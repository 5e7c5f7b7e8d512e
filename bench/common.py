"""What every benchmark shares: paths, pinned threads, measured subprocesses, tables."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
CACHE = BENCH / ".cache"
VENVS = CACHE / "venvs"
TOOLS = BENCH / "tools"
OUR_PYTHON = Path(sys.executable)
THREADS = 2


def venv_python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def pinned_env(threads: int = THREADS, **extra: str) -> dict[str, str]:
    """The environment every tool runs under: same thread count, offline, CPU only."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "GPTQMODEL_CPU_WORKERS"):
        env[var] = str(threads)
    env.update(
        BENCH_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
        TQDM_DISABLE="1", DISABLE_TQDM="1",
    )
    env.pop("PYTHONPATH", None)  # peer venvs must not see our packages
    env.update(extra)
    return env


@dataclass
class Measured:
    """One tool run in its own process: exit code, wall time, peak RSS, what it reported."""

    label: str
    rc: int
    wall_s: float
    peak_rss_mb: float  # the child's own VmHWM (see run_measured); ru_maxrss when the child did not report it
    sampled_rss_mb: float  # max RSS of the process tree, sampled every 20 ms (cross-check)
    ru_maxrss_mb: float = 0.0  # wait4's ru_maxrss: floored at this parent's RSS when the child was spawned
    cpu_s: float = 0.0  # the child's user + system CPU seconds (wait4): less sensitive to a shared machine's load than wall
    result: dict[str, Any] = field(default_factory=dict)
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0 and bool(self.result)


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(label: str, python: Path, script: Path, args: list[str], *, env: dict[str, str] | None = None,
                 timeout: float = 1800, cwd: Path | None = None, log_dir: Path | None = None) -> Measured:
    """Run ``python script args --result R`` in a fresh process and measure it.

    The child writes its own timings (imports, quantization) as JSON to R; the
    parent measures the whole process (wall, peak RSS via ``os.wait4``).
    """
    log_dir = log_dir or CACHE / "logs"
    cwd = cwd or CACHE / "cwd"  # some tools drop files in their working directory (gptqmodel: ./logs)
    cwd.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    slug = label.replace(" ", "_").replace("/", "-")
    result_path = log_dir / f"{slug}.json"
    log_path = log_dir / f"{slug}.log"
    result_path.unlink(missing_ok=True)
    cmd = [str(python), str(script), *args, "--result", str(result_path)]
    peak_sample = 0
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or pinned_env(), stdout=log, stderr=subprocess.STDOUT)
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak_sample
            while not stop.is_set():
                peak_sample = max(peak_sample, _tree_rss(proc.pid))
                stop.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            stop.set()
            sampler.join()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    tail = log_path.read_text(errors="replace")[-3000:]
    # Linux carries the RSS high-water mark across fork+exec into ru_maxrss, so wait4 reports at least
    # this (large) parent's RSS. The child's VmHWM, read by the child itself at its end, has no such floor.
    ru = round(usage.ru_maxrss / 1024, 1)
    peak = result.get("vmhwm_mb") or ru
    return Measured(label, proc.returncode, round(wall, 2), peak_rss_mb=peak, sampled_rss_mb=round(peak_sample / 2**20, 1),
                    ru_maxrss_mb=ru, cpu_s=round(usage.ru_utime + usage.ru_stime, 2), result=result, log_tail=tail)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_gb, 1), "torch": torch.__version__,
        "python": platform.python_version(), "threads": THREADS, "load_avg": os.getloadavg(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def ratio(a: float | None, b: float | None, nd: int = 2) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.{nd}f}"


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join("" if v is None else str(v) for v in r) + " |")
    return "\n".join(out)


def fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def started_and_load() -> tuple[str, str]:
    """When a bench starts (UTC) and the load average then, as its RESULTS section states them."""
    import time

    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), ", ".join(f"{x:.2f}" for x in os.getloadavg())


def write_section(text: str, begin: str, end: str) -> None:
    """Put ``text`` (which starts with ``begin`` and ends with ``end``) into RESULTS.md in place of the old section."""
    path = BENCH / "RESULTS.md"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in old and end in old:
        new = old[:old.index(begin)] + text + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


def run_and_record(a, prefix: str, measure, render, begin: str, end: str) -> int:
    """A stack bench's whole run: ``measure(a, work)`` in a scratch folder, ``render(result, a, started, load)``,
    printed and (unless ``a.no_write``) put in RESULTS.md between ``begin`` and ``end``."""
    import shutil
    import tempfile

    started, load = started_and_load()
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        result = measure(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = render(result, a, started, load)
    print(text)
    if not a.no_write:
        write_section(text, begin, end)
    return 0
