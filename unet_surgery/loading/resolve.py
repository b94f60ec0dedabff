"""Resolve what a user names as a model (a preset, a diffusers folder, a checkpoint file).

On ``meta`` only the architecture is built (enough to map or plan); with a real device the
weights are loaded by :mod:`unet_surgery.loading.weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unet_surgery.errors import CheckpointError, PresetError
from unet_surgery.loading.ldm_keys import detect_architecture
from unet_surgery.loading.weights import WEIGHT_SUFFIXES, load_unet, read_tensor_shapes, unet_folder
from unet_surgery.presets import PRESETS, build_unet, get_preset, preset_config


@dataclass
class ResolvedModel:
    """A model ready to map or patch, and where it came from."""

    model: nn.Module
    kind: str  # "preset", "diffusers-folder", "single-file"
    description: str
    preset: str | None = None

def resolve_model(spec: str, *, device: str | torch.device = "meta") -> ResolvedModel:
    """Turn a preset name, a diffusers UNet folder or a checkpoint file into a model.

    On ``meta`` only the architecture is built (enough to map); weights files are still
    checked for readability so a corrupt file fails here, with its name.

    Args:
        spec: a preset name, a diffusers UNet or pipeline folder, or a checkpoint file.
        device: ``meta`` (architecture only) or a real device (weights loaded).
    """
    path = Path(spec)
    if path.is_dir():
        return _from_diffusers_folder(path, device)
    if path.suffix in WEIGHT_SUFFIXES or path.exists():
        return _from_single_file(path, device)
    if spec in PRESETS:
        model = build_unet(spec, size="full", device=device)
        return ResolvedModel(model, "preset", get_preset(spec).description, spec)
    try:
        get_preset(spec)  # raises PresetError naming the closest preset
    except PresetError as exc:
        raise PresetError(f"{spec!r} is neither an existing file or folder nor a preset: {exc}") from None
    raise AssertionError("unreachable")


def _from_diffusers_folder(path: Path, device: str | torch.device) -> ResolvedModel:
    path, config, cls = unet_folder(path)
    class_name = config.get("_class_name")
    weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not weights:
        raise CheckpointError(f"{path} has a config.json but no weights file (*.safetensors)")
    for file in weights:
        read_tensor_shapes(file)  # validates every shard before anything is built
    if str(torch.device(device)) == "meta":
        from unet_surgery.loading.weights import _fit_shapes, _folder_weights
        from unet_surgery.presets import from_config

        public = {k: v for k, v in config.items() if not k.startswith("_")}
        with torch.device("meta"):
            model = from_config(cls, public, str(path / "config.json"))
        model = model.to("meta")
        # The config must describe the weights beside it (shapes only: nothing is read).
        stand_ins = {k: torch.empty(v, device="meta") for f in _folder_weights(path) for k, v in read_tensor_shapes(f).items()}
        _fit_shapes(stand_ins, {k: v.shape for k, v in model.state_dict().items()}, str(path))
    else:
        model = load_unet(path, device=device)
    model.eval()
    return ResolvedModel(model, "diffusers-folder", f"{class_name} from {path}")


def _from_single_file(path: Path, device: str | torch.device) -> ResolvedModel:
    shapes = read_tensor_shapes(path)
    if str(torch.device(device)) != "meta":
        model = load_unet(path, device=device)
        preset = getattr(model, "unet_surgery_preset", None)
        return ResolvedModel(model, "single-file", f"{preset or type(model).__name__} from {path}", preset)
    layout, preset, size = _fitting_preset(path, shapes)
    model = build_unet(preset, size=size, device="meta")
    return ResolvedModel(model, "single-file", f"{preset}{'' if size == 'full' else f' ({size})'} ({layout} layout) from {path}", preset)


def _fitting_preset(path: Path, shapes: dict[str, tuple[int, ...]]) -> tuple[str, str, str]:
    """(layout, preset, size) whose architecture the file's shapes fit exactly, as ``load_unet`` decides.

    Shapes only (meta stand-ins): nothing is read, so a tiny test checkpoint is recognised
    as it is by ``export``, and a file that fits nothing is refused here too.
    """
    from unet_surgery.loading.ldm_keys import convert_ldm_unet, detect_layout
    from unet_surgery.loading.weights import _fit_shapes, _single_file_candidates

    layout = detect_layout(shapes)
    if layout is None:
        detect_architecture(shapes)  # raises the unknown-layout error
    stand_ins = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    first = ""
    for name, size in _single_file_candidates(shapes):
        model = build_unet(name, size=size, device="meta")
        layers = int(preset_config(name, size=size).get("layers_per_block", 2))
        state = convert_ldm_unet(stand_ins, layers) if layout == "ldm" else stand_ins
        try:
            _fit_shapes(dict(state), {k: v.shape for k, v in model.state_dict().items()}, str(path))
        except CheckpointError as exc:
            first = first or str(exc).split(": ", 1)[-1]
            continue
        return str(layout), name, size
    raise CheckpointError(f"{path}: {layout}-layout UNet weights fit no shipped architecture (first mismatch: {first})")


def describe(resolved: ResolvedModel) -> dict[str, Any]:
    return {"kind": resolved.kind, "description": resolved.description, "preset": resolved.preset}
