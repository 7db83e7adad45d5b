"""Caller identity from the kernel, authorization by role, quotas, and hostile input, on a real daemon."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpushared.api.v1 import gpushare_pb2 as pb
from gpushared.api.v1 import gpushare_pb2_grpc as pb_grpc
from tests.conftest import Daemon

SOCKET_GID = 4300  # the socket's group: members may connect
ADMIN_GID = 4400  # the admin group
ALICE, BOB, ADA, OUTSIDER = 4242, 4243, 4244, 4245
GIB = 1024**3

CONFIG = f"""
[daemon]
socket_group = "{SOCKET_GID}"
admin_group = "{ADMIN_GID}"

[quota]
max_allocations = 3
max_memory = "300GiB"

[quota.users."{BOB}"]
max_allocations = 1
"""


@pytest.fixture
def shared(tmp_short: Path) -> Iterator[Daemon]:
    # The socket directory must be traversable by the test uids; the daemon keeps its internal dir 0700.
    tmp_short.chmod(0o755)
    d = Daemon(tmp_short, config=CONFIG).start()
    yield d
    if d.process is not None and d.process.poll() is None:
        assert d.stop() == 0, d.log()


def as_member(d: Daemon, uid: int, *args: str) -> tuple[int, str, str]:
    result = d.ctl(*args, user=uid, group=uid, extra_groups=[SOCKET_GID])
    return result.returncode, result.stdout, result.stderr


def test_socket_is_0660_and_group_owned(shared: Daemon) -> None:
    info = shared.socket.stat()
    assert info.st_mode & 0o777 == 0o660
    assert info.st_gid == SOCKET_GID
    internal = shared.socket.with_name(shared.socket.name + ".d")
    assert internal.stat().st_mode & 0o777 == 0o700


def test_non_member_cannot_connect(shared: Daemon) -> None:
    result = shared.ctl("status", user=OUTSIDER, group=OUTSIDER)
    assert result.returncode == 4
    assert result.stderr.startswith(f"gpusharectl: {shared.socket}: permission denied (hint: join the group")


def test_identity_comes_from_the_kernel(shared: Daemon) -> None:
    code, out, err = as_member(shared, ALICE, "--json", "status")
    assert code == 0, err
    caller = json.loads(out)["caller"]
    assert caller["uid"] == ALICE
    assert caller["gid"] == ALICE
    assert caller["admin"] is False
    assert caller["pid"] > 1


def test_owner_member_admin_and_root_roles(shared: Daemon) -> None:
    code, out, err = as_member(shared, ALICE, "--json", "allocate", "--memory", "10GiB", "--name", "alice-job")
    assert code == 0, err
    alice_id = json.loads(out)["id"]
    assert json.loads(out)["owner_uid"] == ALICE

    # Any member may list and show, but not release someone else's allocation.
    code, out, _ = as_member(shared, BOB, "list")
    assert code == 0
    assert alice_id in out
    code, out, _ = as_member(shared, BOB, "show", alice_id)
    assert code == 0
    assert "alice-job" in out
    code, _, err = as_member(shared, BOB, "release", alice_id)
    assert code == 4
    assert err.strip() == (
        f"gpusharectl: allocation {alice_id}: owned by uid {ALICE}, not by you (uid {BOB}) "
        "(hint: only the owner or an admin (root or the admin group) may release it)"
    )
    # An admin by group (primary gid from SO_PEERCRED) may.
    result = shared.ctl("release", alice_id, user=ADA, group=ADMIN_GID, extra_groups=[SOCKET_GID])
    assert result.returncode == 0, result.stderr
    # The owner may release their own; root may release anyone's.
    code, out, _ = as_member(shared, ALICE, "--json", "allocate", "--memory", "1GiB")
    second = json.loads(out)["id"]
    code, out, err = as_member(shared, ALICE, "release", second)
    assert code == 0, err
    code, out, _ = as_member(shared, BOB, "--json", "allocate", "--memory", "1GiB")
    bob_id = json.loads(out)["id"]
    assert shared.ctl("release", bob_id).returncode == 0


def test_quotas(shared: Daemon) -> None:
    for _ in range(3):
        code, _, err = as_member(shared, ALICE, "allocate", "--memory", "10GiB")
        assert code == 0, err
    code, _, err = as_member(shared, ALICE, "allocate", "--memory", "10GiB")
    assert code == 1
    assert f"user {ALICE}: quota allows 3 allocations and you hold 3" in err
    code, _, err = as_member(shared, BOB, "allocate", "--memory", "190GiB")
    assert code == 0, err
    code, _, err = as_member(shared, BOB, "allocate", "--memory", "1GiB")
    assert code == 1
    assert f"user {BOB}: quota allows 1 allocations" in err
    # Memory quota: 300 GiB for everyone else.
    code, _, err = as_member(shared, ADA, "allocate", "--memory", "190GiB")
    assert code == 0, err
    code, _, err = as_member(shared, ADA, "allocate", "--memory", "120GiB")
    assert code == 1
    assert "quota allows 300 GiB and you hold 190 GiB; 120 GiB more does not fit" in err
    # Root is exempt.
    assert shared.ctl("allocate", "--memory", "150GiB").returncode == 0


def test_sighup_reloads_quota_and_says_what_needs_a_restart(shared: Daemon) -> None:
    assert shared.config_path is not None
    changed = CONFIG.replace("max_allocations = 3", "max_allocations = 1").replace(
        "[daemon]", "[daemon]\nsocket_mode = '0600'"
    )
    shared.config_path.write_text(changed)
    assert shared.process is not None
    shared.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "configuration reloaded" not in shared.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 'applied: default_quota; need a restart: socket_mode"' in shared.log()
    assert as_member(shared, ALICE, "allocate", "--memory", "1GiB")[0] == 0
    code, _, err = as_member(shared, ALICE, "allocate", "--memory", "1GiB")
    assert code == 1
    assert "quota allows 1 allocations" in err
    shared.config_path.write_text("[daemon]\nlog_level = 'shouting'\n")
    shared.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload failed" not in shared.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reload failed, keeping the running configuration" in shared.log()
    assert shared.ctl("status").returncode == 0


def test_internal_socket_is_refused_fail_closed(shared: Daemon) -> None:
    internal = shared.socket.with_name(shared.socket.name + ".d") / "grpc.sock"
    with grpc.insecure_channel(f"unix:{internal}") as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GpushareStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Forged metadata claiming to be root changes nothing.
    with grpc.insecure_channel(f"unix:{internal}") as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GpushareStub(channel).GetStatus(
            pb.GetStatusRequest(), timeout=5, metadata=(("uid", "0"), ("x-gpushare-uid", "0"))
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ---- hostile input through the raw API --------------------------------------------------------

HOSTILE: list[tuple[str, object, grpc.StatusCode, str]] = [
    (
        "Allocate",
        pb.AllocateRequest(memory_bytes=0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "memory: must be more than 0 bytes",
    ),
    (
        "Allocate",
        pb.AllocateRequest(memory_bytes=2**64 - 1),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "exceeds the largest partition cap",
    ),
    (
        "Allocate",
        pb.AllocateRequest(memory_bytes=GIB, partition_count=2**32 - 1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "partitions: 4294967295 is out of range",
    ),
    (
        "Allocate",
        pb.AllocateRequest(memory_bytes=GIB, gpu_index=2**32 - 1),
        grpc.StatusCode.NOT_FOUND,
        "gpu 4294967295: no such GPU",
    ),
    (
        "Allocate",
        pb.AllocateRequest(memory_bytes=GIB, name="evil\x00\n\x1b[2J"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a valid allocation name",
    ),
    (
        "Allocate",
        pb.AllocateRequest(memory_bytes=GIB, name="x" * 10_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a valid allocation name",
    ),
    (
        "Allocate",
        pb.AllocateRequest(memory_bytes=GIB, name="--trust-remote-code"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a valid allocation name",
    ),
    (
        "Allocate",
        pb.AllocateRequest(memory_bytes=GIB, compute_partition=99),
        grpc.StatusCode.INVALID_ARGUMENT,
        "compute_partition: unknown value 99",
    ),
    (
        "Allocate",
        pb.AllocateRequest(memory_bytes=GIB, policy=7),
        grpc.StatusCode.INVALID_ARGUMENT,
        "policy: unknown value 7",
    ),
    (
        "Allocate",
        pb.AllocateRequest(memory_bytes=GIB, name="y" * 100_000),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
    (
        "Release",
        pb.ReleaseRequest(id="a-ffffffffffff"),
        grpc.StatusCode.NOT_FOUND,
        "allocation a-ffffffffffff: no such allocation",
    ),
    ("Release", pb.ReleaseRequest(id="../../etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT, "not an allocation id"),
    ("Release", pb.ReleaseRequest(id=""), grpc.StatusCode.INVALID_ARGUMENT, "not an allocation id"),
    (
        "GetAllocation",
        pb.GetAllocationRequest(id="a-0123456789ab\n"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not an allocation id",
    ),
]


def test_hostile_input_gets_the_right_status_and_changes_nothing(daemon: Daemon) -> None:
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        stub = pb_grpc.GpushareStub(channel)
        kept = stub.Allocate(pb.AllocateRequest(memory_bytes=GIB, name="kept"), timeout=5).allocation
        before = stub.ListAllocations(pb.ListAllocationsRequest(), timeout=5)
        for method, request, code, message in HOSTILE:
            with pytest.raises(grpc.RpcError) as info:
                getattr(stub, method)(request, timeout=5)
            assert info.value.code() == code, (method, request, info.value.details())
            assert message in (info.value.details() or ""), (method, info.value.details())
        # Garbage bytes that are not a protobuf message at all.
        garbage = channel.unary_unary(
            "/gpushare.v1.Gpushare/Allocate", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as info:
            garbage(b"\xff\xff\xff\xff\x0f\x00garbage", timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "request: not a valid gpushare.v1.AllocateRequest message"
        unknown = channel.unary_unary(
            "/gpushare.v1.Gpushare/Explode", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as info:
            unknown(b"", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        after = stub.ListAllocations(pb.ListAllocationsRequest(), timeout=5)
        assert after == before
        assert stub.GetAllocation(pb.GetAllocationRequest(id=kept.id), timeout=5).allocation.name == "kept"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
