"""Group membership from the system user database (NSS), for the admin decision."""

from __future__ import annotations

import grp
import os
import pwd
import time

_TTL_SECONDS = 10.0


class UserDatabase:
    """Caches lookups briefly: NSS may be LDAP, and every RPC asks."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], tuple[float, frozenset[int]]] = {}

    def groups_of(self, uid: int, gid: int) -> frozenset[int]:
        """The primary gid from the kernel plus supplementary groups of the uid's passwd entry.

        A uid without a passwd entry has only the gid the kernel reported: supplementary groups
        are never read from /proc/<pid>, whose pid may have been reused since connect().
        """
        now = time.monotonic()
        cached = self._cache.get((uid, gid))
        if cached is not None and now - cached[0] < _TTL_SECONDS:
            return cached[1]
        try:
            name = pwd.getpwuid(uid).pw_name
            groups = frozenset(os.getgrouplist(name, gid)) | {gid}
        except KeyError:
            groups = frozenset({gid})
        self._cache[(uid, gid)] = (now, groups)
        return groups

    @staticmethod
    def group_id(name_or_gid: str) -> int | None:
        """gid of a group given by name or number; None when it does not exist."""
        if name_or_gid.isdigit():
            return int(name_or_gid)
        try:
            return grp.getgrnam(name_or_gid).gr_gid
        except KeyError:
            return None

    @staticmethod
    def user_id(name_or_uid: str) -> int | None:
        if name_or_uid.isdigit():
            return int(name_or_uid)
        try:
            return pwd.getpwnam(name_or_uid).pw_uid
        except KeyError:
            return None
