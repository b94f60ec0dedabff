"""The recipe data types every layer shares: pass configs, selectors, schedules, recipes.

Below both :mod:`unet_surgery.passes` (which defines the concrete pass configs) and
:mod:`unet_surgery.recipes` (which parses documents into these types and builds recipes), so
imports go one way: ``recipes -> passes -> core``.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from unet_surgery.errors import RecipeError
from unet_surgery.ops.dispersion import TransformParams
from unet_surgery.ops.schedules import ScheduleSpec as ScheduleSpec

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


OnMissing = Literal["error", "warn"]

TransformSpec = TransformParams
"""The ``transform`` section of a disperse pass: :class:`~unet_surgery.ops.TransformParams`."""

class PassConfig:
    """Base of every pass config: a frozen dataclass with a ``type`` and a ``select``.

    The concrete configs live beside their handlers in :mod:`unet_surgery.passes` (one file
    per pass) and are registered there; the parser finds them by ``type``.
    """

    type: ClassVar[str]

    def validate(self, where: str) -> None:
        """Checks across fields that the type hints cannot express; raise via :func:`fail`."""


RECIPE_VERSION = 1
SUPPORTED_RECIPE_VERSIONS = (1,)


@dataclass(frozen=True)
class SamplingSpec:
    """The self-cascade sampler's settings (FreeScale)."""

    stages: tuple[tuple[int, int], ...] = doc("resolutions (height, width) in pixels, first = plain generation")
    steps: int = doc("denoising steps per stage", default=50)
    restart_step: int | None = doc("step each later stage restarts from (default int(0.3 * steps))", default=None)
    cosine_scale: float = doc("exponent of the cosine blend of forward noise (<= 1 advised for 8K)", default=2.0)
    cosine_scale_bg: float = doc("exponent where the detail mask is 0 (region-aware control)", default=1.0)


@dataclass(frozen=True)
class PatchSpec:
    """Patch-wise denoising (MultiDiffusion): overlapping views at the model's native size."""

    window: int | None = doc("view size in latent pixels (default: base_resolution / vae_scale_factor)", default=None)
    stride: int | None = doc("distance between views in latent pixels (default: window // 2)", default=None)
    view_batch_size: int = doc("views per UNet call (peak memory grows with it)", default=1)


@dataclass(frozen=True)
class DemoFusionSpec:
    """DemoFusion (Du et al. 2024), with the official pipeline's defaults."""

    steps: int = doc("denoising steps per phase (num_inference_steps)", default=50)
    stride: int | None = doc("local patch stride in latent pixels (default: window // 2, 64 for SDXL)", default=None)
    view_batch_size: int = doc("views per UNet call", default=16)
    cosine_scale_1: float = doc("skip residual: weight of the noise-inverted upsample, cos^cosine_scale_1", default=3.0)
    cosine_scale_2: float = doc("dilated sampling's share against local patches, cos^cosine_scale_2", default=1.0)
    cosine_scale_3: float = doc("Gaussian filter's sigma schedule, 0.99 * cos^cosine_scale_3 + 0.01", default=1.0)
    sigma: float = doc("Gaussian filter's sigma before its schedule", default=1.0)
    jitter: bool = doc("random jitter of the local patches (official: on)", default=True)
    multi_decoder: bool = doc("decode in padded tiles (DemoFusion's multi-decoder)", default=True)


@dataclass(frozen=True)
class Recipe:
    """A named, ordered list of passes plus the resolutions it was made for."""

    name: str = doc("identifier, e.g. scalecrafter-sd15-2048x2048")
    base_resolution: tuple[int, int] = doc("training resolution [height, width] in pixels the recipe was made for")
    target_resolutions: tuple[tuple[int, int], ...] = doc("resolutions [height, width] the recipe targets")
    passes: tuple[PassConfig, ...] = doc("rewrites, applied in order")
    description: str = doc("what the recipe does", default="")
    source: str | None = doc("where the settings come from", default=None)
    model: str | None = doc(
        "model family the recipe was made for: a preset name (sd15, sd21, sdxl, svd...) or a toy name", default=None
    )
    signature: str | None = doc(
        "structure of the UNet it was made for, as `inspect` prints it (e.g. '4 levels, attention 0-3, image'); "
        "apply refuses a UNet of another structure, family or stated base size unless forced",
        default=None,
    )
    vae_scale_factor: int = doc("pixels per latent pixel (8 for SD-style VAEs, 1 for pixel-space models)", default=8)
    sampling: SamplingSpec | None = doc("self-cascade sampler settings", default=None)
    patches: PatchSpec | None = doc("patch-wise denoising of every UNet call (MultiDiffusion)", default=None)
    demofusion: DemoFusionSpec | None = doc("DemoFusion sampler settings (instead of sampling)", default=None)
    version: int = doc("recipe format version; a file without one is read as version 1", default=RECIPE_VERSION)


def fail(path: str, message: str) -> typing.NoReturn:
    """Raise :class:`RecipeError` for the field at ``path``."""
    raise RecipeError(f"{path}: {message}" if path else message)


def key_path(path: str, key: Any) -> str:
    """``path.key`` for names and module paths, ``path['odd key']`` for anything else."""
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][\w.\-*]*", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"
