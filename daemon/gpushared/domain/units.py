"""Byte sizes as people write them (IEC and SI units) and as gpushare prints them (IEC)."""

from __future__ import annotations

import re

from gpushared.domain.errors import InvalidArgument

_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
MAX_BYTES = 2**64 - 1


def parse_size(text: str, *, subject: str = "size") -> int:
    """Parse "40GiB", "512MiB", "1.5GiB", "1000000" (bytes) into bytes.

    IEC units (KiB, MiB, GiB, TiB) are powers of 1024; SI units (KB, MB, GB, TB) powers of 1000.
    Fractions are allowed when the result is a whole number of bytes.
    """
    match = _SIZE.match(text)
    if match is None:
        raise InvalidArgument(
            f"{subject}: cannot read {text[:40]!r} as a size",
            hint="write a whole number of bytes or a number with a unit, e.g. 40GiB or 512MiB",
        )
    number, unit = str(match.group(1)), str(match.group(2))
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise InvalidArgument(
            f"{subject}: unknown unit {unit[:16]!r}", hint="use B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB)"
        )
    whole, _, fraction = number.partition(".")
    numerator = int(whole + fraction) * factor
    denominator: int = 10 ** len(fraction)
    if numerator % denominator:
        raise InvalidArgument(f"{subject}: {text.strip()} is not a whole number of bytes")
    value = numerator // denominator
    if value > MAX_BYTES:
        raise InvalidArgument(f"{subject}: {text.strip()} is larger than 16 EiB")
    return value


_IEC = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def format_bytes(value: int) -> str:
    """Print bytes exactly where a whole IEC unit allows (196592 MiB stays "196592 MiB", as amd-smi
    prints it), else with two decimals in the largest unit ("1.18 MiB")."""
    if value < 1024:
        return f"{value} B"
    for unit, factor in _IEC:
        if value >= factor and value % factor == 0:
            return f"{value // factor} {unit}"
    unit, factor = next((u, f) for u, f in _IEC if value >= f)
    return f"{value / factor:.2f} {unit}"
