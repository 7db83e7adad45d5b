"""The daemon's durable records (allocations) in one SQLite file in the state directory.

WAL with synchronous=FULL: a committed transaction survives power loss, not only a crash of
the daemon (with NORMAL a WAL commit may roll back after power loss). The schema version is
PRAGMA user_version; a file from a newer gpushared, or one that is not a sound database, is a
startup error naming the file, never silently replaced.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from gpushared.domain.allocation import Allocation, PartitionRef, PlacementPolicy
from gpushared.domain.errors import StateError, StateWriteError
from gpushared.domain.partition_op import PartitionOperation
from gpushared.domain.served_model import ServedModel, spec_from_json, spec_to_json
from gpushared.ports import (
    AllocationAdded,
    AllocationRemoved,
    GpuCleared,
    GpuMarked,
    ModelSaved,
    OperationSaved,
    StoreChange,
)

SCHEMA_VERSION = 4
DB_NAME = "gpushared.db"

_SCHEMA = """
CREATE TABLE allocation (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    owner_uid INTEGER NOT NULL,
    owner_gid INTEGER NOT NULL,
    partitions TEXT NOT NULL,
    memory_bytes_per_partition INTEGER NOT NULL,
    policy TEXT NOT NULL,
    placement_reason TEXT NOT NULL,
    created_at REAL NOT NULL
) STRICT;
"""

_MODEL_TABLE = """
CREATE TABLE model (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    allocation_id TEXT NOT NULL,
    owner_uid INTEGER NOT NULL,
    run_as_uid INTEGER NOT NULL,
    run_as_gid INTEGER NOT NULL,
    port INTEGER NOT NULL,
    created_at REAL NOT NULL,
    pid INTEGER NOT NULL,
    start_time INTEGER NOT NULL,
    running INTEGER NOT NULL
) STRICT;
"""
# Schema 3: a model's API key (the file is root-only, 0600) and its last start durations (JSON list of seconds).
_MODEL_KEY_AND_STARTS = """
ALTER TABLE model ADD COLUMN api_key TEXT;
ALTER TABLE model ADD COLUMN start_seconds TEXT NOT NULL DEFAULT '[]';
"""
# Schema 4: the partition operation journal (one JSON record per operation, rewritten before and after each
# step) and GPUs marked degraded by an operation that could not be rolled back.
_OPERATIONS = """
CREATE TABLE partition_operation (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    finished INTEGER NOT NULL,
    body TEXT NOT NULL
) STRICT;
CREATE TABLE gpu_mark (
    bdf TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    since REAL NOT NULL
) STRICT;
ALTER TABLE model ADD COLUMN drained_by TEXT NOT NULL DEFAULT '';
ALTER TABLE model ADD COLUMN failure TEXT NOT NULL DEFAULT '';
"""
KEEP_FINISHED_OPERATIONS = 50
# Each entry upgrades the schema from its index + 1 to the next version, inside one transaction.
_MIGRATIONS = (_MODEL_TABLE, _MODEL_KEY_AND_STARTS, _OPERATIONS)

_FIX = "move the file aside to start with no allocations, or restore it from a backup"


class SqliteAllocationStore:
    """Implements ports.AllocationStore."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DB_NAME
        try:
            state_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(
                f"state directory {state_dir}: cannot create it ({exc.strerror})",
                hint="pass --state-dir with a directory gpushared can write",
            ) from exc
        existed = self.path.exists()
        if existed and not os.access(self.path, os.R_OK | os.W_OK):
            raise StateError(f"state file {self.path}: not readable and writable by this user", hint=_FIX)
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves so each call is one transaction.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._open(existed)
        except sqlite3.DatabaseError as exc:
            raise StateError(f"state file {self.path}: not a usable gpushared database ({exc})", hint=_FIX) from exc

    def _open(self, existed: bool) -> None:
        db = self._db
        check = db.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise StateError(f"state file {self.path}: database is damaged ({check})", hint=_FIX)
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StateError(
                f"state file {self.path}: written by a newer gpushared (schema {version}; this one reads {SCHEMA_VERSION})",
                hint="upgrade gpushared, or restore a backup taken before the upgrade",
            )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        if version == 0:
            tables = db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
            if existed and tables:
                raise StateError(f"state file {self.path}: has tables but no gpushared schema version", hint=_FIX)
            # Schema and version in one transaction: a crash leaves either nothing or both.
            db.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} {''.join(_MIGRATIONS)} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
            )
        else:
            for step in range(version, SCHEMA_VERSION):
                db.executescript(f"BEGIN IMMEDIATE; {_MIGRATIONS[step - 1]} PRAGMA user_version={step + 1}; COMMIT;")
        os.chmod(self.path, 0o600)

    def load(self) -> list[Allocation]:
        rows = self._db.execute(
            "SELECT id, name, owner_uid, owner_gid, partitions, memory_bytes_per_partition, policy,"
            " placement_reason, created_at FROM allocation ORDER BY created_at, id"
        ).fetchall()
        allocations = []
        for row in rows:
            try:
                refs = tuple(PartitionRef(str(bdf), int(pid)) for bdf, pid in json.loads(row[4]))
                allocations.append(
                    Allocation(
                        id=row[0],
                        name=row[1],
                        owner_uid=int(row[2]),
                        owner_gid=int(row[3]),
                        partitions=refs,
                        memory_bytes_per_partition=int(row[5]),
                        policy=PlacementPolicy(row[6]),
                        placement_reason=row[7],
                        created_at=float(row[8]),
                    )
                )
            except (ValueError, TypeError) as exc:
                raise StateError(
                    f"state file {self.path}: allocation {row[0]!r} is unreadable ({exc})", hint=_FIX
                ) from exc
        return allocations

    def apply(self, changes: Sequence[StoreChange]) -> None:
        """One transaction, so one fsync, for a whole batch of changes (group commit)."""
        try:
            with self._transaction():
                for change in changes:
                    if isinstance(change, AllocationAdded):
                        self._insert(change.allocation)
                    elif isinstance(change, AllocationRemoved):
                        self._db.execute("DELETE FROM allocation WHERE id = ?", (change.allocation_id,))
                    elif isinstance(change, ModelSaved):
                        self._save_model(change.model)
                    elif isinstance(change, OperationSaved):
                        self._save_operation(change.operation)
                    elif isinstance(change, GpuMarked):
                        self._db.execute(
                            "INSERT OR REPLACE INTO gpu_mark VALUES (?, ?, ?)",
                            (change.bdf, change.reason, change.since),
                        )
                    elif isinstance(change, GpuCleared):
                        self._db.execute("DELETE FROM gpu_mark WHERE bdf = ?", (change.bdf,))
                    else:
                        self._db.execute("DELETE FROM model WHERE name = ?", (change.name,))
        except sqlite3.OperationalError as exc:
            # Disk full, I/O error, read-only file system: the transaction rolled back as a whole.
            raise StateWriteError(
                f"state file {self.path}: cannot record the change ({exc}); nothing was changed",
                hint=f"free space or fix the file system under {self.path.parent}, then retry",
            ) from exc

    def load_models(self) -> list[ServedModel]:
        rows = self._db.execute(
            "SELECT name, spec, allocation_id, owner_uid, run_as_uid, run_as_gid, port, created_at, pid,"
            " start_time, running, api_key, start_seconds, drained_by, failure FROM model ORDER BY created_at, name"
        ).fetchall()
        models = []
        for row in rows:
            try:
                models.append(
                    ServedModel(
                        name=row[0],
                        spec=spec_from_json(row[1]),
                        allocation_id=row[2],
                        owner_uid=int(row[3]),
                        run_as_uid=int(row[4]),
                        run_as_gid=int(row[5]),
                        port=int(row[6]),
                        created_at=float(row[7]),
                        pid=int(row[8]),
                        start_time=int(row[9]),
                        running=bool(row[10]),
                        api_key=None if row[11] is None else str(row[11]),
                        start_seconds=tuple(float(x) for x in json.loads(row[12])),
                        drained_by=str(row[13]),
                        failure=str(row[14]),
                    )
                )
            except (ValueError, TypeError, KeyError) as exc:
                raise StateError(f"state file {self.path}: model {row[0]!r} is unreadable ({exc})", hint=_FIX) from exc
        return models

    def _save_model(self, model: ServedModel) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO model VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                model.name,
                spec_to_json(model.spec),
                model.allocation_id,
                model.owner_uid,
                model.run_as_uid,
                model.run_as_gid,
                model.port,
                model.created_at,
                model.pid,
                model.start_time,
                int(model.running),
                model.api_key,
                json.dumps(list(model.start_seconds)),
                model.drained_by,
                model.failure,
            ),
        )

    def add(self, allocation: Allocation) -> None:
        self.apply([AllocationAdded(allocation)])

    def remove(self, allocation_id: str) -> None:
        self.apply([AllocationRemoved(allocation_id)])

    def _insert(self, allocation: Allocation) -> None:
        partitions = json.dumps([[r.gpu_bdf, r.partition_id] for r in allocation.partitions])
        self._db.execute(
            "INSERT INTO allocation VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                allocation.id,
                allocation.name,
                allocation.owner_uid,
                allocation.owner_gid,
                partitions,
                allocation.memory_bytes_per_partition,
                str(allocation.policy),
                allocation.placement_reason,
                allocation.created_at,
            ),
        )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _save_operation(self, operation: PartitionOperation) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO partition_operation VALUES (?, ?, ?, ?)",
            (operation.id, operation.created_at, int(operation.finished), operation.to_json()),
        )
        if operation.finished:
            # Finished operations stay visible for a while; the journal must not grow for ever.
            self._db.execute(
                "DELETE FROM partition_operation WHERE finished = 1 AND id NOT IN (SELECT id FROM partition_operation"
                " WHERE finished = 1 ORDER BY created_at DESC LIMIT ?)",
                (KEEP_FINISHED_OPERATIONS,),
            )

    def load_operations(self) -> list[PartitionOperation]:
        rows = self._db.execute("SELECT id, body FROM partition_operation ORDER BY created_at, id").fetchall()
        operations = []
        for row in rows:
            try:
                operations.append(PartitionOperation.from_json(row[1]))
            except StateError as exc:
                raise StateError(f"state file {self.path}: operation {row[0]!r}: {exc.message}", hint=_FIX) from exc
        return operations

    def load_gpu_marks(self) -> dict[str, tuple[str, float]]:
        rows = self._db.execute("SELECT bdf, reason, since FROM gpu_mark ORDER BY bdf").fetchall()
        return {str(bdf): (str(reason), float(since)) for bdf, reason, since in rows}

    def close(self) -> None:
        self._db.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        # A failed COMMIT may already have rolled back; never let that hide the original error.
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
