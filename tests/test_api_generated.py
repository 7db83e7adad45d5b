"""The checked-in generated API code must be exactly what dev/gen-proto makes from the .proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpushared.api.v1 import gpushare_pb2 as pb
from tests.conftest import REPO

GENERATED = ("gpushare_pb2.py", "gpushare_pb2.pyi", "gpushare_pb2_grpc.py", "gpushare_pb2_grpc.pyi")


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools comes with the [dev] extra that dev/setup installs")
    api = Path("gpushared/api/v1")
    (tmp_path / api).mkdir(parents=True)
    shutil.copy(REPO / "daemon" / api / "gpushare.proto", tmp_path / api)
    bin_dir = str(Path(sys.executable).parent)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(tmp_path),
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            str(tmp_path / api / "gpushare.proto"),
        ],
        check=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        capture_output=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / api / name).read_text()
        checked_in = (REPO / "daemon" / api / name).read_text()
        assert fresh == checked_in, f"{api / name} is stale: run dev/gen-proto and commit the result"


def test_every_rpc_and_enum_follows_the_api_rules() -> None:
    service = pb.DESCRIPTOR.services_by_name["Gpushare"]
    assert pb.DESCRIPTOR.package == "gpushare.v1"
    assert {m.name for m in service.methods} == {
        "GetStatus",
        "ListGpus",
        "ListPartitions",
        "Allocate",
        "Release",
        "ListAllocations",
        "GetAllocation",
        "Serve",
        "Stop",
        "ListModels",
        "GetModel",
        "ReadModelLog",
        "PlanPartitions",
        "ApplyPartitions",
        "GetOperation",
        "ListOperations",
        "ClearDegradedGpu",
    }
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.name
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        for field in message.fields:
            assert field.name == field.name.lower(), f"{message.name}.{field.name} is not snake_case"
            if field.name.endswith("_bytes"):
                assert field.type == field.TYPE_UINT64, f"{message.name}.{field.name} must be uint64 bytes"
    proto = (REPO / "daemon/gpushared/api/v1/gpushare.proto").read_text().splitlines()
    for number, line in enumerate(proto):
        if line.strip().startswith("rpc "):
            assert proto[number - 1].strip().startswith("//"), f"rpc without a comment: {line.strip()}"
