"""unet-surgery: make pretrained diffusion UNets generate far above their training resolution.

Map any UNet (:func:`map_unet`), apply declarative recipes (:func:`apply`), export the patched
model.
"""

from __future__ import annotations

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
