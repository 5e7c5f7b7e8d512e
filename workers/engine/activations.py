"""Calibration activations batch by batch: in RAM while they are small, in scratch files beyond.

At the spec's default calibration (128 × 512 tokens) the activations entering and
leaving one layer of width 1024 take 512 MiB in float32, more than the layer
itself. A ``Spool`` keeps batches in RAM up to ``ram_bytes`` in all and writes
the rest to files in its folder (the job's scratch), read back one batch at a
time, so a layer's peak no longer grows with the calibration set. A batch read
back holds exactly the bytes written, so results do not depend on where it was.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class _File:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: torch.device


@dataclass(frozen=True)
class _Shared:
    """An item of another ``Activations`` read through this one: its owner keeps (and drops) it."""

    entry: torch.Tensor | _File

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.entry.shape)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Spool:
    """Where a run's activation batches live: RAM up to ``ram_bytes`` in all, then files in ``folder``.

    Without a folder (or a bound) everything stays in RAM. ``close`` removes the folder.
    """

    def __init__(self, folder: Path | None = None, ram_bytes: int | None = None):
        self.folder = folder
        self.ram_bytes = ram_bytes
        self.in_ram = 0  # bytes of the batches kept in RAM, alive now
        self.spilled = 0  # files written so far
        self._names = itertools.count()

    def keep(self, t: torch.Tensor) -> torch.Tensor | _File:
        n = _nbytes(t)
        if self.folder is None or self.ram_bytes is None or self.in_ram + n <= self.ram_bytes:
            self.in_ram += n
            return t
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{next(self._names)}.bin"
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        with open(path, "wb") as f:
            f.write(memoryview(data.numpy()))
        self.spilled += 1
        return _File(path, t.dtype, tuple(t.shape), t.device)

    @staticmethod
    def load(entry: torch.Tensor | _File) -> torch.Tensor:
        if isinstance(entry, torch.Tensor):
            return entry
        t = torch.empty(entry.shape, dtype=entry.dtype)
        with open(entry.path, "rb") as f:
            f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return t.to(entry.device)

    def drop(self, entry: torch.Tensor | _File) -> None:
        if isinstance(entry, torch.Tensor):
            self.in_ram -= _nbytes(entry)
        else:
            entry.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Forget every batch and remove the folder (at the end of a run, and when it fails)."""
        self.in_ram = 0
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class Activations:
    """A sequence of tensor-led items kept by a ``Spool``: a batch ``(hidden, kwargs)``, or a sub-module's output.

    An item is a tensor or a tuple whose first element is one; the tensor may be
    spilled, the rest (keyword arguments: masks, rotary tables) stays in RAM.
    Reading an item loads its tensor; ``drain`` hands each over and forgets it.
    """

    def __init__(self, spool: Spool):
        self.spool = spool
        self._items: list[tuple[Any, tuple | None]] = []  # (tensor or file, the rest of a tuple or None)

    def append(self, item: Any) -> None:
        head, rest = (item[0], tuple(item[1:])) if isinstance(item, tuple) else (item, None)
        self._items.append((self.spool.keep(head), rest))

    def append_shared(self, owner: Activations, j: int, rest: tuple | None = None) -> None:
        """Append ``owner``'s ``j``-th tensor (not kept again, neither in RAM nor on disk), with ``rest``.

        It stays readable here as long as ``owner`` keeps it.
        """
        entry = owner._items[j][0]
        self._items.append((entry if isinstance(entry, _Shared) else _Shared(entry), rest))

    def with_rest(self, rests: list[tuple]) -> Activations:
        """The same tensors (not copied) with the rest of each tuple replaced by ``rests[j]``."""
        out = Activations(self.spool)
        out._items = [(entry, rest) for (entry, _), rest in zip(self._items, rests)]
        return out

    def shapes(self) -> list[torch.Size]:
        """Each item's tensor shape, without reading a spilled one back."""
        return [torch.Size(e.shape) for e, _ in self._items]

    @staticmethod
    def _item(entry, rest) -> Any:
        t = Spool.load(entry.entry if isinstance(entry, _Shared) else entry)
        return t if rest is None else (t, *rest)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, j: int) -> Any:
        return self._item(*self._items[j])

    def __iter__(self) -> Iterator[Any]:
        for entry, rest in self._items:
            yield self._item(entry, rest)

    def drain(self) -> Iterator[Any]:
        """Yield every item, forgetting each (its file removed) once it is read; empty afterwards."""
        while self._items:
            entry, rest = self._items.pop(0)
            item = self._item(entry, rest)
            self._drop(entry)
            del entry
            yield item
            del item

    def release(self) -> None:
        """Forget every item."""
        while self._items:
            self._drop(self._items.pop()[0])

    def _drop(self, entry) -> None:
        if not isinstance(entry, _Shared):  # a shared one is its owner's to drop
            self.spool.drop(entry)
