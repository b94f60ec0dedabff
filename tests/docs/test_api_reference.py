"""``docs/api.md`` renders every public function, and every parameter of every function it
lists is described in the ``Args:`` section of its docstring (Google style, as mkdocstrings
reads it)."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import unet_surgery

PAGE = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def listed() -> dict[str, Any]:
    objects = {}
    for target in re.findall(r"^::: (\S+)$", PAGE.read_text(), re.M):
        module, _, name = target.rpartition(".")
        try:
            objects[target] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            objects[target] = importlib.import_module(target)  # a whole module (the ops)
    return objects


FUNCTIONS = {t: o for t, o in listed().items() if inspect.isfunction(inspect.unwrap(o))}


def undescribed(function: Any) -> list[str]:
    doc = inspect.getdoc(function) or ""
    args = doc.split("\nArgs:\n", 1)[1] if "\nArgs:\n" in doc else ""
    names = []
    for p in inspect.signature(function).parameters.values():
        star = "**" if p.kind is p.VAR_KEYWORD else "*" if p.kind is p.VAR_POSITIONAL else ""
        if not re.search(rf"^    {re.escape(star + p.name)}( \([^)]*\))?: \S", args, re.M):
            names.append(p.name)
    return names


def test_every_public_function_is_on_the_page() -> None:
    shown = {id(inspect.unwrap(o)) for o in FUNCTIONS.values()}
    public = [n for n in unet_surgery.__all__ if inspect.isfunction(getattr(unet_surgery, n))]
    assert len(public) >= 15
    assert [n for n in public if id(inspect.unwrap(getattr(unet_surgery, n))) not in shown] == []


@pytest.mark.parametrize("target", sorted(FUNCTIONS))
def test_every_parameter_is_described(target: str) -> None:
    assert undescribed(FUNCTIONS[target]) == []


def test_the_check_reads_what_mkdocstrings_reads() -> None:
    def documented(a: int, *, b: str = "", **rest: Any) -> None:
        """Summary.

        Args:
            a: the first.
            **rest: the others.
        """

    assert undescribed(documented) == ["b"]
