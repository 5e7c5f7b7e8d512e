"""The peers' own virtualenvs under bench/.cache/venvs, created on first use.

Each peer pins a transformers that differs from ours, so each gets a venv of
its own, installed from bench/requirements/<name>.txt constrained only to the
local CPU torch wheel (bench/requirements/torch-constraint.txt; the repo's
constraints.txt pins our own transformers, which the peers cannot use).
"""

from __future__ import annotations

import subprocess
import sys

from bench.common import BENCH, VENVS, venv_python

PEERS = ("llmc", "autoawq")


def ensure(name: str, log=print) -> bool:
    """Create and fill the venv ``name`` if it is missing; return whether it is usable."""
    py = venv_python(name)
    req = BENCH / "requirements" / f"{name}.txt"
    constraint = BENCH / "requirements" / "torch-constraint.txt"
    stamp = VENVS / name / ".bench-installed"
    if py.is_file() and stamp.is_file() and stamp.read_text() == req.read_text():
        return True
    log(f"creating bench venv {name} (first run only; several minutes)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENVS / name)], check=True)
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(constraint), "-r", str(req)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        log(f"venv {name}: pip failed:\n{r.stderr[-2000:]}")
        return False
    stamp.write_text(req.read_text())
    return True


if __name__ == "__main__":
    ok = all(ensure(n) for n in (sys.argv[1:] or PEERS))
    sys.exit(0 if ok else 1)
