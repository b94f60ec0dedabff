"""``unet_surgery.generate``: a prompt x seed list of images, one process or many, resumable.

Processes come from ``accelerate`` (:class:`accelerate.PartialState`): under ``accelerate
launch`` each process takes its contiguous block of the job list
(``PartialState.split_between_processes``) and its own device; alone, it takes them all. Every
image is drawn from a CPU generator seeded with its own seed, and nothing that differs between
processes is written into a file, so the files do not depend on the number of processes. At the
end the manifest lines are gathered (``accelerate.utils.gather_object``) and the main process
writes ``manifest.jsonl`` in job order: one line per image of the list, whichever run wrote it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unet_surgery.generation import pngmeta
from unet_surgery.generation.jobs import (
    GenerationError,
    Job,
    make_jobs,
    parse_seeds,
    parse_size,
    read_prompts,
)
from unet_surgery.generation.pipeline_loader import (
    DTYPES,
    check_controlnet,
    check_model,
    load_controlnet,
    load_pipeline,
    task_pipeline,
)
from unet_surgery.generation.recipe_choice import check_recipe, patched_unet_folder, resolve_recipe
from unet_surgery.generation.schedulers import SCHEDULERS, set_scheduler
from unet_surgery.generation.vae_memory import configure_vae
from unet_surgery.io import check_not_input, excerpt, may_replace
from unet_surgery.recipes.library import dump_recipe
from unet_surgery.recipes.schema import Recipe

MANIFEST = "manifest.jsonl"
SPLITS = ("images", "patches")
# MKL's strict conditional numerical reproducibility: without it a CPU matmul's last bits depend
# on the memory alignment of its operands, which differs between processes that allocated
# differently before (measured: 1-in-255 pixel differences between a one- and a two-process run).
# MKL reads it at its first call, so it is set before anything is computed; a value already in
# the environment wins.
MKL_REPRODUCIBLE = ("MKL_CBWR", "AUTO,STRICT")


@dataclass
class GenerateResult:
    """What one process did; ``manifest`` is set on the main process only."""

    out: Path
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    manifest: Path | None = None
    recipe: Recipe | None = None
    vae_tiling: bool = False
    num_processes: int = 1


def _versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import PIL
    import transformers

    from unet_surgery._version import __version__

    return {
        "unet_surgery": __version__, "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "accelerate": accelerate.__version__, "pillow": PIL.__version__,
        "python": platform.python_version(),
    }


def _fingerprints(pipe: Any) -> dict[str, str]:
    """``fingerprint`` of every weight-carrying component (the UNet's is the model's)."""
    from unet_surgery.export.fingerprint import fingerprint

    return {name: fingerprint(module) for name, module in sorted(pipe.components.items())
            if isinstance(module, torch.nn.Module)}


def _open_image(path: str | Path, option: str, mode: str = "RGB") -> tuple[Any, str]:
    """An input image in ``mode`` and the sha256 of its file; one clear error naming ``option``
    if unreadable (its header's size is checked before any pixel is decoded)."""
    from PIL import UnidentifiedImageError

    file = Path(path)
    try:
        with pngmeta.open_image(file) as image:
            converted = image.convert(mode)
    except pngmeta.ImageTooLarge as exc:
        raise GenerationError(f"{option}: {exc}") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else text
        raise GenerationError(f"{option}: cannot read {file}: {reason[:200]}") from None
    return converted, pngmeta.file_sha256(file)


def _open_init_image(path: str | Path) -> tuple[Any, str]:
    """The init image as RGB and the sha256 of its file; one clear error if unreadable."""
    return _open_image(path, "--init-image")


def _normalised(data: Any) -> Any:
    """``data`` as it reads back from a PNG (tuples as lists, keys as strings)."""
    return json.loads(pngmeta.canonical_json(data))


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def generate(
    model: str | Path,
    *,
    prompts: str | Sequence[str] | None = None,
    prompts_file: str | Path | None = None,
    size: str | int | tuple[int, int] = 512,
    recipe: str | Path | Recipe | None = "auto",
    negative_prompt: str | None = None,
    steps: int = 50,
    guidance: float = 7.5,
    seeds: str | int | Sequence[int] = 0,
    scheduler: str | None = None,
    out: str | Path = "outputs",
    init_image: str | Path | None = None,
    strength: float = 0.6,
    mask: str | Path | None = None,
    controlnet: str | Path | None = None,
    control_image: str | Path | None = None,
    control_scale: float | None = None,
    control_end: float | None = None,
    components: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    vae_tiling: bool | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    split: str = "images",
    force: bool = False,
) -> GenerateResult:
    """Generate ``prompts`` x ``seeds`` at ``size`` with ``recipe`` into ``out``.

    ``size`` is a ``"WIDTHxHEIGHT"`` string (``"1024x768"``, as ``--size``), one side for a
    square, or a ``(height, width)`` pair as in ``pipe(height=, width=)``. ``force`` applies a
    recipe made for another UNet structure, family or base size.

    ``model`` is a diffusers SD/SDXL pipeline folder, or a single-file UNet checkpoint with
    ``components`` (a pipeline folder for the rest). ``recipe``: ``"auto"`` (derived from the
    UNet's map and the size), ``None``/``"none"``, a shipped recipe name, a file or a
    :class:`Recipe`. With ``init_image`` the image, resized to ``size``, is denoised from
    ``strength``; with ``mask`` as well, only the mask's white part is repainted (inpainting).
    ``controlnet`` (a ControlNet folder) with ``control_image`` steers any of these with a
    ControlNet. Files already in ``out`` with the same request are kept (resume); one with
    another request is an error unless ``overwrite``. ``vae_tiling=None`` decides from the
    decoder's estimated peak memory. ``threads`` sets torch's CPU threads: on the CPU the last
    bits of a result depend on it, so give the same value to runs whose bytes must agree.
    ``split="patches"`` (under ``accelerate launch``, with a patch-wise or DemoFusion recipe)
    makes every process work on every image, sharing its views each step; the main process
    writes the files.

    Args:
        model: a pipeline folder, or a UNet folder or single-file UNet with ``components``; a
            patched folder from ``apply --out`` runs with its own recipe.
        prompts: a prompt or a list of prompts (or give ``prompts_file``).
        prompts_file: a text file, one prompt a line (``#`` comments).
        size: ``"WIDTHxHEIGHT"``, one side for a square, or (height, width).
        recipe: ``"auto"``, ``None``/``"none"``, a shipped name, a file, an adapter folder or a
            :class:`Recipe`.
        negative_prompt: the negative prompt.
        steps: denoising steps (per cascade stage).
        guidance: classifier-free guidance scale.
        seeds: ``42``, ``"0,5,9"``, ``"0-7"`` (inclusive) or a list; every prompt gets every seed.
        scheduler: a sampler name (``SCHEDULERS``; default: the pipeline's own).
        out: the output folder.
        init_image: image-to-image: start from this image, resized to ``size``.
        strength: with ``init_image``: how much of the schedule is re-run, in (0, 1].
        mask: inpainting (with ``init_image``): white repaints, black keeps; resized to ``size``.
        controlnet: a diffusers ControlNet folder for the model's UNet (with ``control_image``).
        control_image: the ControlNet's condition image (an edge or depth map...), resized to ``size``.
        control_scale: the ControlNet's ``controlnet_conditioning_scale`` (default 1).
        control_end: ``control_guidance_end``: the ControlNet acts on the steps ``i`` with
            ``(i + 1) / n <= control_end`` (default 0.6 with a HiDiffusion recipe, as its official
            code, else 1).
        components: pipeline folder for the other components when ``model`` is a UNet.
        device: ``cpu``, ``cuda``, ``cuda:1``... (default: the process's accelerate device).
        dtype: ``float32``, ``float16`` or ``bfloat16`` (default float16 on CUDA, else float32).
        vae_tiling: always (True) or never (False) decode in tiles; None decides from memory.
        threads: CPU threads per process.
        overwrite: regenerate files that exist.
        progress: show progress bars.
        force: apply a recipe made for another UNet structure, family or base size.
        split: ``"images"`` or ``"patches"`` (under ``accelerate launch``).
    """
    # --- everything that can be checked without a model, before a process group or a load
    if (prompts is None) == (prompts_file is None):
        raise GenerationError("give exactly one of --prompt TEXT and --prompts FILE")
    prompt_list = read_prompts(prompts_file) if prompts_file is not None else (
        [prompts] if isinstance(prompts, str) else list(prompts or []))
    if any(not isinstance(p, str) or not p.strip() for p in prompt_list):
        raise GenerationError("--prompt: prompts must be non-empty text")
    jobs = make_jobs(prompt_list, parse_seeds(seeds))
    width, height = parse_size(size)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        shown = steps if isinstance(steps, int) and abs(steps) < 10**9 else type(steps).__name__
        raise GenerationError(f"--steps: {shown} is not a number of steps from 1 to {MAX_STEPS}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0.0 <= guidance <= MAX_GUIDANCE:
        raise GenerationError(f"--guidance: {str(guidance)[:20]} is not a finite scale from 0 to {MAX_GUIDANCE}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise GenerationError(f"--strength: {str(strength)[:20]} is not in (0, 1]")
    _check_control_options(init_image, mask, controlnet, control_image, control_scale, control_end)
    if init_image is not None and int(steps * strength) < 1:  # diffusers' img2img runs int(steps * strength)
        raise GenerationError(
            f"--steps {steps} with --strength {strength:g} leaves no denoising step (image-to-image runs "
            f"int(steps x strength) = 0); raise --steps or --strength"
        )
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise GenerationError(f"--scheduler: unknown {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if dtype is not None and dtype not in DTYPES:
        raise GenerationError(f"--dtype: unknown {dtype!r}; choose one of {', '.join(DTYPES)}")
    if split not in SPLITS:
        raise GenerationError(f"--split: unknown {split!r}; choose one of {', '.join(SPLITS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 1024):
        raise GenerationError(f"--threads: {str(threads)[:20]} is not a number of threads from 1 to 1024")
    requested_device = _parse_device(device)
    unet_source, _ = check_model(model, components)
    own = patched_unet_folder(unet_source)
    checked = check_recipe(recipe, own)
    init = _open_init_image(init_image) if init_image is not None else None
    mask_in = _open_image(mask, "--mask", "L") if mask is not None else None
    control_in = _open_image(control_image, "--control-image") if control_image is not None else None
    controlnet_folder = check_controlnet(controlnet) if controlnet is not None else None
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise GenerationError(f"--out: {out_dir} exists and is not a folder")
    inputs = [Path(model)] + ([Path(components)] if components is not None else []) + (
        [controlnet_folder] if controlnet_folder is not None else [])
    check_not_input(out_dir, inputs, GenerationError, option="--out", replaces_folder=False)
    earlier = pngmeta.read_manifest(out_dir / MANIFEST)  # refuses a manifest.jsonl we did not write

    from accelerate import PartialState
    from accelerate.utils import gather_object

    if threads is not None:
        torch.set_num_threads(threads)
    cpu = _cpu_only(requested_device)
    if cpu:
        os.environ.setdefault(MKL_REPRODUCIBLE[0], MKL_REPRODUCIBLE[1])
    state = PartialState(cpu=cpu)
    run_device = _device(requested_device, state.device)
    torch_dtype = DTYPES[dtype] if dtype else (torch.float16 if run_device.type == "cuda" else torch.float32)
    show = progress and state.is_main_process
    with _loading_bars(show):
        pipe = load_pipeline(model, components=components, dtype=torch_dtype, device=run_device)
    parse_size((height, width), pipe.vae_scale_factor)
    _check_fits(pipe, width, height, steps)
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    applied, unet_map = resolve_recipe(checked, pipe, height=height, width=width, steps=steps,
                                       init_image=init is not None, control=control_in is not None)
    executor = _patch_executor(split, applied, state.num_processes, height, width, pipe, run_device)
    control_model = None
    if controlnet_folder is not None:
        with _loading_bars(show):
            control_model = load_controlnet(controlnet_folder, dtype=torch_dtype, device=run_device)
    task = "inpainting" if mask_in is not None else "image-to-image" if init is not None else "text-to-image"
    runner = task_pipeline(pipe, task, control_model)
    runner.set_progress_bar_config(disable=not show, leave=False, desc="steps")
    tiling = configure_vae(pipe, height, width, vae_tiling)
    document = dump_recipe(applied) if applied is not None else ""
    fingerprints = _fingerprints(pipe)
    common = {
        "model": {"pipeline": type(pipe).__name__, "fingerprint": fingerprints.get("unet"),
                  "components": fingerprints},
        "recipe": None if applied is None else {
            "name": applied.name, "sha256": "sha256:" + hashlib.sha256(document.encode()).hexdigest()},
        "negative_prompt": negative_prompt or "",
        "width": width, "height": height, "steps": steps, "guidance_scale": float(guidance),
        "scheduler": {"class": type(pipe.scheduler).__name__,
                      "config": {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}},
        "init_image": None if init is None else {"sha256": init[1], "strength": float(strength)},
        "dtype": str(torch_dtype).removeprefix("torch."),
    }
    # recorded only when given, so files of runs without them resume as before
    if mask_in is not None:
        common["mask"] = {"sha256": mask_in[1]}
    if control_in is not None and control_model is not None:
        from unet_surgery.export.fingerprint import fingerprint

        end = control_end if control_end is not None else default_control_end(applied)
        common["controlnet"] = {"fingerprint": fingerprint(control_model), "image_sha256": control_in[1],
                                "scale": float(1.0 if control_scale is None else control_scale), "end": float(end)}
    environment = {"versions": _versions(), "device": run_device.type, "model_path": str(model),
                   "components_path": None if components is None else str(components)}
    image = None if init is None else init[0].resize((width, height), _lanczos())
    extra = _pipeline_inputs(common, mask_in, control_in, image is not None)
    result = GenerateResult(out_dir, recipe=applied, vae_tiling=tiling, num_processes=state.num_processes)
    if show:
        what = f"recipe {applied.name}" if applied is not None else "no recipe"
        print(f"generate: {len(jobs)} image(s) ({len(prompt_list)} prompt(s) x {len(jobs) // len(prompt_list)} "
              f"seed(s)) at {width}x{height}, {what}, {state.num_processes} process(es), "
              f"vae tiling {'on' if tiling else 'off'}", file=sys.stderr)

    lines: list[tuple[int, str]] = []
    patch = None
    if applied is not None:
        from unet_surgery.sampling.pipelines import apply_to_pipeline

        # A patched folder's own recipe was checked (or forced) when `apply --out` wrote it
        # onto these very weights: its fit is not asked again.
        patch = apply_to_pipeline(runner, applied, unet_map=unet_map, force=force or own is not None)
    try:
        share = contextlib.nullcontext(list(enumerate(jobs))) if split == "patches" else (
            state.split_between_processes(list(enumerate(jobs))))
        writes = split != "patches" or state.is_main_process
        with share as mine:
            from tqdm.auto import tqdm

            for position, job in tqdm(mine, desc="images", disable=not show, unit="img"):
                request = _normalised({**common, "prompt": job.prompt, "prompt_index": job.prompt_index,
                                       "seed": job.seed})
                settings = {"format": pngmeta.FORMAT, "request": request, "environment": environment}
                target = out_dir / job.file_name
                pngmeta.remove_stale_temporaries(target)
                if _keep_existing(target, request, overwrite):
                    result.skipped.append(target)
                    digest = pngmeta.file_sha256(target)
                else:
                    picture = _one_image(runner, applied, job, common, image, strength, show, executor, extra)
                    if not writes:  # --split patches: the main process writes what all computed
                        state.wait_for_everyone()
                        continue
                    digest = pngmeta.write_png(target, picture, settings, document)
                    result.written.append(target)
                    if split == "patches":
                        state.wait_for_everyone()
                if writes:
                    lines.append((position, pngmeta.manifest_line(job.file_name, digest, settings)))
    finally:
        if patch is not None:
            patch.remove()
    gathered = gather_object(lines) if state.num_processes > 1 else lines
    if state.is_main_process:
        ordered = [line for _, line in sorted(gathered)]
        result.manifest = out_dir / MANIFEST
        kept = pngmeta.earlier_lines(out_dir, earlier, {job.file_name for job in jobs})
        pngmeta.write_text(result.manifest, "".join(line + "\n" for line in sorted(kept + ordered, key=_file_of)))
    state.wait_for_everyone()
    return result


@contextlib.contextmanager
def _loading_bars(show: bool) -> Iterator[None]:
    """diffusers' and transformers' loading bars off for the block unless ``show``, then as before."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    modules = (diffusers_logging, transformers_logging)
    were_on = [m.is_progress_bar_enabled() for m in modules]
    if not show:
        for m in modules:
            m.disable_progress_bar()
    try:
        yield
    finally:
        for m, on in zip(modules, were_on, strict=True):
            if on:
                m.enable_progress_bar()


MAX_STEPS = 1000  # a diffusion schedule has 1000 training timesteps: more steps repeat them
MAX_GUIDANCE = 100.0


def _file_of(line: str) -> str:
    return str(json.loads(line)["file"])  # our own canonical line: the file name sorts in job order


def _parse_device(requested: str | None) -> str | None:
    """``requested`` if torch names a device so (``cpu``, ``cuda``, ``cuda:1``, ``mps``...), else one line."""
    if requested is None:
        return None
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError):
        raise GenerationError(f"--device: {excerpt(str(requested))} is not a device (cpu, cuda, cuda:1, mps...)") from None
    if device.type == "cuda" and device.index is not None and torch.cuda.is_available() \
            and device.index >= torch.cuda.device_count():
        raise GenerationError(f"--device: {requested} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    return requested


def _check_fits(pipe: Any, width: int, height: int, steps: int) -> None:
    """Refuse a size below what the UNet can halve down to, or more steps than the schedule has."""
    levels = len(getattr(pipe.unet.config, "block_out_channels", ())) or 1
    smallest = pipe.vae_scale_factor * 2 ** (levels - 1)
    if min(width, height) < smallest:
        raise GenerationError(
            f"--size: {width}x{height} is below this model's smallest size, {smallest} px a side "
            f"(its latent is halved {levels - 1} times)"
        )
    train = int(getattr(pipe.scheduler.config, "num_train_timesteps", MAX_STEPS))
    if steps > train:
        raise GenerationError(f"--steps: {steps} is more than the scheduler's {train} training timesteps")


def _cpu_only(requested: str | None) -> bool:
    """Whether the processes run on the CPU: asked for, or no accelerator to run on (accelerate then
    uses its CPU backend, gloo, for a multi-process launch; without ``cpu=True`` it would not)."""
    if requested is not None:
        return torch.device(requested).type == "cpu"
    accelerator = getattr(torch, "accelerator", None)
    return not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())


def _device(requested: str | None, process_device: torch.device) -> torch.device:
    """The device this process runs on: its accelerate device unless another is asked for."""
    if requested is None:
        return process_device
    wanted = torch.device(requested)
    if wanted.index is None and wanted.type == process_device.type:
        return process_device  # "cuda" under accelerate launch: this process's own GPU
    if wanted.type == "cuda" and not torch.cuda.is_available():
        raise GenerationError("--device cuda: no CUDA device is available (use --device cpu)")
    return wanted


def _lanczos() -> Any:
    from PIL import Image

    return Image.Resampling.LANCZOS


def _keep_existing(target: Path, request: dict[str, Any], overwrite: bool) -> bool:
    """Whether a file already at ``target`` is kept: written for the same request and no
    ``overwrite`` (:func:`unet_surgery.io.may_replace`); other content is refused unless ``overwrite``."""
    if not target.exists():
        return False
    existing = pngmeta.read_settings(target)
    if existing is None:
        return not may_replace(target, same=False, overwrite=overwrite, error=GenerationError,
                               what="an image not written by generate", prefix="--out: ")
    keys = ", ".join(_differences(existing["request"], request)[:8])
    return not may_replace(target, same=existing["request"] == request, overwrite=overwrite, error=GenerationError,
                           what=f"an image generated with other settings (differing: {keys})", prefix="--out: ")


def _patch_executor(split: str, recipe: Recipe | None, processes: int, height: int, width: int,
                    pipe: Any, device: torch.device) -> Any:
    """The view executor of ``--split patches`` (``None`` otherwise or alone), checked before any image."""
    if split != "patches":
        return None
    if recipe is None or (recipe.patches is None and recipe.demofusion is None):
        name = "no recipe" if recipe is None else f"recipe {recipe.name!r}"
        raise GenerationError(f"--split patches: {name} has no patches or demofusion section to split")
    vsf = pipe.vae_scale_factor
    if recipe.demofusion is not None:
        from unet_surgery.generation.recipe_choice import native_size
        from unet_surgery.sampling.demofusion import view_counts

        counts = view_counts(height, width, min(native_size(pipe)), vsf, recipe.demofusion)
    else:
        from unet_surgery.sampling.patchwise import num_view_batches, patch_settings

        window, stride = patch_settings(recipe)
        # resolve_recipe gives plain patches a one-stage sampling
        assert recipe.sampling is not None and recipe.patches is not None
        per_call = recipe.patches.view_batch_size
        counts = [num_view_batches(h // vsf, w // vsf, window, stride, per_call) for h, w in recipe.sampling.stages]
    from unet_surgery.sampling.patchwise import PatchError, SplitViews, check_world_size

    try:
        check_world_size(processes, counts)
    except PatchError as exc:
        raise GenerationError(str(exc)) from None
    return SplitViews(device) if processes > 1 else None


MAX_CONTROL_SCALE = 10.0  # published ControlNet scales are 0.5 to 2


def _check_control_options(init_image: Any, mask: Any, controlnet: Any, control_image: Any,
                           control_scale: Any, control_end: Any) -> None:
    """The inpainting and ControlNet options, checked together before anything is read."""
    if mask is not None and init_image is None:
        raise GenerationError("--mask: inpainting needs --init-image, the image whose white mask part is repainted")
    if (controlnet is None) != (control_image is None):
        given, missing = ("--controlnet", "--control-image") if control_image is None else ("--control-image", "--controlnet")
        raise GenerationError(f"{given}: give {missing} too (a ControlNet folder and its condition image)")
    for option, value, low, high in (("--control-scale", control_scale, 0.0, MAX_CONTROL_SCALE),
                                     ("--control-end", control_end, 0.0, 1.0)):
        if value is None:
            continue
        if controlnet is None:
            raise GenerationError(f"{option}: only with --controlnet and --control-image")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
                or (option == "--control-end" and value == 0):
            bounds = f"({low:g}, {high:g}]" if option == "--control-end" else f"[{low:g}, {high:g}]"
            raise GenerationError(f"{option}: {str(value)[:20]} is not in {bounds}")


HIDIFFUSION_PASSES = ("rau_net", "msw_msa")
HIDIFFUSION_CONTROL_END = 0.6  # controlnet_apply_steps_rate of the official hidiffusion.py


def default_control_end(recipe: Recipe | None) -> float:
    """``control_guidance_end`` when none is given: HiDiffusion's official code applies the
    ControlNet for the first 60 % of the steps only; everything else, diffusers' 1."""
    if recipe is not None and any(type(p).type in HIDIFFUSION_PASSES for p in recipe.passes):
        return HIDIFFUSION_CONTROL_END
    return 1.0


def _pipeline_inputs(common: dict[str, Any], mask: tuple[Any, str] | None, control: tuple[Any, str] | None,
                     has_init: bool) -> dict[str, Any]:
    """The pipeline call's mask and ControlNet arguments, images resized to the requested size."""
    from PIL import Image

    size = (common["width"], common["height"])
    extra: dict[str, Any] = {}
    if mask is not None:  # the inpainting pipelines take the size too (else the image's)
        extra.update(mask_image=mask[0].resize(size, Image.Resampling.NEAREST),
                     height=common["height"], width=common["width"])
    if control is not None:
        settings = common["controlnet"]
        # text-to-image ControlNet pipelines take the condition as ``image``; the others as ``control_image``
        extra["control_image" if has_init else "image"] = control[0].resize(size, _lanczos())
        extra.update(controlnet_conditioning_scale=settings["scale"], control_guidance_end=settings["end"])
    return extra


def _one_image(runner: Any, recipe: Recipe | None, job: Job, common: dict[str, Any], image: Any,
               strength: float, show: bool, executor: Any = None, extra: dict[str, Any] | None = None) -> Any:
    """One PIL image for ``job``, from a CPU generator seeded with the job's seed."""
    generator = torch.Generator("cpu").manual_seed(job.seed)
    negative = common["negative_prompt"] or None
    with torch.no_grad():
        if recipe is not None and recipe.demofusion is not None:
            from unet_surgery.sampling.demofusion import demofusion_sample

            out = demofusion_sample(
                runner, recipe, height=common["height"], width=common["width"], prompt=job.prompt,
                negative_prompt=negative, guidance_scale=common["guidance_scale"], generator=generator,
                jitter_seed=job.seed, output_type="pil", executor=executor, progress=show,
            )
            return out.images[0]
        if recipe is not None and recipe.sampling is not None:
            from unet_surgery.sampling.pipelines import self_cascade_sample

            control = {k: v for k, v in (extra or {}).items()
                       if k in ("image", "controlnet_conditioning_scale", "control_guidance_end")}
            out = self_cascade_sample(
                runner, recipe, prompt=job.prompt, negative_prompt=negative,
                guidance_scale=common["guidance_scale"], generator=generator, output_type="pil", progress=show,
                executor=executor, **control,
            )
            return out.images[0]
        kwargs: dict[str, Any] = {
            "prompt": job.prompt, "negative_prompt": negative, "num_inference_steps": common["steps"],
            "guidance_scale": common["guidance_scale"], "generator": generator, "output_type": "pil",
        }
        if image is not None:
            kwargs.update(image=image, strength=strength)
        else:
            kwargs.update(height=common["height"], width=common["width"])
        kwargs.update(extra or {})
        return runner(**kwargs).images[0]
