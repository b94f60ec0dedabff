"""Reading UNet weights without executing pickled code, and building models around them.

Weights are read with ``safetensors`` or ``torch.load(weights_only=True)``; a model is built on
``meta`` and adopts the tensors (nothing is initialised twice). Architectures come from a
folder's ``config.json`` or, for single files, from the shipped presets recognised by key
names and shapes (:mod:`unet_surgery.loading.ldm_keys`).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unet_surgery.errors import CheckpointError
from unet_surgery.io import excerpt, read_bounded_json, read_json_object, readable_file
from unet_surgery.loading.ldm_keys import (
    convert_ldm_unet,
    detect_architecture,
    detect_layout,
)
from unet_surgery.presets import PRESETS, get_preset

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
# Precisions a UNet computes in. float8 formats are storage formats (often with per-tensor
# scales kept beside them): taking their values as weights would be silently wrong.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

def read_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a weights file, without reading tensor data where the format allows."""
    readable_file(path, missing=f"checkpoint not found: {path}")
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
    readable_file(path, missing=f"checkpoint not found: {path}")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{path}: unknown weights format {path.suffix!r} (expected one of {', '.join(WEIGHT_SUFFIXES)})")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(device) if str(device) != "meta" else "cpu")
        except Exception as exc:
            raise CheckpointError(f"{path} is not a valid safetensors file ({_brief(exc)})") from exc
    mmap = str(device) != "meta" and _mappable(path)
    try:
        obj = torch.load(str(path), map_location=device, weights_only=True, mmap=mmap)
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

MAX_DEFLATE_RATIO = 100  # weights compress to ~90 % of their size; 100:1 is a zip bomb


def _mappable(path: Path) -> bool:
    """Whether ``torch.load(mmap=True)`` reads ``path`` right: a zip archive storing every entry
    uncompressed. Memory mapping takes an entry's bytes at its offset as they lie, so a
    deflated storage would come back as compressed bytes taken for weights; such archives (and
    the legacy non-zip format, which cannot be mapped) are read whole instead. A deflated entry
    that claims to expand more than :data:`MAX_DEFLATE_RATIO` times is refused.
    """
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a valid checkpoint archive ({_brief(exc)})") from None
    packed = [e for e in entries if e.compress_type != zipfile.ZIP_STORED]
    for entry in packed:
        if entry.file_size > MAX_DEFLATE_RATIO * entry.compress_size + (1 << 20):
            raise CheckpointError(
                f"{path}: entry {excerpt(entry.filename)} claims {entry.file_size} bytes from {entry.compress_size} "
                f"compressed (over {MAX_DEFLATE_RATIO}:1); refusing a zip bomb"
            )
    return not packed


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__

def _fit_shapes(state: dict[str, Any], expected: Mapping[str, torch.Size], where: str) -> dict[str, Any]:
    """Check ``state`` names exactly the model's tensors with the right shapes.

    The one tolerated difference is a 1x1 conv stored for a linear projection (or the
    reverse: SD2 checkpoints exist in both forms); those are reshaped, which is exact.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(f"{where}: weights do not fit the architecture: {', '.join(detail)}")
    out = {}
    for key, value in state.items():
        if value.dtype not in WEIGHT_DTYPES:
            kind = "floating point" if value.is_floating_point() else "not floating point"
            raise CheckpointError(
                f"{where}: {key} holds {str(value.dtype).removeprefix('torch.')} values ({kind}); UNet weights "
                f"must be {', '.join(str(d).removeprefix('torch.') for d in WEIGHT_DTYPES)} (convert the file first)"
            )
        if not value.is_meta and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{where}: {key} holds NaN or infinite values")
        want = tuple(expected[key])
        have = tuple(value.shape)
        if have != want:
            if have[:2] == want[:2] and all(d == 1 for d in have[2:] + want[2:]):
                value = value.reshape(want)
            else:
                raise CheckpointError(f"{where}: {key} has shape {have}, the architecture needs {want}")
        out[key] = value
    return out

def _diffusers_class(class_name: str, where: str) -> Any:
    try:
        import diffusers
    except ImportError as exc:
        raise CheckpointError("loading diffusers weights needs diffusers: pip install 'unet-surgery[diffusers]'") from exc
    cls = getattr(diffusers, str(class_name), None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"{where}: _class_name {class_name!r} is not a diffusers model class")
    return cls

ALIGNMENT = 64

def _aligned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy tensors whose data is not 64-byte aligned (safetensors packs them at any offset).

    CPU kernels pick vectorised paths by alignment, so an unaligned weight gives results
    that differ in the last bits from the same weight freshly allocated: loading would not
    be bit-exact. Copies are made one at a time (the originals are released as we go).
    """
    out = {}
    for key in list(state):
        value = state.pop(key)
        out[key] = value if value.data_ptr() % ALIGNMENT == 0 else value.clone()
    return out

def _build_with_weights(
    build: Any, state: dict[str, torch.Tensor], where: str, device: str | torch.device, dtype: torch.dtype | None
) -> nn.Module:
    """Build on ``meta`` and adopt the tensors (no random init, no copy); fall back to a real build.

    ``assign=True`` keeps the checkpoint's dtype, so half-precision files give a
    half-precision model unless ``dtype`` says otherwise.
    """
    with torch.device("meta"):
        model = build()
    state = _fit_shapes(state, {k: v.shape for k, v in model.state_dict().items()}, where)
    state = _aligned(state)
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in model.buffers()):  # non-persistent buffers need a real build
        with torch.device("cpu"):
            model = build()
        model.load_state_dict(state, strict=True)
    model = model.to(device=device) if dtype is None else model.to(device=device, dtype=dtype)
    return model.eval()

def _folder_weights(folder: Path) -> list[Path]:
    """The weight files of a diffusers model folder: the plain set, else the fp16 variant.

    Sharded sets are listed by their ``*.index.json``; a set is taken whole or not at all.
    """
    for variant in ("", ".fp16"):
        for ext in (".safetensors", ".bin"):
            single = folder / f"{DIFFUSERS_WEIGHTS}{variant}{ext}"
            index = folder / f"{DIFFUSERS_WEIGHTS}{variant}{ext}.index.json"
            if single.is_file():
                return [single]
            if index.is_file():
                return _shards(folder, index)
    others = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(others) == 1:
        return others
    raise CheckpointError(
        f"{folder}: no {DIFFUSERS_WEIGHTS}[.fp16].safetensors (or shard index) found"
        + (f"; ambiguous weight files: {', '.join(p.name for p in others)}" if others else "")
    )

def _shards(folder: Path, index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names: plain file names inside ``folder``, all present."""
    data = read_bounded_json(index, CheckpointError)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} is not a valid shard index (no weight_map of file names)")
    names = sorted(set(weight_map.values()))
    for name in names:
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name:
            raise CheckpointError(f"{index} names the shard {excerpt(name)}, which is not a file name inside {folder}")
    shards = [folder / name for name in names]
    absent = [excerpt(s.name) for s in shards if not s.is_file()]
    if absent:
        raise CheckpointError(f"{index} lists shard(s) that are missing: {', '.join(absent[:5])}")
    return shards


def _read_config(folder: Path) -> dict[str, Any]:
    return read_json_object(
        folder / "config.json", missing=f"{folder} is not a diffusers UNet folder: config.json is missing"
    )


def unet_folder(path: Path) -> tuple[Path, dict[str, Any], Any]:
    """A diffusers UNet folder (or a pipeline folder's ``unet/``): its path, config and class."""
    if (path / "unet" / "config.json").is_file():
        path = path / "unet"  # a whole pipeline folder
    config = _read_config(path)
    return path, config, _diffusers_class(str(config.get("_class_name")), str(path / "config.json"))


SINGLE_FILE_PRESETS = ("sd15", "sd21", "sdxl")

def match_preset(class_name: str, config: Mapping[str, Any]) -> tuple[str, str] | None:
    """(preset, size) whose shipped config ``config`` agrees with, so inputs can be made for it."""
    from unet_surgery.presets import preset_config

    canon = json.loads(json.dumps(dict(config), default=list))
    for size in ("full", "tiny"):
        for name in PRESETS:
            preset = get_preset(name)
            if preset.family != "diffusers" or preset.model_class != class_name:
                continue
            ref = preset_config(name, size=size)
            ref = json.loads(json.dumps(ref.get("unet", ref)))
            # Block type names differ between a UNet and its motion twin; widths decide.
            common = [k for k in ref if not k.startswith("_") and "block_type" not in k and k in canon]
            if "block_out_channels" in common and all(ref[k] == canon[k] for k in common):
                return name, size
    return None

def _tag(model: nn.Module, match: tuple[str, str] | None) -> nn.Module:
    if match is not None:
        tagged: Any = model  # plain attributes, not submodules
        tagged.unet_surgery_preset, tagged.unet_surgery_size = match
    return model


def _load_folder(folder: Path, device: str | torch.device, dtype: torch.dtype | None) -> nn.Module:
    folder, config, cls = unet_folder(folder)
    class_name = str(config.get("_class_name"))
    state: dict[str, torch.Tensor] = {}
    from unet_surgery.presets import check_config_bounds

    check_config_bounds({k: v for k, v in config.items() if not k.startswith("_")}, str(folder / "config.json"))
    for file in _folder_weights(folder):
        state.update(load_state_dict(file, device=device))
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    from unet_surgery.presets import check_config_bounds, from_config

    where = str(folder / "config.json")
    check_config_bounds(public, where)  # before reading gigabytes of weights
    model = _build_with_weights(lambda: from_config(cls, public, where), state, str(folder), device, dtype)
    return _tag(model, match_preset(class_name, config))


def _single_file_candidates(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, str]]:
    """Presets to try, the detected full-size one first, then every other (tiny included)."""
    try:
        first = [(detect_architecture(shapes)[1], "full")]
    except CheckpointError:
        first = []
    rest = [(n, s) for s in ("full", "tiny") for n in SINGLE_FILE_PRESETS if (n, s) not in first]
    return first + rest


def _load_single_file(path: Path, device: str | torch.device, dtype: torch.dtype | None, config: Mapping[str, Any] | None) -> nn.Module:
    from unet_surgery.presets import from_config, preset_config

    shapes = read_tensor_shapes(path)
    layout = detect_layout(shapes)
    if layout is None:
        detect_architecture(shapes)  # raises the unknown-layout error
    ldm = layout == "ldm"
    state = load_state_dict(path, device=device)
    if config is not None:
        candidates: list[tuple[dict[str, Any], tuple[str, str] | None]] = [(dict(config), None)]
    else:
        candidates = [(preset_config(n, size=s), (n, s)) for n, s in _single_file_candidates(shapes)]
    errors = []
    for cfg, match in candidates:
        public = {k: v for k, v in cfg.items() if not k.startswith("_")}
        cls = _diffusers_class(str(cfg.get("_class_name", "UNet2DConditionModel")), str(path))
        renamed = convert_ldm_unet(state, int(public.get("layers_per_block", 2))) if ldm else state
        try:
            model = _build_with_weights(
                lambda cls=cls, public=public: from_config(cls, public, str(path)), renamed, str(path), device, dtype
            )
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        return _tag(model, match)
    raise CheckpointError(
        f"{path}: {'LDM' if ldm else 'diffusers'}-layout UNet weights fit no shipped architecture "
        f"(tried {len(candidates)}; first mismatch: {errors[0].split(': ', 1)[-1]})"
    )


def load_unet(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    config: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A UNet with its real weights, from a folder or a single file, without a network.

    * a diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model[.fp16].safetensors``,
      sharded sets with their index, or ``.bin`` read weights-only) or a pipeline folder
      (its ``unet/``);
    * a single file in LDM layout (``model.diffusion_model.*``, as SD1.5/SD2.1/SDXL are
      published) or diffusers layout: the architecture is recognised from keys and shapes
      among the shipped configs (tiny test sizes included), or given as a diffusers ``config``.
      LDM weights are renamed to diffusers keys, exactly (every key and shape is checked).

    ``dtype=None`` keeps the stored precision (fp16 files give an fp16 model). The model is
    built on ``meta`` and adopts the loaded tensors, so nothing is initialised twice. Models
    that match a preset are tagged so :func:`unet_surgery.presets.example_inputs` accepts them.

    Args:
        source: a diffusers UNet or pipeline folder, or a single-file checkpoint.
        device: where to put the model.
        dtype: cast the weights (None: keep the stored precision).
        config: a diffusers config for a single file whose architecture is not a shipped one.
    """
    path = Path(source)
    if path.is_dir():
        return _load_folder(path, device, dtype)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return _load_single_file(path, device, dtype, config)
