"""Frozen ``torch.export`` programs of a patched model, one per schedule phase.

A patched model changes behaviour with the step, which a static graph cannot; but it changes
only between a few phases (:mod:`unet_surgery.export.phases`). Each phase is exported with
its settings frozen to constants at a fixed resolution and batch, and saved as
``phase_{k}.pt2`` beside a ``manifest.json`` that maps every step (and its timestep) to a
phase. :class:`Pt2Runner` loads the folder and is a drop-in ``unet(sample, t, ehs)`` for a
sampling loop with those timesteps: no unet-surgery code runs inside the programs.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unet_surgery.core.limits import MAX_SIDE
from unet_surgery.errors import CheckpointError, SurgeryError
from unet_surgery.export.manifest import check_pt2_manifest, read_manifest, sha256_file
from unet_surgery.export.phases import PhaseSettings, default_timesteps, enumerate_phases, frozen
from unet_surgery.export.progress import progress
from unet_surgery.export.pt2_safety import safe_load
from unet_surgery.export.staging import export_files, staged_folder
from unet_surgery.patching.patch import Patch

PT2_FORMAT = "unet-surgery-pt2"
PT2_VERSION = 2  # 2: every phase file's sha256 in the manifest
MANIFEST = "manifest.json"
_EXTRA = ("added_cond_kwargs", "added_time_ids")
_LDM_NAMES = {"x": "sample", "timesteps": "timestep", "context": "encoder_hidden_states"}


class UNetForward(nn.Module):
    """``unet.forward`` as a tensor-in, tensor-out module.

    Calls ``forward`` directly, bypassing the UNet's own hooks: the patch's call tracker reads
    the timestep as a Python number (untraceable), and in a frozen phase nothing reads it.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self._return_dict = "return_dict" in inspect.signature(unet.forward).parameters

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        added_time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self._return_dict:  # LDM UNetModel: forward(x, timesteps, context)
            return self.unet.forward(sample, timestep, encoder_hidden_states)
        extra: dict[str, Any] = {"return_dict": False}
        if added_cond_kwargs is not None:
            extra["added_cond_kwargs"] = added_cond_kwargs
        if added_time_ids is not None:
            extra["added_time_ids"] = added_time_ids
        return self.unet.forward(sample, timestep, encoder_hidden_states, **extra)[0]


def canonical_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Inputs under :class:`UNetForward`'s names (LDM ``x``/``timesteps``/``context`` renamed)."""
    out = {_LDM_NAMES.get(k, k): v for k, v in inputs.items()}
    unknown = set(out) - {"sample", "timestep", "encoder_hidden_states", *_EXTRA}
    if unknown or not {"sample", "timestep", "encoder_hidden_states"} <= set(out):
        raise SurgeryError(f"pt2 export takes sample, timestep, encoder_hidden_states[, {', '.join(_EXTRA)}], got {sorted(inputs)}")
    return out


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def default_inputs(
    model: nn.Module, height: int, width: int, *, batch: int = 1, num_frames: int | None = None, vae_scale_factor: int = 8
) -> dict[str, Any]:
    """Example inputs at ``height`` x ``width`` pixels for any UNet class with a call spec.

    Preset-tagged models get the presets' example inputs; any other diffusers or LDM UNet gets
    inputs built from its class's call spec and its own config (only shapes are frozen).
    """
    from unet_surgery.graph.inputs import call_inputs, call_spec, facts_from_model
    from unet_surgery.presets import example_inputs

    device, dtype = next(model.parameters()).device, _model_dtype(model)
    if getattr(model, "unet_surgery_preset", None) is not None:
        return example_inputs(model, batch=batch, height=height, width=width, num_frames=num_frames, device=device, dtype=dtype)
    spec = call_spec(model)
    if spec is None:
        raise SurgeryError(
            f"no call spec is known for {type(model).__name__}; pass inputs= with one forward's keyword arguments"
        )
    if height % vae_scale_factor or width % vae_scale_factor:
        raise SurgeryError(f"height and width must be multiples of {vae_scale_factor}, got {height}x{width}")
    frames = num_frames if num_frames is not None else getattr(getattr(model, "config", None), "num_frames", None)
    if spec.is_video and frames is None:
        raise SurgeryError(f"{type(model).__name__} is a video UNet: pass num_frames")

    def time_ids(kind: str, rows: int) -> torch.Tensor:
        values = [height, width, 0, 0, height, width] if kind == "text_time" else [6.0, 127.0, 0.02]
        return torch.tensor(values, dtype=torch.float32).repeat(rows, 1).to(device=device, dtype=dtype)

    return call_inputs(
        spec,
        facts_from_model(model, spec),
        batch=batch,
        latent_hw=(height // vae_scale_factor, width // vae_scale_factor),
        frames=frames if spec.is_video else None,
        tokens=77,
        tensor=lambda shape: torch.randn(shape, dtype=torch.float32).to(device=device, dtype=dtype),
        timestep=torch.full((batch,), 999, dtype=torch.long, device=device),
        time_ids=time_ids,
        labels=lambda shape: torch.zeros(*shape, dtype=torch.long, device=device),
    )


def _describe_inputs(inputs: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, Mapping):
            out.update(_describe_inputs(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            out[prefix + key] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    return out


def _check_freezable(patch: Patch, settings: PhaseSettings, k: int) -> None:
    errors = settings.freeze_errors(patch)
    if errors:
        raise SurgeryError(f"phase {k}: {errors[0]}")


def export_phase(patch: Patch, settings: PhaseSettings, inputs: Mapping[str, Any]) -> torch.export.ExportedProgram:
    """The patched model with ``settings`` frozen, exported for ``inputs``' shapes."""
    with frozen(patch, settings), torch.no_grad():
        return torch.export.export(UNetForward(patch.model), args=(), kwargs=dict(inputs), strict=False)


MAX_BATCH = 64
MAX_FRAMES = 256


def _is_video(model: nn.Module) -> bool:
    from unet_surgery.graph.inputs import call_spec
    from unet_surgery.presets import get_preset

    preset = getattr(model, "unet_surgery_preset", None)
    if preset is not None:
        return get_preset(preset).is_video
    spec = call_spec(model)
    return bool(spec is not None and spec.is_video)


def check_pt2_options(patch: Patch, *, height: int, width: int, num_steps: int, batch: int, num_frames: int | None) -> None:
    """Refuse sizes, step counts, batches and frame counts no program can be exported for (one line each)."""
    factor = patch.recipe.vae_scale_factor
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIDE or value % factor:
            raise SurgeryError(f"resolution: {name} {str(value)[:20]} must be a multiple of {factor} from {factor} to {MAX_SIDE}")
    train = patch.tracker.num_train_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= train:
        raise SurgeryError(f"steps: {str(num_steps)[:20]} is not between 1 and {train} (the model's training timesteps)")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise SurgeryError(f"batch: {str(batch)[:20]} is not between 1 and {MAX_BATCH}")
    video = _is_video(patch.model)
    if num_frames is not None and not video:
        raise SurgeryError(f"frames: {type(patch.model).__name__} is not a video UNet; frames apply to video UNets only")
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int)
                                   or not 1 <= num_frames <= MAX_FRAMES):
        raise SurgeryError(f"frames: {str(num_frames)[:20]} is not between 1 and {MAX_FRAMES}")


def export_pt2(
    patch: Patch,
    directory: str | Path,
    *,
    height: int,
    width: int,
    num_steps: int,
    timesteps: Sequence[float] | None = None,
    batch: int = 1,
    num_frames: int | None = None,
    inputs: Mapping[str, Any] | None = None,
    show_progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write one ``phase_{k}.pt2`` per distinct phase of a ``num_steps`` run and the manifest.

    ``height``/``width`` are pixels (latents are 1/vae_scale_factor of that); ``timesteps``
    is the sampler's list (default: :func:`default_timesteps`); ``inputs`` overrides the
    example forward arguments (their shapes and dtypes are frozen into the programs).
    An earlier export with other content in ``directory`` is replaced only with ``overwrite``.

    Args:
        patch: the applied recipe to freeze.
        directory: the folder to write the programs and the manifest to.
        height: image height in pixels.
        width: image width in pixels.
        num_steps: sampling steps of the run.
        timesteps: the sampler's timesteps (default: :func:`default_timesteps`).
        batch: batch size frozen into the programs.
        num_frames: frames, for video UNets.
        inputs: example forward arguments instead of the built ones.
        show_progress: show a progress bar.
        overwrite: replace an earlier export with other content.
    """
    model = patch.model
    if not patch.active:
        raise SurgeryError("the patch has been removed; apply it again before exporting")
    check_pt2_options(patch, height=height, width=width, num_steps=num_steps, batch=batch, num_frames=num_frames)
    ts = [float(t) for t in (timesteps if timesteps is not None else default_timesteps(num_steps, patch.tracker.num_train_timesteps))]
    if len(ts) != num_steps:
        raise SurgeryError(f"{len(ts)} timesteps given for {num_steps} steps")
    example = canonical_inputs(
        inputs if inputs is not None
        else default_inputs(model, height, width, batch=batch, num_frames=num_frames, vae_scale_factor=patch.recipe.vae_scale_factor)
    )
    latent_hw = (int(example["sample"].shape[-2]), int(example["sample"].shape[-1]))
    phases, table = enumerate_phases(patch, ts, latent_hw, int(example["sample"].shape[0]))
    for k, settings in enumerate(phases):
        _check_freezable(patch, settings, k)
    directory = Path(directory)
    with staged_folder(directory, overwrite=overwrite) as stage, progress(len(phases), "pt2 phases", show_progress) as bar:
        for k, settings in enumerate(phases):
            program = export_phase(patch, settings, example)
            with (stage / f"phase_{k}.pt2").open("wb") as f:
                torch.export.save(program, f)
            bar.update()
        manifest = {
            "format": PT2_FORMAT,
            "version": PT2_VERSION,
            "recipe": patch.recipe.name,
            "model_class": type(model).__name__,
            "resolution": [height, width],
            "latent_hw": list(latent_hw),
            "batch": int(example["sample"].shape[0]),
            "dtype": str(_model_dtype(model)).removeprefix("torch."),
            "num_steps": num_steps,
            "timesteps": ts,
            "step_phase": table,
            "phases": [
                {
                    "file": f"phase_{k}.pt2",
                    "sha256": sha256_file(stage / f"phase_{k}.pt2"),
                    "steps": [i for i, p in enumerate(table) if p == k],
                    "changed": s.summary(patch),
                }
                for k, s in enumerate(phases)
            ],
            "inputs": _describe_inputs(example),
        }
        manifest["export_files"] = export_files(stage, MANIFEST)  # proves the folder is ours to replace
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return directory


class Pt2Runner:
    """Run an exported folder as a UNet: picks the phase of each call from its timestep.

    ``runner(sample, timestep, encoder_hidden_states, **extra)`` returns the prediction
    tensor. The step is the index of the nearest timestep in the manifest's list (pass
    ``step=`` to choose it directly). Programs are loaded on first use and kept.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        file = self.directory / MANIFEST
        manifest = read_manifest(file, missing=f"{self.directory} is not a pt2 export: {MANIFEST} is missing")
        check_pt2_manifest(manifest, file, PT2_FORMAT, PT2_VERSION)
        self.manifest = manifest
        self.timesteps: list[float] = [float(t) for t in manifest["timesteps"]]
        self.step_phase: list[int] = [int(k) for k in manifest["step_phase"]]
        self._programs: dict[int, nn.Module] = {}

    @property
    def num_phases(self) -> int:
        return len(self.manifest["phases"])

    def step_of(self, timestep: float | torch.Tensor) -> int:
        from unet_surgery.ops.schedules import step_index

        return step_index(timestep, self.timesteps)

    def program(self, phase: int) -> nn.Module:
        """The runnable module of one phase (loaded from ``phase_{k}.pt2`` on first use)."""
        if phase not in self._programs:
            entry = self.manifest["phases"][phase]
            path = self.directory / entry["file"]
            if not path.is_file():
                raise CheckpointError(f"{self.directory}: {entry['file']} is missing")
            if sha256_file(path) != entry["sha256"]:
                raise CheckpointError(f"{path} is corrupt or was replaced (its sha256 differs from {MANIFEST})")
            self._programs[phase] = safe_load(path).module()
        return self._programs[phase]

    def _timestep(self, timestep: Any, device: torch.device) -> torch.Tensor:
        spec = self.manifest["inputs"]["timestep"]
        t = torch.as_tensor(timestep, device=device).to(getattr(torch, spec["dtype"])).reshape(-1)
        shape = tuple(spec["shape"])
        return t.reshape(()) if not shape else t.expand(shape).contiguous()

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        *,
        step: int | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        if step is None:
            step = self.step_of(timestep)
        if not 0 <= step < len(self.step_phase):
            raise SurgeryError(f"step {step} is outside the exported run of {len(self.step_phase)} steps")
        module = self.program(self.step_phase[step])
        kwargs = {k: v for k, v in extra.items() if v is not None}
        return module(sample=sample, timestep=self._timestep(timestep, sample.device), encoder_hidden_states=encoder_hidden_states, **kwargs)
