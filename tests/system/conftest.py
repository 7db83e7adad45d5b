"""System tests under real systemd 252 (PID 1 in systemd-nspawn). See tests/system/nspawn.py and docs/systemd.md.

Marked ``system`` and ``slow`` (so .ci/run runs them). Fast unit
checks (tests/system/test_units.py) are neither and always run.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system import nspawn

REPO = Path(__file__).resolve().parents[2]
SYSTEM_DIR = REPO / "tests" / "system"
UNIT_DIR = REPO / "systemd"


@pytest.fixture(scope="session")
def system_root() -> Path:
    """The cached Debian 12 root (built on first use); skips where system tests cannot run at all."""
    reason = nspawn.why_unavailable()
    if reason:
        pytest.skip(reason)
    return nspawn.ensure_root()


def binds(extra: dict[Path, str] | None = None) -> dict[Path, str]:
    """What every container sees read-only: the unit files and this directory (fake daemon)."""
    return {UNIT_DIR: "/mnt/systemd", SYSTEM_DIR: "/mnt/system", **(extra or {})}


@pytest.fixture
def container(system_root: Path, tmp_path: Path) -> Iterator[nspawn.Container]:
    """A freshly booted container for one test (boot ~0.5 s, poweroff ~2 s); always torn down."""
    with nspawn.Container(system_root, binds_ro=binds(), log_dir=tmp_path) as booted:
        yield booted


SOURCES = ("systemd", "packaging", "daemon", "client", "pyproject.toml")


def newest_source() -> float:
    stamps = []
    for name in SOURCES:
        path = REPO / name
        files = (
            [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        stamps += [p.stat().st_mtime for p in files]
    return max(stamps, default=0.0)


def find_deb(directory: Path) -> Path | None:
    debs = sorted(directory.glob("gpushare_*_amd64.deb"), key=lambda p: p.stat().st_mtime)
    return debs[-1] if debs else None


@pytest.fixture(scope="session")
def deb() -> Path:
    """dist/'s newest .deb when it is newer than every source; else one packaging/build makes (deb only, into
    build/system-test-dist, so a dist/ someone else is building is left alone); else skip."""
    found = find_deb(REPO / "dist")
    if found is not None and found.stat().st_mtime >= newest_source():
        return found
    build = REPO / "packaging" / "build"
    if not (build.exists() and os.access(build, os.X_OK)):
        if found is not None:
            return found  # stale, but all there is
        pytest.skip("no dist/gpushare_*_amd64.deb and no packaging/build to make one")
    out = REPO / "build" / "system-test-dist"
    ours = find_deb(out) if out.exists() else None
    if ours is not None and ours.stat().st_mtime >= newest_source():
        return ours
    env = {**os.environ, "FORMATS": "deb", "OUT": str(out), "WORK": str(REPO / "build" / "system-test-packaging")}
    done = subprocess.run([str(build)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        pytest.fail(f"packaging/build exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    ours = find_deb(out)
    assert ours is not None, f"packaging/build made no .deb in {out}:\n{done.stdout[-2000:]}"
    return ours
