"""Which UNet a recipe was made for, checked before it is applied.

A recipe's layer tables and factors only mean something on the architecture and at the base
size they were written for: an SDXL table applied to SD1.5 still finds layers of the same names
and changes them, silently wrong. So a recipe states its ``model`` (family), its
``signature`` (the structure of that UNet's map, :func:`map_signature`) and its
``base_resolution``. :func:`check_fit` refuses a UNet whose map, family or stated base size
differs, in one line naming both, unless the caller forces it.
"""

from __future__ import annotations

from typing import Any

from unet_surgery.errors import RecipeError
from unet_surgery.recipes.schema import Recipe

# Pipelines whose default size is not ``unet.config.sample_size`` x the VAE factor:
# diffusers' StableVideoDiffusionPipeline defaults to height=576, width=1024 whatever the config.
_DEFAULT_BASE = {"UNetSpatioTemporalConditionModel": (576, 1024)}


class RecipeMismatchError(RecipeError):
    """The recipe was made for another UNet: structure, family or base size (pass ``force=True``)."""


def _ranges(levels: list[int]) -> str:
    """``[0, 1, 2, 4]`` -> ``0-2,4``; ``none`` for no level."""
    runs: list[list[int]] = []
    for level in levels:
        if runs and runs[-1][1] == level - 1:
            runs[-1][1] = level
        else:
            runs.append([level, level])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def map_signature(unet_map: Any) -> str:
    """The structure a recipe depends on, read off a map: widths and head counts left out.

    Levels, the levels holding spatial attention and whether the UNet has temporal layers:
    equal for a full-size preset, its tiny test variant and its LDM layout, different between
    SD1.5/2.1 (``4 levels, attention 0-3, image``) and SDXL (``3 levels, attention 1-2, image``).

    Args:
        unet_map: the map to read.
    """
    spatial = sorted({a.level for a in unet_map.attentions if a.axis != "temporal" and a.level is not None})
    video = any(a.axis == "temporal" for a in unet_map.attentions) or any(
        c.axis == "temporal" for c in unet_map.convs
    )
    return f"{unet_map.num_levels} levels, attention {_ranges(spatial)}, {'video' if video else 'image'}"


def preset_signature(name: str) -> str | None:
    """The map signature of preset ``name`` (its shipped map), or None for a name that is no preset."""
    from unet_surgery.graph import map_unet
    from unet_surgery.presets import PRESETS, build_unet

    if name not in PRESETS:
        return None
    return map_signature(map_unet(build_unet(name, device="meta")))


def stated_base(model: Any, vae_scale_factor: int) -> tuple[int, int] | None:
    """(height, width) in pixels the model says it was trained at, or None if it does not say.

    A diffusers UNet says it with ``config.sample_size`` (latent pixels), which its pipeline
    uses as the default size; a model without a config says nothing.
    """
    if type(model).__name__ in _DEFAULT_BASE:
        return _DEFAULT_BASE[type(model).__name__]
    config = getattr(model, "config", None)
    sample = config.get("sample_size") if isinstance(config, dict) else getattr(config, "sample_size", None)
    if isinstance(sample, bool) or sample is None:
        return None
    if isinstance(sample, int):
        return (sample * vae_scale_factor, sample * vae_scale_factor)
    if isinstance(sample, (list, tuple)) and len(sample) == 2 and all(isinstance(s, int) for s in sample):
        return (sample[0] * vae_scale_factor, sample[1] * vae_scale_factor)
    return None


def size_text(hw: tuple[int, int]) -> str:
    """A (height, width) pair as the ``WIDTHxHEIGHT`` string every message and name uses."""
    return f"{hw[1]}x{hw[0]}"


def model_family(model: Any) -> str | None:
    """The preset family ``model`` is (``sd15``, ``sdxl``...; an LDM layout counts as its diffusers
    twin), or None when it cannot be told.

    A model built by :func:`~unet_surgery.presets.build_unet` or loaded from a folder whose
    config matches a preset carries the tag; an untagged diffusers model is matched by its
    config (a fine-tune of SD1.5 keeps SD1.5's config). Widths do not decide it alone: SD1.5
    and SD2.1 have the same structure and base size and differ in their text width.

    Args:
        model: the UNet to tell.
    """
    preset = getattr(model, "unet_surgery_preset", None)
    if not isinstance(preset, str):
        from unet_surgery.loading.weights import match_preset

        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "items"):
            return None
        found = match_preset(type(model).__name__, config)
        preset = found[0] if found is not None else None
    return preset.removeprefix("ldm_") if preset is not None else None


def check_fit(recipe: Recipe, unet_map: Any, model: Any = None, *, force: bool = False) -> None:
    """Refuse ``recipe`` on a UNet it was not made for, in one line naming both, unless ``force``.

    Three things must agree where both sides state them: the structure (the recipe's
    ``signature``, else the signature of the preset its ``model`` names; the UNet's map), the
    family (the recipe's ``model``; :func:`model_family`) and the base size (the recipe's
    ``base_resolution``; the size the UNet states, :func:`stated_base`). A recipe's layer table,
    factors and thresholds are written for one family at one base size: on another they
    still find layers and change them, silently wrong.

    Args:
        recipe: the recipe about to be applied.
        unet_map: the map of the UNet it is applied to.
        model: that UNet, for its family and the base size it states (None: only the
            structure is checked).
        force: skip the check (the caller knows better: e.g. a recipe run on a tiny test
            variant as a scaled-down proxy).
    """
    if force:
        return
    made_for = recipe.signature or (preset_signature(recipe.model) if recipe.model else None)
    found = map_signature(unet_map)
    family = model_family(model) if model is not None else None
    base = stated_base(model, recipe.vae_scale_factor) if model is not None else None
    made_base = (int(recipe.base_resolution[0]), int(recipe.base_resolution[1]))
    differs = []
    if made_for is not None and made_for != found:
        differs.append("structure")
    if recipe.model and family is not None and recipe.model in _presets() and family != recipe.model:
        differs.append("family")
    if base is not None and tuple(base) != made_base:
        differs.append("base size")
    if not differs:
        return
    recipe_side = f"{recipe.model + ' ' if recipe.model else ''}({made_for or 'any structure'}) at {size_text(made_base)}"
    model_side = (f"{family + ' ' if family else ''}{unet_map.model_class} ({found})"
                  + (f" at {size_text(base)} (config.sample_size)" if base is not None else ""))
    raise RecipeMismatchError(
        f"recipe {recipe.name!r} was made for {recipe_side}, not this {model_side}: another "
        f"{', '.join(differs[:-1]) + ' and ' if len(differs) > 1 else ''}{differs[-1]}; pass force=True (--force) to apply it anyway"
    )


def _presets() -> frozenset[str]:
    from unet_surgery.presets import PRESETS

    return frozenset(name.removeprefix("ldm_") for name in PRESETS)
