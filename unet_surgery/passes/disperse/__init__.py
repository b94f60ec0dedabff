"""The ``disperse`` pass: ScaleCrafter's dispersed kernels, used in place of re-dilated ones.

Each selected conv holds the transform ``R`` (one shared tensor per distinct transform), not a
kernel: the dispersed kernel ``R @ w`` is computed from the live weight on every forward that
uses it, so a patched model holds no extra parameter or buffer bytes and weight edits after
apply (LoRA) are respected. An adapter stores ``R`` once per transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from unet_surgery.core.schema import OnMissing, PassConfig, Recipe, ScheduleSpec, Selector, doc
from unet_surgery.errors import SelectionError
from unet_surgery.graph.records import UNetMap
from unet_surgery.ops.dispersion import TransformParams, transform_key, transform_tensor
from unet_surgery.ops.redilate import ConvSetting, dispersion_of
from unet_surgery.passes.base import (
    FilterFn,
    PassHandler,
    Plan,
    active_now,
    describe_schedule,
    register_pass,
    spatial_convs,
    window_is_empty,
)
from unet_surgery.passes.layers import CONV
from unet_surgery.runtime import MAIN, UNetCall

TRANSFORM_PREFIX = "dispersion_R/"
"""Adapter key of a transform: ``dispersion_R/<small>-<large>-<scale>-<input_size>-<eta>``."""


@dataclass(frozen=True)
class DispersePass(PassConfig):
    """Dispersed kernels (ScaleCrafter): a 3x3 kernel becomes R @ W3 while the pass is active."""

    type: ClassVar[str] = "disperse"
    select: Selector = doc("convolutions to disperse")
    transform: TransformParams = doc("the least-squares problem R solves", default_factory=TransformParams)
    schedule: ScheduleSpec = doc("when the dispersed kernel is used (published: inflate_tau)", default_factory=ScheduleSpec)
    on_missing: OnMissing = doc("a listed path the model lacks: error or warn", default="error")


@dataclass(frozen=True)
class DisperseEntry:
    transform: TransformParams
    schedule: ScheduleSpec


@register_pass
class DisperseHandler(PassHandler[DispersePass]):
    """Gives each conv the transform ``R`` (its kernel ``R @ W`` is computed per forward); switches
    it on while the window is open and the re-dilation factor is at least the transform's scale
    (the kernel already covers ``scale``)."""

    type = "disperse"
    config = DispersePass
    rewrite = CONV
    order = 10  # after re-dilation: it reads the factor re-dilation set

    def layers(self, config: DispersePass, index: int, unet_map: UNetMap, plan: Plan, filter_fn: FilterFn | None) -> list[Any]:
        return spatial_convs(config, index, unet_map, plan, filter_fn)

    def entry(self, config: DispersePass, index: int, rec: Any) -> DisperseEntry:
        t = config.transform
        if rec.spatial_kernel != (t.small, t.small):
            raise SelectionError(f"passes[{index}] (disperse): {rec.path} is not a spatial {t.small}x{t.small} convolution")
        return DisperseEntry(t, config.schedule)

    def check_plan(self, plan: Plan) -> None:
        for path, layer in plan.layers.items():
            if layer.entry(self.type) is not None and layer.entry("redilate") is None:
                raise SelectionError(
                    f"{path} is dispersed but not re-dilated: a dispersed kernel only "
                    "replaces a re-dilated one (add it to a redilate pass)"
                )

    def describe(self, entry: DisperseEntry) -> str:
        t = entry.transform
        return f"{t.small}x{t.small} -> {t.large}x{t.large}, {describe_schedule(entry.schedule)}"

    def prepare(self, module: nn.Module, entry: DisperseEntry) -> dict[str, Any]:
        t = entry.transform
        return {"dispersion": transform_tensor(t), "dispersed_factor_scale": 1.0 / t.scale}

    def setting(self, patch: Any, entry: DisperseEntry, branch: str, call: UNetCall | None, current: ConvSetting) -> ConvSetting:
        if branch != MAIN or current.factor == 1.0:
            return current
        use = active_now(patch, entry.schedule, call) and current.factor / entry.transform.scale >= 1.0
        return ConvSetting(factor=current.factor, use_dispersed=use)

    def adapter_tensors(self, path: str, module: nn.Module, entry: DisperseEntry) -> dict[str, torch.Tensor]:
        """``R`` once per distinct transform (layers sharing it give the same key): no kernels."""
        if dispersion_of(module) is None:
            raise SelectionError(f"{path} is planned as dispersed but carries no dispersion transform")
        t = entry.transform
        return {TRANSFORM_PREFIX + transform_key(t): transform_tensor(t)}

    def no_effect_reasons(self, config: DispersePass, index: int, recipe: Recipe, plan: Plan | None) -> list[str]:
        reasons = []
        if window_is_empty(config.schedule):
            reasons.append(f"schedule.tau is {config.schedule.tau:g}: the dispersed kernel is never used")
        if plan is None:
            return reasons
        mains = [plan.layers[path].entry("redilate") for path in plan.planned_by(index)]
        factors = [m.factor for m in mains if m is not None]
        numeric = [f for f in factors if isinstance(f, (int, float))]
        if factors and len(numeric) == len(factors) and all(f / config.transform.scale < 1.0 for f in numeric):
            reasons.append(
                f"every dispersed layer's re-dilation factor is below the transform scale "
                f"{config.transform.scale}: the dispersed kernel is never used"
            )
        return reasons
