"""What the passes share: factor schedules, the step window, and layer selection helpers.

The registry, plans and handler base class live in :mod:`unet_surgery.core.registry` (below
this package and :mod:`unet_surgery.recipes`) and are re-exported here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from unet_surgery.core.registry import (
    FilterFn,
    LayerPart,
    LayerPlan,
    LayerRewrite,
    MissingPath,
    PassHandler,
    Plan,
    Record,
    handler_for,
    make_plan,
    no_effect_reasons,
    pass_types,
    register_pass,
    unregister_pass,
)
from unet_surgery.core.schema import ScheduleSpec
from unet_surgery.core.selectors import Selection, closest_paths, select
from unet_surgery.errors import SelectionError
from unet_surgery.graph.records import AttentionRecord, ConvRecord, UNetMap
from unet_surgery.ops.schedules import FactorSchedule, inferred_step
from unet_surgery.runtime import UNetCall

__all__ = [
    "AUTO",
    "FactorPlan",
    "FilterFn",
    "LayerPart",
    "LayerPlan",
    "LayerRewrite",
    "MissingPath",
    "PassHandler",
    "Plan",
    "Record",
    "active_now",
    "auto_factor",
    "describe_schedule",
    "factor_for",
    "factor_now",
    "handler_for",
    "make_plan",
    "no_effect_reasons",
    "pass_types",
    "register_pass",
    "selection",
    "spatial_convs",
    "spatial_self_attentions",
    "step_position",
    "unregister_pass",
    "window_is_empty",
]

if TYPE_CHECKING:
    from unet_surgery.patching.patch import Patch

AUTO = "auto"


# ----------------------------------------------------------------------------- schedules


def describe_schedule(s: ScheduleSpec) -> str:
    return "every step" if s.tau is None else f"steps < {s.tau:g} of {s.steps}"


@dataclass(frozen=True)
class FactorPlan:
    """A conv's factor over the trajectory. ``factor == "auto"`` is resolved per call."""

    factor: float | str
    schedule: ScheduleSpec

    def schedule_for(self, factor: float) -> FactorSchedule:
        # Read on every conv of every UNet call: built once per (spec, factor).
        return _factor_schedule(self.schedule, factor)

    def describe(self) -> str:
        text = self.factor if isinstance(self.factor, str) else f"{self.factor:g}"
        return f"{text}" + (", progressive" if self.schedule.progressive else "") + f", {describe_schedule(self.schedule)}"


@functools.lru_cache(maxsize=256)
def _factor_schedule(spec: ScheduleSpec, factor: float) -> FactorSchedule:
    return FactorSchedule(factor=factor, tau=spec.tau, steps=spec.steps, progressive=spec.progressive)


def auto_factor(latent_hw: tuple[int, int], base_latent_hw: tuple[int, int]) -> float:
    """FreeScale's restrained dilation: current size over base size, floored, at least 1."""
    import math

    ratio = max(latent_hw[0] / base_latent_hw[0], latent_hw[1] / base_latent_hw[1])
    return float(max(1, math.floor(ratio + 1e-9)))


def factor_now(patch: Patch, fp: FactorPlan | None, call: UNetCall | None) -> float:
    """The factor ``fp`` gives for ``call`` (1 when off), with ``patch``'s step bookkeeping."""
    if fp is None:
        return 1.0
    factor = fp.factor
    if factor == AUTO:
        if call is None or not call.latent_hw[0]:
            return 1.0
        factor = auto_factor(call.latent_hw, patch.base_latent_hw)
    schedule = fp.schedule_for(float(factor))
    position = step_position(patch, call, schedule.steps)
    if position is None:
        return float(schedule.factor) if schedule.tau is None else 1.0
    return schedule.factor_at_step(*position)


def step_position(patch: Patch, call: UNetCall | None, steps: int) -> tuple[int, int] | None:
    """``(step, step count)`` of ``call``: exact from the sampler's timestep list when the patch
    knows it, else inferred from ``t / T`` on a ``steps``-step run; None without a timestep.
    The one place a pass turns a UNet call into a step."""
    if call is None or call.timestep is None:
        return None
    tracker = patch.tracker
    if tracker.timesteps and call.step is not None:
        return call.step, len(tracker.timesteps)
    return inferred_step(call.timestep, steps, tracker.num_train_timesteps), steps


def active_now(patch: Patch, schedule: ScheduleSpec, call: UNetCall | None) -> bool:
    """Whether ``schedule``'s window is open on ``call``."""
    return factor_now(patch, FactorPlan(2.0, schedule), call) != 1.0


def window_is_empty(schedule: ScheduleSpec) -> bool:
    """True when no step can fall inside the window (``tau`` of 0)."""
    return schedule.tau is not None and schedule.tau <= 0


# ----------------------------------------------------------------------------- planning helpers


def selection(config: Any, index: int, unet_map: UNetMap, plan: Plan, filter_fn: FilterFn | None) -> Selection:
    """Resolve a pass's selector (and its ``factors`` table), honouring ``on_missing``."""
    where = f"passes[{index}] ({type(config).type})"
    sel = config.select
    table = getattr(config, "factors", None) or {}
    if table and sel.paths is None:
        # A table without explicit paths selects exactly its layers (within the criteria).
        sel = replace(sel, paths=tuple(table))
    found = select(unet_map, sel, where=where)
    if filter_fn is not None:
        found.records = [r for r in found.records if filter_fn(r.path, r.op)]
        if not found.records:
            raise SelectionError(f"{where}: filter_fn rejected every selected layer")
    extra = [p for p in table if p not in {r.path for r in found.records} and p not in found.missing]
    absent = [*found.missing, *(p for p in extra if p not in unet_map.paths())]
    if absent:
        if getattr(config, "on_missing", "error") == "error":
            first = absent[0]
            close = found.suggestions.get(first) or []
            raise SelectionError(
                f"{where}: {len(absent)} listed layer(s) do not exist in {unet_map.model_class}, e.g. {first!r}"
                + (f" (closest: {', '.join(close)})" if close else "")
                + "; set on_missing: warn to skip them"
            )
        for path in absent:
            plan.missing.append(MissingPath(index, path, found.suggestions.get(path) or closest_paths(path, unet_map.paths())))
    return found


def spatial_convs(config: Any, index: int, unet_map: UNetMap, plan: Plan, filter_fn: FilterFn | None) -> list[ConvRecord]:
    """The selected layers, which must all be spatial convolutions."""
    out = []
    for rec in selection(config, index, unet_map, plan, filter_fn).records:
        if not isinstance(rec, ConvRecord) or rec.axis == "temporal":
            raise SelectionError(f"passes[{index}] ({type(config).type}): {rec.path} is not a spatial convolution")
        out.append(rec)
    return out


def spatial_self_attentions(
    config: Any, index: int, unet_map: UNetMap, plan: Plan, filter_fn: FilterFn | None
) -> list[AttentionRecord]:
    """The selected layers, which must all be spatial self-attention."""
    out = []
    for rec in selection(config, index, unet_map, plan, filter_fn).records:
        if not isinstance(rec, AttentionRecord) or rec.kind != "self" or rec.axis != "spatial":
            raise SelectionError(f"passes[{index}] ({type(config).type}): {rec.path} is not a spatial self-attention")
        out.append(rec)
    return out


def factor_for(config: Any, path: str, where: str) -> float | str:
    """A layer's factor: its ``factors`` entry, else the pass's ``factor``."""
    if path in config.factors:
        return config.factors[path]
    if config.factor is None:
        raise SelectionError(f"{where}: {path} has no entry in factors and the pass has no default factor")
    return config.factor


