"""Export a patched model: a surgery adapter, a patched diffusers folder, or frozen ``.pt2`` programs.

One module per format; see ``docs/export.md``.
"""

from unet_surgery.export.adapter import load_patch, read_adapter_meta, save_patch
from unet_surgery.export.diffusers_folder import load_patched, save_patched_pretrained
from unet_surgery.export.fingerprint import fingerprint
from unet_surgery.export.phases import enumerate_phases, settings_at
from unet_surgery.export.pt2 import Pt2Runner, export_pt2

__all__ = [
    "Pt2Runner",
    "enumerate_phases",
    "export_pt2",
    "fingerprint",
    "load_patch",
    "load_patched",
    "read_adapter_meta",
    "save_patch",
    "save_patched_pretrained",
    "settings_at",
]
