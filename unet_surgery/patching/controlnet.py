"""ControlNet residuals added at the patched UNet's own feature sizes.

A ControlNet returns one residual per skip connection of the UNet's down path and one for the
mid block, at the sizes the *plain* UNet has; diffusers' ``UNet2DConditionModel.forward`` adds
them to the skip copies right after the down blocks (``down_block_res_samples``) and to the
hidden state right after the mid block. A pass that changes feature sizes while it is active
(HiDiffusion's RAU-Net halves the maps below its level) makes those sums fail. HiDiffusion's
official UNet forward resizes every residual bicubically to the skip it is added to
(``F.interpolate(..., mode='bicubic')``); this module does the same for any patch:

* a model pre hook takes ``down_block_additional_residuals`` and
  ``mid_block_additional_residual`` out of a ControlNet call and keeps them on the call record
  (per thread, gone when the call ends);
* a pre hook on every up block adds, to the skips that block receives
  (``res_hidden_states_tuple``, the last ``len(block.resnets)`` of the list, exactly the
  slicing of diffusers' up loop), the matching residuals; the first up block also adds the mid
  residual to its input, which is diffusers' ``sample = mid_block(...) + mid_residual``.

A residual is resized (bicubic, as published) only when its size differs from the feature's;
otherwise the sum is the very operation diffusers performs, so a patch that leaves sizes alone
gives bit for bit the plain UNet's ControlNet result. The up-block hooks are registered at the
first ControlNet call only, so a UNet never called with a ControlNet (or compiled without one)
carries none. The ControlNet model itself is never touched. T2I-Adapter residuals
(``down_intrablock_additional_residuals``) are left to diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unet_surgery.errors import SurgeryError

DOWN = "down_block_additional_residuals"
MID = "mid_block_additional_residual"
HOOK = "controlnet"
BLOCK_HOOKS = "controlnet.up_blocks"


@dataclass
class PendingResiduals:
    """The residuals of the call in flight not yet added: the down list is consumed from its end."""

    down: list[torch.Tensor]
    mid: torch.Tensor | None


def fitted(residual: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """``residual`` at ``feature``'s spatial size: itself when equal, else resized bicubically
    (HiDiffusion's official ``F.interpolate(residual, (H, W), mode='bicubic')``)."""
    size = tuple(feature.shape[-2:])
    if tuple(residual.shape[-2:]) == size:
        return residual
    return F.interpolate(residual, size=size, mode="bicubic")


class ControlNetResiduals:
    """The hooks of one patch that carry ControlNet residuals to where the UNet uses them."""

    def __init__(self, patch: Any) -> None:
        self.patch = patch

    def attach(self) -> None:
        """Register the model pre hook (after the passes' hooks: it takes the residuals as they
        left them, e.g. expanded to noise-damped guidance's three branches)."""
        self.patch.hooks.add(HOOK, pre=self.pre)

    def pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        call = self.patch.tracker.current
        down, mid = kwargs.get(DOWN), kwargs.get(MID)
        if call is None or down is None or mid is None:  # not a ControlNet call (or no patch on it)
            return None
        up_blocks = getattr(module, "up_blocks", None)
        if up_blocks is None or not all(hasattr(block, "resnets") for block in up_blocks):
            return None  # not a diffusers UNet2DConditionModel layout: diffusers adds them as it does
        skips = sum(len(block.resnets) for block in up_blocks)
        if len(down) != skips:
            raise SurgeryError(
                f"the ControlNet gave {len(down)} down residuals; this UNet's up blocks take {skips} skips"
            )
        if BLOCK_HOOKS not in self.patch.hooks:
            self.patch.hooks.add_many(BLOCK_HOOKS, [(block, _UpBlockHook(self, i == 0)) for i, block in enumerate(up_blocks)])
        call.controlnet = PendingResiduals(list(down), mid)
        return args, {**kwargs, DOWN: None, MID: None}

    def pending(self) -> PendingResiduals | None:
        call = self.patch.tracker.current
        return None if call is None else call.controlnet


class _UpBlockHook:
    """The pre hook of one up block (an object, not a closure: ``copy.deepcopy`` of a patched
    model gives hooks bound to the copy's patch)."""

    __slots__ = ("first", "owner")

    def __init__(self, owner: ControlNetResiduals, first: bool) -> None:
        self.owner, self.first = owner, first

    def __call__(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        pending = self.owner.pending()
        if pending is None:
            return None
        skips = kwargs.get("res_hidden_states_tuple")
        if skips is None:
            raise SurgeryError(
                f"{type(block).__name__} was called without res_hidden_states_tuple=...: cannot add the "
                "ControlNet residuals to its skips"
            )
        n = len(skips)
        take, pending.down = pending.down[len(pending.down) - n:], pending.down[: len(pending.down) - n]
        kwargs = {**kwargs, "res_hidden_states_tuple": tuple(
            skip + fitted(residual, skip) for skip, residual in zip(skips, take, strict=True))}
        if self.first and pending.mid is not None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            hidden = hidden + fitted(pending.mid, hidden)
            pending.mid = None
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = hidden
            else:
                args = (hidden, *args[1:])
        return args, kwargs
