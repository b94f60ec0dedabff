"""Which recipe a generation run applies: ``auto``, ``none``, a shipped name or a recipe file.

``auto`` is :func:`unet_surgery.auto_recipe` on the UNet's map, from the model's native size
(``unet.config.sample_size`` x the VAE factor) to the requested one; at or below the native size
there is nothing to fix and no recipe is applied. A recipe with a ``sampling`` section runs
FreeScale's self-cascade; its last stage must be the requested size, and ``steps`` replaces its
steps per stage (an explicit ``restart_step`` is scaled by the same ratio). With an init image
the sampling section is dropped: the image already fixes the layout the cascade's first stages
would, and the recipe's passes act on the image-to-image run. With a ControlNet (text to image)
the cascade runs the ControlNet at every stage.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from unet_surgery.errors import CheckpointError, RecipeError
from unet_surgery.generation.jobs import GenerationError
from unet_surgery.recipes.library import load_recipe
from unet_surgery.recipes.schema import Recipe

NO_RECIPE = ("none", "off")


def adapter_recipe(folder: Path) -> Recipe:
    """The recipe of an adapter folder (``export --format adapter``, or a patched folder from
    ``apply --out``), its files checked against the checksums in ``adapter.json``."""
    from unet_surgery.export.adapter import RECIPE_FILE, read_adapter_meta

    read_adapter_meta(folder)
    return load_recipe(folder / RECIPE_FILE)


def is_adapter_folder(path: Path) -> bool:
    from unet_surgery.export.adapter import META_FILE

    return path.is_dir() and (path / META_FILE).is_file()


def patched_unet_folder(unet_source: Path) -> Path | None:
    """The folder holding the adapter of a patched UNet MODEL, or None for a plain one.

    MODEL may be the patched folder itself, its weights file (with ``--components``) or a
    pipeline folder whose ``unet/`` is a patched folder.
    """
    for folder in (unet_source, unet_source / "unet", unet_source.parent):
        if is_adapter_folder(folder) and (folder is not unet_source.parent or unet_source.is_file()):
            return folder
    return None


def check_recipe(spec: str | Path | Recipe | None, own: Path | None = None) -> Recipe | str | None:
    """Parse a named, file or adapter recipe early (before loading a model); ``auto`` stays a string.

    ``own`` is the adapter folder of a patched MODEL: its recipe is what ``auto`` (the default)
    means; ``none`` runs the UNet unpatched, and any other recipe is refused (it would be
    applied on top of another's settings).
    """
    if spec is None or (isinstance(spec, str) and spec in NO_RECIPE):
        return None
    try:
        if own is not None:
            if not (isinstance(spec, str) and spec == "auto"):
                raise GenerationError(
                    f"--recipe: MODEL is a patched folder ({own}) that carries its own recipe; "
                    "omit --recipe to use it, or give --recipe none to run the UNet unpatched"
                )
            return adapter_recipe(own)
        if isinstance(spec, str) and spec == "auto":
            return "auto"
        if isinstance(spec, (str, Path)) and is_adapter_folder(Path(spec)):
            return adapter_recipe(Path(spec))
        return load_recipe(spec)
    except (RecipeError, CheckpointError) as exc:
        raise GenerationError(f"--recipe: {exc}") from None


def native_size(pipe: Any) -> tuple[int, int]:
    """(height, width) in pixels the UNet was trained at."""
    sample = pipe.unet.config.sample_size
    h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    return int(h) * pipe.vae_scale_factor, int(w) * pipe.vae_scale_factor


def resolve_recipe(checked: Recipe | str | None, pipe: Any, *, height: int, width: int, steps: int,
                   init_image: bool, control: bool = False) -> tuple[Recipe | None, Any]:
    """(recipe to apply or ``None``, the UNet map when one was computed).

    ``control``: a ControlNet steers the run. A cascade then runs the ControlNet at every stage;
    patch-wise and DemoFusion samplers run no ControlNet and are refused.
    """
    unet_map = None
    if checked is None:
        return None, None
    if checked == "auto":
        base = native_size(pipe)
        if height <= base[0] and width <= base[1]:
            return None, None
        from unet_surgery.graph import map_unet
        from unet_surgery.recipes.auto import auto_recipe

        unet_map = map_unet(pipe.unet, cache=True)
        try:
            recipe = auto_recipe(unet_map, base=base, target=(height, width),
                                 vae_scale_factor=pipe.vae_scale_factor, steps=steps)
        except RecipeError as exc:
            raise GenerationError(f"--recipe auto: {exc}") from None
    else:
        assert isinstance(checked, Recipe)
        recipe = checked
    if recipe.demofusion is not None or recipe.patches is not None:
        if control:
            what = "demofusion" if recipe.demofusion is not None else "patches"
            raise GenerationError(f"--controlnet: recipe {recipe.name!r} ({what}) samples without a ControlNet")
        return _patch_recipe(recipe, pipe, height=height, width=width, steps=steps, init_image=init_image), unet_map
    if recipe.sampling is None:
        if recipe.target_resolutions and (height, width) not in {tuple(t) for t in recipe.target_resolutions}:
            sizes = ", ".join(f"{w}x{h}" for h, w in recipe.target_resolutions)
            warnings.warn(f"recipe {recipe.name!r} was written for {sizes} (WxH), not {width}x{height}",
                          UserWarning, stacklevel=2)
        return recipe, unet_map
    if init_image:
        return replace(recipe, sampling=None), unet_map
    last = tuple(recipe.sampling.stages[-1])
    if last != (height, width):
        raise GenerationError(
            f"--size: recipe {recipe.name!r} cascades up to {last[1]}x{last[0]} (WxH), "
            f"not {width}x{height}; give --size {last[1]}x{last[0]} or another recipe"
        )
    from unet_surgery.sampling.cascade import with_steps

    return replace(recipe, sampling=with_steps(recipe.sampling, steps)), unet_map


def _patch_recipe(recipe: Recipe, pipe: Any, *, height: int, width: int, steps: int, init_image: bool) -> Recipe:
    """A DemoFusion or patch-wise recipe checked against the request; ``steps`` replaces its steps."""
    what = "demofusion" if recipe.demofusion is not None else "patches"
    if init_image:
        raise GenerationError(f"--init-image: recipe {recipe.name!r} ({what}) generates from text only")
    if recipe.demofusion is not None:
        from unet_surgery.sampling.demofusion import phases
        from unet_surgery.sampling.patchwise import PatchError

        base = min(native_size(pipe))
        try:
            final = phases(height, width, base, pipe.vae_scale_factor)[-1]
        except PatchError as exc:
            raise GenerationError(f"--size: {exc}") from None
        if (final.height, final.width) != (height, width):
            raise GenerationError(
                f"--size: DemoFusion from {base}x{base} makes {final.width}x{final.height} (WxH), not "
                f"{width}x{height}; give --size {final.width}x{final.height}"
            )
        return replace(recipe, demofusion=replace(recipe.demofusion, steps=steps))
    from unet_surgery.sampling.patchwise import PatchError, check_window, patch_settings

    window, stride = patch_settings(recipe)
    stages = recipe.sampling.stages if recipe.sampling is not None else ((height, width),)
    for h, w in stages:
        try:
            check_window(h // pipe.vae_scale_factor, w // pipe.vae_scale_factor, window, stride)
        except PatchError as exc:
            raise GenerationError(f"--recipe {recipe.name}: {exc} (at {w}x{h} px)") from None
    if recipe.sampling is not None:
        last = tuple(recipe.sampling.stages[-1])
        if last != (height, width):
            raise GenerationError(
                f"--size: recipe {recipe.name!r} cascades up to {last[1]}x{last[0]} (WxH), "
                f"not {width}x{height}; give --size {last[1]}x{last[0]} or another recipe"
            )
        from unet_surgery.sampling.cascade import with_steps

        return replace(recipe, sampling=with_steps(recipe.sampling, steps))
    from unet_surgery.recipes.schema import SamplingSpec

    return replace(recipe, sampling=SamplingSpec(stages=((height, width),), steps=steps))
