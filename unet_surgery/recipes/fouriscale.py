"""``fouriscale_recipe``: the official FouriScale settings for any mapped UNet.

The official layer lists (``assets/layer_settings/{sd1.5,sd2.1,sdxl}.txt``), written in map
terms (level = the resolution level of a conv's input, 0 = full resolution):

* spatial k x k convs (k > 1) of resnets and samplers; never 1x1 convs (shortcuts,
  projections), never the UNet's first and last conv;
* down path and mid block: input level >= 2 (both backbones; on SD1.5 that takes in the
  downsampler of ``down_blocks.2``, on SDXL no downsampler);
* up path: input level >= 1 (SD1.5 ``up_blocks.0-2``, SDXL ``up_blocks.0-1``);
* upsampler convs (an up-path conv one level finer than the conv before it), dilated but
  not filtered: on SD1.5 every one (input level >= 0), on SDXL only the one at level >= 1.
  The two published lists disagree here; the rule follows each: for a 4-level map the SD1.5
  list, for a 3-level map the SDXL one, and for other depths the SD1.5 rule counted from the
  deepest level.

Settings of the official configs (``configs/*.yaml``): dilation ``max(ceil(h/h0), ceil(w/w0))``
(``auto``); SD1.5/2.1 up to dilation 3 (1024^2 and 1280^2): steps 10..30, else (2048x1024,
2048^2) 20..35; SDXL always 20..35; progressive in every config; mask floor 0 (SD1.5/2.1
processor) or 0.6 (SDXL processor).
"""

from __future__ import annotations

import math

from unet_surgery.errors import RecipeError
from unet_surgery.graph.records import ConvRecord, UNetMap
from unet_surgery.passes.fouriscale import FouriScalePass
from unet_surgery.recipes.auto import size_pair
from unet_surgery.recipes.fit import map_signature
from unet_surgery.recipes.schema import Recipe, Selector, checked

# num_levels -> (down/mid min level, up min level, upsampler min level)
_OFFICIAL_LEVELS = {4: (2, 1, 0), 3: (2, 1, 1)}


def _levels(num_levels: int) -> tuple[int, int, int]:
    if num_levels in _OFFICIAL_LEVELS:
        return _OFFICIAL_LEVELS[num_levels]
    deepest = num_levels - 1
    return max(deepest - 1, 0), max(deepest - 2, 0), max(deepest - 3, 0)


def _kxk(rec: ConvRecord) -> bool:
    return rec.axis == "spatial" and max(rec.spatial_kernel) > 1 and rec.level is not None


def fouriscale_layers(unet_map: UNetMap) -> tuple[list[str], list[str]]:
    """(filtered convs, upsampler convs) the official lists give for this map."""
    down_min, up_min, ups_min = _levels(unet_map.num_levels)
    convs = sorted((c for c in unet_map.convs if _kxk(c)), key=lambda c: c.order)
    if len(convs) < 3:
        raise RecipeError(f"{unet_map.model_class} has too few spatial convs for FouriScale")
    inner = convs[1:-1]  # not the first (conv_in) and last (conv_out) conv
    filtered: list[str] = []
    upsamplers: list[str] = []
    previous = convs[0]
    for conv in inner:
        level = conv.level or 0
        upsampler = conv.stage == "up" and previous.level is not None and level < previous.level
        if upsampler:
            if level >= ups_min:
                upsamplers.append(conv.path)
        elif (conv.stage in ("down", "mid") and level >= down_min) or (conv.stage == "up" and level >= up_min):
            filtered.append(conv.path)
        previous = conv
    return filtered, upsamplers


def fouriscale_recipe(
    unet_map: UNetMap, base: int | tuple[int, int], target: int | tuple[int, int], *, name: str | None = None
) -> Recipe:
    """The official FouriScale settings for ``unet_map`` from ``base`` to ``target`` (pixels, int or (height, width)).

    Args:
        unet_map: the map of the UNet the recipe is for.
        base: training size in pixels: an int (square) or (height, width).
        target: size to generate at in pixels: an int (square) or (height, width).
        name: recipe name (default ``fouriscale-{model class}-{width}x{height}``).
    """
    (bh, bw), (th, tw) = size_pair(base, "base"), size_pair(target, "target")
    dilation = max(math.ceil(th / bh), math.ceil(tw / bw))
    xl = unet_map.num_levels == 3
    start, stop = (10, 30) if not xl and dilation <= 3 else (20, 35)
    value = 0.6 if xl else 0.0
    filtered, upsamplers = fouriscale_layers(unet_map)
    common = dict(start_step=float(start), stop_step=float(stop), steps=50, progressive=True, mask_value=value)
    passes = [FouriScalePass(select=Selector(paths=tuple(filtered)), **common)]  # type: ignore[arg-type]
    if upsamplers:
        passes.append(FouriScalePass(select=Selector(paths=tuple(upsamplers)), filter=False, **common))  # type: ignore[arg-type]
    return checked(Recipe(
        name=name or f"fouriscale-{unet_map.model_class}-{tw}x{th}",
        description=f"FouriScale (dilation {dilation} with low-pass filtering), {bw}x{bh} -> {tw}x{th} (WxH).",
        source="LeonHLJ/FouriScale official code (layer_settings, configs, model.py)",
        base_resolution=(bh, bw),
        target_resolutions=((th, tw),),
        passes=tuple(passes),
        signature=map_signature(unet_map),
    ))
