"""Resolve what a user names as a model (a preset, a diffusers folder, a checkpoint file).

Loading never executes pickled code: weights are read with ``safetensors`` or
``torch.load(weights_only=True)``. Architectures come from the file's ``config.json`` or, for
single-file checkpoints, from the shipped presets recognised by key names and shapes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unet_surgery.errors import CheckpointError, PresetError
from unet_surgery.presets import PRESETS, build_unet, get_preset

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
LDM_PREFIX = "model.diffusion_model."
_CROSS_KEY = re.compile(r"(?:^|\.)attn2\.to_k\.weight$")


@dataclass
class ResolvedModel:
    """A model ready to map or patch, and where it came from."""

    model: nn.Module
    kind: str  # "preset", "diffusers-folder", "single-file"
    description: str
    preset: str | None = None


def read_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a weights file, without reading tensor data where the format allows."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:
            raise CheckpointError(f"{path} is not a valid safetensors file ({_brief(exc)})") from exc
    state = load_state_dict(path, device="meta")
    return {k: tuple(v.shape) for k, v in state.items()}


def load_state_dict(path: Path, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a weights file; pickles are loaded with ``weights_only=True``, never executed."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{path}: unknown weights format {path.suffix!r} (expected one of {', '.join(WEIGHT_SUFFIXES)})")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(device) if str(device) != "meta" else "cpu")
        except Exception as exc:
            raise CheckpointError(f"{path} is not a valid safetensors file ({_brief(exc)})") from exc
    try:
        obj = torch.load(str(path), map_location=device, weights_only=True, mmap=str(device) != "meta")
    except Exception as exc:
        raise CheckpointError(
            f"{path} could not be read as a weights-only torch checkpoint ({_brief(exc)}); "
            "pickled code is never executed"
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def detect_architecture(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, str]:
    """(layout, preset) of a single-file UNet checkpoint from its keys and shapes.

    layout is ``"ldm"`` (``model.diffusion_model.*`` or bare ``input_blocks.*``) or
    ``"diffusers"``; the preset is recognised by the cross-attention width and SDXL's
    additional embedding.
    """
    keys = list(shapes)
    if any(k.startswith(LDM_PREFIX) for k in keys):
        layout, unet_keys = "ldm", [k[len(LDM_PREFIX):] for k in keys if k.startswith(LDM_PREFIX)]
        shapes = {k[len(LDM_PREFIX):]: v for k, v in shapes.items() if k.startswith(LDM_PREFIX)}
    elif any(k.startswith("input_blocks.") for k in keys):
        layout, unet_keys = "ldm", keys
    elif "conv_in.weight" in shapes and any(k.startswith("down_blocks.") for k in keys):
        layout, unet_keys = "diffusers", keys
    else:
        sample = ", ".join(keys[:3]) or "no tensors"
        raise CheckpointError(f"unknown checkpoint layout: neither LDM nor diffusers UNet keys (first keys: {sample})")
    context = {shapes[k][1] for k in unet_keys if _CROSS_KEY.search(k)}
    if not context:
        raise CheckpointError("unknown UNet: the checkpoint has no cross-attention (attn2.to_k) weights")
    width = context.pop()
    sdxl = any(k.startswith(("label_emb.", "add_embedding.")) for k in unet_keys)
    if sdxl and width == 2048:
        return layout, "sdxl"
    if width == 768:
        return layout, "sd15"
    if width == 1024:
        return layout, "sd21"
    raise CheckpointError(f"unknown UNet: cross-attention width {width} matches no shipped preset (SD1.5 768, SD2.1 1024, SDXL 2048)")


def resolve_model(spec: str, *, device: str | torch.device = "meta") -> ResolvedModel:
    """Turn a preset name, a diffusers UNet folder or a checkpoint file into a model.

    On ``meta`` only the architecture is built (enough to map); weights files are still
    checked for readability so a corrupt file fails here, with its name.
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
    if (path / "unet" / "config.json").is_file():
        path = path / "unet"  # a whole pipeline folder
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a diffusers UNet folder: config.json is missing")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file} is not valid JSON ({exc})") from exc
    class_name = config.get("_class_name")
    try:
        import diffusers
    except ImportError as exc:
        raise CheckpointError("loading a diffusers folder needs diffusers: pip install 'unet-surgery[diffusers]'") from exc
    cls = getattr(diffusers, str(class_name), None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"{config_file}: _class_name {class_name!r} is not a diffusers model class")
    weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not weights:
        raise CheckpointError(f"{path} has a config.json but no weights file (*.safetensors)")
    for file in weights:
        read_tensor_shapes(file)  # validates every shard before anything is built
    if str(torch.device(device)) == "meta":
        with torch.device("meta"):
            model = cls.from_config(config)
        model = model.to("meta")
    else:
        try:
            model = cls.from_pretrained(str(path), local_files_only=True, use_safetensors=weights[0].suffix == ".safetensors").to(device)
        except Exception as exc:
            raise CheckpointError(f"{path}: diffusers could not load the weights ({_brief(exc)})") from exc
    model.eval()
    return ResolvedModel(model, "diffusers-folder", f"{class_name} from {path}")


def _from_single_file(path: Path, device: str | torch.device) -> ResolvedModel:
    shapes = read_tensor_shapes(path)
    layout, preset = detect_architecture(shapes)
    if str(torch.device(device)) != "meta":
        raise CheckpointError("loading single-file weights onto a real device is done by load_checkpoint (not yet available)")
    model = build_unet(preset, size="full", device="meta")
    return ResolvedModel(model, "single-file", f"{preset} ({layout} layout) from {path}", preset)


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def describe(resolved: ResolvedModel) -> dict[str, Any]:
    return {"kind": resolved.kind, "description": resolved.description, "preset": resolved.preset}
