"""Metadata filters, evaluated before the vector scan: LangChain-style operators over a per-segment index.

A filter is a dict, as LangChain's vector stores accept it::

    {"source": "a.md"}                                    # equality (several keys: all must match)
    {"source": {"$in": ["a.md", "b.md"]}, "year": {"$gte": 2020, "$lt": 2024}}
    {"$or": [{"lang": "en"}, {"lang": {"$nin": ["fr", "de"]}}]}

Operators: ``$eq $ne $in $nin $gt $gte $lt $lte`` on a field, ``$and $or`` over a list of filters.
Semantics are those of Python on the document's metadata (``md.get(key)``): a missing key reads as
``None`` (so ``$ne`` and ``$nin`` match documents without the key); ``$in`` / ``$nin`` take a list;
``$gt $gte $lt $lte`` compare numbers with numbers and strings with strings, and never match any other
value (nor a missing key). :func:`matches` is that reference semantics, one document at a time.

How it is fast: a segment is immutable, so each field a filter names is indexed once per segment, lazily
(:class:`FieldColumn`: one int32 code per row, codes of equal values equal, plus the distinct values'
numeric and string ranks). A filter then becomes a boolean row mask with a few numpy operations whose
cost does not depend on how many rows match; the search scores only the rows in the mask (see
:meth:`chatkit.store.segments.Segment.search_rows`). The index is derived from the rows alone, so a
loaded store rebuilds it on first use.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .segments import Segment

__all__ = ["FieldFilter", "Filter", "compile_filter", "matches", "FieldColumn", "SegmentFields", "OPERATORS"]

Filter = Mapping[str, Any] | Callable[[dict[str, Any]], bool] | None

FIELD_OPS = ("$eq", "$ne", "$in", "$nin", "$gt", "$gte", "$lt", "$lte")
LOGIC_OPS = ("$and", "$or")
OPERATORS = FIELD_OPS + LOGIC_OPS
_RANGE = {"$gt", "$gte", "$lt", "$lte"}

_MISSING = -1  # code of a row without the key
_UNHASHABLE = -2  # code of a row whose value is a list, dict, ... (compared one by one)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_float(v: int | float) -> float:
    try:
        return float(v)
    except OverflowError:  # an int beyond float range
        return math.inf if v > 0 else -math.inf


# ---------------------------------------------------------------------- the filter tree


@dataclass(frozen=True, slots=True)
class _Cmp:
    key: str
    op: str
    value: Any  # for $in/$nin: a tuple


@dataclass(frozen=True, slots=True)
class _Logic:
    op: str  # "$and" or "$or"
    parts: tuple[Any, ...]


def _parse_field(key: str, spec: Any, where: str) -> Any:
    if not isinstance(spec, Mapping):
        return _Cmp(key, "$eq", spec)
    if not spec:
        raise ValueError(f"filter {where}: field {key!r} has an empty operator dict")
    parts = []
    for op, operand in spec.items():
        if op not in FIELD_OPS:
            hint = "" if isinstance(op, str) and op.startswith("$") else f"; to match a dict value use {{{key!r}: {{'$eq': ...}}}}"
            raise ValueError(
                f"filter {where}: unknown operator {op!r} for field {key!r} (supported: {', '.join(FIELD_OPS)}){hint}"
            )
        if op in ("$in", "$nin"):
            if not isinstance(operand, (list, tuple, set, frozenset)):
                raise TypeError(f"filter {where}: {op} for field {key!r} needs a list, got {type(operand).__name__}")
            operand = tuple(operand)
        elif op in _RANGE:
            if not (_is_number(operand) or isinstance(operand, str)) or (isinstance(operand, float) and math.isnan(operand)):
                raise TypeError(
                    f"filter {where}: {op} for field {key!r} needs a number or a str, got {type(operand).__name__} {operand!r:.40}"
                )
        parts.append(_Cmp(key, op, operand))
    return parts[0] if len(parts) == 1 else _Logic("$and", tuple(parts))


def _parse(spec: Mapping[str, Any], where: str) -> Any:
    parts: list[Any] = []
    for key, value in spec.items():
        if not isinstance(key, str):
            raise TypeError(f"filter {where}: keys must be str, got {key!r}")
        if key in LOGIC_OPS:
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"filter {where}: {key} needs a non-empty list of filters, got {value!r:.60}")
            subs = []
            for i, sub in enumerate(value):
                if not isinstance(sub, Mapping):
                    raise TypeError(f"filter {where}: {key}[{i}] must be a dict, got {type(sub).__name__}")
                subs.append(_parse(sub, f"{where}{key}[{i}]"))
            parts.append(_Logic(key, tuple(subs)))
        elif key.startswith("$"):
            raise ValueError(
                f"filter {where}: unknown operator {key!r} at the top level (supported there: {', '.join(LOGIC_OPS)})"
            )
        else:
            parts.append(_parse_field(key, value, where))
    return parts[0] if len(parts) == 1 else _Logic("$and", tuple(parts))


class FieldFilter:
    """A validated dict filter, evaluated on one document (:meth:`matches`) or on a whole segment
    (:meth:`mask`). Build it with :func:`compile_filter`."""

    __slots__ = ("spec", "_tree")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = spec
        self._tree = _parse(spec, "") if spec else _Logic("$and", ())

    def __repr__(self) -> str:
        return f"<FieldFilter {dict(self.spec)!r}>"

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        """Whether one document's metadata passes."""
        return _match(self._tree, metadata)

    def mask(self, fields: SegmentFields) -> np.ndarray:
        """A bool array over the segment's rows (live or not): which pass."""
        return _mask(self._tree, fields)


def compile_filter(filter: object) -> FieldFilter | Callable[[dict[str, Any]], bool] | None:
    """Validate ``filter``: ``None``, a callable on the metadata (kept as is) or a dict (compiled).

    Raises:
        TypeError: not a dict, callable or None; or an operand of the wrong type.
        ValueError: an unknown operator, or an empty ``$and`` / ``$or`` / operator dict.

    Example:
        >>> f = compile_filter({"year": {"$gte": 2020}, "lang": {"$in": ["en", "fr"]}})
        >>> f.matches({"year": 2021, "lang": "fr"}), f.matches({"year": 2019, "lang": "fr"})
        (True, False)
        >>> compile_filter({"year": {"$regex": "19.."}})
        Traceback (most recent call last):
        ...
        ValueError: filter : unknown operator '$regex' for field 'year' (supported: $eq, $ne, $in, $nin, $gt, $gte, $lt, $lte)
    """
    if filter is None:
        return None
    if isinstance(filter, Mapping):
        return FieldFilter(filter)
    if callable(filter):
        return filter  # type: ignore[return-value]
    raise TypeError(f"filter must be a dict of metadata conditions, a callable, or None; got {type(filter).__name__}")


def matches(filter: Mapping[str, Any], metadata: Mapping[str, Any]) -> bool:
    """The reference semantics: whether ``metadata`` passes the dict ``filter``."""
    return FieldFilter(filter).matches(metadata)


# ---------------------------------------------------------------------- one document


def _cmp_value(value: Any, op: str, operand: Any) -> bool:
    if op == "$eq":
        return bool(value == operand)
    if op == "$ne":
        return bool(value != operand)
    if op == "$in":
        return any(value == o for o in operand)
    if op == "$nin":
        return not any(value == o for o in operand)
    if _is_number(operand):
        if not _is_number(value):
            return False
    elif not isinstance(value, str):
        return False
    if op == "$gt":
        return bool(value > operand)
    if op == "$gte":
        return bool(value >= operand)
    if op == "$lt":
        return bool(value < operand)
    return bool(value <= operand)


def _match(node: Any, md: Mapping[str, Any]) -> bool:
    if isinstance(node, _Cmp):
        return _cmp_value(md.get(node.key), node.op, node.value)
    if node.op == "$and":
        return all(_match(p, md) for p in node.parts)
    return any(_match(p, md) for p in node.parts)


# ---------------------------------------------------------------------- a whole segment


def _hashable(v: object) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True


class FieldColumn:
    """One field of one segment, indexed: ``codes[row]`` is the row's value code (equal values share a
    code, ``-1`` missing, ``-2`` unhashable); ``values[code]`` the value; ``numbers`` / ``string_ranks``
    per code for range operators (NaN / -1 where the value is not a number / str)."""

    __slots__ = ("codes", "values", "lookup", "unhashable", "raw", "_numbers", "_strings")

    def __init__(self, raw: list[Any], missing: np.ndarray) -> None:
        lookup: dict[Any, int] = {}
        values: list[Any] = []
        codes = np.empty(len(raw), dtype=np.int32)
        unhashable: list[int] = []
        for row, v in enumerate(raw):
            if missing[row]:
                codes[row] = _MISSING
                continue
            try:
                code = lookup.get(v)
            except TypeError:
                codes[row] = _UNHASHABLE
                unhashable.append(row)
                continue
            if code is None:
                code = lookup[v] = len(values)
                values.append(v)
            codes[row] = code
        self.codes = codes
        self.values = values
        self.lookup = lookup
        self.unhashable = np.array(unhashable, dtype=np.int64)
        self.raw = raw  # per row (None where missing): for the unhashable rows
        self._numbers: np.ndarray | None = None
        self._strings: tuple[list[str], np.ndarray] | None = None

    def numbers(self) -> np.ndarray:
        """Per code: the value as float64 if it is a number (not a bool), else NaN."""
        if self._numbers is None:
            self._numbers = np.array([_as_float(v) if _is_number(v) else math.nan for v in self.values], dtype=np.float64)
        return self._numbers

    def strings(self) -> tuple[list[str], np.ndarray]:
        """The distinct str values sorted, and per code the value's rank among them (-1: not a str)."""
        if self._strings is None:
            ordered = sorted({v for v in self.values if isinstance(v, str)})
            rank = {s: i for i, s in enumerate(ordered)}
            ranks = np.array([rank[v] if isinstance(v, str) else -1 for v in self.values], dtype=np.int64)
            self._strings = (ordered, ranks)
        return self._strings


class SegmentFields:
    """The lazily built :class:`FieldColumn` s of one segment (a segment's ``fields()``). The document
    metadata a filter sees is the stored metadata plus, for chunks of a source, the stamped ``source``,
    ``chunk`` and ``version``."""

    __slots__ = ("_seg", "_columns", "_guard")

    def __init__(self, seg: Segment) -> None:
        self._seg = seg
        self._columns: dict[str, FieldColumn] = {}
        self._guard = threading.Lock()  # one builder per column; readers of built columns never take it

    @property
    def n(self) -> int:
        """The segment's row count."""
        return self._seg.n

    def indexed(self) -> tuple[str, ...]:
        """The fields indexed so far."""
        return tuple(self._columns)

    def column(self, key: str) -> FieldColumn:
        """The index of ``key`` (built on first use: one pass over the rows)."""
        col = self._columns.get(key)
        if col is None:
            with self._guard:
                col = self._columns.get(key)
                if col is None:
                    col = self._columns[key] = self._build(key)
        return col

    def _build(self, key: str) -> FieldColumn:
        from .records import CHUNK_KEY, SOURCE_KEY, VERSION_KEY

        seg = self._seg
        n = seg.n
        missing = np.zeros(n, dtype=bool)
        stamped = {SOURCE_KEY: seg.sources, CHUNK_KEY: seg.chunks, VERSION_KEY: seg.versions}.get(key)
        raw: list[Any] = [None] * n
        sentinel = object()
        for row, md in enumerate(seg.metadatas):
            if stamped is not None and seg.sources[row] is not None:
                raw[row] = stamped[row]
                continue
            v = md.get(key, sentinel)
            if v is sentinel:
                missing[row] = True
            else:
                raw[row] = v
        return FieldColumn(raw, missing)


def _eq_codes(col: FieldColumn, operands: tuple[Any, ...]) -> tuple[np.ndarray, bool, list[Any]]:
    """The codes equal to any operand, whether ``None`` is among them (it matches missing rows too), and
    the unhashable operands (only unhashable rows can equal them)."""
    codes: list[int] = []
    has_none = False
    odd: list[Any] = []
    for o in operands:
        if o is None:
            has_none = True
        if not _hashable(o):
            odd.append(o)
            continue
        code = col.lookup.get(o)
        if code is not None:
            codes.append(code)
    return np.array(codes, dtype=np.int32), has_none, odd


def _in_mask(col: FieldColumn, operands: tuple[Any, ...]) -> np.ndarray:
    codes, has_none, _ = _eq_codes(col, operands)
    if len(codes) == 1 and not has_none:
        mask = col.codes == codes[0]
    else:  # a lookup table by code, gathered per row: O(rows), however many operands
        table = np.zeros(len(col.values) + 2, dtype=bool)  # codes -2 and -1 index the two extra slots
        table[codes] = True
        table[_MISSING] = has_none
        mask = table[col.codes]
    for row in col.unhashable.tolist():
        v = col.raw[row]
        mask[row] = any(v == o for o in operands)
    return mask


def _range_mask(col: FieldColumn, op: str, operand: Any) -> np.ndarray:
    if _is_number(operand):
        per_code = col.numbers()
        x = _as_float(operand)
        compare = {"$gt": np.greater, "$gte": np.greater_equal, "$lt": np.less, "$lte": np.less_equal}[op]
        with np.errstate(invalid="ignore"):
            ok = compare(per_code, x)  # NaN (not a number) compares False
    else:
        ordered, ranks = col.strings()
        if op == "$gt":
            ok = ranks >= bisect.bisect_right(ordered, operand)
        elif op == "$gte":
            ok = ranks >= bisect.bisect_left(ordered, operand)
        elif op == "$lt":
            ok = (ranks >= 0) & (ranks < bisect.bisect_left(ordered, operand))
        else:
            ok = (ranks >= 0) & (ranks < bisect.bisect_right(ordered, operand))
    ok = np.append(ok, [False, False])  # codes -2 and -1 index the two extra slots: never in range
    return ok[col.codes]


def _mask(node: Any, fields: SegmentFields) -> np.ndarray:
    if isinstance(node, _Logic):
        if not node.parts:
            return np.ones(fields.n, dtype=bool)
        out = _mask(node.parts[0], fields)
        for part in node.parts[1:]:
            if node.op == "$and":
                out &= _mask(part, fields)
            else:
                out |= _mask(part, fields)
        return out
    col = fields.column(node.key)
    op = node.op
    if op in ("$eq", "$ne"):
        mask = _in_mask(col, (node.value,))
    elif op in ("$in", "$nin"):
        mask = _in_mask(col, node.value)
    else:
        return _range_mask(col, op, node.value)
    if op in ("$ne", "$nin"):
        np.logical_not(mask, out=mask)
    return mask
