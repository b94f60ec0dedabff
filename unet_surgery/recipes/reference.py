"""Generate the recipe reference (Markdown) from the schema dataclasses.

``docs/recipe-reference.md`` is this function's output; a test keeps the two equal, so the
reference cannot drift from the code. Regenerate with
``python -m unet_surgery.recipes.reference > docs/recipe-reference.md``.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Literal, Union

from unet_surgery.recipes import schema


def sections() -> list[tuple[str, type]]:
    """The reference's sections: the recipe, every registered pass, then the shared specs."""
    from unet_surgery.passes import pass_types

    return [
        ("Recipe", schema.Recipe),
        *((f"Pass: {name}", cls) for name, cls in pass_types().items()),
        ("Selector", schema.Selector),
        ("ScheduleSpec", schema.ScheduleSpec),
        ("TransformSpec", schema.TransformSpec),
        ("SamplingSpec", schema.SamplingSpec),
        ("PatchSpec", schema.PatchSpec),
        ("DemoFusionSpec", schema.DemoFusionSpec),
    ]


def type_text(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is schema.LevelRange:
        return "level (int or range `a..b`)"
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if tp is schema.PassConfig:
        return "pass"
    if origin in (Union, types.UnionType):
        return " or ".join(type_text(a) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else ""
        )
    if origin is tuple:
        if args and args[-1] is Ellipsis:
            return f"list of {type_text(args[0])}"
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict:
        return f"mapping {type_text(args[0])} → {type_text(args[1])}"
    if tp is schema.TransformSpec:
        return "[TransformSpec](#transformspec)"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    return {int: "int", float: "number", str: "string", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        if f.default is None:
            return "`null`"
        if f.default == "":
            return '`""`'
        return f"`{str(f.default).lower() if isinstance(f.default, bool) else f.default}`"
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "`{}`" if value == {} else "defaults"
    return "required"


def schema_reference() -> str:
    lines = [
        "# Recipe reference",
        "",
        "Generated from `unet_surgery/recipes/schema.py` by `python -m unet_surgery.recipes.reference`;"
        " a test keeps this page equal to the code.",
        "",
    ]
    for title, cls in sections():
        anchor = "transformspec" if cls is schema.TransformSpec else cls.__name__.lower()
        lines += [f"## {title} {{#{anchor}}}", "", inspect.cleandoc(cls.__doc__ or ""), ""]
        if hasattr(cls, "type") and isinstance(cls.type, str):
            lines += [f"`type: {cls.type}`", ""]
        lines += ["| field | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meaning = f.metadata.get("doc", "").replace("|", "\\|")
            lines.append(f"| `{f.name}` | {type_text(hints[f.name])} | {_default(f)} | {meaning} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(schema_reference(), end="")
