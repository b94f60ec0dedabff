"""The ``noise_damped_cfg`` pass: ScaleCrafter's noise-damped classifier-free guidance.

The unconditional prediction of the damped branch runs with its own (vanilla) re-dilation
table. The conv side is a branch of the conv rewrite (a :class:`~unet_surgery.ops.BatchSplit`
slice); the batch side is :class:`~unet_surgery.patching.guidance.NoiseDampedGuidance`, which
:meth:`Patch.enable_noise_damped_cfg` (or ``apply_to_pipeline``) switches on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from unet_surgery.passes.base import (
    AUTO,
    FactorPlan,
    Plan,
    factor_now,
    register_pass,
    window_is_empty,
)
from unet_surgery.passes.redilate import FactorPassHandler, check_factors
from unet_surgery.recipes.schema import OnMissing, PassConfig, Recipe, ScheduleSpec, Selector, doc
from unet_surgery.runtime import DAMPED, UNetCall


@dataclass(frozen=True)
class NoiseDampedCFGPass(PassConfig):
    """Noise-damped guidance: the unconditional branch runs re-dilated by its own table."""

    type: ClassVar[str] = "noise_damped_cfg"
    select: Selector = doc("layers re-dilated in the damped (vanilla) branch")
    factor: float | None = doc("factor for selected layers without an entry in `factors`", default=None)
    factors: dict[str, float] = doc("per-layer factors of the damped branch", default_factory=dict)
    schedule: ScheduleSpec = doc("steps with noise-damped guidance (published: ndcfg_tau)", default_factory=ScheduleSpec)
    on_missing: OnMissing = doc("a listed path the model lacks: error or warn", default="error")

    def validate(self, where: str) -> None:
        check_factors(self, where)


@register_pass
class NoiseDampedCFGHandler(FactorPassHandler):
    """Plans the damped branch's factor per conv; sets it on the damped slice of the batch."""

    type = "noise_damped_cfg"
    config = NoiseDampedCFGPass
    order = 20
    branch = DAMPED

    def guidance_active(self, patch: Any, call: UNetCall | None) -> bool:
        """Whether the damped branch differs from plain on ``call`` (guidance splits the batch)."""
        return any(factor_now(patch, e, call) != 1.0 for e in patch.plan.entries(self.type).values())

    def no_effect_reasons(self, config: NoiseDampedCFGPass, index: int, recipe: Recipe, plan: Plan | None) -> list[str]:
        reasons = []
        if window_is_empty(config.schedule):
            reasons.append(f"schedule.tau is {config.schedule.tau:g}: no step is inside the window")
        if plan is not None:
            same = _same_branches(plan.entries(self.type), plan.entries("redilate"))
        else:  # no model: the same layers and factors, written the same way in the recipe
            mains: list[Any] = [p for p in recipe.passes if type(p).type == "redilate"]
            same = len(mains) == 1 and (mains[0].select, mains[0].factor, mains[0].factors, mains[0].schedule) == (
                config.select, config.factor, config.factors, config.schedule
            )
        if same:
            reasons.append(
                "the damped branch re-dilates every layer exactly as the main branch does: "
                "noise-damped guidance is then ordinary classifier-free guidance"
            )
        return reasons


def _same_branches(damped: dict[str, FactorPlan], main: dict[str, FactorPlan]) -> bool:
    """Both branches give every layer the same factor at every step (same factor and window)."""

    def plain(entry: FactorPlan) -> bool:
        return entry.factor != AUTO and float(entry.factor) == 1.0

    if not damped:
        return False
    for path in set(damped) | set(main):
        d, m = damped.get(path), main.get(path)
        if d is None or m is None:
            if not plain(d or m):  # type: ignore[arg-type]
                return False
        elif (d.factor, d.schedule) != (m.factor, m.schedule):
            return False
    return True
