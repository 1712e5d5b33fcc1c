"""sciddiff._atomic: a failed write leaves the old file untouched and no temp file behind."""

from __future__ import annotations

import pytest

from sciddiff._atomic import atomic_write, atomic_write_text


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old")
    atomic_write_text(p, "new")
    assert p.read_text() == "new"
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]


def test_failed_write_keeps_old_content_and_cleans_up(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old")

    def half(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(p, half)
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]


def test_mkdir_option(tmp_path):
    p = tmp_path / "sub" / "b.txt"
    with pytest.raises(FileNotFoundError):
        atomic_write_text(p, "x")
    atomic_write_text(p, "x", mkdir=True)
    assert p.read_text() == "x"
