"""A progress bar for long writes: tqdm when installed (diffusers depends on it), else a line."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class _Line:
    """Minimal stand-in for tqdm: one stderr line per update."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n = total, desc, 0

    def update(self, n: int = 1) -> None:
        self.n += n
        print(f"{self.desc}: {self.n}/{self.total}", file=sys.stderr, flush=True)

    def set_postfix_str(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


@contextmanager
def progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    """Yield an object with ``update(n)`` and ``set_postfix_str(text)``; silent when disabled."""
    if not enabled:
        yield _Silent()
        return
    try:
        from tqdm.auto import tqdm

        bar: Any = tqdm(total=total, desc=desc, unit="step", file=sys.stderr)
    except ImportError:
        bar = _Line(total, desc)
    try:
        yield bar
    finally:
        bar.close()
