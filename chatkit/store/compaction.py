"""When to merge segments: a simple tiered policy plus a hard cap on the segment count.

Segments are grouped into tiers by size: tier ``t`` holds segments of ``min_rows * factor**t`` up to
``min_rows * factor**(t+1)`` live rows. When one tier holds ``factor`` segments they are merged into one
(which lands in a higher tier), so each tier keeps fewer than ``factor`` segments and a store of ``n`` rows
has about ``(factor - 1) * log_factor(n / min_rows)`` segments. Every row is rewritten only
``log_factor(n)`` times over its life. A segment whose rows are mostly tombstones is rewritten alone.

The hard cap covers the time a big background merge takes: if more than ``max_segments`` exist, the
writer that published the extra one merges the smallest segments nobody else is merging (cheap: they are
small).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["plan_tiered", "plan_cap", "MIN_TIER_ROWS", "MAX_DEAD_FRACTION"]

MIN_TIER_ROWS = 256
MAX_DEAD_FRACTION = 0.3


def _tier(live: int, factor: int) -> int:
    return int(math.log(max(live, MIN_TIER_ROWS) / MIN_TIER_ROWS, factor) + 1e-9)


def plan_tiered(
    sizes: Sequence[int], dead: Sequence[int], busy: Sequence[bool], *, factor: int
) -> list[int] | None:
    """Indexes of segments to merge next under the tiered policy, or ``None`` when nothing is due.

    Args:
        sizes: each segment's total row count.
        dead: each segment's tombstoned row count.
        busy: which segments another merge is already working on (never chosen).
        factor: how many same-tier segments trigger a merge (at least 2).
    """
    tiers: dict[int, list[int]] = {}
    for i, (n, d, b) in enumerate(zip(sizes, dead, busy, strict=True)):
        if not b:
            tiers.setdefault(_tier(n - d, factor), []).append(i)
    for t in sorted(tiers):
        members = tiers[t]
        if len(members) >= factor:
            members.sort(key=lambda i: sizes[i] - dead[i])
            return members[:factor]
    for i, (n, d, b) in enumerate(zip(sizes, dead, busy, strict=True)):
        if not b and d and d >= MAX_DEAD_FRACTION * n:
            return [i]
    return None


def plan_cap(sizes: Sequence[int], dead: Sequence[int], busy: Sequence[bool], *, max_segments: int) -> list[int] | None:
    """Indexes of the smallest idle segments to merge so at most ``max_segments`` remain, or ``None``."""
    excess = len(sizes) - max_segments
    if excess <= 0:
        return None
    idle = sorted((i for i, b in enumerate(busy) if not b), key=lambda i: sizes[i] - dead[i])
    if len(idle) < 2:
        return None
    return idle[: max(2, excess + 1)]
