"""MultiDiffusion recipes built from two sizes: ``auto_recipe(..., policy="multidiffusion")``."""

from __future__ import annotations

from unet_surgery.recipes.schema import PatchSpec, Recipe


def multidiffusion_recipe(
    base: tuple[int, int], target: tuple[int, int], *, vae_scale_factor: int = 8, name: str | None = None,
    model: str | None = None,
) -> Recipe:
    """Patch-wise denoising alone (MultiDiffusion, Bar-Tal et al. 2023): every step denoises
    overlapping views of the model's native size over the whole ``target`` (pixels) and averages
    them, with the official stride of half a window. No UNet rewrite: memory stays that of one
    native-size view, and nothing ties distant views together, so large targets may repeat objects.
    """
    h, w = target
    return Recipe(
        name=name or f"auto-multidiffusion-{w}x{h}",  # names are WIDTHxHEIGHT (docs/cli.md)
        description=f"MultiDiffusion from {base[1]}x{base[0]} to {w}x{h}: overlapping native-size views "
        "(stride half a window), averaged every step.",
        source="unet_surgery.recipes.auto_recipe(policy='multidiffusion') (omerbt/MultiDiffusion settings)",
        model=model,
        base_resolution=base,
        target_resolutions=(target,),
        passes=(),
        vae_scale_factor=vae_scale_factor,
        patches=PatchSpec(),
    )
