"""MODEL as a diffusers SD/SDXL pipeline, from local files only.

* a pipeline folder (``model_index.json``): ``from_pretrained(local_files_only=True,
  use_safetensors=True)``: no download, no pickle;
* a single-file UNet checkpoint (LDM or diffusers layout, ``.safetensors`` or a weights-only
  pickle): the UNet comes from the project's own loader (:func:`unet_surgery.load_unet`, never
  unpickles code), every other component from a pipeline folder given as ``components``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from unet_surgery.errors import CheckpointError
from unet_surgery.generation.jobs import GenerationError
from unet_surgery.io import excerpt, read_bounded_json
from unet_surgery.loading.weights import WEIGHT_SUFFIXES

TEXT_TO_IMAGE = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
TASKS = ("text-to-image", "image-to-image", "inpainting")
# (text-to-image class, task, with a ControlNet) -> the pipeline class that runs it
TASK_PIPELINES = {
    (base, task, control): f"{prefix}{'ControlNet' if control else ''}{suffix}Pipeline"
    for base, prefix in (("StableDiffusionPipeline", "StableDiffusion"), ("StableDiffusionXLPipeline", "StableDiffusionXL"))
    for task, suffix in zip(TASKS, ("", "Img2Img", "Inpaint"), strict=True)
    for control in (False, True)
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Third-party messages that say nothing to a user of this tool: transformers falls back to its PIL
# image processors when torchvision is absent (the fallback is what a pipeline needs anyway).
_NOT_THE_USERS_CONCERN = {"transformers.utils.import_utils": ("requires torchvision (not installed)",)}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_third_party() -> None:
    """Drop the third-party log lines in ``_NOT_THE_USERS_CONCERN`` (idempotent)."""
    for name, fragments in _NOT_THE_USERS_CONCERN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))


def pipeline_class_name(folder: Path) -> str:
    """The ``_class_name`` of a pipeline folder's ``model_index.json``, checked to be supported."""
    index = folder / "model_index.json"
    if not folder.is_dir():
        raise GenerationError(f"MODEL: {folder} is not a folder or a checkpoint file")
    if not index.is_file():
        raise GenerationError(
            f"MODEL: {folder} is not a diffusers pipeline folder (no model_index.json); "
            "a UNet-only folder needs the other components: give its weights file and --components"
        )
    data = read_bounded_json(index, GenerationError, prefix="MODEL: ")
    name = data.get("_class_name") if isinstance(data, dict) else None
    if name not in TEXT_TO_IMAGE:
        shown = excerpt(name) if isinstance(name, str) else type(name).__name__
        raise GenerationError(
            f"MODEL: {folder} holds a {shown}; generate supports {', '.join(TEXT_TO_IMAGE)} folders"
        )
    check_component_json(folder)
    return str(name)


def check_component_json(folder: Path) -> None:
    """Read every JSON file of a pipeline folder's components (configs, scheduler, tokenizer)
    with the bounded reader before diffusers and transformers parse them unbounded: over-deep
    nesting, huge integers or ``NaN`` (e.g. ``"norm_eps": NaN``) are one line naming the file."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(sub.glob("*.json")):
            read_bounded_json(file, GenerationError, prefix="MODEL: ")


def check_model(model: str | Path, components: str | Path | None) -> tuple[Path, Path]:
    """(UNet source, pipeline folder): validated before anything heavy is loaded."""
    path = Path(model)
    if path.is_file() or path.suffix in WEIGHT_SUFFIXES:
        if not path.is_file():
            raise GenerationError(f"MODEL: checkpoint not found: {path}")
        if components is None:
            raise GenerationError(
                f"MODEL: {path} is a single-file UNet checkpoint; give --components DIR, a diffusers "
                "pipeline folder for the VAE, text encoder(s), tokenizer(s) and scheduler"
            )
        folder = Path(components)
        pipeline_class_name(folder)
        return path, folder
    if not path.exists():
        raise GenerationError(f"MODEL: {path} does not exist (a diffusers pipeline folder or a checkpoint file)")
    if path.is_dir() and not (path / "model_index.json").is_file() and (path / "config.json").is_file():
        # a UNet folder (save_pretrained, or a patched folder from `apply --out`)
        if components is None:
            raise GenerationError(
                f"MODEL: {path} is a UNet folder; give --components DIR, a diffusers pipeline folder for "
                "the VAE, text encoder(s), tokenizer(s) and scheduler"
            )
        folder = Path(components)
        pipeline_class_name(folder)
        return path, folder
    pipeline_class_name(path)
    if components is not None:
        raise GenerationError("--components is for a single-file MODEL; a pipeline folder has its own")
    return path, path


def load_pipeline(model: str | Path, *, components: str | Path | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Any:
    """The text-to-image pipeline MODEL names, on ``device`` in ``dtype``, without a network."""
    quiet_third_party()
    import diffusers

    unet_source, folder = check_model(model, components)
    cls = getattr(diffusers, pipeline_class_name(folder))
    extra: dict[str, Any] = {}
    if unet_source != folder:
        from unet_surgery.loading import load_unet

        extra["unet"] = load_unet(unet_source, device="cpu", dtype=dtype)
    if cls.__name__ == "StableDiffusionPipeline":
        extra.setdefault("safety_checker", None)  # an optional component; never fetched
        extra["requires_safety_checker"] = False
    try:
        pipe = cls.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, dtype=dtype, **extra
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"MODEL: cannot load {folder} as a {cls.__name__}: {first}") from None
    return pipe.to(device)


def check_controlnet(folder: str | Path) -> Path:
    """A ControlNet folder (``save_pretrained``: ``config.json`` naming ``ControlNetModel``),
    its config read with the bounded reader before diffusers parses it."""
    path = Path(folder)
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        raise GenerationError(f"--controlnet: {path} is not a diffusers ControlNet folder (no config.json)")
    data = read_bounded_json(config, GenerationError, prefix="--controlnet: ")
    name = data.get("_class_name") if isinstance(data, dict) else None
    if name != "ControlNetModel":
        shown = excerpt(name) if isinstance(name, str) else type(name).__name__
        raise GenerationError(f"--controlnet: {path} holds a {shown}, not a ControlNetModel")
    return path


def load_controlnet(folder: str | Path, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> Any:
    """The ControlNet of a local folder (safetensors only, no download), on ``device`` in ``dtype``."""
    from diffusers import ControlNetModel

    path = check_controlnet(folder)
    try:
        controlnet = ControlNetModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                     torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"--controlnet: cannot load {path}: {first}") from None
    return controlnet.to(device).eval()


def task_pipeline(pipe: Any, task: str = "text-to-image", controlnet: Any = None) -> Any:
    """The pipeline for ``task`` (with ``controlnet`` when given) sharing ``pipe``'s components (no copy)."""
    import diffusers

    name = TASK_PIPELINES[(type(pipe).__name__, task, controlnet is not None)]
    if name == type(pipe).__name__:
        return pipe
    extra = {"controlnet": controlnet} if controlnet is not None else {}
    return getattr(diffusers, name).from_pipe(pipe, **extra)
