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
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

from unet_surgery.errors import RecipeError

Stage = Literal["down", "mid", "up"]
Op = Literal["conv1d", "conv2d", "conv3d", "attention"]
Axis = Literal["spatial", "temporal", "spatiotemporal"]
AttentionKind = Literal["self", "cross"]


def doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field with documentation for the generated reference."""
    return field(metadata={"doc": text}, **kwargs)


@dataclass(frozen=True)
class LevelRange:
    """Inclusive range of resolution levels; written ``2``, ``"1..3"``, ``"1.."`` or ``{min, max}``."""

    lo: int
    hi: int | None  # None: no upper bound

    def __contains__(self, level: object) -> bool:
        return isinstance(level, int) and level >= self.lo and (self.hi is None or level <= self.hi)

    def to_data(self) -> Any:
        if self.hi == self.lo:
            return self.lo
        return f"{self.lo}..{'' if self.hi is None else self.hi}"


@dataclass(frozen=True)
class Selector:
    """Which layers a pass acts on. Every given criterion must hold; lists mean any-of."""

    op: tuple[Op, ...] | None = doc("ops to select: conv2d, conv3d, attention", default=None)
    kernel: tuple[int, ...] | None = doc("spatial kernel sizes (3 selects 3x3 convs)", default=None)
    stride: tuple[int, ...] | None = doc("spatial strides (1, or 2 for downsamplers)", default=None)
    stage: tuple[Stage, ...] | None = doc("down, mid, up", default=None)
    level: LevelRange | None = doc("resolution level of the layer's input: int or range like 1..3", default=None)
    axis: tuple[Axis, ...] | None = doc("spatial or temporal layers", default=None)
    kind: tuple[AttentionKind, ...] | None = doc("attention kind: self or cross", default=None)
    paths: tuple[str, ...] | None = doc(
        "module paths: exact names, globs (down_blocks.*.resnets.*.conv1) or re:REGEX", default=None
    )
    exclude: Selector | None = doc("layers matching this selector are dropped", default=None)


@dataclass(frozen=True)
class ScheduleSpec:
    """When a pass is active over the sampling trajectory."""

    tau: float | None = doc(
        "active while step < tau, in steps of a `steps`-step sampler (null: every step)", default=None
    )
    steps: int = doc("the step count tau is expressed in (published settings: 50)", default=50)
    progressive: bool = doc("ScaleCrafter's decaying factor max(ceil(f*(tau-i)/tau), 2)", default=False)


@dataclass(frozen=True)
class TransformSpec:
    """Parameters of the dispersion least-squares problem (see the dispersion page)."""

    small: int = doc("small (original) kernel size", default=3)
    large: int = doc("large (dispersed) kernel size", default=5)
    scale: int = doc("scale s of the structure-level equations", default=2)
    input_size: int = doc("size n of the input patch of the least-squares problem", default=3)
    eta: float = doc("weight of the pixel-level equations", default=0.05)


OnMissing = Literal["error", "warn"]


@dataclass(frozen=True)
class RedilatePass:
    """Re-dilated convolutions (ScaleCrafter), with a per-step schedule."""

    type: ClassVar[str] = "redilate"
    select: Selector = doc("layers to re-dilate")
    factor: float | Literal["auto"] | None = doc(
        "factor for every selected layer without an entry in `factors`; auto: the current "
        "latent size over the base size, floored (FreeScale's restrained dilation)",
        default=None,
    )
    factors: dict[str, float] = doc("per-layer factors (path: factor), e.g. a published table", default_factory=dict)
    schedule: ScheduleSpec = doc("when the pass is active", default_factory=ScheduleSpec)
    on_missing: OnMissing = doc(
        "a path in `select.paths`/`factors` the model lacks: error, or warn and report it", default="error"
    )


@dataclass(frozen=True)
class DispersePass:
    """Dispersed kernels (ScaleCrafter): a 3x3 kernel becomes R @ W3 while the pass is active."""

    type: ClassVar[str] = "disperse"
    select: Selector = doc("convolutions to disperse")
    transform: TransformSpec = doc("the least-squares problem R solves", default_factory=TransformSpec)
    schedule: ScheduleSpec = doc("when the dispersed kernel is used (published: inflate_tau)", default_factory=ScheduleSpec)
    on_missing: OnMissing = doc("a listed path the model lacks: error or warn", default="error")


@dataclass(frozen=True)
class NoiseDampedCFGPass:
    """Noise-damped guidance: the unconditional branch runs re-dilated by its own table."""

    type: ClassVar[str] = "noise_damped_cfg"
    select: Selector = doc("layers re-dilated in the damped (vanilla) branch")
    factor: float | None = doc("factor for selected layers without an entry in `factors`", default=None)
    factors: dict[str, float] = doc("per-layer factors of the damped branch", default_factory=dict)
    schedule: ScheduleSpec = doc("steps with noise-damped guidance (published: ndcfg_tau)", default_factory=ScheduleSpec)
    on_missing: OnMissing = doc("a listed path the model lacks: error or warn", default="error")


@dataclass(frozen=True)
class ScaleFusionPass:
    """FreeScale's scale-fusion self-attention (global + windowed local, Gaussian fused)."""

    type: ClassVar[str] = "scale_fusion"
    select: Selector = doc("attention ops to fuse (spatial self-attention only)")
    blur: Literal["published", "volumetric", "spatial"] = doc(
        "published: what the official code computes, a 2-D Gaussian over (w, channel) per token row; "
        "volumetric: 3-D over (h, w, channel); spatial: over (h, w) only",
        default="published",
    )
    jitter: bool = doc("shift each window by up to 1/8 window (seeded)", default=True)
    seed: int = doc("seed of the window jitter", default=0)
    fast_mode: bool = doc("global attention over strided sub-grids instead of all tokens", default=False)
    schedule: ScheduleSpec = doc("when fusion is active", default_factory=ScheduleSpec)


Pass = Union[RedilatePass, DispersePass, NoiseDampedCFGPass, ScaleFusionPass]  # noqa: UP007
PASS_TYPES: dict[str, type] = {
    cls.type: cls for cls in (RedilatePass, DispersePass, NoiseDampedCFGPass, ScaleFusionPass)
}


@dataclass(frozen=True)
class SamplingSpec:
    """The self-cascade sampler's settings (FreeScale)."""

    stages: tuple[tuple[int, int], ...] = doc("resolutions (height, width) in pixels, first = plain generation")
    steps: int = doc("denoising steps per stage", default=50)
    restart_step: int | None = doc("step each later stage restarts from (default int(0.3 * steps))", default=None)
    cosine_scale: float = doc("exponent of the cosine blend of forward noise (<= 1 advised for 8K)", default=2.0)
    cosine_scale_bg: float = doc("exponent where the detail mask is 0 (region-aware control)", default=1.0)
    dilate_tau: int = doc("restrained dilation is active while step < dilate_tau", default=35)


@dataclass(frozen=True)
class Recipe:
    """A named, ordered list of passes plus the resolutions it was made for."""

    name: str = doc("identifier, e.g. scalecrafter-sd15-2048x2048")
    base_resolution: tuple[int, int] = doc("training resolution (height, width) in pixels")
    target_resolutions: tuple[tuple[int, int], ...] = doc("resolutions (height, width) the recipe targets")
    passes: tuple[Pass, ...] = doc("rewrites, applied in order")
    description: str = doc("what the recipe does", default="")
    source: str | None = doc("where the settings come from", default=None)
    model: str | None = doc("architecture the recipe was written for (a preset name)", default=None)
    vae_scale_factor: int = doc("pixels per latent pixel (8 for SD-style VAEs, 1 for pixel-space models)", default=8)
    sampling: SamplingSpec | None = doc("self-cascade sampler settings", default=None)


# --- parsing ----------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _key_path(path: str, key: Any) -> str:
    """``path.key`` for names and module paths, ``path['odd key']`` for anything else."""
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][\w.\-*]*", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def _fail(path: str, message: str) -> typing.NoReturn:
    raise RecipeError(f"{path}: {message}" if path else message)


def _parse_level(value: Any, path: str) -> LevelRange:
    if isinstance(value, bool):
        _fail(path, f"expected int or range, got {_describe(value)}")
    if isinstance(value, int):
        if value < 0:
            _fail(path, f"level must be >= 0, got {value}")
        return LevelRange(value, value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*\.\.\s*(\d*)\s*", value)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2)) if m.group(2) else None
            if hi is not None and hi < lo:
                _fail(path, f"empty level range {value!r}")
            return LevelRange(lo, hi)
    if isinstance(value, dict) and set(value) <= {"min", "max"} and value:
        lo = _parse(int, value.get("min", 0), f"{path}.min")
        hi = _parse(int | None, value.get("max"), f"{path}.max")
        if lo < 0 or (hi is not None and hi < lo):
            _fail(path, f"invalid level range {_describe(value)}")
        return LevelRange(lo, hi)
    _fail(path, f"expected int or range, got {_describe(value)}")


def _parse(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is LevelRange:
        return _parse_level(value, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _parse(options[0], value, path)
        if all(dataclasses.is_dataclass(a) for a in options):  # the pass union
            return _parse_pass(value, path)
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
        return {_parse(key_tp, k, path): _parse(val_tp, v, _key_path(path, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"expected int, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(path, f"expected a number, got {_describe(value)}")
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
        where = _key_path(path, unknown[0])
        _fail(where, f"unknown field (expected one of {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in value:
            kwargs[name] = _parse(hints[name], value[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(sub, "required field is missing")
    return cls(**kwargs)


def _parse_pass(value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        _fail(path, f"expected a mapping with a type, got {_describe(value)}")
    kind = value.get("type")
    if not isinstance(kind, str) or kind not in PASS_TYPES:
        _fail(f"{path}.type", f"expected one of {', '.join(PASS_TYPES)}, got {_describe(kind)}")
    return _parse_dataclass(PASS_TYPES[kind], value, path)


def _check_recipe(recipe: Recipe) -> None:
    def resolution(value: tuple[int, int], where: str) -> None:
        if value[0] <= 0 or value[1] <= 0:
            _fail(where, f"resolutions must be positive, got {list(value)}")

    resolution(recipe.base_resolution, "base_resolution")
    if recipe.vae_scale_factor < 1:
        _fail("vae_scale_factor", f"must be >= 1, got {recipe.vae_scale_factor}")
    if not recipe.target_resolutions:
        _fail("target_resolutions", "at least one target resolution is required")
    for i, res in enumerate(recipe.target_resolutions):
        resolution(res, f"target_resolutions[{i}]")
    if not recipe.passes:
        _fail("passes", "a recipe needs at least one pass")
    for i, p in enumerate(recipe.passes):
        where = f"passes[{i}]"
        for key, factor in getattr(p, "factors", {}).items():
            if factor <= 0:
                _fail(_key_path(f"{where}.factors", key), f"factor must be > 0, got {factor}")
        if isinstance(getattr(p, "factor", None), float) and p.factor <= 0:
            _fail(f"{where}.factor", f"factor must be > 0, got {p.factor}")
        if isinstance(p, (RedilatePass, NoiseDampedCFGPass)) and p.factor is None and not p.factors:
            _fail(f"{where}.factor", "give a factor or a factors table")
        schedule = p.schedule
        if schedule.steps < 1:
            _fail(f"{where}.schedule.steps", f"must be >= 1, got {schedule.steps}")
        if schedule.tau is not None and schedule.tau < 0:
            _fail(f"{where}.schedule.tau", f"must be >= 0, got {schedule.tau}")
        if isinstance(p, DispersePass):
            t = p.transform
            if t.small % 2 == 0 or t.large % 2 == 0 or t.large <= t.small:
                _fail(f"{where}.transform", f"need odd kernel sizes with large > small, got {t.small} -> {t.large}")
            if t.scale < 1 or t.eta <= 0 or t.input_size < 1:
                _fail(f"{where}.transform", "need scale >= 1, eta > 0 and input_size >= 1")
    s = recipe.sampling
    if s is not None:
        if not s.stages:
            _fail("sampling.stages", "at least one stage is required")
        for i, (a, b) in enumerate(zip(s.stages, s.stages[1:], strict=False)):
            if b[0] < a[0] or b[1] < a[1]:
                _fail(f"sampling.stages[{i + 1}]", f"stages must not shrink: {list(a)} -> {list(b)}")
        if s.steps < 1:
            _fail("sampling.steps", f"must be >= 1, got {s.steps}")
        if s.restart_step is not None and not 0 <= s.restart_step < s.steps:
            _fail("sampling.restart_step", f"must be in [0, {s.steps}), got {s.restart_step}")


def parse_recipe(document: Any) -> Recipe:
    """Validate a recipe document (the result of ``yaml.safe_load`` or ``json.load``)."""
    recipe = _parse_dataclass(Recipe, document, "")
    _check_recipe(recipe)
    return recipe


# --- back to data -----------------------------------------------------------------------------


def to_data(obj: Any) -> Any:
    """A recipe (or part) as plain JSON/YAML-able data; ``parse_recipe(to_data(r)) == r``."""
    if isinstance(obj, LevelRange):
        return obj.to_data()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        if hasattr(type(obj), "type") and isinstance(type(obj).type, str):
            out["type"] = type(obj).type
        for f in dataclasses.fields(obj):
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
