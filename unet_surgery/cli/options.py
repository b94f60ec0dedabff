"""Argument types for numbers typed on the command line: bounded before conversion.

``type=int`` converts any digit string, however long, and argparse then prints the whole of
it in its error; these refuse over-long text first and quote a bounded excerpt. Floats must
be finite: ``nan`` and ``inf`` are never a setting.
"""

from __future__ import annotations

import argparse
import math
import re

MAX_DIGITS = 19  # every integer option fits 64 bits
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 40 else f"{text[:40]!r}... ({len(text)} characters)"


def bounded_int(text: str) -> int:
    """An integer of at most :data:`MAX_DIGITS` ASCII digits."""
    text = text.strip()
    if not _INT.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not an integer")
    if len(text.lstrip("+-")) > MAX_DIGITS:
        raise argparse.ArgumentTypeError(f"an integer of {len(text.lstrip('+-'))} digits is out of range")
    return int(text)


def finite_float(text: str) -> float:
    """A finite decimal number (``nan``, ``inf`` and overflowing exponents are refused)."""
    text = text.strip()
    if not _FLOAT.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not a finite number")
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not a finite number")
    return value
