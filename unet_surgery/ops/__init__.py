"""Numerical convolution ops of ScaleCrafter: re-dilation, dispersion, factor schedules."""

from __future__ import annotations

from unet_surgery.ops.dispersion import (
    TransformParams,
    disperse_kernel,
    dispersion_transform,
    load_transform,
    save_transform,
)
from unet_surgery.ops.redilate import (
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
from unet_surgery.ops.schedules import FactorSchedule, progressive_factor, step_index

__all__ = [
    "ConvSetting",
    "FactorSchedule",
    "FactorSource",
    "RedilatedConv2d",
    "RedilatedConv3d",
    "TransformParams",
    "current_setting",
    "disperse_kernel",
    "dispersion_transform",
    "is_redilated",
    "load_transform",
    "progressive_factor",
    "redilate_",
    "redilated_conv",
    "restore_",
    "save_transform",
    "step_index",
]
