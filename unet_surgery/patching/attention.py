"""Install scale-fusion attention for a patch: each fused layer reads its setting per call.

The token grid is the current latent size and the window the base (training) latent size;
the layer scales both to its own level from its token count. At or below the base size the
layer runs plain attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from unet_surgery.ops.scale_fusion import (
    PUBLISHED_JITTER,
    FusionSetting,
    fuse_attention_,
    restore_attention_,
)
from unet_surgery.patching.plan import AttentionPlan

if TYPE_CHECKING:
    from unet_surgery.patching.patch import Patch


def fusion_setting(patch: Patch, plan: AttentionPlan) -> FusionSetting | None:
    """The setting of one fused layer for the current UNet call (None: plain attention)."""
    call = patch.tracker.current
    fusion = plan.fusion
    if fusion is None or call is None or not call.latent_hw[0]:
        return None
    grid, window = call.latent_hw, patch.base_latent_hw
    if grid[0] <= window[0] and grid[1] <= window[1]:
        return None
    if not patch.active_now(fusion.schedule, call):
        return None
    return FusionSetting(
        active=True,
        grid_hw=grid,
        window_hw=(min(window[0], grid[0]), min(window[1], grid[1])),
        blur=fusion.blur,
        jitter=PUBLISHED_JITTER if fusion.jitter else 0.0,
        seed=fusion.seed,
        fast_mode=fusion.fast_mode,
    )


def install_fusion(patch: Patch) -> list[nn.Module]:
    modules = []
    for path, plan in patch.plan.attentions.items():
        attn = patch.model.get_submodule(path)
        fuse_attention_(attn, lambda plan=plan: fusion_setting(patch, plan))
        modules.append(attn)
    return modules


def restore_fusion(module: nn.Module) -> None:
    restore_attention_(module)
