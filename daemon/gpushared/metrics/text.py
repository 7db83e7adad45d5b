"""Reading the Prometheus text exposition format (0.0.4): only the families asked for, standard library only.

The daemon reads each vLLM child's /metrics with it, and ``gpusharectl top`` reads the daemon's. A vLLM exposition
holds hundreds of series nobody re-exports (HTTP handler histograms, request-parameter histograms, cache config),
so a line is kept only when its metric name is wanted: one dict lookup decides, before any label is parsed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]
"""Label pairs sorted by name: hashable, and equal for equal label sets whatever their order on the line."""

GAUGE = "gauge"
COUNTER = "counter"
HISTOGRAM = "histogram"
KINDS = (GAUGE, COUNTER, HISTOGRAM)

_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,?)')
_ESCAPE = re.compile(r"\\(.)")
_UNESCAPED = {"n": "\n", "\\": "\\", '"': '"'}


class ExpositionError(ValueError):
    """The text is not the exposition format (a line that cannot be parsed among the wanted ones)."""


@dataclass
class Bucket:
    le: str
    """The upper bound as the source wrote it ("0.25", "+Inf"): re-exported verbatim, so no float formatting
    turns vLLM's "1.0" into "1" and back."""
    upper: float
    count: float


@dataclass
class Histogram:
    buckets: list[Bucket] = field(default_factory=list)
    """Cumulative, sorted by upper bound, +Inf last (``complete`` checks)."""
    sum: float = math.nan
    count: float = math.nan

    @property
    def complete(self) -> bool:
        return bool(self.buckets) and math.isinf(self.buckets[-1].upper) and not math.isnan(self.sum)


@dataclass
class Family:
    """One metric family: plain samples (gauge, counter) or histograms, keyed by their label set."""

    name: str
    kind: str
    samples: dict[Labels, float] = field(default_factory=dict)
    histograms: dict[Labels, Histogram] = field(default_factory=dict)


def wanted_names(families: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Sample name -> (family, part) for the families asked for (name -> kind). A counter is named as its
    samples are, with ``_total``; a histogram by its base name (its samples add _bucket, _sum, _count)."""
    lookup: dict[str, tuple[str, str]] = {}
    for name, kind in families.items():
        if kind not in KINDS:
            raise ValueError(f"{name}: unknown kind {kind!r}")
        if kind == HISTOGRAM:
            for part in ("bucket", "sum", "count"):
                lookup[f"{name}_{part}"] = (name, part)
        else:
            lookup[name] = (name, "value")
    return lookup


def parse(text: str, families: Mapping[str, str]) -> dict[str, Family]:
    """The wanted families found in ``text`` (families absent from it are absent from the result); a histogram
    series without its +Inf bucket or its sum is dropped, since re-exporting it would give wrong quantiles."""
    lookup = wanted_names(families)
    return parse_lines(select_lines(text, lookup), lookup, families)


def select_lines(text: str, lookup: Mapping[str, tuple[str, str]]) -> list[str]:
    """The sample lines of ``text`` whose metric name is wanted, in order. Cheap: no label is parsed here, so a
    caller can compare them with the previous read's and skip the parsing when nothing changed."""
    selected = []
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        end = line.find("{")
        space = line.find(" ")
        if end == -1 or (space != -1 and space < end):
            end = space
        if end != -1 and line[:end] in lookup:
            selected.append(line)
    return selected


def parse_lines(
    lines: Iterable[str],
    lookup: Mapping[str, tuple[str, str]],
    kinds: Mapping[str, str],
    label_cache: dict[str, Labels] | None = None,
) -> dict[str, Family]:
    """Parse sample lines; ``label_cache`` (label block text -> Labels) spares re-parsing the label sets a child
    repeats at every read."""
    found: dict[str, Family] = {}
    cache: dict[str, Labels] = {} if label_cache is None else label_cache
    for line in lines:
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            name = line[:brace]
            hit = lookup.get(name)
            if hit is None:
                continue
            # The value and timestamp after the label set never hold a "}": the last one closes the set.
            close = line.rfind("}")
            block = line[brace + 1 : close]
            labels = cache.get(block)
            if labels is None:
                labels, after = _labels(line, brace + 1)
                if after != line[close + 1 :]:
                    raise ExpositionError(f"stray '}}' after the label set: {line[:200]!r}")
                cache[block] = labels
            rest = line[close + 1 :]
        else:
            if space == -1:
                continue
            name = line[:space]
            hit = lookup.get(name)
            if hit is None:
                continue
            labels, rest = (), line[space + 1 :]
        value = _value(rest, line)
        family_name, part = hit
        family = found.get(family_name)
        if family is None:
            family = found[family_name] = Family(family_name, kinds[family_name])
        if part == "value":
            family.samples[labels] = value
            continue
        if part == "bucket":
            le = next((v for k, v in labels if k == "le"), None)
            if le is None:
                raise ExpositionError(f"bucket without le: {line[:200]!r}")
            key = tuple((k, v) for k, v in labels if k != "le")
            family.histograms.setdefault(key, Histogram()).buckets.append(Bucket(le, _float(le, line), value))
        elif part == "sum":
            family.histograms.setdefault(labels, Histogram()).sum = value
        else:
            family.histograms.setdefault(labels, Histogram()).count = value
    for family in found.values():
        for key in list(family.histograms):
            histogram = family.histograms[key]
            histogram.buckets.sort(key=lambda b: b.upper)
            if not histogram.complete:
                del family.histograms[key]
            elif math.isnan(histogram.count):
                histogram.count = histogram.buckets[-1].count
    return found


def _labels(line: str, pos: int) -> tuple[Labels, str]:
    pairs: list[tuple[str, str]] = []
    end = len(line)
    while pos < end and line[pos] != "}":
        match = _LABEL.match(line, pos)
        if match is None:
            raise ExpositionError(f"bad label set: {line[:200]!r}")
        value = match.group(2)
        if "\\" in value:
            value = _ESCAPE.sub(lambda m: _UNESCAPED.get(m.group(1), "\\" + m.group(1)), value)
        pairs.append((match.group(1), value))
        pos = match.end()
        if not match.group(3):
            while pos < end and line[pos] == " ":
                pos += 1
            break
    if pos >= end or line[pos] != "}":
        raise ExpositionError(f"unterminated label set: {line[:200]!r}")
    pairs.sort()
    return tuple(pairs), line[pos + 1 :]


def _value(rest: str, line: str) -> float:
    parts = rest.split()
    if not parts:
        raise ExpositionError(f"sample without a value: {line[:200]!r}")
    return _float(parts[0], line)


def _float(text: str, line: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ExpositionError(f"not a number {text[:40]!r} in {line[:200]!r}") from None


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """``histogram_quantile`` on cumulative (upper bound, count) pairs sorted by bound, +Inf last: linear
    interpolation inside the bucket, the last finite bound when the rank falls in +Inf, NaN without
    observations. The same answer Prometheus would give for the same buckets."""
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]):
        return math.nan
    total = buckets[-1][1]
    if total <= 0:
        return math.nan
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower_bound
            if count == lower_count:
                return upper
            return lower_bound + (upper - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = upper, count
    return lower_bound
