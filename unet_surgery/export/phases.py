"""The phases of a patched model over a sampling run: the steps between which nothing changes.

A patch's layers read their setting per UNet call (factor, dispersed kernel, fusion window),
but over a run of ``n`` steps the settings take only a few distinct values (e.g. re-dilated
while ``step < tau``, progressively smaller factors, then off). To freeze the model into
static programs we evaluate every layer's setting for a hypothetical call at each step (the
patch's own rules, through its tracker, so nothing is re-implemented) and group equal ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from unet_surgery.errors import SurgeryError
from unet_surgery.ops import rewrite
from unet_surgery.patching.patch import Patch
from unet_surgery.runtime import MAIN, UNetCall


@dataclass(frozen=True)
class PhaseSettings:
    """Every patched layer's setting during one phase, in path order (hashable, comparable)."""

    layers: tuple[tuple[str, Any], ...]

    def summary(self, patch: Patch) -> list[dict[str, Any]]:
        """The layers that are not plain in this phase, for manifests and reports."""
        rows = []
        for path, setting in self.layers:
            row = patch.plan.layers[path].rewrite.summary(setting)
            if row is not None:
                rows.append({"path": path, **row})
        return rows

    def freeze_errors(self, patch: Patch) -> list[str]:
        """Why some layer's setting cannot be frozen (each handler of the layer is asked)."""
        errors = []
        for path, setting in self.layers:
            for part in patch.plan.layers[path].parts:
                error = part.handler.freeze_error(path, setting)
                if error is not None:
                    errors.append(error)
        return errors


def default_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """DDIM/PNDM "leading" spacing without offset: ``(n-1-i) * (T // n)`` for step ``i``."""
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise SurgeryError(f"steps must be in 1..{num_train_timesteps}, got {num_steps}")
    ratio = num_train_timesteps // num_steps
    return [(num_steps - 1 - i) * ratio for i in range(num_steps)]


def settings_at(patch: Patch, step: int, timesteps: Sequence[float], latent_hw: tuple[int, int], batch: int = 1) -> PhaseSettings:
    """Each layer's setting on a (hypothetical) UNet call at ``step`` of ``timesteps``.

    The tracker is pointed at that call for the evaluation and restored afterwards; only the
    main branch is evaluated (noise-damped guidance is a sampling-loop feature).
    """
    tracker = patch.tracker
    saved = (tracker.timesteps, tracker.current)
    tracker.timesteps = [float(t) for t in timesteps]
    call = UNetCall(timestep=float(timesteps[step]), latent_hw=(int(latent_hw[0]), int(latent_hw[1])), batch=batch, step=step)
    tracker.current = call
    try:
        layers = tuple((path, patch.layer_setting(layer, MAIN, call)) for path, layer in sorted(patch.plan.layers.items()))
    finally:
        tracker.timesteps, tracker.current = saved
    return PhaseSettings(layers)


def enumerate_phases(
    patch: Patch, timesteps: Sequence[float], latent_hw: tuple[int, int], batch: int = 1
) -> tuple[list[PhaseSettings], list[int]]:
    """Distinct settings in order of first use, and the phase index of every step.

    Args:
        patch: the applied recipe.
        timesteps: the sampler's timesteps, one per step.
        latent_hw: (height, width) of the latents.
        batch: batch size of the UNet calls.
    """
    phases: list[PhaseSettings] = []
    table: list[int] = []
    for step in range(len(timesteps)):
        settings = settings_at(patch, step, timesteps, latent_hw, batch)
        if settings not in phases:
            phases.append(settings)
        table.append(phases.index(settings))
    return phases, table


@contextlib.contextmanager
def frozen(patch: Patch, settings: PhaseSettings) -> Iterator[None]:
    """Make every patched layer use its setting in ``settings`` as a constant, then restore."""
    with contextlib.ExitStack() as stack:
        for path, setting in settings.layers:
            stack.enter_context(rewrite.frozen_source(patch.model.get_submodule(path), setting))
        yield
