"""The ``msw_msa`` pass: HiDiffusion's modified shifted-window self-attention.

The selected self-attention ops attend within 2x2 windows of their token grid, the grid
cyclically shifted by a random quarter of a window on every call (HiDiffusion,
``make_diffusers_transformer_block``). Active on every step, as published.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from unet_surgery.core.schema import PassConfig, Selector, doc, fail
from unet_surgery.graph.records import UNetMap
from unet_surgery.ops import rewrite
from unet_surgery.ops.hidiffusion import WindowSetting, window_attention_
from unet_surgery.passes.base import (
    FilterFn,
    LayerRewrite,
    PassHandler,
    Plan,
    register_pass,
    spatial_self_attentions,
)
from unet_surgery.runtime import UNetCall

WINDOW_ATTENTION = LayerRewrite(
    name="window_attention",
    group="window_attentions",
    off=None,
    install=lambda module, source, extras: window_attention_(module, source),
    restore=rewrite.restore,
    summary=lambda s: None if s is None else {"msw_msa": True},
)
"""MSW-MSA self-attention (:mod:`unet_surgery.ops.hidiffusion`); None is plain attention."""


@dataclass(frozen=True)
class MswMsaPass(PassConfig):
    """HiDiffusion's MSW-MSA: self-attention within 2x2 shifted windows."""

    type: ClassVar[str] = "msw_msa"
    select: Selector = doc("spatial self-attention ops to window (published: every one of the top attention level)")
    shift: int | None = doc(
        "null: a random quarter-window shift drawn on every call, as published; 0-3: that quarter, fixed",
        default=None,
    )
    seed: int | None = doc(
        "null: draw from torch's global generator, exactly as published; an int: a private "
        "generator seeded when the patch is applied, drawn once per windowed call in execution order",
        default=None,
    )

    def validate(self, where: str) -> None:
        if self.shift is not None and not 0 <= self.shift <= 3:
            fail(f"{where}.shift", f"must be 0, 1, 2, 3 or null, got {self.shift}")


@dataclass(frozen=True)
class WindowEntry:
    """One windowed layer: its pass config and the pass's index (the key of its state slot)."""

    config: MswMsaPass
    index: int


def _generator(patch: Any, config: MswMsaPass, index: int) -> torch.Generator | None:
    """Pass ``index``'s private generator, in the patch's state slot of that pass."""
    if config.seed is None:
        return None
    slot = patch.state.slot(index)
    generator = slot.get("generator")
    if generator is None:
        generator = slot["generator"] = torch.Generator().manual_seed(config.seed)
    return generator


@register_pass
class MswMsaHandler(PassHandler[MswMsaPass]):
    """Windows the selected self-attention on every call with a known latent size."""

    type = "msw_msa"
    config = MswMsaPass
    rewrite = WINDOW_ATTENTION

    def layers(self, config: MswMsaPass, index: int, unet_map: UNetMap, plan: Plan, filter_fn: FilterFn | None) -> list[Any]:
        return spatial_self_attentions(config, index, unet_map, plan, filter_fn)

    def entry(self, config: MswMsaPass, index: int, rec: Any) -> WindowEntry:
        return WindowEntry(config, index)

    def describe(self, entry: WindowEntry) -> str:
        shift = entry.config.shift
        return "2x2 windows, " + ("random shift" if shift is None else f"shift {shift}/4 window")

    def setting(self, patch: Any, entry: WindowEntry, branch: str, call: UNetCall | None, current: Any) -> WindowSetting | None:
        if call is None or not call.latent_hw[0]:
            return current
        config = entry.config
        return WindowSetting(latent_hw=call.latent_hw, quarter=config.shift,
                             generator=_generator(patch, config, entry.index))

    def freeze_error(self, path: str, setting: Any) -> str | None:
        if isinstance(setting, WindowSetting) and setting.quarter is None:
            return (
                f"{path} draws a random MSW-MSA shift on every call, which cannot be frozen into a "
                "static program; export a recipe with a fixed shift (0-3)"
            )
        return None
