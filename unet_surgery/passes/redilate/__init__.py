"""The ``redilate`` pass: re-dilated convolutions (ScaleCrafter; FreeScale's ``factor: auto``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from unet_surgery.core.schema import (
    OnMissing,
    PassConfig,
    Recipe,
    ScheduleSpec,
    Selector,
    doc,
    fail,
    key_path,
)
from unet_surgery.graph.records import UNetMap
from unet_surgery.ops.redilate import ConvSetting
from unet_surgery.passes.base import (
    AUTO,
    FactorPlan,
    FilterFn,
    PassHandler,
    Plan,
    factor_for,
    factor_now,
    register_pass,
    spatial_convs,
    window_is_empty,
)
from unet_surgery.passes.layers import CONV
from unet_surgery.runtime import MAIN, UNetCall

MAX_FACTOR = 64.0  # a dilation beyond 64 reaches past every latent a UNet runs at


def check_factors(config: Any, where: str) -> None:
    """Factors are dilations from 1 (the plain conv) to :data:`MAX_FACTOR`, and a pass needs a
    factor or a table (redilate, ndcfg). Below 1 the input would be enlarged by 1/factor per
    side (1e-15 asks for a 10**15-pixel side), so the range is where the op is a re-dilation."""
    for key, factor in config.factors.items():
        if not 1.0 <= factor <= MAX_FACTOR:
            fail(key_path(f"{where}.factors", key), f"factor must be between 1 and {MAX_FACTOR:g}, got {factor:g}")
    if isinstance(config.factor, float) and not 1.0 <= config.factor <= MAX_FACTOR:
        fail(f"{where}.factor", f"factor must be between 1 and {MAX_FACTOR:g}, got {config.factor:g}")
    if config.factor is None and not config.factors:
        fail(f"{where}.factor", "give a factor or a factors table")


def factor_one_reasons(config: Any, planned: list[str] | None) -> list[str]:
    """No-effect reasons of factor passes: an empty window, or factor 1 for every layer.

    ``planned`` are the layers the pass kept on a model (None: no model, judge the recipe).
    """
    reasons = []
    if window_is_empty(config.schedule):
        reasons.append(f"schedule.tau is {config.schedule.tau:g}: no step is inside the window")
    ones = config.factor in (None, 1.0) and all(f == 1.0 for f in config.factors.values())
    if (planned is not None and not planned) or (planned is None and ones):
        reasons.append("every selected layer has factor 1 (the plain conv)")
    return reasons


@dataclass(frozen=True)
class RedilatePass(PassConfig):
    """Re-dilated convolutions (ScaleCrafter), with a per-step schedule."""

    type: ClassVar[str] = "redilate"
    select: Selector = doc("layers to re-dilate")
    factor: float | Literal["auto"] | None = doc(
        "factor for every selected layer without an entry in `factors`; auto: the current "
        "latent size over the base size, floored (FreeScale's restrained dilation)",
        default=None,
    )
    factors: dict[str, float] = doc("per-layer factors (path: factor), e.g. a published table", default_factory=dict)
    schedule: ScheduleSpec = doc("when the pass is active", default_factory=ScheduleSpec)
    on_missing: OnMissing = doc(
        "a path in `select.paths`/`factors` the model lacks: error, or warn and report it", default="error"
    )

    def validate(self, where: str) -> None:
        check_factors(self, where)


class FactorPassHandler(PassHandler[Any]):
    """A conv factor per layer over the trajectory, set on one branch of the batch.

    Shared by re-dilation (the main branch) and noise-damped guidance (the damped branch).
    """

    rewrite = CONV
    branch: str = MAIN
    skip_factor_one: bool = False  # a factor of 1 is the plain conv: not planned at all

    def layers(self, config: Any, index: int, unet_map: UNetMap, plan: Plan, filter_fn: FilterFn | None) -> list[Any]:
        return spatial_convs(config, index, unet_map, plan, filter_fn)

    def entry(self, config: Any, index: int, rec: Any) -> FactorPlan | None:
        factor = factor_for(config, rec.path, f"passes[{index}]")
        if self.skip_factor_one and factor != AUTO and float(factor) == 1.0:
            return None
        return FactorPlan(factor, config.schedule)

    def describe(self, entry: FactorPlan) -> str:
        return entry.describe()

    def setting(self, patch: Any, entry: FactorPlan, branch: str, call: UNetCall | None, current: ConvSetting) -> ConvSetting:
        if branch != self.branch:
            return current
        return ConvSetting(factor=factor_now(patch, entry, call), use_dispersed=False)


@register_pass
class RedilateHandler(FactorPassHandler):
    """Plans a factor per conv; sets the main branch's factor on every call."""

    type = "redilate"
    config = RedilatePass
    order = 0
    skip_factor_one = True

    def no_effect_reasons(self, config: RedilatePass, index: int, recipe: Recipe, plan: Plan | None) -> list[str]:
        planned = None if plan is None else plan.planned_by(index)
        return factor_one_reasons(config, planned)
