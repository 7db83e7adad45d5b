"""Model homes and logs on disk: ownership, tails, following across a rotation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpushared.adapters.model_files import ModelFiles
from gpushared.domain.errors import FailedPrecondition


def test_home_is_private_to_the_model_uid(tmp_path: Path) -> None:
    tmp_path.chmod(0o711)
    files = ModelFiles(tmp_path)
    home = files.home("m", 4242, 4243)
    for directory in (home, home / "tmp", home / "cache"):
        info = directory.stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (4242, 4243, 0o700)
    files.remove_home("m")
    assert not home.exists()


def test_home_refuses_a_state_dir_models_cannot_traverse(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    with pytest.raises(FailedPrecondition, match="cannot reach their home") as info:
        ModelFiles(state).home("m", 4242, 4242)
    assert info.value.hint == f"chmod o+x {state} (its files stay private)"


def test_tail_follow_and_rotation(tmp_path: Path) -> None:
    files = ModelFiles(tmp_path)
    path = files.log_path("m")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)  # as the child holds it
    os.write(fd, b"".join(f"line {n}\n".encode() for n in range(10000)))
    data, offset = files.read_log("m", offset=None, tail_lines=3)
    assert data == b"line 9997\nline 9998\nline 9999\n"
    os.write(fd, b"more\n")
    data, offset = files.read_log("m", offset=offset, tail_lines=0)
    assert data == b"more\n"
    assert files.rotate("m", max_bytes=100)
    assert not files.rotate("m", max_bytes=100), "already below the cap"
    assert path.with_name("m.log.1").read_bytes().endswith(b"line 9999\nmore\n")
    os.write(fd, b"after rotation\n")  # O_APPEND: lands at the new end, not at the old offset
    os.close(fd)
    assert path.read_bytes() == b"after rotation\n"
    data, _ = files.read_log("m", offset=offset, tail_lines=0)
    assert data == b"after rotation\n", "an offset past the end starts over"
    assert files.read_log("absent", offset=None, tail_lines=5) == (b"", 0)
    assert not files.rotate("absent", 1)


def test_readability_is_judged_with_the_childs_uid_gid_and_groups(tmp_short: Path) -> None:
    tmp_short.chmod(0o755)
    model = tmp_short / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    os.chown(model, 0, 44)  # root:video
    model.chmod(0o750)
    files = ModelFiles(tmp_short / "state")
    assert not files.readable_by(str(model), 4242, 4242), "neither owner nor group"
    assert files.readable_by(str(model), 4242, 4242, (44,)), "the video group the child gets opens it"
    assert files.readable_by(str(model), 4242, 44)
    assert not files.readable_by(str(tmp_short / "absent"), 4242, 4242)
    model.chmod(0o740)  # readable but not enterable
    assert not files.readable_by(str(model), 4242, 44), "a directory must also be enterable"
    # Many checks in a row from a threaded process: none may crash (subprocess's vfork + setuid did).
    assert all(files.readable_by(str(model / "config.json"), 0, 0) for _ in range(20))
