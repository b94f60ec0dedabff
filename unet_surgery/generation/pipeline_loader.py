"""MODEL as a diffusers SD/SDXL pipeline, from local files only.

* a pipeline folder (``model_index.json``): ``from_pretrained(local_files_only=True,
  use_safetensors=True)``: no download, no pickle;
* a single-file UNet checkpoint (LDM or diffusers layout, ``.safetensors`` or a weights-only
  pickle): the UNet comes from the project's own loader (:func:`unet_surgery.load_unet`, never
  unpickles code), every other component from a pipeline folder given as ``components``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from unet_surgery.errors import CheckpointError
from unet_surgery.generation.jobs import GenerationError
from unet_surgery.io import MAX_JSON_BYTES, excerpt, read_bounded_json
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
    check_components(data, index)
    check_component_json(folder)
    return str(name)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")


def _known_library(library: Any) -> bool:
    """A library diffusers may import a component from: ``diffusers``, ``transformers`` or one
    of diffusers' own pipeline modules (``stable_diffusion`` holds SD1.5's safety checker)."""
    if library in (None, "diffusers", "transformers"):
        return True
    if not isinstance(library, str) or not _NAME.fullmatch(library):
        return False
    import importlib.util

    return importlib.util.find_spec(f"diffusers.pipelines.{library}") is not None


def check_components(index: dict[str, Any], where: Path) -> None:
    """Refuse a ``model_index.json`` entry diffusers would act on unchecked: a component name
    that is not a plain name (it is a subfolder path), or a ``[library, class]`` pair naming a
    library other than diffusers, transformers or a diffusers pipeline module. diffusers
    imports whatever module the library names, so ``["antigravity", "X"]`` would run that
    module's import-time code."""
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list):
            continue
        if not _NAME.fullmatch(key):
            raise GenerationError(f"MODEL: {where}: component name {excerpt(key)} is not a plain name")
        if len(value) != 2 or not _known_library(value[0]) or not (
            value[1] is None or (isinstance(value[1], str) and _NAME.fullmatch(value[1]))
        ):
            raise GenerationError(
                f"MODEL: {where}: component {key!r} names {excerpt(json.dumps(value))}, not a [library, class] pair "
                "of diffusers, transformers or a diffusers pipeline module"
            )


MAX_TRAIN_TIMESTEPS = 100_000  # SD's schedulers use 1000; 10**9 allocated gigabytes of betas


def check_component_json(folder: Path) -> None:
    """Read every JSON file of a pipeline folder's components (configs, scheduler, tokenizer)
    with the bounded reader before diffusers and transformers parse them unbounded: over-deep
    nesting, huge integers or ``NaN`` (e.g. ``"norm_eps": NaN``) are one line naming the file.
    A model component's ``config.json`` gets the UNet's size bounds (numbers up to 1e6, widths,
    an estimated size, ``sample_size`` a positive integer), so a VAE or text encoder config
    cannot ask for terabytes; a scheduler config its own (:func:`check_scheduler_config`). A
    tokenizer's files (``merges.txt``, ``vocab.json``...) are at most 16 MiB each, as JSON."""
    from unet_surgery.errors import PresetError
    from unet_surgery.presets import check_config_bounds

    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name.startswith("tokenizer"):
            for file in sorted(sub.iterdir()):
                if file.is_file() and file.stat().st_size > MAX_JSON_BYTES:
                    raise GenerationError(f"MODEL: {file} is larger than {MAX_JSON_BYTES} bytes (a tokenizer file is a few MiB)")
        for file in sorted(sub.glob("*.json")):
            data = read_bounded_json(file, GenerationError, prefix="MODEL: ")
            if not isinstance(data, dict):
                continue
            if file.name == "scheduler_config.json":
                check_scheduler_config(data, file)
            elif file.name == "config.json":  # diffusers builds the folder's UNet itself: checked here too
                try:
                    check_config_bounds({k: v for k, v in data.items() if not k.startswith("_")}, str(file))
                except PresetError as exc:
                    raise GenerationError(f"MODEL: {exc}") from None


def check_scheduler_config(config: dict[str, Any], file: Path) -> None:
    """Refuse a schedule that cannot be built or gives NaN: ``num_train_timesteps`` 1 to
    :data:`MAX_TRAIN_TIMESTEPS`, ``beta_start`` and ``beta_end`` in (0, 1) with start <= end
    (``beta_end: 5`` made alphas negative and every image NaN, written as black)."""
    steps = config.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_TRAIN_TIMESTEPS:
        raise GenerationError(
            f"MODEL: {file}: num_train_timesteps {str(steps)[:40]} is not an integer from 1 to {MAX_TRAIN_TIMESTEPS}"
        )
    betas = [config.get(k) for k in ("beta_start", "beta_end")]
    for key, beta in zip(("beta_start", "beta_end"), betas, strict=True):
        if beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < 1):
            raise GenerationError(f"MODEL: {file}: {key} {str(beta)[:40]} is not a number in (0, 1)")
    start, end = betas
    if start is not None and end is not None and start > end:
        raise GenerationError(f"MODEL: {file}: beta_start {start} is above beta_end {end}")


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
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, IndexError, AttributeError,
            NotImplementedError, ImportError, MemoryError) as exc:
        # diffusers and transformers build every component from files someone else wrote; what
        # they raise on a bad one (a schedule they do not know, a size they cannot allocate) is
        # one line naming the folder, not their traceback.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"MODEL: cannot load {folder} as a {cls.__name__}: {excerpt(first, 300)}") from None
    _check_schedule(pipe.scheduler, folder)
    _check_finite(pipe, folder)
    return pipe.to(device)


def _check_finite(pipe: Any, folder: Path) -> None:
    """Every weight of every model component finite: a NaN in the VAE or text encoder gave an
    all-black PNG and exit 0 (the UNet loader checks its own weights the same way)."""
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        for key, tensor in component.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"MODEL: {folder}: {name} weight {key} holds NaN or infinity")


def _check_schedule(scheduler: Any, folder: Path) -> None:
    """The built schedule's cumulative alphas must be finite and in (0, 1]: a custom
    ``trained_betas`` list or ``beta_schedule`` can still give NaN or negative ones."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if isinstance(alphas, torch.Tensor) and alphas.numel() and not (
        bool(torch.isfinite(alphas).all()) and float(alphas.min()) > 0 and float(alphas.max()) <= 1
    ):
        raise CheckpointError(
            f"MODEL: {folder}: the scheduler's cumulative alphas leave (0, 1] (its betas are not a noise schedule)"
        )


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
