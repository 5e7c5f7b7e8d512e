"""Caller-controlled names checked like PEP 706's ``data`` tar filter; regular files copied without following links."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from quantfarm.paths import UnsafePath, copy_regular_file, safe_join, safe_relpath

BAD = [
    ("", "is empty"),
    ("/etc/passwd", "is absolute"),
    ("a//b", "has an empty segment"),
    ("a/", "has an empty segment"),
    ("../x", "has a '..' segment"),
    ("m/../../../../tmp/X/f", "has a '..' segment"),
    ("a/./b", "has a '.' segment"),
    ("a\\..\\b", "holds a NUL or a backslash"),
    ("a\x00b", "holds a NUL or a backslash"),
]


@pytest.mark.parametrize("name,why", BAD)
def test_unsafe_names_are_refused_with_the_reason(name, why, tmp_path):
    with pytest.raises(UnsafePath) as err:
        safe_relpath(name)
    assert err.value.why == why and err.value.name == name
    with pytest.raises(UnsafePath):
        safe_join(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_clean_names_join_inside_the_folder(tmp_path):
    assert safe_relpath("a/b.c/..d") == "a/b.c/..d"
    assert safe_join(tmp_path, "sub/model.safetensors") == tmp_path.resolve() / "sub" / "model.safetensors"
    with pytest.raises(UnsafePath, match="is not a string"):
        safe_relpath(3)  # type: ignore[arg-type]


def test_a_symlink_inside_the_folder_cannot_carry_a_name_out(tmp_path):
    root = tmp_path / "root"
    (root / "in").mkdir(parents=True)
    (root / "out").symlink_to(tmp_path)
    (root / "ok").symlink_to(root / "in")
    assert safe_join(root, "ok/f") == root.resolve() / "ok" / "f"
    with pytest.raises(UnsafePath) as err:
        safe_join(root, "out/f")
    assert err.value.why == "resolves outside its folder"


def test_only_regular_files_are_copied(tmp_path):
    (tmp_path / "secret").write_text("root:x:0:0")
    (tmp_path / "real").write_text("vocab")
    (tmp_path / "link").symlink_to(tmp_path / "secret")
    os.mkfifo(tmp_path / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    (tmp_path / "d").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    assert copy_regular_file(tmp_path / "real", out / "real") and (out / "real").read_text() == "vocab"
    for name in ("link", "fifo", "sock", "missing", "d"):  # returns at once: a FIFO is never opened for a blocking read
        assert copy_regular_file(tmp_path / name, out / name) is False, name
    assert copy_regular_file(Path("/dev/null"), out / "null") is False
    assert sorted(p.name for p in out.iterdir()) == ["real"]
    sock.close()
