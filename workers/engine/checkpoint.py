"""Per-layer checkpoints in a blob store, guarded by a fingerprint of the inputs.

Layout under the job's checkpoint prefix::

    manifest.json            fingerprint, its parts, and one entry per finished layer
    layer-00000.safetensors  that layer's packed tensors

A layer file is written before the manifest names it, so a crash in between
leaves an unreferenced file, never a manifest pointing at nothing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from quantfarm.errors import CheckpointMismatch, StorageUnavailable
from quantfarm.store import BlobStore

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def fingerprint(parts: dict[str, Any]) -> str:
    """A stable digest of everything that determines a job's result."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes() + str((tuple(t.shape), str(t.dtype))).encode()).hexdigest()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"method": {"options": {"bits": 4}}}`` -> ``{"method.options.bits": 4}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def recorded_dtype(store: BlobStore, device: torch.device) -> torch.dtype | None:
    """The compute dtype a job's checkpoints were made in on this kind of device; None when there are none.

    A resumed job keeps computing in it: a worker whose CPU would choose another
    dtype (bf16 with AMX or AVX512-BF16, float32 without) carries on from the
    checkpoints, with every layer of the result computed in the one dtype, instead
    of refusing them. On another kind of device the fingerprint still refuses them.
    """
    try:
        manifest = json.loads(store.get_bytes(MANIFEST))
    except KeyError:
        return None
    compute = manifest.get("parts", {}).get("compute") or {}
    dtype = getattr(torch, str(compute.get("dtype", "")).removeprefix("torch."), None)
    return dtype if compute.get("device") == device.type and isinstance(dtype, torch.dtype) else None


class Checkpoints:
    """Read and write one job's layer checkpoints."""

    def __init__(self, store: BlobStore, parts: dict[str, Any]):
        self.store = store
        self.parts = parts
        self.digest = fingerprint(parts)
        self.layers: dict[int, dict[str, Any]] = {}

    def _read_manifest(self) -> dict | None:
        try:
            return json.loads(self.store.get_bytes(MANIFEST))
        except KeyError:
            return None

    def open(self) -> set[int]:
        """Load the manifest; return finished layers. Raises CheckpointMismatch on a different fingerprint."""
        m = self._read_manifest()
        if m is None:
            return set()
        if m.get("fingerprint") != self.digest:
            old, new = _flatten(m.get("parts", {})), _flatten(self.parts)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise CheckpointMismatch(
                "This job's checkpoints were made from different inputs (changed: "
                f"{', '.join(changed) or 'unknown'}); they cannot be resumed. Submit a new job.",
                details={"changed": changed},
            )
        self.layers = {int(k): v for k, v in m.get("layers", {}).items()}
        return set(self.layers)

    def save(self, index: int, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        key = f"layer-{index:05d}.safetensors"
        blob = st_save({k: v.contiguous().cpu() for k, v in sorted(tensors.items())})
        self.store.put_bytes(key, blob)
        self.layers[index] = {"key": key, "sha256": hashlib.sha256(blob).hexdigest(), "tensors": sorted(tensors), **info}
        manifest = {
            "format": FORMAT_VERSION,
            "fingerprint": self.digest,
            "parts": self.parts,
            "layers": {str(i): v for i, v in sorted(self.layers.items())},
        }
        self.store.put_bytes(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())

    def load(self, index: int) -> dict[str, torch.Tensor]:
        entry = self.layers[index]
        try:
            blob = self.store.get_bytes(entry["key"])
        except KeyError:
            raise StorageUnavailable(f"Checkpoint {entry['key']} is listed in the manifest but missing from the store.") from None
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise CheckpointMismatch(f"Checkpoint {entry['key']} is corrupt (sha256 differs from the manifest).")
        return st_load(blob)

    def losses(self) -> dict[int, dict[str, float]]:
        return {i: v.get("losses", {}) for i, v in sorted(self.layers.items())}
