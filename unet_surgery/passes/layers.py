"""The layer rewrites the built-in passes share: re-dilated convs and scale-fusion attention.

A pass that rewrites another kind of layer (a block, a downsampler) defines its own
:class:`~unet_surgery.passes.base.LayerRewrite` in its own file, on the same mechanism
(:mod:`unet_surgery.ops.rewrite`).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import nn

from unet_surgery.ops.redilate import ConvSetting, redilate_, restore_
from unet_surgery.ops.scale_fusion import FusionSetting, fuse_attention_, restore_attention_
from unet_surgery.passes.base import LayerRewrite


def _conv_summary(setting: ConvSetting) -> dict[str, Any] | None:
    if setting.factor == 1.0 and not setting.use_dispersed and setting.lowpass is None:
        return None
    row: dict[str, Any] = {"factor": setting.factor, "dispersed": setting.use_dispersed}
    if setting.lowpass is not None:  # FouriScale; absent otherwise, so older manifests read the same
        row["lowpass"] = {k: v for k, v in asdict(setting.lowpass).items() if k != "scale_floor" or not v}
    return row


def _fusion_summary(setting: FusionSetting | None) -> dict[str, Any] | None:
    return {"scale_fusion": True} if setting is not None and setting.active else None


def _install_conv(module: nn.Module, source: Any, extras: dict[str, Any]) -> None:
    redilate_(module, source, **extras)  # type: ignore[arg-type]


def _install_attention(module: nn.Module, source: Any, extras: dict[str, Any]) -> None:
    fuse_attention_(module, source, **extras)


CONV = LayerRewrite(
    name="conv",
    group="convs",
    off=ConvSetting(1.0, False),
    install=_install_conv,
    restore=restore_,
    summary=_conv_summary,
    split_batches=True,
)
"""Re-dilated conv (:func:`~unet_surgery.ops.redilate_`): factor, dispersed kernel, per batch slice."""

ATTENTION = LayerRewrite(
    name="attention",
    group="attentions",
    off=None,
    install=_install_attention,
    restore=restore_attention_,
    summary=_fusion_summary,
)
"""Scale-fusion self-attention (:func:`~unet_surgery.ops.fuse_attention_`); None is plain."""
