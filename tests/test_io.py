"""Atomic artifact writing keeps old content on failure and uses normal permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest

from grcm.io import atomic_directory, atomic_path, write_json_atomic


def test_failed_write_keeps_previous_file(tmp_path):
    target = tmp_path / "a.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left behind


def test_directory_replaced_only_on_success(tmp_path):
    target = tmp_path / "bundle"
    with atomic_directory(target) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(ValueError), atomic_directory(target) as tmp:
        (tmp / "x").write_text("2")
        raise ValueError("crash")
    assert (target / "x").read_text() == "1"
    with atomic_directory(target) as tmp:
        (tmp / "x").write_text("3")
    assert (target / "x").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "f.json", {})
        with atomic_directory(tmp_path / "d"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
