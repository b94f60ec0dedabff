"""The ``fouriscale`` pass: dilated convs with a low-pass filter of their input (FouriScale).

Official code (LeonHLJ/FouriScale, ``model.py`` and ``text2image*.py``): every listed conv
runs with dilation ``ceil(d_i)`` while step ``i < stop_step``, where ``d_i`` is the dilation
``D`` before ``start_step`` and ``(D - 1) * (stop - i) / (stop - start) + 1`` after it
(``progressive``); its input is low-pass filtered first (:mod:`unet_surgery.ops.lowpass`,
scale ``d_i / stride``), except on upsampler convs (``filter: false``). ``D`` is
``max(ceil(h / h0), ceil(w / w0))`` of the latent over the training latent. The pass
contributes to the shared conv rewrite (``CONV``), so it composes with the other conv passes.

FouriScale's guidance (a third batch branch with a weaker filter whose self-attention borrows
the conditional branch's queries and keys) is not part of this pass; see
``docs/methods/fouriscale.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

from unet_surgery.core.schema import OnMissing, PassConfig, Recipe, Selector, doc, fail
from unet_surgery.graph.records import UNetMap
from unet_surgery.ops.lowpass import LowPass
from unet_surgery.ops.redilate import ConvSetting
from unet_surgery.passes.base import (
    FilterFn,
    PassHandler,
    Plan,
    register_pass,
    spatial_convs,
    step_position,
)
from unet_surgery.passes.layers import CONV
from unet_surgery.passes.redilate import MAX_FACTOR
from unet_surgery.runtime import MAIN, UNetCall


@dataclass(frozen=True)
class FouriScalePass(PassConfig):
    """Dilated convs whose input is low-pass filtered first (FouriScale), over a step window."""

    type: ClassVar[str] = "fouriscale"
    select: Selector = doc("convs to dilate (and filter)")
    dilation: float | Literal["auto"] = doc(
        "dilation D; auto: max(ceil(h / h0), ceil(w / w0)) of the latent over the base latent (official)",
        default="auto",
    )
    start_step: float = doc("progressive decay starts here (official: 10 or 20 of 50)", default=20)
    stop_step: float = doc("active while step < stop_step (official: 30 or 35 of 50)", default=35)
    steps: int = doc("the step count start/stop are expressed in (official: 50)", default=50)
    progressive: bool = doc("dilation decays linearly to 1 between start_step and stop_step", default=True)
    filter: bool = doc("low-pass filter the input (official: every listed conv but upsamplers)", default=True)
    mask_value: float = doc("floor of the low-pass mask (official: 0 for SD1.5/2.1, 0.6 for SDXL)", default=0.0)
    on_missing: OnMissing = doc("a listed path the model lacks: error or warn", default="error")

    def validate(self, where: str) -> None:
        if isinstance(self.dilation, float) and not 1 <= self.dilation <= MAX_FACTOR:
            fail(f"{where}.dilation", f"dilation must be between 1 and {MAX_FACTOR:g}, got {self.dilation:g}")
        if self.steps < 1:
            fail(f"{where}.steps", f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.start_step < self.stop_step:
            fail(f"{where}.stop_step", f"need 0 <= start_step < stop_step, got {self.start_step}, {self.stop_step}")
        if not 0.0 <= self.mask_value <= 1.0:
            fail(f"{where}.mask_value", f"mask_value must be in [0, 1], got {self.mask_value}")


def official_dilation(dilation: float, step: int, start: float, stop: float, progressive: bool) -> float:
    """FouriScale's (float) dilation at step ``step``; 1 means the plain conv."""
    if step >= stop:
        return 1.0
    if progressive and step >= start:
        return max((dilation - 1.0) * ((stop - step) / (stop - start)) + 1.0, 1.0)
    return dilation


def auto_dilation(latent_hw: tuple[int, int], base_latent_hw: tuple[int, int]) -> float:
    """The official ``max(ceil(h / h0), ceil(w / w0))``."""
    return float(max(math.ceil(latent_hw[0] / base_latent_hw[0]), math.ceil(latent_hw[1] / base_latent_hw[1])))


@register_pass
class FouriScaleHandler(PassHandler[FouriScalePass]):
    """Plans the selected spatial convs; sets factor ceil(d_i) and the low-pass filter."""

    type = "fouriscale"
    config = FouriScalePass
    rewrite = CONV
    order = 10

    def layers(self, config: FouriScalePass, index: int, unet_map: UNetMap, plan: Plan, filter_fn: FilterFn | None) -> list[Any]:
        return spatial_convs(config, index, unet_map, plan, filter_fn)

    def describe(self, entry: FouriScalePass) -> str:
        d = entry.dilation if isinstance(entry.dilation, str) else f"{entry.dilation:g}"
        how = "dilate + low-pass" if entry.filter else "dilate"
        return f"{how} {d}, steps < {entry.stop_step:g} of {entry.steps}" + (
            f", decaying from {entry.start_step:g}" if entry.progressive else ""
        )

    def setting(self, patch: Any, entry: FouriScalePass, branch: str, call: UNetCall | None, current: ConvSetting) -> ConvSetting:
        if branch != MAIN or call is None or not call.latent_hw[0]:
            return current
        position = step_position(patch, call, entry.steps)
        if position is None:
            return current
        step, n = position
        ratio = n / entry.steps
        base = patch.base_latent_hw
        dilation = auto_dilation(call.latent_hw, base) if entry.dilation == "auto" else float(entry.dilation)
        d = official_dilation(dilation, step, entry.start_step * ratio, entry.stop_step * ratio, entry.progressive)
        if d == 1.0:
            return current
        lowpass = LowPass(d, base, call.latent_hw[0], entry.mask_value) if entry.filter else None
        return replace(current, factor=float(math.ceil(d)), use_dispersed=False, lowpass=lowpass)

    def no_effect_reasons(self, config: FouriScalePass, index: int, recipe: Recipe, plan: Plan | None) -> list[str]:
        if config.dilation != "auto" and float(config.dilation) == 1.0:
            return ["dilation is 1: every selected conv is the plain conv"]
        return []
