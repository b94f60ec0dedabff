"""unet-surgery: make pretrained diffusion UNets generate far above their training resolution.

Map any UNet (:func:`map_unet`), apply declarative recipes, export the patched model.
"""

from __future__ import annotations

__version__ = "0.1.0"

from unet_surgery.errors import (
    CheckpointError,
    MappingError,
    PresetError,
    RecipeError,
    SelectionError,
    SurgeryError,
    TransformError,
)

__all__ = [
    "CheckpointError",
    "MappingError",
    "PresetError",
    "RecipeError",
    "SelectionError",
    "SurgeryError",
    "TransformError",
    "__version__",
]
