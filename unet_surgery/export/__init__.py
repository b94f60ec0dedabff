"""Export a patched model: a surgery adapter, a patched diffusers folder, or frozen ``.pt2`` programs.

One module per format; see ``docs/export.md``.
"""

from unet_surgery.export.adapter import load_patch, read_adapter_meta, save_patch
from unet_surgery.export.diffusers_folder import load_patched, save_patched_pretrained
from unet_surgery.export.fingerprint import fingerprint

__all__ = [
    "fingerprint",
    "load_patch",
    "load_patched",
    "read_adapter_meta",
    "save_patch",
    "save_patched_pretrained",
]
