"""unet-surgery: make pretrained diffusion UNets generate far above their training resolution.

Map any UNet (:func:`map_unet`), apply declarative recipes (:func:`apply`), export the patched
model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from unet_surgery._version import __version__
from unet_surgery.errors import (
    CheckpointError,
    MappingError,
    PresetError,
    RecipeError,
    SelectionError,
    SurgeryError,
    TransformError,
)

# Public name -> module that defines it, imported on first use: ``import unet_surgery`` (and so
# every ``unet-surgery --help``) stays free of torch until a name that needs it is touched.
_LAZY = {
    "load_patch": "unet_surgery.export",
    "load_patched": "unet_surgery.export",
    "save_patch": "unet_surgery.export",
    "generate": "unet_surgery.generation",
    "UNetMap": "unet_surgery.graph",
    "map_unet": "unet_surgery.graph",
    "load_unet": "unet_surgery.loading",
    "Patch": "unet_surgery.patching.patch",
    "apply": "unet_surgery.patching.patch",
    "current_patch": "unet_surgery.patching.patch",
    "remove": "unet_surgery.patching.patch",
    "Recipe": "unet_surgery.recipes",
    "list_recipes": "unet_surgery.recipes",
    "load_recipe": "unet_surgery.recipes",
    "auto_recipe": "unet_surgery.recipes.auto",
    "CascadeOutput": "unet_surgery.sampling",
    "PipelinePatch": "unet_surgery.sampling",
    "apply_to_pipeline": "unet_surgery.sampling",
    "cfg_denoiser": "unet_surgery.sampling",
    "self_cascade": "unet_surgery.sampling",
    "self_cascade_sample": "unet_surgery.sampling",
}

if TYPE_CHECKING:
    from unet_surgery.export import load_patch, load_patched, save_patch
    from unet_surgery.generation import generate
    from unet_surgery.graph import UNetMap, map_unet
    from unet_surgery.loading import load_unet
    from unet_surgery.patching.patch import Patch, apply, current_patch, remove
    from unet_surgery.recipes import Recipe, list_recipes, load_recipe
    from unet_surgery.recipes.auto import auto_recipe
    from unet_surgery.sampling import (
        CascadeOutput,
        PipelinePatch,
        apply_to_pipeline,
        cfg_denoiser,
        self_cascade,
        self_cascade_sample,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CascadeOutput",
    "CheckpointError",
    "MappingError",
    "Patch",
    "PipelinePatch",
    "PresetError",
    "Recipe",
    "RecipeError",
    "SelectionError",
    "SurgeryError",
    "TransformError",
    "UNetMap",
    "__version__",
    "apply",
    "apply_to_pipeline",
    "auto_recipe",
    "cfg_denoiser",
    "current_patch",
    "generate",
    "list_recipes",
    "load_patch",
    "load_patched",
    "load_recipe",
    "load_unet",
    "map_unet",
    "remove",
    "save_patch",
    "self_cascade",
    "self_cascade_sample",
]
