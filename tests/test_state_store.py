"""The SQLite allocation store: durability across kill -9, and clear refusal of state it cannot trust."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpushared.adapters import sqlite_state
from gpushared.adapters.sqlite_state import DB_NAME, SqliteAllocationStore
from gpushared.domain.allocation import Allocation, PartitionRef, PlacementPolicy
from gpushared.domain.errors import StateError
from gpushared.domain.model import ModelSpec
from gpushared.domain.served_model import ServedModel, spec_to_json
from gpushared.ports import ModelDeleted, ModelSaved


def allocation(n: int) -> Allocation:
    return Allocation(
        id=f"a-{n:012x}",
        name=f"job-{n}",
        owner_uid=1000 + n,
        owner_gid=1000,
        memory_bytes_per_partition=n + 1,
        partitions=(PartitionRef("0000:05:00.0", n % 8), PartitionRef("0000:26:00.0", 0)),
        policy=PlacementPolicy.PACK,
        placement_reason=f"reason {n}",
        created_at=1700000000.5 + n,
    )


def test_round_trip_and_remove(tmp_path: Path) -> None:
    store = SqliteAllocationStore(tmp_path)
    for n in range(3):
        store.add(allocation(n))
    store.remove("a-000000000001")
    store.close()
    reopened = SqliteAllocationStore(tmp_path)
    assert reopened.load() == [allocation(0), allocation(2)]
    reopened.close()
    assert (tmp_path / DB_NAME).stat().st_mode & 0o777 == 0o600


def test_duplicate_id_is_rejected_and_leaves_state_unchanged(tmp_path: Path) -> None:
    store = SqliteAllocationStore(tmp_path)
    store.add(allocation(1))
    with pytest.raises(sqlite3.IntegrityError):
        store.add(allocation(1))
    assert store.load() == [allocation(1)]
    store.close()


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    writer = textwrap.dedent(
        f"""
        import sys
        from tests.test_state_store import allocation
        from gpushared.adapters.sqlite_state import SqliteAllocationStore
        store = SqliteAllocationStore(__import__("pathlib").Path({str(tmp_path)!r}))
        n = 0
        while True:
            store.add(allocation(n))
            print(n, flush=True)
            n += 1
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent
    )
    assert process.stdout is not None
    acknowledged = -1
    for line in process.stdout:
        acknowledged = int(line)
        if acknowledged >= 200:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    store = SqliteAllocationStore(tmp_path)
    ids = {a.id for a in store.load()}
    store.close()
    assert {f"a-{n:012x}" for n in range(acknowledged + 1)} <= ids


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError) as info:
        SqliteAllocationStore(tmp_path)
    assert str(tmp_path / DB_NAME) in info.value.message
    assert "move the file aside" in info.value.hint
    assert (tmp_path / DB_NAME).read_bytes().startswith(b"this is not sqlite"), "the file must not be replaced"


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    SqliteAllocationStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("PRAGMA user_version=7")
    db.close()
    with pytest.raises(StateError, match=r"written by a newer gpushared \(schema 7; this one reads 4\)"):
        SqliteAllocationStore(tmp_path)


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("CREATE TABLE something (x)")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="has tables but no gpushared schema version"):
        SqliteAllocationStore(tmp_path)


def test_unreadable_row_is_refused(tmp_path: Path) -> None:
    store = SqliteAllocationStore(tmp_path)
    store.add(allocation(1))
    store.close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("UPDATE allocation SET policy = 'sideways'")
    db.commit()
    db.close()
    store = SqliteAllocationStore(tmp_path)
    with pytest.raises(StateError, match="allocation 'a-000000000001' is unreadable"):
        store.load()
    store.close()


def test_state_dir_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError, match=f"state directory {blocker}/state: cannot create it"):
        SqliteAllocationStore(blocker / "state")


def test_schema_1_is_upgraded_in_place_keeping_allocations(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.executescript(f"{sqlite_state._SCHEMA} PRAGMA user_version=1;")
    db.execute(
        "INSERT INTO allocation VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ("a-000000000001", "old", 7, 7, '[["0000:05:00.0", 0]]', 5, "spread", "r", 1.0),
    )
    db.commit()
    db.close()
    store = SqliteAllocationStore(tmp_path)
    assert [a.name for a in store.load()] == ["old"]
    assert store.load_models() == []
    store.close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 4
    db.close()


def test_schema_2_models_gain_no_key_and_no_start_history(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.executescript(f"{sqlite_state._SCHEMA} {sqlite_state._MODEL_TABLE} PRAGMA user_version=2;")
    spec = ModelSpec(name="m1", model="org/model", engine="stub")
    db.execute(
        "INSERT INTO model VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ("m1", spec_to_json(spec), "a-000000000001", 1000, 1000, 1000, 8100, 5.0, 42, 99, 1),
    )
    db.commit()
    db.close()
    store = SqliteAllocationStore(tmp_path)
    assert store.load_models() == [ServedModel("m1", spec, "a-000000000001", 1000, 1000, 1000, 8100, 5.0, 42, 99)]
    store.close()


def test_models_round_trip(tmp_path: Path) -> None:
    spec = ModelSpec(name="m1", model="org/model", engine="stub", options=(("enable-prefix-caching", ""),))
    model = ServedModel("m1", spec, "a-000000000001", 1000, 1000, 1000, 8100, 5.0)
    store = SqliteAllocationStore(tmp_path)
    store.apply([ModelSaved(model), ModelSaved(model.with_child(42, 99))])
    assert store.load_models() == [model.with_child(42, 99)]
    store.apply([ModelDeleted("m1")])
    assert store.load_models() == []
    store.close()


def test_model_key_and_start_durations_round_trip_and_the_key_stays_out_of_repr(tmp_path: Path) -> None:
    spec = ModelSpec(name="m1", model="org/model", engine="stub")
    model = ServedModel(
        "m1", spec, "a-000000000001", 1000, 1000, 1000, 8100, 5.0, api_key="s3cret-KEY", start_seconds=(1.5, 40.25)
    )
    store = SqliteAllocationStore(tmp_path)
    store.apply([ModelSaved(model)])
    store.close()
    store = SqliteAllocationStore(tmp_path)
    assert store.load_models() == [model]
    store.close()
    assert "s3cret" not in repr(model)
    assert oct((tmp_path / DB_NAME).stat().st_mode & 0o777) == "0o600", "the file holds API keys"
