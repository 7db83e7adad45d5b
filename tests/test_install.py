"""Packaging and unprivileged use: `pip install .` works (not only editable), and anyone can try the emulator."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import OTHER_UID, REPO, run_as


@pytest.mark.slow
def test_wheel_from_the_checkout_is_complete(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("gpushare-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "gpushared/app.py",
        "gpushared/api/v1/gpushare.proto",
        "gpushared/api/v1/gpushare_pb2.py",
        "gpushared/py.typed",
        "gpusharectl/cli.py",
    ):
        assert required in names, f"{required} missing from {wheel.name}"
    assert not any(n.startswith(("tests/", "daemon/", "client/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "gpushared = gpushared.app:main" in scripts
    assert "gpusharectl = gpusharectl.cli:main" in scripts
    # Installed (not editable) into a plain directory, it runs from there.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True
    )
    result = subprocess.run(
        [sys.executable, "-c", "import gpushared.app, gpusharectl.cli; print(gpushared.app.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(target)},
        cwd=tmp_path,
    )
    assert result.stdout.strip().startswith(str(target))


def test_unprivileged_user_can_run_the_emulator(tmp_short: Path) -> None:
    tmp_short.chmod(0o777)
    socket = tmp_short / "run" / "gpushared.sock"
    state = tmp_short / "state"
    script = (
        "import subprocess, sys, time\n"
        f"d = subprocess.Popen([sys.executable, '-m', 'gpushared', '--emulate', '2', '--socket', '{socket}',"
        f" '--state-dir', '{state}'], stderr=subprocess.PIPE, text=True)\n"
        "for _ in range(300):\n"
        f"    r = subprocess.run([sys.executable, '-m', 'gpusharectl', '--socket', '{socket}', 'status'], capture_output=True, text=True)\n"
        "    if r.returncode == 0: break\n"
        "    time.sleep(0.1)\n"
        "print(r.stdout)\n"
        "d.terminate(); print('exit', d.wait()); print(d.stderr.read())\n"
    )
    (tmp_short / "run").mkdir()
    (tmp_short / "run").chmod(0o777)
    result = run_as([sys.executable, "-c", script], user=OTHER_UID, group=OTHER_UID, extra_groups=[])
    assert result.returncode == 0, result.stderr
    assert "backend      emulated" in result.stdout
    assert f"you          {OTHER_UID} (uid {OTHER_UID}) admin" not in result.stdout
    assert f"(uid {OTHER_UID})" in result.stdout
    assert "exit 0" in result.stdout
    assert f"does not exist: the socket keeps the daemon's own group (gid {OTHER_UID})" in result.stdout
    assert (state / "gpushared.db").stat().st_uid == OTHER_UID
