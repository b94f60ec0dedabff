"""The ``fouriscale`` pass: dilated convs with a low-pass filter of their input (FouriScale).

Official code (LeonHLJ/FouriScale, ``model.py`` and ``text2image*.py``): every listed conv
runs with dilation ``ceil(d_i)`` while step ``i < stop_step``, where ``d_i`` is the dilation
``D`` before ``start_step`` and ``(D - 1) * (stop - i) / (stop - start) + 1`` after it
(``progressive``); its input is low-pass filtered first (:mod:`unet_surgery.ops.lowpass`,
scale ``d_i / stride``), except on upsampler convs (``filter: false``). ``D`` is
``max(ceil(h / h0), ceil(w / w0))`` of the latent over the training latent. The pass
contributes to the shared conv rewrite (``CONV``), so it composes with the other conv passes.

FouriScale's guidance (a third batch branch whose convs get the weak mask, and whose
self-attention borrows the conditional branch's queries and keys) is the
``fouriscale_guidance`` pass (:mod:`unet_surgery.passes.fouriscale.guidance`); this pass
gives the convs of that branch their setting (``weak_*`` options).

The folder holds the whole method: this module (config + handler), ``guidance.py`` (the
guidance pass) and ``builder.py`` (``fouriscale_recipe``, above :mod:`unet_surgery.recipes`).
The low-pass filter is in :mod:`unet_surgery.ops.lowpass`, shared with the conv rewrite.
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

GUIDANCE = "fouriscale_guidance"
"""The branch of FouriScale's guidance slice (the official third of the batch)."""


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
    base_size: tuple[int, int] | None = doc(
        "(height, width) in pixels the dilation and the filter are measured against (official SDXL: "
        "picked from the aspect-ratio table assets/base_settings/sdxl.txt); default: the recipe's base_resolution",
        default=None,
    )
    weak_dilation_divisor: float = doc(
        "guidance branch: its convs run at dilation ceil(max(d / this, 1)) (official: 1 in the SD1.5/2.1 "
        "processor, 1.5 in the SDXL one)",
        default=1.0,
    )
    weak_scale_floor: bool = doc(
        "guidance branch: the weak mask's scale is max(d / stride, 1) (SD1.5/2.1 processor); false: "
        "d / stride (SDXL processor)",
        default=True,
    )
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
        if self.base_size is not None and min(self.base_size) < 1:
            fail(f"{where}.base_size", f"base_size must be two positive pixel sizes, got {list(self.base_size)}")
        if not 1.0 <= self.weak_dilation_divisor <= MAX_FACTOR:
            fail(f"{where}.weak_dilation_divisor",
                 f"weak_dilation_divisor must be between 1 and {MAX_FACTOR:g}, got {self.weak_dilation_divisor:g}")


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

    def dilation_now(self, patch: Any, entry: FouriScalePass, call: UNetCall | None) -> float:
        """FouriScale's float dilation ``d_i`` on ``call`` (1: the plain conv)."""
        if call is None or not call.latent_hw[0]:
            return 1.0
        position = step_position(patch, call, entry.steps)
        if position is None:
            return 1.0
        step, n = position
        ratio = n / entry.steps
        base = self.base_latent(patch, entry)
        dilation = auto_dilation(call.latent_hw, base) if entry.dilation == "auto" else float(entry.dilation)
        return official_dilation(dilation, step, entry.start_step * ratio, entry.stop_step * ratio, entry.progressive)

    @staticmethod
    def base_latent(patch: Any, entry: FouriScalePass) -> tuple[int, int]:
        """The latent size dilation and filter are measured against (``base_size``, else the recipe's base)."""
        if entry.base_size is None:
            return patch.base_latent_hw
        s = patch.recipe.vae_scale_factor
        return (max(1, entry.base_size[0] // s), max(1, entry.base_size[1] // s))

    def setting(self, patch: Any, entry: FouriScalePass, branch: str, call: UNetCall | None, current: ConvSetting) -> ConvSetting:
        if branch not in (MAIN, GUIDANCE):
            return current
        d = self.dilation_now(patch, entry, call)
        if d == 1.0 or call is None:
            return current
        base = self.base_latent(patch, entry)
        if branch == MAIN:
            lowpass = LowPass(d, base, call.latent_hw[0], entry.mask_value) if entry.filter else None
            return replace(current, factor=float(math.ceil(d)), use_dispersed=False, lowpass=lowpass)
        weak = (
            LowPass(d, base, call.latent_hw[0], entry.mask_value, weak=True, scale_floor=entry.weak_scale_floor)
            if entry.filter
            else None
        )
        factor = float(math.ceil(max(d / entry.weak_dilation_divisor, 1.0)))
        return replace(current, factor=factor, use_dispersed=False, lowpass=weak)

    def no_effect_reasons(self, config: FouriScalePass, index: int, recipe: Recipe, plan: Plan | None) -> list[str]:
        if config.dilation != "auto" and float(config.dilation) == 1.0:
            return ["dilation is 1: every selected conv is the plain conv"]
        return []
