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
from unet_surgery.ops.redilate import _SOURCE as _CONV_SOURCE
from unet_surgery.ops.redilate import ConvSetting
from unet_surgery.patching.patch import Patch
from unet_surgery.runtime import UNetCall

_FUSION_SOURCE = "_fusion_source"  # unet_surgery.ops.scale_fusion's source attribute


@dataclass(frozen=True)
class PhaseSettings:
    """Every patched layer's setting during one phase, in path order (hashable, comparable)."""

    convs: tuple[tuple[str, ConvSetting], ...]
    attentions: tuple[tuple[str, Any], ...]  # (path, FusionSetting | None)

    def summary(self) -> list[dict[str, Any]]:
        """The layers that are not plain in this phase, for manifests and reports."""
        rows: list[dict[str, Any]] = [
            {"path": p, "factor": s.factor, "dispersed": s.use_dispersed}
            for p, s in self.convs
            if s.factor != 1.0 or s.use_dispersed
        ]
        rows += [{"path": p, "scale_fusion": True} for p, s in self.attentions if s is not None and s.active]
        return rows


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
    tracker.current = UNetCall(timestep=float(timesteps[step]), latent_hw=tuple(latent_hw), batch=batch, step=step)
    try:
        convs = []
        for path, plan in sorted(patch.plan.convs.items()):
            setting = patch.conv_setting(plan)
            if not isinstance(setting, ConvSetting):
                raise SurgeryError(f"{path}: a batch-split setting cannot be frozen")
            convs.append((path, setting))
        attentions = []
        if patch.plan.attentions:
            from unet_surgery.patching.attention import fusion_setting

            attentions = [(path, fusion_setting(patch, plan)) for path, plan in sorted(patch.plan.attentions.items())]
    finally:
        tracker.timesteps, tracker.current = saved
    return PhaseSettings(tuple(convs), tuple(attentions))


def enumerate_phases(
    patch: Patch, timesteps: Sequence[float], latent_hw: tuple[int, int], batch: int = 1
) -> tuple[list[PhaseSettings], list[int]]:
    """Distinct settings in order of first use, and the phase index of every step."""
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
    saved: list[tuple[Any, str, Any]] = []
    try:
        for path, setting in settings.convs:
            conv = patch.model.get_submodule(path)
            saved.append((conv, _CONV_SOURCE, conv.__dict__[_CONV_SOURCE]))
            conv.__dict__[_CONV_SOURCE] = setting
        for path, fusion in settings.attentions:
            attn = patch.model.get_submodule(path)
            saved.append((attn, _FUSION_SOURCE, attn.__dict__[_FUSION_SOURCE]))
            attn.__dict__[_FUSION_SOURCE] = fusion
        yield
    finally:
        for module, name, source in reversed(saved):
            module.__dict__[name] = source
