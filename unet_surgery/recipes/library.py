"""Shipped recipes (``recipes/`` in the repository, ``unet_surgery/_recipes`` in the wheel) and
loading of recipe files. Loading never runs code: YAML is read with a ``yaml.SafeLoader`` whose
numbers follow YAML 1.2's core schema (:class:`RecipeLoader`).
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from unet_surgery.errors import RecipeError
from unet_surgery.io import parse_bounded_json, read_bounded_text
from unet_surgery.recipes.schema import MAX_DEPTH, Recipe, parse_recipe, to_data

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


@cache
def recipes_dir() -> Path:
    """Where the shipped recipes are: inside the installed wheel, or the source checkout."""
    packaged = Path(str(resources.files("unet_surgery"))) / "_recipes"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "recipes"


def _shipped() -> dict[str, Path]:
    root = recipes_dir()
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix in RECIPE_SUFFIXES and path.is_file():
            found[path.stem] = path
    return found


def list_recipes() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(_shipped())


MAX_RECIPE_BYTES = 1 << 20  # the largest shipped recipe is a few KiB
MAX_INT_DIGITS = 32  # recipe integers are at most 2**53 (16 digits); longer literals are refused unread

_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
# YAML 1.2 core schema numbers. YAML 1.1 (PyYAML's default) also reads base-60 "sexagesimals"
# (``59:59:59`` is 215999), which it converts in time quadratic in their length, as well as
# ``0b``/``_``-separated forms; here those stay strings (and a recipe then says which field is not a number).
_CORE_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_CORE_FLOAT = re.compile(
    r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)


def _core_resolvers(cls: type) -> None:
    """Give a PyYAML loader or dumper class the YAML 1.2 core int and float resolvers (only)."""
    cls.yaml_implicit_resolvers = {  # type: ignore[attr-defined]
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    cls.add_implicit_resolver(_INT_TAG, re.compile(rf"^(?:{_CORE_INT.pattern})$"), list("-+0123456789"))  # type: ignore[attr-defined]
    cls.add_implicit_resolver(_FLOAT_TAG, re.compile(rf"^(?:{_CORE_FLOAT.pattern})$"), list("-+.0123456789"))  # type: ignore[attr-defined]


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 core numbers, each bounded before it is converted."""

    def construct_yaml_int(self, node: yaml.Node) -> int:
        text = str(self.construct_scalar(node))  # type: ignore[arg-type]
        digits = text.lstrip("+-")
        if len(digits) > MAX_INT_DIGITS:
            raise RecipeError(f"line {node.start_mark.line + 1}: an integer of {len(digits)} digits "
                              f"(limit {MAX_INT_DIGITS})")
        sign = -1 if text.startswith("-") else 1
        base = 8 if digits.startswith("0o") else 16 if digits.startswith("0x") else 10
        return sign * int(digits[2:] if base != 10 else digits, base)

    def construct_yaml_float(self, node: yaml.Node) -> float:
        text = str(self.construct_scalar(node)).lower()  # type: ignore[arg-type]
        if text.lstrip("+-") in (".inf", ".nan"):
            return float(text.replace(".", ""))
        return float(text)


_core_resolvers(RecipeLoader)
RecipeLoader.add_constructor(_INT_TAG, RecipeLoader.construct_yaml_int)
RecipeLoader.add_constructor(_FLOAT_TAG, RecipeLoader.construct_yaml_float)


def read_document(path: Path) -> Any:
    """Parse a YAML or JSON file into plain data (no code execution, no custom tags).

    Bounded before parsing: at most :data:`MAX_RECIPE_BYTES`, strict UTF-8 text; a parser
    that recurses too deep or an integer too long to convert is one clear error, not a traceback.
    """
    text = read_bounded_text(path, MAX_RECIPE_BYTES, RecipeError, hint="; a recipe is a few KiB")
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        if path.suffix == ".json":
            return parse_bounded_json(text, str(path), RecipeError, max_depth=MAX_DEPTH)
        return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RecipeError(f"{path} is not valid {kind}: {first}") from None
    except RecursionError:
        raise RecipeError(f"{path} is nested too deeply to be a recipe") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise RecipeError(f"{path} is not valid {kind}: {str(exc).splitlines()[0][:120]}") from None


def load_recipe(source: Recipe | str | Path | dict[str, Any]) -> Recipe:
    """A :class:`Recipe` from a recipe, a shipped name, a file path or a parsed document.

    Args:
        source: a :class:`Recipe` (returned as is), a shipped recipe name, a ``.yaml``/``.json`` file or a
            parsed document.
    """
    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        return parse_recipe(source)
    if not isinstance(source, (str, Path)):
        raise RecipeError(f"expected a recipe, a name, a path or a mapping, got {type(source).__name__}")
    path = Path(source)
    if path.suffix in RECIPE_SUFFIXES or path.exists():
        if not path.exists() or path.is_dir():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            return parse_recipe(read_document(path))
        except RecipeError as exc:
            raise RecipeError(f"{path}: {exc}") from None
    shipped = _shipped()
    if str(source) not in shipped:
        import difflib

        close = difflib.get_close_matches(str(source), list(shipped), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " See `unet-surgery recipes list`."
        raise RecipeError(f"unknown recipe {str(source)!r}.{hint}")
    return load_recipe(shipped[str(source)])


class _RecipeDumper(yaml.SafeDumper):
    """Block style for mappings (one table entry a line), flow style for short scalar lists."""

    def ignore_aliases(self, data: Any) -> bool:  # repeated values are written out, no &anchors
        return True


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, (dict, list)) for v in data) and len(data) <= 4
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_core_resolvers(_RecipeDumper)  # quotes exactly the strings RecipeLoader would read as numbers
_RecipeDumper.add_representer(list, _represent_list)
_RecipeDumper.add_representer(tuple, _represent_list)  # type: ignore[arg-type]


def dump_recipe(recipe: Recipe | dict[str, Any]) -> str:
    """A recipe as readable YAML (``load_recipe`` of the text gives the recipe back).

    Args:
        recipe: a :class:`Recipe` or a recipe document.
    """
    data = to_data(recipe) if isinstance(recipe, Recipe) else recipe
    return yaml.dump(data, Dumper=_RecipeDumper, sort_keys=False, width=100)
