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
from typing import Any

from unet_surgery.core.schema import PassConfig
from unet_surgery.errors import RecipeError
from unet_surgery.graph.records import ConvRecord, UNetMap
from unet_surgery.passes.fouriscale import FouriScalePass
from unet_surgery.passes.fouriscale.guidance import FouriScaleGuidancePass
from unet_surgery.passes.freeu.builder import SETTINGS, freeu_pass
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


SDXL_BASE_SIZES: tuple[tuple[int, int], ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)
"""FouriScale's SDXL base sizes, (height, width) in pixels, in the order of the official
``assets/base_settings/sdxl.txt`` (aspect ratio h/w 0.25 to 4.0; the order breaks ties)."""


def table_base_size(target: tuple[int, int], table: tuple[tuple[int, int], ...] = SDXL_BASE_SIZES) -> tuple[int, int]:
    """The official ``find_smallest_padding_pair``: the base whose one multiple covers ``target`` with least padding.

    Only bases with ``ceil(h / bh) == ceil(w / bw)`` qualify; the first with the smallest
    ``(r * bh - h) + (r * bw - w)`` wins.
    """
    h, w = target
    best, found = math.inf, None
    for bh, bw in table:
        r = math.ceil(h / bh)
        if r == math.ceil(w / bw) and (padding := (r * bh - h) + (r * bw - w)) < best:
            best, found = padding, (bh, bw)
    if found is None:
        raise RecipeError(f"no base size of FouriScale's table covers {target[1]}x{target[0]} with one multiple")
    return found


def fouriscale_recipe(
    unet_map: UNetMap,
    base: int | tuple[int, int],
    target: int | tuple[int, int],
    *,
    name: str | None = None,
    aspect_table: bool | None = None,
    guidance: bool | None = None,
    amp_guidance: bool = False,
    model: str | None = None,
    freeu: bool | None = None,
) -> Recipe:
    """The official FouriScale settings for ``unet_map`` from ``base`` to ``target`` (pixels, int or (height, width)).

    As the official scripts run it: FouriScale's guidance branch on (``fouriscale_guidance``),
    ``--amp_guidance`` off, and on SDXL-like maps (three levels) at a 1024x1024 base the base
    size FouriScale measures against picked from its aspect-ratio table (a pass option,
    ``base_size``; the recipe's ``base_resolution`` stays the model's).

    Args:
        unet_map: the map of the UNet the recipe is for.
        base: training size in pixels: an int (square) or (height, width).
        target: size to generate at in pixels: an int (square) or (height, width).
        name: recipe name (default ``fouriscale-{model class}-{width}x{height}``).
        aspect_table: pick the base FouriScale measures against from :data:`SDXL_BASE_SIZES`
            (None: on for three-level maps at a 1024x1024 base, as ``text2image_xl.py``).
        guidance: add FouriScale's guidance branch (official: always on; None: on when the map
            has spatial self-attention, whose queries and keys the branch borrows).
        amp_guidance: amplify the guidance scale by 2.4 before ``start_step`` (official ``--amp_guidance``).
        model: the family to record in the recipe (``sd15``, ``sd21``, ``sdxl``); it picks FreeU's factors.
        freeu: add FreeU with the family's published factors (None: on when ``model`` has them, as
            the official scripts switch it on unless ``--disable_freeu``).
    """
    (bh, bw), (th, tw) = size_pair(base, "base"), size_pair(target, "target")
    xl = unet_map.num_levels == 3
    if aspect_table is None:
        aspect_table = xl and (bh, bw) == (1024, 1024)
    if aspect_table and (bh, bw) != (1024, 1024):
        raise RecipeError(f"FouriScale's aspect-ratio table is for a 1024x1024 base, not {bw}x{bh}")
    ref = table_base_size((th, tw)) if aspect_table else (bh, bw)
    dilation = max(math.ceil(th / ref[0]), math.ceil(tw / ref[1]))
    start, stop = (10, 30) if not xl and dilation <= 3 else (20, 35)
    common: dict[str, Any] = dict(start_step=float(start), stop_step=float(stop), steps=50, progressive=True,
                                  mask_value=0.6 if xl else 0.0)
    if ref != (bh, bw):
        common["base_size"] = ref
    if xl:  # FouriConvProcessor_XL's guidance branch
        common.update(weak_dilation_divisor=1.5, weak_scale_floor=False)
    filtered, upsamplers = fouriscale_layers(unet_map)
    passes: list[PassConfig] = [FouriScalePass(select=Selector(paths=tuple(filtered)), **common)]
    if upsamplers:
        passes.append(FouriScalePass(select=Selector(paths=tuple(upsamplers)), filter=False, **common))
    if guidance is None:
        guidance = any(a.kind == "self" and a.axis == "spatial" for a in unet_map.attentions)
    if guidance:
        passes.append(FouriScaleGuidancePass(amp_guidance=amp_guidance, amp_stop_step=float(start)))
    if freeu is None:
        freeu = model in SETTINGS
    if freeu:
        if model not in SETTINGS:
            raise RecipeError(f"freeu: no published FreeU factors for model {model!r} (known: {', '.join(SETTINGS)})")
        passes.append(freeu_pass(unet_map, **SETTINGS[model]))  # type: ignore[arg-type]
    extras = [w for w, on in (("guidance", guidance), ("amplified guidance", amp_guidance), ("FreeU", freeu)) if on]
    return checked(Recipe(
        name=name or f"fouriscale-{unet_map.model_class}-{tw}x{th}",
        description=f"FouriScale (dilation {dilation} with low-pass filtering"
        + "".join(f", {w}" for w in extras)
        + f"), {bw}x{bh} -> {tw}x{th} (WxH)"
        + (f", measured against {ref[1]}x{ref[0]}." if ref != (bh, bw) else "."),
        source="LeonHLJ/FouriScale official code (layer_settings, base_settings, configs, model.py, text2image*.py)",
        base_resolution=(bh, bw),
        target_resolutions=((th, tw),),
        passes=tuple(passes),
        signature=map_signature(unet_map),
        model=model,
    ))
