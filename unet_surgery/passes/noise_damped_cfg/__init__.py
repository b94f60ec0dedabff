"""The ``noise_damped_cfg`` pass: ScaleCrafter's noise-damped classifier-free guidance.

The unconditional prediction of the damped branch runs with its own (vanilla) re-dilation
table. The conv side is a branch of the conv rewrite (a :class:`~unet_surgery.ops.BatchSplit`
slice). The batch side is two model hooks the handler registers on the patch (``attach``);
they act once the caller declares ``[uncond, cond]`` batches (``patch.set_cfg_batches(True)``,
done by ``apply_to_pipeline``).

A pipeline batches ``[uncond, cond]`` and combines ``uncond + w * (cond - uncond)``. While the
noise-damped window is open, the pre hook turns that batch into ``[uncond, uncond, cond]``; the
first slice runs the damped (vanilla-table) branch and the other two the main branch, in one
UNet call (each re-dilated conv splits its batch). The post hook then returns

    uncond' = eps_v(u)          cond' = eps_v(u) + eps_d(c) - eps_d(u)

so the pipeline's own combination yields ``eps_v(u) + w * (eps_d(c) - eps_d(u))``, the
published formula, for any guidance scale. The published loop spends four evaluations (two
batch-2 calls) and discards one. What a call in flight needs (its rows) is on the call
record, which is per thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from unet_surgery.core.schema import OnMissing, PassConfig, Recipe, ScheduleSpec, Selector, doc
from unet_surgery.passes.base import (
    AUTO,
    FactorPlan,
    Plan,
    factor_now,
    register_pass,
    window_is_empty,
)
from unet_surgery.passes.cfg_batch import end_split, map_sample, split_batch
from unet_surgery.passes.redilate import FactorPassHandler, check_factors
from unet_surgery.runtime import DAMPED, MAIN, UNetCall


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
    cfg_batches = True

    def guidance_active(self, patch: Any, call: UNetCall | None) -> bool:
        """Whether the damped branch differs from plain on ``call`` (guidance splits the batch)."""
        return any(factor_now(patch, e, call) != 1.0 for e in patch.plan.entries(self.type).values())

    def attach(self, patch: Any) -> None:
        hooks = _BatchSplitHooks(patch, self)
        patch.hooks.add(self.type, pre=hooks.pre, post=hooks.post)

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


def _combine(sample: torch.Tensor, rows: int) -> torch.Tensor:
    k = sample.shape[0] // (3 * rows)
    n = rows * k
    vanilla_u, damped_u, damped_c = sample[:n], sample[n : 2 * n], sample[2 * n :]
    return torch.cat([vanilla_u, vanilla_u + (damped_c - damped_u)])


class _BatchSplitHooks:
    """The pre/post model hooks of noise-damped guidance, acting while ``patch.cfg_batches``."""

    def __init__(self, patch: Any, handler: NoiseDampedCFGHandler) -> None:
        self.patch, self.handler = patch, handler

    def pre(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        patch = self.patch
        call = patch.tracker.current
        if call is None or not patch.cfg_batches or not self.handler.guidance_active(patch, call):
            return None
        layout = ((0, DAMPED), (0, MAIN), (1, MAIN))  # [u, c] -> [u, u, c]
        return split_batch(patch, call, args, kwargs, layout, "noise-damped guidance")

    def post(self, module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        call = self.patch.tracker.current
        if call is None or call.groups is None:
            return None
        rows = call.groups[0][0]
        end_split(call)
        return map_sample(output, lambda sample: _combine(sample, rows), "noise-damped guidance")
