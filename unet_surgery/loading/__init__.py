"""Models from what a user names: presets, diffusers folders and single-file checkpoints.

Three parts: :mod:`~unet_surgery.loading.resolve` (a name to a model, on ``meta`` to map),
:mod:`~unet_surgery.loading.ldm_keys` (LDM layout detection and key renaming) and
:mod:`~unet_surgery.loading.weights` (reading weights without executing pickled code and
building models around them). Loading never executes pickled code.
"""

from unet_surgery.loading.ldm_keys import (
    LDM_PREFIX,
    convert_ldm_unet,
    detect_architecture,
    detect_layout,
    ldm_to_diffusers_key,
)
from unet_surgery.loading.resolve import ResolvedModel, describe, resolve_model
from unet_surgery.loading.weights import (
    WEIGHT_SUFFIXES,
    load_state_dict,
    load_unet,
    match_preset,
    read_tensor_shapes,
    unet_folder,
)

__all__ = [
    "LDM_PREFIX",
    "WEIGHT_SUFFIXES",
    "ResolvedModel",
    "convert_ldm_unet",
    "describe",
    "detect_architecture",
    "detect_layout",
    "ldm_to_diffusers_key",
    "load_state_dict",
    "load_unet",
    "match_preset",
    "read_tensor_shapes",
    "resolve_model",
    "unet_folder",
]
