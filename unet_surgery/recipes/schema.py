"""The recipe format: frozen dataclasses, validated from plain YAML/JSON data.

A recipe is data only. :func:`parse_recipe` walks the document against the dataclasses'
type hints and raises :class:`RecipeError` naming the path of the first bad field, e.g.
``passes[2].select.level: expected int or range, got 'deep'``. The same field metadata
(``doc``) generates the recipe reference in the docs.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
import warnings
from typing import Any, Literal, Union

from unet_surgery.core.limits import MAX_SIDE
from unet_surgery.core.registry import pass_types
from unet_surgery.core.schema import (
    RECIPE_VERSION,
    SUPPORTED_RECIPE_VERSIONS,
    AttentionKind,
    Axis,
    DemoFusionSpec,
    LevelRange,
    OnMissing,
    Op,
    PassConfig,
    PatchSpec,
    Recipe,
    SamplingSpec,
    ScheduleSpec,
    Selector,
    Stage,
    TransformSpec,
    doc,
    fail,
    key_path,
)
from unet_surgery.errors import RecipeError, TransformError
from unet_surgery.passes import DispersePass, NoiseDampedCFGPass, RedilatePass, ScaleFusionPass

__all__ = [
    "RECIPE_VERSION",
    "SUPPORTED_RECIPE_VERSIONS",
    "AttentionKind",
    "Axis",
    "DemoFusionSpec",
    "DispersePass",
    "LevelRange",
    "NoiseDampedCFGPass",
    "OnMissing",
    "Op",
    "PassConfig",
    "PatchSpec",
    "Recipe",
    "RedilatePass",
    "SamplingSpec",
    "ScaleFusionPass",
    "ScheduleSpec",
    "Selector",
    "Stage",
    "TransformSpec",
    "check_document_limits",
    "doc",
    "fail",
    "key_path",
    "parse_recipe",
    "to_data",
]


def __getattr__(name: str) -> Any:
    if name == "PASS_TYPES":
        return pass_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- parsing ----------------------------------------------------------------------------------


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 40, 40, 40


def _describe(value: Any) -> str:
    """A short repr whose cost is bounded too (a value may be a 2**40-node alias bomb)."""
    text = _SHORT.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- limits -----------------------------------------------------------------------------------

MAX_DEPTH = 32
MAX_NODES = 100_000  # after alias expansion: the largest shipped recipe has a few hundred
MAX_STRING = 10_000
MAX_INT = 2**53
MAX_FLOAT = 1e15
MIN_FLOAT = 1e-15  # nonzero magnitudes below this are refused (1e-300 underflows in forward)
MAX_PATTERNS = 10_000


def check_document_limits(document: Any) -> None:
    """Refuse a document too deep, too large once aliases are expanded, or holding cycles.

    Costs time linear in the number of distinct nodes (shared nodes are sized once), so a
    YAML alias bomb -- a few hundred bytes standing for 2**40 nodes -- is refused at once.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(document, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if not isinstance(node, (dict, list, tuple)):
            if isinstance(node, str) and len(node) > MAX_STRING:
                fail("", f"a string of {len(node)} characters is longer than the limit of {MAX_STRING}")
            continue
        key = id(node)
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else list(node)
        if done:
            active.discard(key)
            sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in children)
            if sizes[key] > MAX_NODES:
                fail("", f"the document holds more than {MAX_NODES} values once YAML aliases are expanded")
            continue
        if key in sizes:
            continue
        if key in active:
            fail("", "the document refers to itself (a recursive YAML alias)")
        if depth > MAX_DEPTH:
            fail("", f"the document is nested more than {MAX_DEPTH} levels deep")
        active.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children)


_fail = fail


MAX_LEVEL = 64  # a UNet halves its input at most a few times; 64 levels is far beyond any


def _parse_level(value: Any, path: str) -> LevelRange:
    if isinstance(value, bool):
        _fail(path, f"expected int or range, got {_describe(value)}")
    if isinstance(value, int):
        if not 0 <= value <= MAX_LEVEL:
            _fail(path, f"level must be between 0 and {MAX_LEVEL}, got {_describe(value)}")
        return LevelRange(value, value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]{1,3})\s*\.\.\s*([0-9]{0,3})\s*", value)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2)) if m.group(2) else None
            if lo > MAX_LEVEL or (hi is not None and hi > MAX_LEVEL):
                _fail(path, f"levels go from 0 to {MAX_LEVEL}, got {_describe(value)}")
            if hi is not None and hi < lo:
                _fail(path, f"empty level range {value!r}")
            return LevelRange(lo, hi)
    if isinstance(value, dict) and set(value) <= {"min", "max"} and value:
        lo = _parse(int, value.get("min", 0), f"{path}.min")
        hi = _parse(int | None, value.get("max"), f"{path}.max")
        if lo < 0 or (hi is not None and hi < lo) or lo > MAX_LEVEL or (hi is not None and hi > MAX_LEVEL):
            _fail(path, f"invalid level range {_describe(value)} (levels go from 0 to {MAX_LEVEL})")
        return LevelRange(lo, hi)
    _fail(path, f"expected int or range, got {_describe(value)}")


def _parse(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is LevelRange:
        return _parse_level(value, path)
    if tp is PassConfig:
        return _parse_pass(value, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _parse(options[0], value, path)
        errors = []
        for option in options:
            try:
                return _parse(option, value, path)
            except RecipeError as exc:
                errors.append(str(exc))
        _fail(path, f"expected {' or '.join(_type_name(o) for o in options)}, got {_describe(value)}")
    if origin is Literal:
        if value not in args:
            _fail(path, f"expected one of {', '.join(map(str, args))}, got {_describe(value)}")
        return value
    if origin is tuple:
        if args and args[-1] is Ellipsis:
            if isinstance(value, dict):
                _fail(path, f"expected a list of {_type_name(args[0])}, got {_describe(value)}")
            if not isinstance(value, (list, tuple)):  # a single value stands for a list of one
                return (_parse(args[0], value, path),)
            return tuple(_parse(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            _fail(path, f"expected a list of {len(args)} values, got {_describe(value)}")
        return tuple(_parse(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, f"expected a mapping, got {_describe(value)}")
        key_tp, val_tp = args
        return {_parse(key_tp, k, path): _parse(val_tp, v, key_path(path, k)) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"expected int, got {_describe(value)}")
        if abs(value) > MAX_INT:
            _fail(path, f"integer out of range (|value| <= 2**53), got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(path, f"expected a number, got {_describe(value)}")
        if abs(value) > MAX_FLOAT or 0 < abs(value) < MIN_FLOAT:
            _fail(path, f"number out of range (0 or {MIN_FLOAT:g} <= |value| <= {MAX_FLOAT:g}), got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, f"expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"schema type {tp!r} not handled")  # a bug in the schema, not the document


def _type_name(tp: Any) -> str:
    if tp is LevelRange:
        return "int or range"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def _parse_dataclass(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        _fail(path, f"expected a mapping, got {_describe(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    allowed = set(fields) | ({"type"} if "type" in hints else set())
    unknown = [k for k in value if k not in allowed]
    if unknown:
        where = key_path(path, unknown[0])
        _fail(where, f"unknown field (expected one of {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in value:
            kwargs[name] = _parse(hints[name], value[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(sub, "required field is missing")
    if cls is Selector:
        _check_paths(kwargs.get("paths"), f"{path}.paths" if path else "paths")
    try:
        return cls(**kwargs)
    except TransformError as exc:  # a dataclass that validates itself (schedules, transforms)
        _fail(path, str(exc))


def _check_paths(paths: tuple[str, ...] | None, where: str) -> None:
    """Compile every ``re:`` selector now (a bad one fails validation, not apply)."""
    from unet_surgery.core.pathregex import MAX_PATTERN, PatternError, compile_path_pattern

    if paths is not None and len(paths) > MAX_PATTERNS:
        _fail(where, f"at most {MAX_PATTERNS} paths, got {len(paths)}")
    for i, pattern in enumerate(paths or ()):
        if len(pattern) > MAX_PATTERN:
            _fail(f"{where}[{i}]", f"longer than {MAX_PATTERN} characters")
        if pattern.startswith("re:"):
            try:
                compile_path_pattern(pattern[3:])
            except PatternError as exc:
                _fail(f"{where}[{i}]", f"{exc} in {_describe(pattern)}")


def _parse_pass(value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        _fail(path, f"expected a mapping with a type, got {_describe(value)}")
    types_ = pass_types()
    kind = value.get("type")
    if not isinstance(kind, str) or kind not in types_:
        _fail(f"{path}.type", f"expected one of {', '.join(types_)}, got {_describe(kind)}")
    return _parse_dataclass(types_[kind], value, path)


def _check_recipe(recipe: Recipe) -> None:
    def resolution(value: tuple[int, int], where: str) -> None:
        if value[0] <= 0 or value[1] <= 0:
            _fail(where, f"resolutions must be positive, got {list(value)}")
        if max(value) > MAX_SIDE:
            _fail(where, f"a side over {MAX_SIDE} pixels: {value[1]}x{value[0]} (WxH)")

    resolution(recipe.base_resolution, "base_resolution")
    if recipe.vae_scale_factor < 1:
        _fail("vae_scale_factor", f"must be >= 1, got {recipe.vae_scale_factor}")
    if not recipe.target_resolutions:
        _fail("target_resolutions", "at least one target resolution is required")
    for i, res in enumerate(recipe.target_resolutions):
        resolution(res, f"target_resolutions[{i}]")
    if not recipe.passes and recipe.patches is None and recipe.demofusion is None:
        _fail("passes", "a recipe needs at least one pass (or a patches or demofusion section)")
    for i, p in enumerate(recipe.passes):
        p.validate(f"passes[{i}]")
    _check_patch_sampling(recipe)
    s = recipe.sampling
    if s is not None:
        if not s.stages:
            _fail("sampling.stages", "at least one stage is required")
        for i, stage in enumerate(s.stages):
            resolution(stage, f"sampling.stages[{i}]")
        for i, (a, b) in enumerate(zip(s.stages, s.stages[1:], strict=False)):
            if b[0] < a[0] or b[1] < a[1]:
                _fail(f"sampling.stages[{i + 1}]", f"stages must not shrink: {list(a)} -> {list(b)}")
        if s.steps < 1:
            _fail("sampling.steps", f"must be >= 1, got {s.steps}")
        if s.restart_step is not None and not 0 <= s.restart_step < s.steps:
            _fail("sampling.restart_step", f"must be in [0, {s.steps}), got {s.restart_step}")


def _check_patch_sampling(recipe: Recipe) -> None:
    """Checks of the patches and demofusion sections that need no model."""
    if recipe.sampling is not None and recipe.demofusion is not None:
        _fail("demofusion", "a recipe has either a sampling (self-cascade) or a demofusion section, not both")
    if recipe.patches is not None and recipe.demofusion is not None:
        _fail("patches", "DemoFusion brings its own local patches (demofusion.stride, view_batch_size); "
              "remove the patches section")
    p = recipe.patches
    if p is not None:
        for name in ("window", "stride"):
            value = getattr(p, name)
            if value is not None and value < 1:
                _fail(f"patches.{name}", f"must be >= 1, got {value}")
        if p.window is not None and p.stride is not None and p.stride > p.window:
            _fail("patches.stride", f"{p.stride} is larger than the window {p.window}: views would leave gaps")
        if p.view_batch_size < 1:
            _fail("patches.view_batch_size", f"must be >= 1, got {p.view_batch_size}")
    d = recipe.demofusion
    if d is not None:
        if d.steps < 1:
            _fail("demofusion.steps", f"must be >= 1, got {d.steps}")
        if d.stride is not None and d.stride < 1:
            _fail("demofusion.stride", f"must be >= 1, got {d.stride}")
        if d.view_batch_size < 1:
            _fail("demofusion.view_batch_size", f"must be >= 1, got {d.view_batch_size}")
        if d.sigma <= 0:
            _fail("demofusion.sigma", f"must be > 0, got {d.sigma}")
        base, target = recipe.base_resolution, recipe.target_resolutions[0]
        if max(target[0] / base[0], target[1] / base[1]) < 2:
            _fail("target_resolutions[0]", f"DemoFusion upscales by whole factors of the base: "
                  f"{target[0]}x{target[1]} is less than twice the base {base[0]}x{base[1]}")


def _check_version(document: Any) -> Any:
    """Refuse an unknown format version before reading fields it may have added."""
    if not isinstance(document, dict):
        return document
    version = document.get("version", RECIPE_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_RECIPE_VERSIONS:
        _fail(
            "version",
            f"recipe format version {_describe(version)} is not one this unet-surgery reads "
            f"({', '.join(map(str, SUPPORTED_RECIPE_VERSIONS))}); upgrade unet-surgery or rewrite the recipe",
        )
    sampling = document.get("sampling")
    if isinstance(sampling, dict) and "dilate_tau" in sampling:
        # Read by nothing in any version: the window of (restrained) dilation is the redilate
        # pass's schedule.tau. Old files keep loading, with a warning.
        warnings.warn(
            "sampling.dilate_tau is ignored: the window of restrained dilation is the redilate "
            "pass's schedule.tau; remove dilate_tau from the recipe",
            UserWarning,
            stacklevel=3,
        )
        document = {**document, "sampling": {k: v for k, v in sampling.items() if k != "dilate_tau"}}
    return document


def parse_recipe(document: Any) -> Recipe:
    """Validate a recipe document (the result of ``yaml.safe_load`` or ``json.load``).

    Args:
        document: plain data: mappings, lists, strings and numbers.
    """
    check_document_limits(document)
    recipe = _parse_dataclass(Recipe, _check_version(document), "")
    _check_recipe(recipe)
    return recipe


def checked(recipe: Recipe) -> Recipe:
    """``recipe`` as the parser would give it from its document: a builder's arguments get the
    same bounds as a file's (``freeu_recipe(b1=nan)`` built a recipe no file could state)."""
    return parse_recipe(to_data(recipe))


# --- back to data -----------------------------------------------------------------------------


def to_data(obj: Any) -> Any:
    """A recipe (or part) as plain JSON/YAML-able data; ``parse_recipe(to_data(r)) == r``."""
    if isinstance(obj, LevelRange):
        return obj.to_data()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        kind = getattr(type(obj), "type", None)
        if isinstance(kind, str):
            out["type"] = kind
        if isinstance(obj, Recipe):
            out["version"] = obj.version
        for f in dataclasses.fields(obj):
            if f.name == "version" and isinstance(obj, Recipe):
                continue
            value = getattr(obj, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING
            )
            if value == default and f.name not in ("select",):
                continue
            out[f.name] = to_data(value)
        return out
    if isinstance(obj, tuple | list):
        return [to_data(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_data(v) for k, v in obj.items()}
    return obj
