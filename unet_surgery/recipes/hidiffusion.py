"""HiDiffusion recipes for any mapped UNet, with the official switching thresholds.

The official code (megvii-research/HiDiffusion, ``hidiffusion.py``) names modules per model;
here the same choice is made from the map, so it carries over to other layouts:

* MSW-MSA on every spatial self-attention of the top level that has attention (SD1.5:
  level 0; SDXL, whose level 0 has none: level 1);
* RAU-Net, SD1.5-like maps (attention at level 0): the downsampler of level 0 switched by
  T1, the pooling pair of level 1 by T2; SDXL-like maps: the pooling pair of the top
  attention level by T1, its downsampler by T2;
* thresholds from ``switching_threshold_ratio_dict``: the "2x" row while either latent side
  is below 4x the base latent (SD1.5: ``ori_H < 256``, SDXL: ``< 512``), else the "4x" row;
  SDXL at 2x uses the aggressive form (pooling on ``[int(8/50 n), int(0.4 n))``, the
  downsampler before ``int(8/50 n)``). A pair whose threshold is 0 never acts and is left out.

``variant`` selects the official code's other settings (it picks them from the pipeline: the
model name, ``'inpainting'`` or ``'playground'`` in it, a ``controlnet`` attribute):

* ``"sdxl-turbo"`` (``sdxl_turbo_hidiffusion_key``): the pooling pair alone, ``T1_ratio`` 0.5
  (``'sdxl_turbo_1024'``) at every size, never aggressive; SDXL-like maps only.
* ``"inpainting"`` / ``"playground"`` (``inpainting_is_aggressive_raunet`` /
  ``playground_is_aggressive_raunet`` False): SDXL below 4x per side without the aggressive
  form: the pooling pair on ``[0, int(0.4 n))``, the downsampler pair (T2 0) left out.
* ``"controlnet"`` (``text_to_img_controlnet_switching_threshold_ratio_dict``): SDXL below 4x
  per side with ``T1_ratio`` 0.5 (aggressive form). Only the thresholds: bringing ControlNet
  residuals to the RAU-Net sizes is the pipeline's business.

The official code reads these flags on its SDXL branch only: on SD1.5-like maps every variant
but ``"sdxl-turbo"`` is the standard setting, and at 4x per side they all are.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from unet_surgery.errors import SelectionError
from unet_surgery.graph.records import UNetMap
from unet_surgery.passes.rau_net import transformers
from unet_surgery.recipes.auto import size_pair
from unet_surgery.recipes.fit import map_signature
from unet_surgery.recipes.schema import Recipe, parse_recipe

# switching_threshold_ratio_dict of the official code: (T1_ratio, T2_ratio).
THRESHOLDS = {
    ("sd15", "2x"): (0.4, 0.0),
    ("sd15", "4x"): (0.7, 0.3),
    ("sdxl", "2x"): (0.4, 0.0),
    ("sdxl", "4x"): (0.7, 0.3),
}
AGGRESSIVE_START = 8 / 50
"""``aggressive_step / 50``: SDXL's aggressive RAU-Net hands over from the downsampler here."""
TURBO_T1 = 0.5
"""``switching_threshold_ratio_dict['sdxl_turbo_1024']['T1_ratio']``: SDXL-Turbo's pooling pair."""
TURBO_STEPS = 4
"""The step count of the published SDXL-Turbo example (``num_inference_steps=4``): the steps a
RAU-Net pass assumes when the sampler's timestep list is unknown."""
CONTROLNET_THRESHOLDS = (0.5, 0.0)
"""``text_to_img_controlnet_switching_threshold_ratio_dict['sdxl_2048']``: (T1_ratio, T2_ratio)."""
Variant = Literal["standard", "sdxl-turbo", "inpainting", "playground", "controlnet"]
VARIANTS: tuple[str, ...] = get_args(Variant)
NOT_AGGRESSIVE: frozenset[str] = frozenset({"inpainting", "playground"})
"""``inpainting_is_aggressive_raunet`` and ``playground_is_aggressive_raunet`` are False."""


def top_attention_level(unet_map: UNetMap) -> int:
    """The highest-resolution level with spatial self-attention."""
    levels = [a.level for a in unet_map.attentions if a.kind == "self" and a.axis == "spatial" and a.level is not None]
    if not levels:
        raise SelectionError(f"{unet_map.model_class} has no spatial self-attention: HiDiffusion needs one")
    return min(levels)


def hidiffusion_recipe(
    unet_map: UNetMap,
    base: int | tuple[int, int],
    target: int | tuple[int, int],
    *,
    rau_net: bool = True,
    msw_msa: bool = True,
    variant: Variant = "standard",
    name: str | None = None,
) -> Recipe:
    """RAU-Net and MSW-MSA as the official code sets them up, selected from ``unet_map``.

    ``base`` and ``target`` are pixels, an int or (height, width).

    Args:
        unet_map: the map of the UNet the recipe is for.
        base: training size in pixels: an int (square) or (height, width).
        target: size to generate at in pixels: an int (square) or (height, width); below 4x per side the
            official 2x thresholds apply, else the 4x ones.
        rau_net: include RAU-Net (resolution-aware downsampling and upsampling).
        msw_msa: include MSW-MSA (windowed self-attention at the top attention level).
        variant: the official setting: ``"standard"``, ``"sdxl-turbo"``, ``"inpainting"``,
            ``"playground"`` or ``"controlnet"`` (module docstring).
        name: recipe name (default ``hidiffusion-{width}x{height}``, ``hidiffusion-{variant}-...``
            for a variant).
    """
    if variant not in VARIANTS:
        raise SelectionError(f"hidiffusion_recipe: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    base, target = size_pair(base, "base"), size_pair(target, "target")
    top = top_attention_level(unet_map)
    strided = sorted({c.level for c in unet_map.convs if c.stage == "down" and c.level is not None
                      and c.axis == "spatial" and max(c.spatial_stride) == 2})
    # SD1.5/2.1 have attention at level 0; SDXL has a downsampler and two down transformers (so
    # one can pool between them) at its top attention level. A map with neither (attention only
    # deep down, one transformer per block, like the toys) is treated SD1.5-style from its first
    # downsampler: our extension, the official code knows only the published layouts.
    top_downs = transformers([a for a in unet_map.attentions
                              if a.kind == "self" and a.axis == "spatial" and a.stage == "down" and a.level == top])
    family = "sd15" if top == 0 or top not in strided or len(top_downs) < 2 else "sdxl"
    conv_level = top if family == "sdxl" or top == 0 else (strided[0] if strided else top)
    size = "2x" if target[0] < 4 * base[0] or target[1] < 4 * base[1] else "4x"
    if variant == "sdxl-turbo" and family != "sdxl":
        raise SelectionError(
            f"hidiffusion_recipe: the sdxl-turbo setting pools at an SDXL-like top attention level (a "
            f"downsampler and two down transformers there); {unet_map.model_class}'s map is SD1.5-like"
        )
    t1, t2 = THRESHOLDS[(family, size)]
    aggressive = family == "sdxl" and size == "2x" and variant not in NOT_AGGRESSIVE
    if family == "sdxl" and size == "2x" and variant == "controlnet":
        t1, t2 = CONTROLNET_THRESHOLDS
    if variant == "sdxl-turbo":
        t1, t2, aggressive = TURBO_T1, 0.0, False
    conv = {"op": ["conv2d"], "stride": [2], "stage": ["down"]}
    attn = {"op": ["attention"], "kind": ["self"], "axis": ["spatial"]}
    attention_levels = {a.level for a in unet_map.attentions if a.kind == "self" and a.axis == "spatial"}
    passes: list[dict[str, Any]] = []
    if rau_net and family == "sd15":
        passes.append({"type": "rau_net", "select": {**conv, "level": conv_level}, "switch": t1})
        if t2 > 0 and conv_level + 1 in attention_levels:
            passes.append({"type": "rau_net", "select": {**attn, "stage": ["down"], "level": conv_level + 1},
                           "switch": t2})
    elif rau_net:
        pool: dict[str, Any] = {"type": "rau_net", "select": {**attn, "stage": ["down"], "level": top}, "switch": t1}
        if aggressive:  # is_aggressive_raunet: the downsampler first, then pooling
            pool["start"] = AGGRESSIVE_START
            passes += [pool, {"type": "rau_net", "select": {**conv, "level": top}, "switch": AGGRESSIVE_START}]
        else:
            passes.append(pool)
            if t2 > 0:
                passes.append({"type": "rau_net", "select": {**conv, "level": top}, "switch": t2})
    if msw_msa:
        passes.append({"type": "msw_msa", "select": {**attn, "level": top}})
    if not passes:
        raise SelectionError("hidiffusion_recipe: nothing to do with rau_net=False and msw_msa=False")
    setting = "" if variant == "standard" else f"{variant} setting, "
    if variant == "sdxl-turbo":
        for p in passes:
            if p["type"] == "rau_net":
                p["steps"] = TURBO_STEPS
    prefix = "hidiffusion" if variant == "standard" else f"hidiffusion-{variant}"
    return parse_recipe(
        {
            "name": name or f"{prefix}-{target[1]}x{target[0]}",
            "description": f"HiDiffusion ({setting}{family}-style map, {size} thresholds) from {base[1]}x{base[0]} to "
            f"{target[1]}x{target[0]} (WxH).",
            "source": "megvii-research/HiDiffusion hidiffusion.py, selected from the map",
            "base_resolution": list(base),
            "target_resolutions": [list(target)],
            "passes": passes,
            "signature": map_signature(unet_map),
        }
    )
