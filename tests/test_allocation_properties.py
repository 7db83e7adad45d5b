"""Random allocate/release/restart sequences against a real daemon never double-allocate, never
overcommit a pool, and never refuse while capacity exists (hypothesis stateful test)."""

from __future__ import annotations

import shutil

import grpc
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gpushared.adapters.amdsmi_gpu import AmdSmiGpuBackend
from gpushared.adapters.emulated_amdsmi import EmulatedAmdSmi
from gpushared.api.v1 import gpushare_pb2 as pb
from gpushared.api.v1 import gpushare_pb2_grpc as pb_grpc
from gpushared.domain.gpu import ComputePartition, MemoryPartition
from tests.conftest import Daemon, short_dir

GIB = 1024**3
MODES = [ComputePartition.SPX, ComputePartition.DPX, ComputePartition.QPX, ComputePartition.CPX]


class AllocationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.daemon: Daemon | None = None
        self.channel: grpc.Channel | None = None
        self.stub: pb_grpc.GpushareStub | None = None

    @initialize(
        nps4=st.booleans(),
        layout=st.lists(st.sampled_from(MODES), min_size=1, max_size=3),
    )
    def start(self, nps4: bool, layout: list[ComputePartition]) -> None:
        root = short_dir("gs-prop-")
        state = root / "state"
        state.mkdir()
        backend = AmdSmiGpuBackend(EmulatedAmdSmi(state / "emulated-host.json", gpu_count=len(layout)), name="emulated")
        if nps4:
            backend.set_memory_partition(0, MemoryPartition.NPS4)
            backend.reload_driver()  # every GPU comes back CPX/NPS4
            layout = [m if m in (ComputePartition.QPX, ComputePartition.CPX) else ComputePartition.CPX for m in layout]
        for gpu, mode in enumerate(layout):
            backend.set_compute_partition(gpu, mode)
        backend.close()
        self.daemon = Daemon(root, gpus=len(layout)).start()
        self._connect()

    def _connect(self) -> None:
        assert self.daemon is not None
        if self.channel is not None:
            self.channel.close()
        self.channel = grpc.insecure_channel(f"unix:{self.daemon.socket}")
        self.stub = pb_grpc.GpushareStub(self.channel)

    def _capacity(self, share: int) -> int:
        """Independent oracle from what the API reports: partitions that could still take `share`."""
        assert self.stub is not None
        capacity = 0
        for gpu in self.stub.ListGpus(pb.ListGpusRequest()).gpus:
            for pool in gpu.memory_pools:
                free = [
                    p
                    for p in gpu.partitions
                    if p.memory_pool == pool.index
                    and p.state == pb.PARTITION_STATE_FREE
                    and p.memory_cap_bytes >= share
                ]
                capacity += min(len(free), pool.free_bytes // share)
        return capacity

    @precondition(lambda self: self.daemon is not None)
    @rule(gib=st.integers(1, 200), count=st.integers(1, 4), pack=st.booleans())
    def allocate(self, gib: int, count: int, pack: bool) -> None:
        assert self.stub is not None
        share = -(-gib * GIB // count)
        fits = self._capacity(share) >= count
        policy = pb.PLACEMENT_POLICY_PACK if pack else pb.PLACEMENT_POLICY_SPREAD
        try:
            response = self.stub.Allocate(
                pb.AllocateRequest(memory_bytes=gib * GIB, partition_count=count, policy=policy)
            )
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            assert not fits, f"refused {gib} GiB over {count} partitions although capacity exists: {exc.details()}"
        else:
            assert fits, "placed a request the oracle says cannot fit"
            assert len(response.allocation.partitions) == count
            assert response.allocation.memory_bytes_per_partition == share

    @precondition(lambda self: self.daemon is not None)
    @rule(pick=st.integers(0, 1000))
    def release(self, pick: int) -> None:
        assert self.stub is not None
        allocations = self.stub.ListAllocations(pb.ListAllocationsRequest()).allocations
        if allocations:
            victim = allocations[pick % len(allocations)]
            released = self.stub.Release(pb.ReleaseRequest(id=victim.id)).allocation
            assert released.id == victim.id

    @precondition(lambda self: self.daemon is not None)
    @rule()
    def restart(self) -> None:
        assert self.stub is not None and self.daemon is not None
        before = self.stub.ListAllocations(pb.ListAllocationsRequest())
        self.daemon.restart()
        self._connect()
        assert self.stub.ListAllocations(pb.ListAllocationsRequest()) == before

    @invariant()
    def sound(self) -> None:
        if self.stub is None:
            return
        holders: dict[tuple[str, int], str] = {}
        for allocation in self.stub.ListAllocations(pb.ListAllocationsRequest()).allocations:
            for part in allocation.partitions:
                key = (part.gpu_bdf, part.partition_id)
                assert key not in holders, f"{key} held by {holders[key]} and {allocation.id}"
                holders[key] = allocation.id
        for gpu in self.stub.ListGpus(pb.ListGpusRequest()).gpus:
            for pool in gpu.memory_pools:
                assert pool.allocated_bytes <= pool.total_bytes, f"GPU {gpu.index} pool {pool.index} overcommitted"
            for part in gpu.partitions:
                held = (gpu.bdf, part.partition_id) in holders
                assert held == (part.state == pb.PARTITION_STATE_ALLOCATED)

    def teardown(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.daemon is not None:
            assert self.daemon.stop() == 0, self.daemon.log()
            shutil.rmtree(self.daemon.root, ignore_errors=True)


@pytest.mark.slow
def test_allocation_state_machine() -> None:
    run = AllocationMachine.TestCase
    run.settings = settings(
        max_examples=12, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    run().runTest()
