"""The ``freeu`` pass: FreeU's backbone and skip scaling before the up-path concatenations.

The map records every skip concatenation (:class:`~unet_surgery.graph.records.SkipRecord`:
its level and the channels of both operands) but not the module that receives it. That
module is found from the convolutions: the ones that read the concatenated tensor (resnet
``conv1`` and the ``conv_shortcut``/``skip_connection`` 1x1) are the first convs after the
concatenation with ``hidden + skip`` input channels, and their deepest common module is the
resnet (diffusers ``up_blocks.i.resnets.j``, LDM ``output_blocks.k.0``). No name is assumed.

FreeU's stage 1 (``b1``, ``s1``) is the lowest-resolution level that has skip concatenations,
stage 2 the next one up, as diffusers' ``resolution_idx`` 0 and 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import nn

from unet_surgery.core.schema import PassConfig, Recipe, ScheduleSpec, Selector, doc, fail
from unet_surgery.core.selectors import closest_paths, is_pattern, path_matches
from unet_surgery.errors import SelectionError
from unet_surgery.graph.records import SkipRecord, UNetMap
from unet_surgery.passes.base import (
    FilterFn,
    LayerRewrite,
    PassHandler,
    Plan,
    active_now,
    describe_schedule,
    register_pass,
    window_is_empty,
)
from unet_surgery.passes.freeu.skip_merge import FreeUSetting, freeu_, restore_freeu_
from unet_surgery.runtime import UNetCall

STAGES = 2
"""FreeU has factors for the two lowest-resolution up levels."""


MAX_SCALE = 10.0  # FreeU's factors multiply features: far above the published ones they overflow
MAX_THRESHOLD = 4096  # half side of the spectrum's square, in latent pixels


@dataclass(frozen=True)
class FreeUPass(PassConfig):
    """FreeU: backbone features amplified, the skip's low frequencies scaled, before each merge."""

    type: ClassVar[str] = "freeu"
    select: Selector = doc(
        "skip merges to act on, by the module receiving the concatenation: only stage (up), level "
        "and paths apply; default: every merge of FreeU's two stages",
        default_factory=Selector,
    )
    b1: float = doc("backbone factor of stage 1 (lowest-resolution up level), first half of the channels", default=1.2)
    b2: float = doc("backbone factor of stage 2 (the next level up)", default=1.4)
    s1: float = doc("skip factor of stage 1: scales the low-frequency square of the skip's spectrum", default=0.9)
    s2: float = doc("skip factor of stage 2", default=0.2)
    threshold: int = doc("half side of the scaled square of the centred spectrum", default=1)
    backbone_scaling: Literal["constant", "structure"] = doc(
        "constant: the first half of the backbone channels times b (diffusers, FreeU v1); structure: "
        "times (b - 1) * m + 1, m the min-max normalised channel mean (FreeU README v2, 2023-10-18)",
        default="constant",
    )
    schedule: ScheduleSpec = doc("when FreeU is active", default_factory=ScheduleSpec)

    def validate(self, where: str) -> None:
        for name in ("b1", "b2", "s1", "s2"):  # published: b 1.0-1.6, s 0.2-1.0; 1e15 overflows to NaN
            value = getattr(self, name)
            if not 0.0 <= value <= MAX_SCALE:
                fail(f"{where}.{name}", f"must be between 0 and {MAX_SCALE:g}, got {value:g}")
        if not 0 <= self.threshold <= MAX_THRESHOLD:
            fail(f"{where}.threshold", f"must be between 0 and {MAX_THRESHOLD}, got {self.threshold}")
        sel = self.select
        unused = [n for n in ("op", "kernel", "stride", "axis", "kind") if getattr(sel, n) is not None]
        if unused:
            fail(f"{where}.select", f"FreeU selects skip merges by stage, level and paths only, not by {', '.join(unused)}")
        if sel.stage is not None and "up" not in sel.stage:
            fail(f"{where}.select.stage", "skip merges are in the up stage only")


@dataclass(frozen=True)
class FreeUEntry:
    """One merge: where the concatenation splits, and the stage's factors."""

    stage: int  # 1 or 2
    hidden_channels: int
    skip_channels: int
    skip_first: bool
    backbone: float
    skip: float
    threshold: int
    schedule: ScheduleSpec
    structure: bool = False

    def setting(self) -> FreeUSetting:
        return FreeUSetting(
            self.hidden_channels, self.skip_channels, self.skip_first, self.backbone, self.skip, self.threshold,
            self.structure,
        )


def _install(module: nn.Module, source: Any, extras: dict[str, Any]) -> None:
    freeu_(module, source)


def _summary(setting: FreeUSetting | None) -> dict[str, Any] | None:
    if setting is None:
        return None
    row: dict[str, Any] = {"backbone": setting.backbone, "skip": setting.skip, "threshold": setting.threshold}
    if setting.structure:
        row["structure"] = True
    return row


MERGE = LayerRewrite(
    name="freeu",
    group="skip_merges",
    off=None,
    install=_install,
    restore=restore_freeu_,
    summary=_summary,
)
"""The module receiving a skip concatenation, FreeU'd (:func:`~unet_surgery.passes.freeu.skip_merge.freeu_`)."""


def _common_module(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common: list[str] = []
    for names in zip(*parts, strict=False):
        if len(set(names)) != 1:
            break
        common.append(names[0])
    return ".".join(common)


def merge_modules(unet_map: UNetMap) -> list[tuple[str, SkipRecord]]:
    """``(receiving module path, skip record)`` of every skip concatenation, in execution order.

    Raises :class:`SelectionError` where the receiving module cannot be told from the map
    (fewer than two convs read the concatenation, or they share no module).
    """
    skips = sorted(unet_map.skips, key=lambda s: s.order)
    out = []
    for i, skip in enumerate(skips):
        end = skips[i + 1].order if i + 1 < len(skips) else None
        width = skip.hidden_channels + skip.skip_channels
        readers = [
            c.path
            for c in unet_map.convs
            if c.order > skip.order and (end is None or c.order < end) and c.in_channels == width and c.level == skip.level
        ]
        module = _common_module(readers) if len(readers) >= 2 else ""
        if not module or module in readers:
            raise SelectionError(
                f"cannot tell which module receives the skip concatenation from {skip.source} at level "
                f"{skip.level} of {unet_map.model_class} (convs reading it: {readers or 'none'})"
            )
        out.append((module, skip))
    return out


def stage_levels(unet_map: UNetMap) -> list[int]:
    """Levels of FreeU's stages 1 and 2: the lowest-resolution levels with skip merges, deepest first."""
    levels = sorted({s.level for s in unet_map.skips if s.level is not None}, reverse=True)
    return levels[:STAGES]


@register_pass
class FreeUHandler(PassHandler[FreeUPass]):
    """Rewrites the modules receiving the selected skip merges of FreeU's two stages."""

    type = "freeu"
    config = FreeUPass
    rewrite = MERGE

    def plan(self, config: FreeUPass, index: int, unet_map: UNetMap, plan: Plan, filter_fn: FilterFn | None) -> None:
        where = f"passes[{index}] (freeu)"
        sel = config.select
        merges = merge_modules(unet_map)
        stages = {level: n + 1 for n, level in enumerate(stage_levels(unet_map))}
        chosen = []
        for path, skip in merges:
            if sel.level is not None and skip.level not in sel.level:
                continue
            if sel.paths is not None and not any(path_matches(path, p) for p in sel.paths):
                continue
            if sel.exclude is not None and _excluded(path, skip, sel.exclude):
                continue
            if sel.level is None and sel.paths is None and skip.level not in stages:
                continue  # the default: FreeU's two stages
            if filter_fn is not None and not filter_fn(path, self.rewrite.name):
                continue
            if skip.level not in stages:
                raise SelectionError(
                    f"{where}: {path} merges at level {skip.level}; FreeU has factors for its two stages only "
                    f"(levels {', '.join(map(str, stages))} of {unet_map.model_class})"
                )
            chosen.append((path, skip))
        known = [p for p, _ in merges]
        for pattern in sel.paths or ():
            if not is_pattern(pattern) and pattern not in known:
                close = closest_paths(pattern, known)
                raise SelectionError(
                    f"{where}: {pattern!r} receives no skip concatenation in {unet_map.model_class}"
                    + (f" (closest: {', '.join(close)})" if close else "")
                )
        if not chosen:
            raise SelectionError(f"{where}: the selector matched no skip merge of {unet_map.model_class}")
        for path, skip in chosen:
            stage = stages[skip.level]  # type: ignore[index]
            entry = FreeUEntry(
                stage=stage,
                hidden_channels=skip.hidden_channels,
                skip_channels=skip.skip_channels,
                skip_first=skip.skip_first,
                backbone=config.b1 if stage == 1 else config.b2,
                skip=config.s1 if stage == 1 else config.s2,
                threshold=config.threshold,
                schedule=config.schedule,
                structure=config.backbone_scaling == "structure",
            )
            plan.add(path, None, self, entry, index)

    def describe(self, entry: FreeUEntry) -> str:
        return (
            f"stage {entry.stage}: backbone x{entry.backbone:g}{' (structure)' if entry.structure else ''}, "
            f"skip low frequencies x{entry.skip:g} "
            f"(threshold {entry.threshold}), {describe_schedule(entry.schedule)}"
        )

    def setting(self, patch: Any, entry: FreeUEntry, branch: str, call: UNetCall | None, current: Any) -> FreeUSetting | None:
        return entry.setting() if active_now(patch, entry.schedule, call) else current

    def no_effect_reasons(self, config: FreeUPass, index: int, recipe: Recipe, plan: Plan | None) -> list[str]:
        reasons = []
        if window_is_empty(config.schedule):
            reasons.append(f"schedule.tau is {config.schedule.tau:g}: no step is inside the window")
        stages = {1, 2}
        if plan is not None:
            stages = {p.entry.stage for layer in plan.layers.values() for p in layer.parts if p.pass_index == index and p.handler is self}
        plain = {1: config.b1 == 1.0 and config.s1 == 1.0, 2: config.b2 == 1.0 and config.s2 == 1.0}
        if stages and all(plain[s] for s in stages):
            reasons.append("every backbone and skip factor of the selected stages is 1")
        return reasons


def _excluded(path: str, skip: SkipRecord, sel: Selector) -> bool:
    if sel.level is not None and skip.level not in sel.level:
        return False
    return not (sel.paths is not None and not any(path_matches(path, p) for p in sel.paths))
