"""Resolve a recipe's :class:`Selector` against a :class:`UNetMap`.

Selection by map attributes (op, kernel, stride, stage, level, axis, kind) makes recipes
portable across UNets; selection by path (exact, glob, ``re:``) allows faithful translations
of published per-layer tables. Selecting nothing is always an error, and a listed path the
model lacks is reported with the closest existing paths.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field

from unet_surgery.core.pathregex import compile_path_pattern
from unet_surgery.core.schema import Selector
from unet_surgery.errors import SelectionError
from unet_surgery.graph.records import AttentionRecord, ConvRecord, UNetMap

Record = ConvRecord | AttentionRecord


@dataclass
class Selection:
    """The records a selector picked, and listed paths that matched no module."""

    records: list[Record]
    missing: list[str] = field(default_factory=list)
    suggestions: dict[str, list[str]] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.records]


def is_pattern(path: str) -> bool:
    return path.startswith("re:") or any(ch in path for ch in "*?[")


def path_matches(path: str, pattern: str) -> bool:
    if pattern.startswith("re:"):  # linear time: a recipe's regex cannot hang the match
        return compile_path_pattern(pattern[3:]).fullmatch(path)
    if is_pattern(pattern):
        return fnmatch.fnmatchcase(path, pattern)
    return path == pattern


def closest_paths(path: str, candidates: list[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(path, candidates, n=n, cutoff=0.5)


def _matches(rec: Record, sel: Selector) -> bool:
    if sel.op is not None and rec.op not in sel.op:
        return False
    if isinstance(rec, ConvRecord):
        if sel.kernel is not None and not all(k in sel.kernel for k in rec.spatial_kernel):
            return False
        if sel.stride is not None and not all(s in sel.stride for s in rec.spatial_stride):
            return False
        if sel.kind is not None:
            return False
    else:
        if sel.kernel is not None or sel.stride is not None:
            return False
        if sel.kind is not None and rec.kind not in sel.kind:
            return False
    if sel.stage is not None and rec.stage not in sel.stage:
        return False
    if sel.level is not None and rec.level not in sel.level:
        return False
    if sel.axis is not None and rec.axis not in sel.axis:
        return False
    if sel.paths is not None and not any(path_matches(rec.path, p) for p in sel.paths):
        return False
    return not (sel.exclude is not None and _matches(rec, sel.exclude))


def select(unet_map: UNetMap, selector: Selector, *, where: str = "select") -> Selection:
    """Records of ``unet_map`` matching ``selector``, in execution order.

    Raises :class:`SelectionError` when nothing matches. Exact paths that name no mapped op
    are returned in ``missing`` (with suggestions) for the caller to report or refuse.
    """
    records = [r for r in unet_map.records if _matches(r, selector)]
    all_paths = unet_map.paths()
    missing: list[str] = []
    suggestions: dict[str, list[str]] = {}
    for pattern in selector.paths or ():
        if is_pattern(pattern):
            continue
        if pattern not in all_paths:
            missing.append(pattern)
            suggestions[pattern] = closest_paths(pattern, all_paths)
    if not records:
        hint = ""
        if missing:
            first = missing[0]
            close = suggestions.get(first) or []
            hint = f"; {first!r} is not a mapped layer" + (f" (closest: {', '.join(close)})" if close else "")
        raise SelectionError(f"{where}: selector matched no layer of {unet_map.model_class}{hint}")
    return Selection(records=records, missing=missing, suggestions=suggestions)
