"""Who is calling, as the kernel reported it, and what each role may do."""

from __future__ import annotations

from dataclasses import dataclass

from gpushared.domain.allocation import Allocation
from gpushared.domain.errors import PermissionDenied


@dataclass(frozen=True)
class Caller:
    """Identity from SO_PEERCRED plus the admin decision made from the user database."""

    uid: int
    gid: int
    pid: int
    admin: bool

    def describe(self) -> str:
        return f"uid {self.uid}" + (" (admin)" if self.admin else "")


def authorize_release(caller: Caller, allocation: Allocation) -> None:
    """A member may release only their own allocations; an admin may release any."""
    if caller.admin or caller.uid == allocation.owner_uid:
        return
    raise PermissionDenied(
        f"allocation {allocation.id}: owned by uid {allocation.owner_uid}, not by you (uid {caller.uid})",
        hint="only the owner or an admin (root or the admin group) may release it",
    )
