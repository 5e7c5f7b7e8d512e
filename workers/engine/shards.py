"""Read only the tensors you ask for from a model's safetensors shards."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from quantfarm.errors import NotAModel
from quantfarm.paths import UnsafePath, safe_join
from quantfarm.store import sha256_file


_HASHES: dict[tuple, str] = {}  # (path, device, inode, size, mtime_ns) -> sha256, so a job hashes each file once


def file_sha256(path: Path) -> str:
    """sha256 of ``path``, computed once per file version in this process (the result fingerprint and the
    checkpoint fingerprint of the same job both need it; a weight shard can be tens of GB)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        if len(_HASHES) >= 4096:
            _HASHES.clear()
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def _shard_path(model_dir: Path, fname) -> Path:
    """Return the shard's path; refuse a name (from the index file) that would leave the model folder."""
    try:
        return safe_join(model_dir, fname)
    except (UnsafePath, TypeError):
        raise NotAModel(f"model.safetensors.index.json names shard {fname!r}, which is not a file inside the model folder.") from None


class ShardReader:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(self.dir / "model.safetensors", framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            found = sorted(p.name for p in self.dir.iterdir())[:20] if self.dir.is_dir() else []
            raise NotAModel(
                f"{self.dir} holds no safetensors weights (model.safetensors or model.safetensors.index.json); "
                "convert the model to safetensors first.",
                details={"files": found},
            )
        for fname in set(weight_map.values()):
            _shard_path(self.dir, fname)
        self.weight_map: dict[str, str] = weight_map
        self._dtypes: dict[str, torch.dtype] | None = None
        self.stored: dict[str, str] = {}  # name we use -> name in the files, where they differ

    def rename(self, rules: tuple[tuple[str, str], ...]) -> None:
        """Call tensors by the names the regex ``rules`` give them (the files keep theirs)."""
        renamed = {}
        for name, fname in self.weight_map.items():
            new = name
            for pattern, repl in rules:
                new = re.sub(pattern, repl, new)
            renamed[new] = fname
            if new != name:
                self.stored[new] = name
        self.weight_map = renamed

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def names(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.weight_map if k.startswith(prefix))

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.dir / self.weight_map[name], framework="pt") as f:
            return f.get_tensor(self.stored.get(name, name))

    def load_prefix(self, prefix: str, *, strip: bool = True) -> dict[str, torch.Tensor]:
        """Load every tensor whose name starts with ``prefix`` (grouped by shard)."""
        by_file: dict[str, list[str]] = {}
        for name in self.names(prefix):
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for fname, names in sorted(by_file.items()):
            with safe_open(self.dir / fname, framework="pt") as f:
                for name in names:
                    out[name[len(prefix):] if strip else name] = f.get_tensor(self.stored.get(name, name))
        return out

    def total_bytes(self) -> int:
        return sum((self.dir / f).stat().st_size for f in self.files)

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every weight shard and config file (for fingerprints)."""
        names = self.files + [n for n in ("config.json",) if (self.dir / n).is_file()]
        return {n: file_sha256(self.dir / n) for n in sorted(names)}
