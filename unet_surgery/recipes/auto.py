"""Automatic recipes: derived from a UNet map and two resolutions, with no per-model tuning.

Two policies:

``policy="auto"`` (the default) is the one that keeps objects whole on a model nobody tuned it
for (see docs/analysis.md for the measurements behind it). It generates at the base size first
and climbs to the target by FreeScale's self-cascade, at most 2x per side a stage, and in every
later stage re-dilates only the deepest level (down and mid convs) and the downsampler into it,
by the stage's own ratio, during the first 70% of the steps (FreeScale's restrained dilation,
stated in map terms). It is built by :func:`cascade_recipe`.

``policy="scalecrafter"`` reproduces ScaleCrafter's published SD1.5 tables (built by
:func:`scalecrafter_recipe`). The rule is modelled on those tables and written in map terms
(level, stage, kernel, axis) rather than layer names, so it applies unchanged to any UNet the
mapper understands, LDM layouts included:

* scale ``s`` = the larger of target/base over height and width (the 2048x1024 tables use the
  larger side's factor);
* spatial k x k convolutions (k > 1) whose input is at level >= 1 are re-dilated; level 0,
  the full-resolution level, is left alone, as in every published SD1.5 table;
* for ``s < 3`` every such level uses ``s``; for ``s >= 3`` the factor grows with depth,
  ``min(s, level + 1)`` (2, 3, 4 for SD1.5 at 4x);
* an upsampler's conv (the first up-path conv after a 2x upsampling, found in the map as an
  up-stage conv one level finer than the conv before it) takes the factor of the level it
  upsamples from, as in the published tables;
* schedule: up to 2.5x, re-dilate for the first 30 of 50 steps at a fixed factor; above,
  the first 35 steps with the progressive rule (the published settings).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

from unet_surgery.core.limits import MAX_SIDE
from unet_surgery.errors import RecipeError
from unet_surgery.graph.records import ConvRecord, UNetMap
from unet_surgery.io import shown_value
from unet_surgery.ops.schedules import ScheduleSpec
from unet_surgery.passes import RedilatePass, ScaleFusionPass
from unet_surgery.recipes.fit import map_signature
from unet_surgery.recipes.schema import LevelRange, Recipe, SamplingSpec, Selector

Policy = Literal["auto", "scalecrafter", "demofusion", "multidiffusion"]
POLICIES: tuple[str, ...] = ("auto", "scalecrafter", "demofusion", "multidiffusion")


def size_pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """``(height, width)`` from a size or a pair; every recipe builder takes sizes this way."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in pair):
        raise RecipeError(f"{name}: expected a positive int or (height, width), got {shown_value(value)}")
    if max(pair) > MAX_SIDE:
        raise RecipeError(f"{name}: a side over {MAX_SIDE} pixels ({shown_value(value)})")
    return pair[0], pair[1]


def auto_factors(scale: float, levels: range) -> dict[int, float]:
    """Factor per level for a scale ``s`` (levels without re-dilation are omitted)."""
    factors = {}
    for level in levels:
        if level < 1:
            continue
        f = scale if scale < 3 else min(scale, level + 1)
        if f > 1:
            factors[level] = float(f)
    return factors


def _scale(base_hw: tuple[int, int], target_hw: tuple[int, int]) -> float:
    scale = max(target_hw[0] / base_hw[0], target_hw[1] / base_hw[1])
    if scale <= 1:
        raise RecipeError(
            f"target {target_hw[0]}x{target_hw[1]} is not larger than base {base_hw[0]}x{base_hw[1]}: nothing to re-dilate"
        )
    return round(scale, 3)


def _kxk_ops(unet_map: UNetMap) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The spatial conv op names and the k > 1 kernel sizes the map holds."""
    ops = tuple(sorted({c.op for c in unet_map.convs if c.op in ("conv2d", "conv3d")}))
    kernels = tuple(sorted({k for c in unet_map.convs for k in c.spatial_kernel if k > 1}))
    return ops, kernels


def auto_recipe(
    unet_map: UNetMap,
    *,
    base: int | tuple[int, int],
    target: int | tuple[int, int],
    vae_scale_factor: int = 8,
    name: str | None = None,
    policy: Policy = "auto",
    steps: int = 50,
) -> Recipe:
    """A recipe for ``unet_map`` going from ``base`` to ``target`` (pixels, int or (height, width)).

    The recipe carries the map's signature, so applying it to another architecture is refused.

    ``policy="auto"``: self-cascade with restrained deepest-level dilation
    (:func:`cascade_recipe`); ``policy="scalecrafter"``: ScaleCrafter's re-dilation tables
    (:func:`scalecrafter_recipe`); ``policy="demofusion"``: DemoFusion's sampler
    (:func:`~unet_surgery.recipes.demofusion.demofusion_recipe`); ``policy="multidiffusion"``:
    patch-wise denoising alone (:func:`~unet_surgery.recipes.multidiffusion.multidiffusion_recipe`).
    ``steps`` is the cascade's steps per stage (samplers may override it).

    Args:
        unet_map: the map of the UNet the recipe is for (:func:`~unet_surgery.map_unet`).
        base: training size in pixels: an int (square) or (height, width).
        target: size to generate at in pixels: an int (square) or (height, width).
        vae_scale_factor: pixels per latent pixel (8 for SD-style VAEs, 1 for pixel-space models).
        name: recipe name (default ``auto-{model class}-{width}x{height}``).
        policy: ``"auto"``, ``"scalecrafter"``, ``"demofusion"`` or ``"multidiffusion"``.
        steps: the cascade's denoising steps per stage (``policy="auto"``), DemoFusion's per phase.
    """
    if policy == "auto":
        return cascade_recipe(unet_map, base=base, target=target, vae_scale_factor=vae_scale_factor,
                              name=name, steps=steps)
    if policy == "scalecrafter":
        return scalecrafter_recipe(unet_map, base=base, target=target,
                                   vae_scale_factor=vae_scale_factor, name=name)
    if policy == "demofusion":  # a sampler, no UNet rewrite: the map is not read
        from unet_surgery.recipes.demofusion import demofusion_recipe

        return demofusion_recipe(size_pair(base, "base"), size_pair(target, "target"),
                                 vae_scale_factor=vae_scale_factor, name=name, steps=steps)
    if policy == "multidiffusion":  # a sampler too
        from unet_surgery.recipes.multidiffusion import multidiffusion_recipe

        return multidiffusion_recipe(size_pair(base, "base"), size_pair(target, "target"),
                                     vae_scale_factor=vae_scale_factor, name=name)
    raise RecipeError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")


def cascade_stages(
    base: tuple[int, int], target: tuple[int, int], multiple: int
) -> tuple[tuple[int, int], ...]:
    """Stage sizes from the base area up to ``target``, at most 2x per side a stage.

    With ``r = sqrt(target area / base area)`` and ``n = ceil(log2(r))`` stages above the first,
    stage ``k`` is ``target / r ** ((n - k) / n)``: the first has the base's area and the
    target's aspect ratio, and every stage grows by the same factor ``r ** (1 / n) <= 2``. Sides
    are rounded to ``multiple`` (at least ``multiple``).
    """
    ratio = math.sqrt(target[0] * target[1] / (base[0] * base[1]))
    n = max(1, math.ceil(math.log2(ratio) - 1e-9))

    def snap(v: float) -> int:
        return max(multiple, round(v / multiple) * multiple)

    stages = [(snap(target[0] / ratio ** ((n - k) / n)), snap(target[1] / ratio ** ((n - k) / n)))
              for k in range(n)]
    stages.append(tuple(target))  # type: ignore[arg-type]
    out: list[tuple[int, int]] = []
    for st in stages:  # snapping can repeat a size for tiny models; keep stages strictly growing
        if not out or st[0] * st[1] > out[-1][0] * out[-1][1]:
            out.append(st)
    return tuple(out)


def restrained_dilation_selectors(unet_map: UNetMap) -> list[Selector]:
    """FreeScale's restrained dilation in map terms: the deepest level's down and mid k x k
    convs, and the strided conv that downsamples into that level. Up blocks are never dilated.

    On SDXL this selects exactly FreeScale's published layers (``down_blocks.1.downsamplers.0``,
    ``down_blocks.2`` resnets, ``mid_block`` resnets)."""
    deepest = unet_map.num_levels - 1
    if deepest < 1:
        raise RecipeError(f"{unet_map.model_class} has a single level: there is no deeper level to dilate")
    ops, kernels = _kxk_ops(unet_map)
    spatial: tuple = ("spatial",)
    selectors = [
        Selector(op=ops, kernel=kernels, stride=(1,), stage=("down", "mid"),  # type: ignore[arg-type]
                 level=LevelRange(deepest, None), axis=spatial)
    ]
    downsamplers = [
        c for c in unet_map.convs
        if isinstance(c, ConvRecord) and c.level == deepest - 1 and max(c.spatial_stride) > 1
        and c.axis == "spatial" and max(c.spatial_kernel) > 1
    ]
    if downsamplers:
        selectors.append(Selector(op=ops, kernel=kernels, stride=(2,),  # type: ignore[arg-type]
                                  level=LevelRange(deepest - 1, deepest - 1), axis=spatial))
    return selectors


def cascade_recipe(
    unet_map: UNetMap,
    *,
    base: int | tuple[int, int],
    target: int | tuple[int, int],
    vae_scale_factor: int = 8,
    name: str | None = None,
    steps: int = 50,
    dilate_fraction: float = 0.7,
    cosine_scale: float = 2.0,
    scale_fusion: bool = False,
) -> Recipe:
    """The ``auto`` policy: self-cascade through :func:`cascade_stages` with restrained dilation.

    Each stage's factor is ``auto`` (the stage's latent size over the base's, floored), active
    for the first ``dilate_fraction`` of the steps (FreeScale: 35 of 50). ``scale_fusion`` adds
    FreeScale's scale-fusion self-attention (off by default: see docs/analysis.md).
    """
    base_hw, target_hw = size_pair(base, "base"), size_pair(target, "target")
    scale = _scale(base_hw, target_hw)
    # every stage must divide down to the deepest level's grid, in pixels
    multiple = vae_scale_factor * 2 ** max(0, unet_map.num_levels - 1)
    for side, v in zip(("height", "width"), target_hw, strict=True):
        if v % multiple:
            raise RecipeError(
                f"target {side} {v} is not a multiple of {multiple} (VAE factor {vae_scale_factor} x "
                f"2^{unet_map.num_levels - 1} downsamplings of {unet_map.model_class})"
            )
    stages = cascade_stages(base_hw, target_hw, multiple)
    schedule = ScheduleSpec(tau=round(dilate_fraction * 50, 6), steps=50)
    passes: list = [RedilatePass(select=sel, factor="auto", schedule=schedule)
                    for sel in restrained_dilation_selectors(unet_map)]
    if scale_fusion and any(a.kind == "self" and a.axis == "spatial" for a in unet_map.attentions):
        passes.append(ScaleFusionPass(select=Selector(op=("attention",), kind=("self",), axis=("spatial",))))
    h, w = target_hw
    return Recipe(
        name=name or f"auto-{unet_map.model_class}-{w}x{h}",
        description=(
            f"Automatic policy from {base_hw[1]}x{base_hw[0]} to {w}x{h} (WxH, scale {scale:g}): self-cascade "
            + " -> ".join(f"{b}x{a}" for a, b in stages)
            + f", restrained dilation of the deepest level (factor = stage ratio) for the first "
            f"{dilate_fraction:.0%} of each stage's steps"
            + (", scale-fusion self-attention" if any(isinstance(q, ScaleFusionPass) for q in passes) else "")
        ),
        source="unet_surgery.recipes.auto_recipe(policy='auto')",
        base_resolution=base_hw,
        target_resolutions=(target_hw,),
        passes=tuple(passes),
        vae_scale_factor=vae_scale_factor,
        signature=map_signature(unet_map),
        sampling=SamplingSpec(stages=stages, steps=steps, cosine_scale=cosine_scale),
    )


def scalecrafter_recipe(
    unet_map: UNetMap,
    *,
    base: int | tuple[int, int],
    target: int | tuple[int, int],
    vae_scale_factor: int = 8,
    name: str | None = None,
) -> Recipe:
    """ScaleCrafter-style re-dilation for ``unet_map`` from ``base`` to ``target`` (pixels)."""
    base_hw, target_hw = size_pair(base, "base"), size_pair(target, "target")
    scale = _scale(base_hw, target_hw)
    factors = auto_factors(scale, range(unet_map.num_levels))
    if not factors:
        raise RecipeError(f"{unet_map.model_class} has no level below full resolution to re-dilate")
    progressive = scale >= 3
    schedule = ScheduleSpec(tau=35 if progressive else 30, steps=50, progressive=progressive)
    conv_ops, kernels = _kxk_ops(unet_map)
    passes = []
    grouped: dict[float, list[int]] = {}
    for level, f in factors.items():
        grouped.setdefault(f, []).append(level)
    for f, levels in sorted(grouped.items()):
        lo, hi = min(levels), max(levels)
        selector = Selector(
            op=conv_ops,  # type: ignore[arg-type]
            axis=("spatial",),
            level=LevelRange(lo, None if hi == unet_map.num_levels - 1 else hi),
        )
        # k x k only: 1x1 convs have no receptive field to restore.
        selector = replace(selector, kernel=kernels)
        passes.append(RedilatePass(select=selector, factor=f, schedule=schedule))
    upsampler_factors = {}
    previous = None
    for conv in unet_map.convs:
        if (
            previous is not None
            and conv.stage == "up"
            and conv.axis == "spatial"
            and max(conv.spatial_kernel) > 1
            and conv.level is not None
            and previous.level is not None
            and conv.level < previous.level
            and previous.level in factors
        ):
            upsampler_factors[conv.path] = factors[previous.level]
        if conv.axis == "spatial" and max(conv.spatial_kernel) > 1:
            previous = conv
    if upsampler_factors:
        # Listed by path, and kept out of the level passes so each conv has one factor.
        passes = [
            RedilatePass(
                select=replace(p.select, exclude=Selector(paths=tuple(upsampler_factors))),
                factor=p.factor,
                schedule=p.schedule,
            )
            for p in passes
        ]
        passes.append(
            RedilatePass(select=Selector(paths=tuple(upsampler_factors)), factors=upsampler_factors, schedule=schedule)
        )
    h, w = target_hw
    return Recipe(
        name=name or f"auto-{unet_map.model_class}-{w}x{h}",
        description=(
            f"Automatic re-dilation from {base_hw[1]}x{base_hw[0]} to {w}x{h} (WxH, scale {scale:g}): "
            + ", ".join(f"level {lv}: {f:g}" for lv, f in factors.items())
        ),
        source="unet_surgery.recipes.auto_recipe(policy='scalecrafter')",
        base_resolution=base_hw,
        target_resolutions=(target_hw,),
        passes=tuple(passes),
        vae_scale_factor=vae_scale_factor,
        signature=map_signature(unet_map),
    )


__all__ = [
    "POLICIES",
    "auto_factors",
    "auto_recipe",
    "cascade_recipe",
    "cascade_stages",
    "restrained_dilation_selectors",
    "scalecrafter_recipe",
]
