"""Allocation under concurrency and under a full disk: nothing double-allocated, nothing half-written."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gpushared.api.v1 import gpushare_pb2 as pb
from gpushared.api.v1 import gpushare_pb2_grpc as pb_grpc
from tests.conftest import Daemon

GIB = 1024**3


async def allocate_concurrently(socket: Path, count: int) -> list[pb.Allocation | grpc.StatusCode]:
    async def one() -> pb.Allocation | grpc.StatusCode:
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            try:
                response = await pb_grpc.GpushareStub(channel).Allocate(
                    pb.AllocateRequest(memory_bytes=GIB), timeout=30
                )
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return response.allocation

    return list(await asyncio.gather(*(one() for _ in range(count))))


def test_concurrent_requests_never_share_a_partition(daemon: Daemon) -> None:
    results = asyncio.run(allocate_concurrently(daemon.socket, 24))
    granted = [r for r in results if isinstance(r, pb.Allocation)]
    refused = [r for r in results if not isinstance(r, pb.Allocation)]
    assert len(granted) == 8, "8 SPX partitions, 8 grants"
    assert set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    held = [(p.gpu_bdf, p.partition_id) for a in granted for p in a.partitions]
    assert len(set(held)) == 8
    daemon.restart()
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        listed = pb_grpc.GpushareStub(channel).ListAllocations(pb.ListAllocationsRequest()).allocations
    assert sorted(a.id for a in listed) == sorted(a.id for a in granted), "every granted lease was durable"


@pytest.fixture
def small_disk(tmp_short: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs for the state directory, so the disk can really fill up."""
    mount = tmp_short / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass  # ENOSPC: the disk is full
    finally:
        os.close(fd)


def test_full_disk_refuses_cleanly_and_recovers(small_disk: Path, tmp_short: Path) -> None:
    d = Daemon(tmp_short)
    d.state_dir = small_disk / "state"
    d.start()
    try:
        with grpc.insecure_channel(f"unix:{d.socket}") as channel:
            stub = pb_grpc.GpushareStub(channel)
            kept = stub.Allocate(pb.AllocateRequest(memory_bytes=GIB, name="before")).allocation
            fill(small_disk / "filler")
            failures = 0
            for _ in range(40):  # SQLite may still have room in pages it owns; keep going until it does not
                try:
                    stub.Allocate(pb.AllocateRequest(memory_bytes=GIB, name="during"))
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                    assert "cannot record the change" in (exc.details() or "")
                    assert "nothing was changed" in (exc.details() or "")
                    failures += 1
                    break
                else:
                    for allocation in stub.ListAllocations(pb.ListAllocationsRequest()).allocations:
                        if allocation.name == "during":
                            stub.Release(pb.ReleaseRequest(id=allocation.id))
            assert failures == 1, "the disk never filled up"
            # The CLI reports it as a refusal (exit 1, the daemon's words), not as an unreachable daemon.
            refused = d.ctl("allocate", "--memory", "1GiB")
            assert refused.returncode == 1, refused.stderr
            assert "cannot record the change" in refused.stderr
            listed = stub.ListAllocations(pb.ListAllocationsRequest()).allocations
            assert [a.name for a in listed] == ["before"], "a refused allocation leaves no trace"
            partitions = stub.ListPartitions(pb.ListPartitionsRequest()).partitions
            assert sum(p.state == pb.PARTITION_STATE_ALLOCATED for p in partitions) == 1
            (small_disk / "filler").unlink()
            again = stub.Allocate(pb.AllocateRequest(memory_bytes=GIB, name="after")).allocation
            assert again.id != kept.id
        assert d.stop() == 0, d.log()
        d.start()
        with grpc.insecure_channel(f"unix:{d.socket}") as channel:
            names = sorted(
                a.name for a in pb_grpc.GpushareStub(channel).ListAllocations(pb.ListAllocationsRequest()).allocations
            )
        assert names == ["after", "before"]
    finally:
        if d.process is not None and d.process.poll() is None:
            d.stop()
