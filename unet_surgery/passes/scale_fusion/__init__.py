"""The ``scale_fusion`` pass: FreeScale's scale-fusion self-attention.

The token grid is the current latent size; window and scale follow the official code
(:func:`~unet_surgery.ops.scale_fusion.fusion_window`): ``s`` per axis is latent / base latent
and the window is ``grid / max(s)`` per side, the base latent size at square sizes. The layer
scales grid and window to its own level from its token count. At or below the base size the
layer runs plain attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from unet_surgery.core.schema import PassConfig, Recipe, ScheduleSpec, Selector, doc
from unet_surgery.graph.records import UNetMap
from unet_surgery.ops.scale_fusion import PUBLISHED_JITTER, FusionSetting, fusion_window
from unet_surgery.passes.base import (
    FilterFn,
    PassHandler,
    Plan,
    active_now,
    register_pass,
    spatial_self_attentions,
    window_is_empty,
)
from unet_surgery.passes.layers import ATTENTION
from unet_surgery.runtime import UNetCall


@dataclass(frozen=True)
class ScaleFusionPass(PassConfig):
    """FreeScale's scale-fusion self-attention (global + windowed local, Gaussian fused)."""

    type: ClassVar[str] = "scale_fusion"
    select: Selector = doc("attention ops to fuse (spatial self-attention only)")
    blur: Literal["published", "published-2024", "volumetric", "spatial"] = doc(
        "published: what the official code computes (HEAD, since 2025-03-07), a 3-D Gaussian over "
        "(h, w, channel); published-2024: the official code before that, 2-D over (w, channel) per "
        "token row; volumetric: alias of published; spatial: over (h, w) only",
        default="published",
    )
    jitter: bool = doc("shift each window by up to 1/8 window (seeded)", default=True)
    seed: int = doc("seed of the window jitter", default=0)
    fast_mode: bool = doc("global attention over strided sub-grids instead of all tokens", default=False)
    schedule: ScheduleSpec = doc("when fusion is active", default_factory=ScheduleSpec)


@register_pass
class ScaleFusionHandler(PassHandler[ScaleFusionPass]):
    """Fuses spatial self-attention while the current latent exceeds the base latent."""

    type = "scale_fusion"
    config = ScaleFusionPass
    rewrite = ATTENTION

    def layers(self, config: ScaleFusionPass, index: int, unet_map: UNetMap, plan: Plan, filter_fn: FilterFn | None) -> list[Any]:
        return spatial_self_attentions(config, index, unet_map, plan, filter_fn)

    def describe(self, entry: ScaleFusionPass) -> str:
        return f"blur {entry.blur}, jitter {'on' if entry.jitter else 'off'}" + (", fast" if entry.fast_mode else "")

    def setting(self, patch: Any, entry: ScaleFusionPass, branch: str, call: UNetCall | None, current: Any) -> FusionSetting | None:
        if call is None or not call.latent_hw[0]:
            return None
        grid, base = call.latent_hw, patch.base_latent_hw
        if grid[0] <= base[0] and grid[1] <= base[1]:
            return None
        if not active_now(patch, entry.schedule, call):
            return None
        window, scale = fusion_window(grid, base)
        return FusionSetting(
            active=True,
            grid_hw=grid,
            window_hw=window,
            scale_hw=scale,
            blur=entry.blur,
            jitter=PUBLISHED_JITTER if entry.jitter else 0.0,
            seed=entry.seed,
            fast_mode=entry.fast_mode,
        )

    def freeze_error(self, path: str, setting: Any) -> str | None:
        if setting is not None and setting.active and setting.jitter:
            return (
                f"{path} uses jittered scale fusion, whose random window offsets cannot be frozen "
                "into a static program; export a recipe with jitter: false"
            )
        return None

    def no_effect_reasons(self, config: ScaleFusionPass, index: int, recipe: Recipe, plan: Plan | None) -> list[str]:
        reasons = []
        if window_is_empty(config.schedule):
            reasons.append(f"schedule.tau is {config.schedule.tau:g}: no step is inside the window")
        base = recipe.base_resolution
        if all(h <= base[0] and w <= base[1] for h, w in recipe.target_resolutions):
            reasons.append("no target resolution exceeds the base resolution: fusion never engages")
        return reasons
