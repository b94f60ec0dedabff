"""Turn a recipe and a UNet map into a per-layer plan: which layer does what, when.

Planning is pure (no model is touched), so ``unet-surgery apply`` can print what would change
and tests can compare plans with published tables. Each pass type registers a planner, in the
manner of torchao's per-config handlers; a new pass type (FreeU, say) adds a dataclass in the
schema and a planner here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from unet_surgery.errors import SelectionError
from unet_surgery.graph.records import AttentionRecord, ConvRecord, UNetMap
from unet_surgery.ops.schedules import FactorSchedule
from unet_surgery.recipes.schema import (
    DispersePass,
    NoiseDampedCFGPass,
    Recipe,
    RedilatePass,
    ScaleFusionPass,
    ScheduleSpec,
    Selector,
    TransformSpec,
)
from unet_surgery.recipes.selectors import Selection, select

AUTO = "auto"


@dataclass(frozen=True)
class FactorPlan:
    """A conv's factor over the trajectory. ``factor == "auto"`` is resolved per call."""

    factor: float | str
    schedule: ScheduleSpec

    def schedule_for(self, factor: float) -> FactorSchedule:
        # Read on every conv of every UNet call: built once per (spec, factor).
        return _factor_schedule(self.schedule, factor)

    def describe(self) -> str:
        s = self.schedule
        when = "every step" if s.tau is None else f"steps < {s.tau:g} of {s.steps}"
        return f"{self.factor if isinstance(self.factor, str) else f'{self.factor:g}'}" + (
            ", progressive" if s.progressive else ""
        ) + f", {when}"


@dataclass
class ConvPlan:
    record: ConvRecord
    redilate: FactorPlan | None = None
    disperse: tuple[TransformSpec, ScheduleSpec] | None = None
    damped: FactorPlan | None = None  # the noise-damped (unconditional) branch's factor


@dataclass
class AttentionPlan:
    record: AttentionRecord
    fusion: ScaleFusionPass | None = None


@dataclass
class MissingPath:
    pass_index: int
    path: str
    suggestions: list[str]


@dataclass
class Plan:
    recipe: Recipe
    convs: dict[str, ConvPlan] = field(default_factory=dict)
    attentions: dict[str, AttentionPlan] = field(default_factory=dict)
    missing: list[MissingPath] = field(default_factory=list)

    def conv(self, record: ConvRecord) -> ConvPlan:
        return self.convs.setdefault(record.path, ConvPlan(record))

    def rows(self) -> list[dict[str, Any]]:
        """One row per changed layer: path, op, what changes and when (for reports)."""
        rows = []
        for p in self.convs.values():
            if p.redilate:
                rows.append({"path": p.record.path, "op": p.record.op, "change": "redilate", "setting": p.redilate.describe()})
            if p.disperse:
                t, s = p.disperse
                when = "every step" if s.tau is None else f"steps < {s.tau:g} of {s.steps}"
                rows.append({"path": p.record.path, "op": p.record.op, "change": "disperse",
                             "setting": f"{t.small}x{t.small} -> {t.large}x{t.large}, {when}"})
            if p.damped:
                rows.append({"path": p.record.path, "op": p.record.op, "change": "noise_damped_cfg", "setting": p.damped.describe()})
        for a in self.attentions.values():
            if a.fusion:
                f = a.fusion
                rows.append({"path": a.record.path, "op": "attention", "change": "scale_fusion",
                             "setting": f"blur {f.blur}, jitter {'on' if f.jitter else 'off'}"
                             + (", fast" if f.fast_mode else "")})
        return rows


@functools.lru_cache(maxsize=256)
def _factor_schedule(spec: ScheduleSpec, factor: float) -> FactorSchedule:
    return FactorSchedule(factor=factor, tau=spec.tau, steps=spec.steps, progressive=spec.progressive)


Planner = Callable[[Any, int, UNetMap, Plan, Callable[[str, str], bool] | None], None]
PLANNERS: dict[type, Planner] = {}


def register_planner(pass_type: type) -> Callable[[Planner], Planner]:
    def deco(fn: Planner) -> Planner:
        PLANNERS[pass_type] = fn
        return fn

    return deco


def _selection(pass_: Any, index: int, unet_map: UNetMap, plan: Plan, filter_fn: Any) -> Selection:
    where = f"passes[{index}] ({type(pass_).type})"
    sel: Selector = pass_.select
    table = getattr(pass_, "factors", None) or {}
    if table and sel.paths is None:
        # A table without explicit paths selects exactly its layers (within the criteria).
        from dataclasses import replace

        sel = replace(sel, paths=tuple(table))
    selection = select(unet_map, sel, where=where)
    if filter_fn is not None:
        selection.records = [r for r in selection.records if filter_fn(r.path, r.op)]
        if not selection.records:
            raise SelectionError(f"{where}: filter_fn rejected every selected layer")
    extra = [p for p in table if p not in {r.path for r in selection.records} and p not in selection.missing]
    absent = [*selection.missing, *(p for p in extra if p not in unet_map.paths())]
    if absent:
        if pass_.on_missing == "error":
            first = absent[0]
            close = selection.suggestions.get(first) or []
            raise SelectionError(
                f"{where}: {len(absent)} listed layer(s) do not exist in {unet_map.model_class}, e.g. {first!r}"
                + (f" (closest: {', '.join(close)})" if close else "")
                + "; set on_missing: warn to skip them"
            )
        from unet_surgery.recipes.selectors import closest_paths

        for path in absent:
            plan.missing.append(MissingPath(index, path, selection.suggestions.get(path) or closest_paths(path, unet_map.paths())))
    return selection


def _factor_for(pass_: RedilatePass | NoiseDampedCFGPass, path: str, where: str) -> float | str:
    if path in pass_.factors:
        return pass_.factors[path]
    if pass_.factor is None:
        raise SelectionError(f"{where}: {path} has no entry in factors and the pass has no default factor")
    return pass_.factor


@register_planner(RedilatePass)
def _plan_redilate(pass_: RedilatePass, index: int, unet_map: UNetMap, plan: Plan, filter_fn: Any) -> None:
    for rec in _selection(pass_, index, unet_map, plan, filter_fn).records:
        if not isinstance(rec, ConvRecord) or rec.axis == "temporal":
            raise SelectionError(f"passes[{index}] (redilate): {rec.path} is not a spatial convolution")
        factor = _factor_for(pass_, rec.path, f"passes[{index}]")
        if factor != AUTO and float(factor) == 1.0:
            continue
        plan.conv(rec).redilate = FactorPlan(factor, pass_.schedule)


@register_planner(DispersePass)
def _plan_disperse(pass_: DispersePass, index: int, unet_map: UNetMap, plan: Plan, filter_fn: Any) -> None:
    t = pass_.transform
    for rec in _selection(pass_, index, unet_map, plan, filter_fn).records:
        if not isinstance(rec, ConvRecord) or rec.axis == "temporal" or rec.spatial_kernel != (t.small, t.small):
            raise SelectionError(
                f"passes[{index}] (disperse): {rec.path} is not a spatial {t.small}x{t.small} convolution"
            )
        plan.conv(rec).disperse = (t, pass_.schedule)


@register_planner(NoiseDampedCFGPass)
def _plan_ndcfg(pass_: NoiseDampedCFGPass, index: int, unet_map: UNetMap, plan: Plan, filter_fn: Any) -> None:
    for rec in _selection(pass_, index, unet_map, plan, filter_fn).records:
        if not isinstance(rec, ConvRecord) or rec.axis == "temporal":
            raise SelectionError(f"passes[{index}] (noise_damped_cfg): {rec.path} is not a spatial convolution")
        factor = _factor_for(pass_, rec.path, f"passes[{index}]")
        plan.conv(rec).damped = FactorPlan(factor, pass_.schedule)


@register_planner(ScaleFusionPass)
def _plan_fusion(pass_: ScaleFusionPass, index: int, unet_map: UNetMap, plan: Plan, filter_fn: Any) -> None:
    for rec in _selection(pass_, index, unet_map, plan, filter_fn).records:
        if not isinstance(rec, AttentionRecord) or rec.kind != "self" or rec.axis != "spatial":
            raise SelectionError(
                f"passes[{index}] (scale_fusion): {rec.path} is not a spatial self-attention"
            )
        plan.attentions.setdefault(rec.path, AttentionPlan(rec)).fusion = pass_


def make_plan(recipe: Recipe, unet_map: UNetMap, filter_fn: Callable[[str, str], bool] | None = None) -> Plan:
    """Resolve every pass of ``recipe`` against ``unet_map``."""
    plan = Plan(recipe)
    for index, pass_ in enumerate(recipe.passes):
        PLANNERS[type(pass_)](pass_, index, unet_map, plan, filter_fn)
    for conv_plan in plan.convs.values():
        if conv_plan.disperse and not conv_plan.redilate:
            raise SelectionError(
                f"{conv_plan.record.path} is dispersed but not re-dilated: a dispersed kernel only "
                "replaces a re-dilated one (add it to a redilate pass)"
            )
    return plan


def auto_factor(latent_hw: tuple[int, int], base_latent_hw: tuple[int, int]) -> float:
    """FreeScale's restrained dilation: current size over base size, floored, at least 1."""
    ratio = max(latent_hw[0] / base_latent_hw[0], latent_hw[1] / base_latent_hw[1])
    return float(max(1, math.floor(ratio + 1e-9)))
