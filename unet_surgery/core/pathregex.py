"""Linear-time matching of ``re:`` path selectors: a Thompson NFA built from Python's own parse.

Python's ``re`` backtracks, so ``re:([a-z_0-9.]+)+X`` takes exponential time on a module
path that does not end in X. A recipe is untrusted input, so selectors are compiled here
instead: the pattern is parsed by ``re``'s parser (same syntax, same error messages), turned
into an NFA, and run by keeping the set of live states -- time O(pattern x path), whatever the
pattern. Only what a path needs is supported: literals, classes, ``.``, groups, alternation,
repeats (bounded repeats up to :data:`MAX_REPEAT`) and ``^``/``$``; backreferences,
lookarounds and flags are refused with a clear message.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from re import _constants as C  # type: ignore[attr-defined]
from re import _parser as P  # type: ignore[attr-defined]
from typing import Any

MAX_PATTERN = 1000
MAX_REPEAT = 100
MAX_STATES = 20_000


class PatternError(ValueError):
    """The pattern is invalid or uses a feature the linear matcher does not offer."""


@dataclass(eq=False)
class _State:
    test: Callable[[str], bool] | None = None  # consumes one character when it holds
    out: list[_State] = field(default_factory=list)  # epsilon moves (or the next state after test)
    at: str | None = None  # "begin" / "end": an epsilon move allowed only there
    final: bool = False


_CATEGORIES: dict[Any, Callable[[str], bool]] = {
    C.CATEGORY_DIGIT: str.isdigit,
    C.CATEGORY_NOT_DIGIT: lambda c: not c.isdigit(),
    C.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
    C.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_"),
    C.CATEGORY_SPACE: str.isspace,
    C.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
}


def _is(ch: str) -> Callable[[str], bool]:
    return lambda c: c == ch


def _is_not(ch: str) -> Callable[[str], bool]:
    return lambda c: c != ch


def _between(lo: int, hi: int) -> Callable[[str], bool]:
    return lambda c: lo <= ord(c) <= hi


def _class(items: list[tuple[Any, Any]]) -> Callable[[str], bool]:
    negate = False
    tests: list[Callable[[str], bool]] = []
    for op, av in items:
        if op is C.NEGATE:
            negate = True
        elif op is C.LITERAL:
            tests.append(_is(chr(av)))
        elif op is C.RANGE:
            tests.append(_between(av[0], av[1]))
        elif op is C.CATEGORY and av in _CATEGORIES:
            tests.append(_CATEGORIES[av])
        else:
            raise PatternError(f"character class item {op} is not supported")
    return lambda c: any(t(c) for t in tests) != negate


class _Builder:
    def __init__(self) -> None:
        self.count = 0

    def new(self, **kwargs: Any) -> _State:
        self.count += 1
        if self.count > MAX_STATES:
            raise PatternError(f"pattern expands to more than {MAX_STATES} states")
        return _State(**kwargs)

    def sequence(self, items: Any, nxt: _State) -> _State:
        for op, av in reversed(list(items)):
            nxt = self.item(op, av, nxt)
        return nxt

    def item(self, op: Any, av: Any, nxt: _State) -> _State:
        if op is C.LITERAL:
            return self.new(test=_is(chr(av)), out=[nxt])
        if op is C.NOT_LITERAL:
            return self.new(test=_is_not(chr(av)), out=[nxt])
        if op is C.ANY:
            return self.new(test=lambda c: c != "\n", out=[nxt])
        if op is C.IN:
            return self.new(test=_class(av), out=[nxt])
        if op is C.BRANCH:
            return self.new(out=[self.sequence(seq, nxt) for seq in av[1]])
        if op is C.SUBPATTERN:
            if av[1] or av[2]:
                raise PatternError("inline flags are not supported")
            return self.sequence(av[3], nxt)
        if op in (C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", object())):
            return self.repeat(av[0], av[1], av[2], nxt)
        if op is C.AT and av in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
            return self.new(at="begin", out=[nxt])
        if op is C.AT and av in (C.AT_END, C.AT_END_STRING):
            return self.new(at="end", out=[nxt])
        raise PatternError(f"{str(op).lower()} is not supported in path selectors")

    def repeat(self, lo: int, hi: int, body: Any, nxt: _State) -> _State:
        if lo > MAX_REPEAT or (hi != C.MAXREPEAT and hi > MAX_REPEAT):
            raise PatternError(f"repeat counts above {MAX_REPEAT} are not supported")
        if hi == C.MAXREPEAT:
            loop = self.new()
            loop.out = [self.sequence(body, loop), nxt]
            nxt = loop
        else:
            for _ in range(hi - lo):
                nxt = self.new(out=[self.sequence(body, nxt), nxt])
        for _ in range(lo):
            nxt = self.sequence(body, nxt)
        return nxt


@dataclass(frozen=True)
class PathPattern:
    """A compiled ``re:`` selector; :meth:`fullmatch` runs in O(pattern x text)."""

    source: str
    start: _State

    def _closure(self, states: list[_State], pos: int, end: int) -> list[_State]:
        seen: set[int] = set()
        out: list[_State] = []
        stack = list(states)
        while stack:
            state = stack.pop()
            if id(state) in seen:
                continue
            seen.add(id(state))
            if (state.at == "begin" and pos != 0) or (state.at == "end" and pos != end):
                continue
            if state.test is not None or state.final:
                out.append(state)
            if state.test is None:
                stack.extend(state.out)
        return out

    def fullmatch(self, text: str) -> bool:
        current = self._closure([self.start], 0, len(text))
        for i, ch in enumerate(text):
            current = self._closure([s.out[0] for s in current if s.test is not None and s.test(ch)], i + 1, len(text))
            if not current:
                return False
        return any(s.final for s in current)


@functools.lru_cache(maxsize=256)
def compile_path_pattern(pattern: str) -> PathPattern:
    """Compile a selector regex (without its ``re:``); :class:`PatternError` says why not."""
    if len(pattern) > MAX_PATTERN:
        raise PatternError(f"pattern is longer than {MAX_PATTERN} characters")
    try:
        parsed = P.parse(pattern, 0)
    except re.error as exc:
        raise PatternError(f"invalid regular expression: {exc}") from None
    if parsed.state.flags & ~(re.UNICODE | getattr(re, "NOFLAG", 0)):
        raise PatternError("inline flags are not supported")
    builder = _Builder()
    return PathPattern(pattern, builder.sequence(parsed, _State(final=True)))
