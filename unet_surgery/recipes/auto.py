"""Automatic recipes: re-dilation levels and factors derived from a map and two resolutions.

The rule is modelled on ScaleCrafter's published SD1.5 tables and written in map terms
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

from dataclasses import replace

from unet_surgery.errors import RecipeError
from unet_surgery.graph.records import UNetMap
from unet_surgery.recipes.schema import LevelRange, Recipe, RedilatePass, ScheduleSpec, Selector


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in pair):
        raise RecipeError(f"{name}: expected a positive int or (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


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


def auto_recipe(
    unet_map: UNetMap,
    *,
    base: int | tuple[int, int],
    target: int | tuple[int, int],
    vae_scale_factor: int = 8,
    name: str | None = None,
) -> Recipe:
    """A re-dilation recipe for ``unet_map`` going from ``base`` to ``target`` (pixels, (h, w))."""
    base_hw, target_hw = _pair(base, "base"), _pair(target, "target")
    scale = max(target_hw[0] / base_hw[0], target_hw[1] / base_hw[1])
    if scale <= 1:
        raise RecipeError(
            f"target {target_hw[0]}x{target_hw[1]} is not larger than base {base_hw[0]}x{base_hw[1]}: nothing to re-dilate"
        )
    scale = round(scale, 3)
    factors = auto_factors(scale, range(unet_map.num_levels))
    if not factors:
        raise RecipeError(f"{unet_map.model_class} has no level below full resolution to re-dilate")
    progressive = scale >= 3
    schedule = ScheduleSpec(tau=35 if progressive else 30, steps=50, progressive=progressive)
    conv_ops = tuple(sorted({c.op for c in unet_map.convs if c.op in ("conv2d", "conv3d")}))
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
        kernels = sorted({k for c in unet_map.convs for k in c.spatial_kernel if k > 1})
        selector = replace(selector, kernel=tuple(kernels))
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
        name=name or f"auto-{unet_map.model_class}-{h}x{w}",
        description=(
            f"Automatic re-dilation from {base_hw[0]}x{base_hw[1]} to {h}x{w} (scale {scale:g}): "
            + ", ".join(f"level {lv}: {f:g}" for lv, f in factors.items())
        ),
        source="unet_surgery.recipes.auto_recipe",
        base_resolution=base_hw,
        target_resolutions=(target_hw,),
        passes=tuple(passes),
        vae_scale_factor=vae_scale_factor,
    )


__all__ = ["auto_factors", "auto_recipe"]
