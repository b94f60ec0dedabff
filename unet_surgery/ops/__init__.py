"""Numerical ops: re-dilation, dispersion and schedules (ScaleCrafter), scale fusion (FreeScale)."""

from __future__ import annotations

from unet_surgery.ops.dispersion import (
    TransformParams,
    disperse_kernel,
    dispersion_transform,
    load_transform,
    save_transform,
)
from unet_surgery.ops.redilate import (
    BatchSplit,
    ConvSetting,
    FactorSource,
    RedilatedConv2d,
    RedilatedConv3d,
    current_setting,
    is_redilated,
    redilate_,
    redilated_conv,
    restore_,
)
from unet_surgery.ops.scale_fusion import (
    FusionSetting,
    FusionSource,
    current_fusion,
    fuse_attention_,
    gaussian_blur,
    is_fused,
    level_hw,
    restore_attention_,
    scale_fusion,
)
from unet_surgery.ops.schedules import FactorSchedule, progressive_factor, step_index

__all__ = [
    "BatchSplit",
    "ConvSetting",
    "FactorSchedule",
    "FactorSource",
    "FusionSetting",
    "FusionSource",
    "RedilatedConv2d",
    "RedilatedConv3d",
    "TransformParams",
    "current_fusion",
    "current_setting",
    "disperse_kernel",
    "dispersion_transform",
    "fuse_attention_",
    "gaussian_blur",
    "is_fused",
    "is_redilated",
    "level_hw",
    "load_transform",
    "progressive_factor",
    "redilate_",
    "redilated_conv",
    "restore_",
    "restore_attention_",
    "save_transform",
    "scale_fusion",
    "step_index",
]
