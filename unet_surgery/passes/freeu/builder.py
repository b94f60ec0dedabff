"""FreeU recipes for any mapped UNet: the selection comes from the map, never from names.

FreeU acts at the two lowest-resolution up levels that merge skip connections (diffusers'
``resolution_idx`` 0 and 1). Those levels are read from the map's skip records, so the same
call serves SD1.5 (levels 3 and 2), SDXL (2 and 1), the LDM layouts and the toy UNets.
"""

from __future__ import annotations

from typing import Literal

from unet_surgery.errors import RecipeError
from unet_surgery.graph.records import UNetMap
from unet_surgery.passes.freeu import FreeUPass, stage_levels
from unet_surgery.recipes.auto import size_pair
from unet_surgery.recipes.fit import map_signature
from unet_surgery.recipes.schema import LevelRange, Recipe, ScheduleSpec, Selector, checked

SETTINGS: dict[str, dict[str, float]] = {
    # ScaleCrafter's official scripts switch FreeU on with these (reference notes).
    "sd15": {"b1": 1.2, "b2": 1.4, "s1": 0.9, "s2": 0.2},
    "sd21": {"b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2},
    # FreeScale's official SDXL scripts (reference notes), also diffusers' FreeU guide.
    "sdxl": {"b1": 1.1, "b2": 1.2, "s1": 0.6, "s2": 0.4},
}
"""Published FreeU factors per backbone (the shipped ``freeu-*`` recipes)."""

V2_SETTINGS: dict[str, dict[str, float]] = {
    # The FreeU README (ChenyangSi/FreeU @ 3676d36, "Parameters"), beside its v2 code.
    "sd15": {"b1": 1.5, "b2": 1.6, "s1": 0.9, "s2": 0.2},
    "sd21": {"b1": 1.4, "b2": 1.6, "s1": 0.9, "s2": 0.2},
    "sdxl": {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2},
}
"""FreeU v2's published factors per backbone, used with ``backbone_scaling: structure`` (the ``freeu-v2-*`` recipes)."""


def freeu_pass(
    unet_map: UNetMap,
    *,
    b1: float | None = None,
    b2: float | None = None,
    s1: float | None = None,
    s2: float | None = None,
    threshold: int | None = None,
    schedule: ScheduleSpec | None = None,
    backbone_scaling: Literal["constant", "structure"] | None = None,
) -> FreeUPass:
    """A ``freeu`` pass selecting, by level, the skip merges of FreeU's two stages in ``unet_map``.

    A factor left out (None) is :class:`FreeUPass`'s default, the one copy of FreeU's defaults.

    Args:
        unet_map: the map of the UNet the pass is for.
        b1: backbone scale of the lowest-resolution up stage (None: the default).
        b2: backbone scale of the next up stage.
        s1: skip scale of the lowest-resolution up stage.
        s2: skip scale of the next up stage.
        threshold: radius of the low-frequency box the skip scale acts on.
        schedule: when the pass acts (default: every step).
        backbone_scaling: ``constant`` (FreeU v1, diffusers) or ``structure`` (FreeU v2); None: the default.
    """
    levels = stage_levels(unet_map)
    if not levels:
        raise RecipeError(f"{unet_map.model_class} has no skip concatenation: FreeU has nothing to act on")
    given = {k: v for k, v in {"b1": b1, "b2": b2, "s1": s1, "s2": s2, "threshold": threshold,
                               "backbone_scaling": backbone_scaling}.items() if v is not None}
    return FreeUPass(
        select=Selector(stage=("up",), level=LevelRange(min(levels), max(levels))),
        schedule=schedule or ScheduleSpec(),
        **given,  # type: ignore[arg-type]
    )


def freeu_recipe(
    unet_map: UNetMap,
    *,
    base: int | tuple[int, int],
    target: int | tuple[int, int] | None = None,
    b1: float | None = None,
    b2: float | None = None,
    s1: float | None = None,
    s2: float | None = None,
    threshold: int | None = None,
    schedule: ScheduleSpec | None = None,
    backbone_scaling: Literal["constant", "structure"] | None = None,
    name: str | None = None,
    model: str | None = None,
    vae_scale_factor: int = 8,
) -> Recipe:
    """A one-pass FreeU recipe for ``unet_map`` trained at ``base``, for use at ``target``.

    Sizes are pixels, an int or (height, width); ``target`` defaults to ``base`` (FreeU is a
    quality fix at any size, not a resolution method); factors left out (None) are
    :class:`FreeUPass`'s defaults.

    Args:
        unet_map: the map of the UNet the recipe is for.
        base: training size in pixels: an int (square) or (height, width).
        target: size it is used at (default ``base``).
        b1: backbone scale of the lowest-resolution up stage.
        b2: backbone scale of the next up stage.
        s1: skip scale (low-frequency damping) of the lowest-resolution up stage.
        s2: skip scale of the next up stage.
        threshold: radius of the low-frequency box the skip scale acts on (FreeU: 1; None: the default).
        schedule: when the pass acts (default: every step).
        backbone_scaling: ``constant`` (FreeU v1, diffusers) or ``structure`` (FreeU v2, with
            :data:`V2_SETTINGS`); None: the default.
        name: recipe name (default ``freeu-{model}``).
        model: the family to record in the recipe (e.g. ``sd15``).
        vae_scale_factor: pixels per latent pixel.
    """
    size = size_pair(base, "base")
    used = size if target is None else size_pair(target, "target")
    config = freeu_pass(unet_map, b1=b1, b2=b2, s1=s1, s2=s2, threshold=threshold, schedule=schedule,
                        backbone_scaling=backbone_scaling)
    return checked(Recipe(
        name=name or f"freeu-{(model or unet_map.model_class).lower()}",
        base_resolution=size,
        target_resolutions=(used,),
        signature=map_signature(unet_map),
        passes=(config,),
        description=f"FreeU{' v2' if config.backbone_scaling == 'structure' else ''} (b1={config.b1:g}, "
        f"b2={config.b2:g}, s1={config.s1:g}, s2={config.s2:g}) at the two lowest-resolution up levels",
        model=model,
        vae_scale_factor=vae_scale_factor,
    ))
