"""DemoFusion recipes built from two sizes: ``auto_recipe(..., policy="demofusion")``."""

from __future__ import annotations

from unet_surgery.errors import RecipeError
from unet_surgery.recipes.schema import DemoFusionSpec, Recipe

README_SIGMA = 0.8  # the official README's examples (the pipeline's own default is 1.0)


def demofusion_recipe(
    base: tuple[int, int], target: tuple[int, int], *, vae_scale_factor: int = 8, name: str | None = None,
    steps: int = 50, model: str | None = None,
) -> Recipe:
    """DemoFusion from a square ``base`` to ``target`` (pixels): the official settings, stride half
    the native window (64 latents for SDXL, 32 for SD1.5), the README's sigma 0.8."""
    if base[0] != base[1]:
        raise RecipeError(f"demofusion: the base must be square (the native window), got {base[1]}x{base[0]}")
    if max(target[0] / base[0], target[1] / base[1]) < 2:
        raise RecipeError(
            f"demofusion: target {target[1]}x{target[0]} is less than twice the base {base[1]}x{base[0]}; "
            "DemoFusion upscales by whole factors of the base"
        )
    window = base[0] // vae_scale_factor
    h, w = target
    return Recipe(
        name=name or f"auto-demofusion-{w}x{h}",  # names are WIDTHxHEIGHT (docs/cli.md)
        description=f"DemoFusion from {base[1]}x{base[0]} to {w}x{h}: progressive upscaling with noise "
        "inversion, skip residual, dilated sampling, jittered local patches, multi-decoder.",
        source="unet_surgery.recipes.auto_recipe(policy='demofusion') (PRIS-CV/DemoFusion settings)",
        model=model,
        base_resolution=base,
        target_resolutions=(target,),
        passes=(),
        vae_scale_factor=vae_scale_factor,
        demofusion=DemoFusionSpec(steps=steps, stride=max(1, window // 2), sigma=README_SIGMA),
    )
