"""A patched diffusers folder: the UNet's ``save_pretrained`` output plus the adapter files.

Weights and ``config.json`` are exactly what diffusers writes (the surgery changes no
``state_dict`` key), so the folder still loads as a plain UNet anywhere; with
:func:`load_patched` it loads as the patched model in one call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from unet_surgery.errors import SurgeryError
from unet_surgery.export.adapter import write_adapter_files
from unet_surgery.export.progress import progress
from unet_surgery.export.staging import staged_folder
from unet_surgery.graph import UNetMap
from unet_surgery.patching.patch import Patch


def save_patched_pretrained(patch: Patch, directory: str | Path, *, show_progress: bool = False,
                            overwrite: bool = False) -> Path:
    """Write the patched UNet as a diffusers folder with the adapter beside it (atomically).

    An earlier export in ``directory`` with the same files is kept; one with other content is
    replaced only with ``overwrite``; any other folder is refused.

    Args:
        patch: the applied recipe (on a diffusers model).
        directory: the folder to write.
        show_progress: show a progress bar.
        overwrite: replace an earlier export with other content.
    """
    model: Any = patch.model
    if not callable(getattr(model, "save_pretrained", None)):
        raise SurgeryError(
            f"{type(model).__name__} is not a diffusers model (no save_pretrained); "
            "load LDM checkpoints with unet_surgery.load_unet, which converts them to diffusers"
        )
    directory = Path(directory)
    with staged_folder(directory, overwrite=overwrite) as stage, progress(2, "diffusers folder", show_progress) as bar:
        bar.set_postfix_str("weights")
        model.save_pretrained(str(stage), safe_serialization=True)
        bar.update()
        bar.set_postfix_str("adapter")
        write_adapter_files(patch, stage)
        bar.update()
    return directory


def load_patched(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    unet_map: UNetMap | None = None,
) -> tuple[nn.Module, Patch]:
    """Load a folder written by :func:`save_patched_pretrained`: ``(model, patch)``, patched.

    Args:
        directory: a folder written by :func:`save_patched_pretrained`.
        device: where to put the model.
        dtype: cast the weights (None: keep the stored precision).
        unet_map: the model's map, when the caller has one (skips mapping).
    """
    from unet_surgery.export.adapter import load_patch, read_adapter_meta
    from unet_surgery.loading import load_unet

    read_adapter_meta(directory)  # fail on a missing/corrupt adapter before loading gigabytes
    model = load_unet(directory, device=device, dtype=dtype)
    return model, load_patch(model, directory, unet_map=unet_map)
