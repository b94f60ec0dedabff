"""Sampling: recipes on diffusers pipelines and FreeScale's self-cascade sampler."""

from __future__ import annotations

from unet_surgery.sampling.cascade import (
    CascadeOutput,
    CascadeStage,
    Denoiser,
    cfg_denoiser,
    combine_cfg,
    cosine_blend_factor,
    restart_step_of,
    self_cascade,
)
from unet_surgery.sampling.pipelines import (
    SUPPORTED_PIPELINES,
    PipelinePatch,
    apply_to_pipeline,
    self_cascade_sample,
)

__all__ = [
    "SUPPORTED_PIPELINES",
    "CascadeOutput",
    "CascadeStage",
    "Denoiser",
    "PipelinePatch",
    "apply_to_pipeline",
    "cfg_denoiser",
    "combine_cfg",
    "cosine_blend_factor",
    "restart_step_of",
    "self_cascade",
    "self_cascade_sample",
]
