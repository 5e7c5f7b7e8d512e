"""storage.models.new_id: time-sortable ids with 80 bits of os.urandom each, never shared with a forked process."""

from __future__ import annotations

import os

from storage import models
from storage.models import new_id

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def _random_part(job_id: str) -> int:
    """The id's 80 random bits (its last 16 characters)."""
    value = 0
    for ch in job_id.split("_", 1)[1][-16:]:
        value = value * 32 + _CROCKFORD.index(ch)
    return value


def test_ids_increase_and_use_every_random_byte_once(monkeypatch):
    """A page of os.urandom serves many ids, ten bytes each, in order; the next page is read when it runs out."""
    pages = [bytes(range(i, i + 30)) for i in (0, 100)]
    reads = []

    def urandom(n):
        reads.append(n)
        return pages[len(reads) - 1]

    monkeypatch.setattr(models, "_RANDOM_READ", 30)
    monkeypatch.setattr(models.os, "urandom", urandom)
    models._random.clear()
    ids = [new_id("job") for _ in range(4)]
    models._random.clear()
    assert reads == [30, 30]
    assert ids == sorted(ids) and len(set(ids)) == 4
    expected = [int.from_bytes(pages[0][i:i + 10], "big") for i in (0, 10, 20)] + [int.from_bytes(pages[1][:10], "big")]
    got = [_random_part(i) for i in ids]
    # Within one millisecond an id is the one before plus one (strictly increasing); otherwise its bytes are the page's.
    assert all(g == e or g == got[k - 1] + 1 for k, (g, e) in enumerate(zip(got, expected)))
    assert got[0] == expected[0]


def test_a_forked_child_does_not_hand_out_the_parents_random_bytes():
    new_id("job")  # the parent holds unread bytes now
    assert len(models._random) > 0
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id's random part
        try:
            os.close(read)
            os.write(write, new_id("job").encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent = new_id("job")
    assert child.startswith("job_") and _random_part(child) != _random_part(parent)
