"""Write a shipped toy as a standard diffusers UNet folder, and read such a folder back.

The toy's weights ship inside the package in the project's own layout (``toy_unet.safetensors``
holding the UNet *and* the class tokens), which no diffusers tool reads. The exported folder is
what ``UNet2DConditionModel.save_pretrained`` writes, so ``unet-surgery inspect``, ``apply --out``
and ``export``, ``load_unet`` and ``from_pretrained`` all take it like any downloaded UNet, plus a
small sidecar with what the UNet alone cannot sample without (the class-token table, the noise
schedule and the sampler defaults)::

    FOLDER/
      config.json                          UNet2DConditionModel config (save_pretrained)
      diffusion_pytorch_model.safetensors  UNet weights, float32 (save_pretrained)
      class_embedding.safetensors          {"weight": (num_classes + 1, cross_attention_dim)}
      toy.json                             name, classes, schedules, sampler defaults, provenance

``toy.json`` is written last and lists every file of the export. Writing again to such a folder
follows the rule of every output (:func:`unet_surgery.io.may_replace`): the same export is kept,
one with other content (another toy) is replaced only with ``overwrite``; any other non-empty
folder is refused (like the other exports, :mod:`unet_surgery.export.staging`), and so is a
folder that is, holds or lies inside the shipped weights.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from unet_surgery.errors import CheckpointError
from unet_surgery.export.staging import export_files, staged_folder
from unet_surgery.io import atomic_write_text, read_json_object
from unet_surgery.toy.model import (
    TOY_NAMES,
    WEIGHTS_PACKAGE,
    ToyDiffusion,
    load_toy,
    make_ddim_scheduler,
)

__all__ = [
    "CLASS_EMBEDDING_FILE",
    "TOY_FILE",
    "TOY_FORMAT",
    "export_toy",
    "is_toy_export",
    "load_toy_folder",
]

TOY_FILE = "toy.json"
CLASS_EMBEDDING_FILE = "class_embedding.safetensors"
TOY_FORMAT = "unet-surgery-toy"
TOY_FORMAT_VERSION = 1
UNET_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def is_toy_export(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a completed toy export (its ``toy.json`` marker)."""
    return (Path(folder) / TOY_FILE).is_file()


def _check_name(toy: str | ToyDiffusion) -> None:
    if not isinstance(toy, ToyDiffusion) and toy not in TOY_NAMES:
        raise CheckpointError(f"unknown toy {toy!r}; shipped toys: {', '.join(TOY_NAMES)}")


def _resolve(toy: str | ToyDiffusion) -> ToyDiffusion:
    if isinstance(toy, ToyDiffusion):
        return toy
    _check_name(toy)
    try:
        return load_toy(toy)
    except FileNotFoundError as exc:  # weights not written yet (e.g. a checkout mid-training)
        raise CheckpointError(f"toy {toy!r} has no shipped weights in this install ({exc})") from None


def _sidecar(toy: ToyDiffusion) -> dict[str, Any]:
    """``toy.json``: everything besides the UNet that sampling the toy again needs."""
    from unet_surgery.toy.sampling import DEFAULT_ETA, DEFAULT_GUIDANCE, DEFAULT_STEPS

    config = dict(toy.config)
    image_size = int(config.get("image_size", toy.unet.config.sample_size))
    ddim = {k: v for k, v in make_ddim_scheduler(toy.scheduler_config).config.items() if not k.startswith("_")}
    return {
        "format": TOY_FORMAT,
        "version": TOY_FORMAT_VERSION,
        "name": toy.name,
        "num_classes": toy.num_classes,
        "empty_class": toy.empty_class,
        "class_names": list(config.get("class_names", [])),
        "image_size": image_size,
        "base_resolution": [image_size, image_size],
        "vae_scale_factor": 1,
        "unet_files": list(UNET_FILES),
        "class_embedding": {
            "file": CLASS_EMBEDDING_FILE,
            "key": "weight",
            "shape": list(toy.class_embedding.weight.shape),
        },
        "scheduler": dict(toy.scheduler_config),
        "ddim_scheduler": {"class": "DDIMScheduler", **ddim},
        "sampler_defaults": {"steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE, "eta": DEFAULT_ETA},
        "toy_config": config,
    }


def export_toy(toy: str | ToyDiffusion, folder: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write toy ``toy`` (a shipped name, or a loaded :class:`ToyDiffusion`) to ``folder``.

    The UNet goes through ``save_pretrained`` (safetensors, in its dtype: float32 for a shipped
    toy), so loading the folder gives the in-memory UNet bit for bit. The folder is built beside
    the target and renamed into place; ``folder`` must be new, empty or an earlier toy export.
    An earlier export with the same files is kept; one with other content is refused unless
    ``overwrite``. Returns ``folder``.
    """
    from safetensors.torch import save_file

    from unet_surgery.errors import SurgeryError
    from unet_surgery.io import check_not_input
    from unet_surgery.presets import _quiet_diffusers

    target = Path(folder)
    _check_name(toy)
    shipped = Path(str(resources.files(WEIGHTS_PACKAGE)))
    check_not_input(target, [shipped], SurgeryError, option="DIR", replaces_folder=True)
    # Entering the staging refuses a foreign folder before the (slower) load.
    with staged_folder(target, overwrite=overwrite) as stage:
        model = _resolve(toy)
        sidecar = _sidecar(model)
        with _quiet_diffusers():
            model.unet.save_pretrained(str(stage), safe_serialization=True)
        weight = model.class_embedding.weight.detach().to("cpu").contiguous()
        save_file({"weight": weight}, str(stage / CLASS_EMBEDDING_FILE),
                  metadata={"format": "pt", "toy": model.name})
        # the marker, written last; it lists every file, which proves the folder ours to replace
        sidecar["export_files"] = export_files(stage, TOY_FILE)
        atomic_write_text(stage / TOY_FILE, json.dumps(sidecar, indent=2) + "\n")
        # mkdtemp/mkstemp create 0700/0600: a folder meant to be shared should be readable
        os.chmod(stage, 0o755)
        for name in (*UNET_FILES, CLASS_EMBEDDING_FILE, TOY_FILE):
            os.chmod(stage / name, 0o644)
    return target


def load_toy_folder(
    folder: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ToyDiffusion:
    """A samplable :class:`ToyDiffusion` from a folder written by :func:`export_toy`.

    The UNet is read by :func:`unet_surgery.loading.load_unet` (as any diffusers folder), the
    class tokens and schedule from the sidecar; the result works with ``unet_surgery.toy.sample``.
    """
    from safetensors.torch import load_file

    from unet_surgery.loading import load_unet

    path = Path(folder)
    meta = read_json_object(
        path / TOY_FILE,
        missing=f"{path} has no {TOY_FILE}: not a toy export (write one with `unet-surgery toy export {path}`)",
    )
    if meta.get("format") != TOY_FORMAT or meta.get("version") != TOY_FORMAT_VERSION:
        raise CheckpointError(
            f"{path / TOY_FILE}: format {meta.get('format')!r} version {meta.get('version')!r}, "
            f"expected {TOY_FORMAT!r} version {TOY_FORMAT_VERSION}"
        )
    emb_file = path / CLASS_EMBEDDING_FILE
    if not emb_file.is_file():
        raise CheckpointError(f"{path} has no {CLASS_EMBEDDING_FILE} (the toy's class tokens)")
    weight = load_file(str(emb_file)).get("weight")
    num_classes = int(meta["num_classes"])
    unet: Any = load_unet(path, device=device, dtype=dtype)
    expected = (num_classes + 1, unet.config.cross_attention_dim)
    if weight is None or tuple(weight.shape) != expected:
        got = None if weight is None else tuple(weight.shape)
        raise CheckpointError(f"{emb_file}: class tokens of shape {got}, expected 'weight' of shape {expected}")
    public = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    with torch.device("meta"):  # a throwaway skeleton: the loaded UNet and tokens replace it
        toy = ToyDiffusion(public, num_classes)
    toy.unet = unet
    toy.class_embedding.load_state_dict({"weight": weight}, assign=True)
    toy.scheduler_config = dict(meta["scheduler"])
    toy.config = dict(meta.get("toy_config", {}))
    toy.name = str(meta.get("name", path.name))
    return toy.to(device=device, dtype=dtype).eval()
