"""Probe inputs: a keyword-argument dict that runs one forward of any supported UNet class.

Mapping needs one call of the model; the map does not depend on the values, only on shapes, so
inputs are zeros/ones on the model's own device (``meta`` costs nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from unet_surgery.errors import MappingError


@dataclass(frozen=True)
class ProbeSpec:
    """What a probe forward looks like for one model: kwargs plus where the spatial dims are."""

    kwargs: dict[str, Any]
    sample_key: str  # name of the latent argument
    spatial_dims: tuple[int, int]  # indices of (height, width) in the latent tensor
    batch: int
    frames: int | None  # None for image models


def _param(model: nn.Module) -> torch.Tensor:
    try:
        return next(model.parameters())
    except StopIteration as exc:
        raise MappingError(f"{type(model).__name__} has no parameters: not a UNet") from exc


def _config(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def _cross_attention_dim(model: nn.Module) -> int | None:
    """Width of the encoder states, read from the first cross-attention key projection."""
    for name, module in model.named_modules():
        if name.endswith("attn2.to_k") and isinstance(module, nn.Linear):
            return module.in_features
    return None


def probe_spec(
    model: nn.Module,
    *,
    latent_hw: tuple[int, int] = (64, 64),
    batch: int = 1,
    frames: int = 2,
    tokens: int = 77,
) -> ProbeSpec:
    """Build probe inputs for ``model`` from its class and configuration.

    Supports diffusers ``UNet2DConditionModel``, ``UNet2DModel``, ``UNetMotionModel``,
    ``UNet3DConditionModel``, ``UNetSpatioTemporalConditionModel`` and the LDM/CompVis
    ``UNetModel``. Anything else raises :class:`MappingError`; pass ``inputs=`` to
    :func:`unet_surgery.map_unet` for custom models.
    """
    ref = _param(model)
    device, dtype = ref.device, ref.dtype if ref.is_floating_point() else torch.float32
    h, w = latent_hw
    cls = type(model).__name__
    cfg = _config(model)

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=device, dtype=dtype)

    timestep = torch.full((batch,), 10, device=device, dtype=torch.long)

    if cls == "UNetModel" and hasattr(model, "input_blocks"):  # LDM / CompVis layout
        kwargs: dict[str, Any] = {"x": zeros(batch, model.in_channels, h, w), "timesteps": timestep}
        ctx = _cross_attention_dim(model)
        if ctx is not None:
            kwargs["context"] = zeros(batch, tokens, ctx)
        if getattr(model, "num_classes", None) is not None:
            adm = model.label_emb[0][0].in_features if isinstance(model.label_emb, nn.Sequential) else None
            kwargs["y"] = zeros(batch, adm) if adm else torch.zeros(batch, dtype=torch.long, device=device)
        return ProbeSpec(kwargs, "x", (2, 3), batch, None)

    if cfg is None:
        raise MappingError(
            f"don't know how to call {cls}: it is neither a diffusers UNet nor an LDM UNetModel "
            "(pass inputs= with example keyword arguments)"
        )

    in_ch = cfg.in_channels
    if cls == "UNet2DModel":
        kwargs = {"sample": zeros(batch, in_ch, h, w), "timestep": timestep, "return_dict": False}
        if getattr(cfg, "num_class_embeds", None):
            kwargs["class_labels"] = torch.zeros(batch, dtype=torch.long, device=device)
        return ProbeSpec(kwargs, "sample", (2, 3), batch, None)

    ctx = cfg.cross_attention_dim if hasattr(cfg, "cross_attention_dim") else None
    if isinstance(ctx, (list, tuple)):
        ctx = ctx[0]

    if cls == "UNet2DConditionModel":
        kwargs = {
            "sample": zeros(batch, in_ch, h, w),
            "timestep": timestep,
            "encoder_hidden_states": zeros(batch, tokens, ctx),
            "return_dict": False,
        }
        if getattr(cfg, "addition_embed_type", None) == "text_time":
            n_time = 6
            text_dim = cfg.projection_class_embeddings_input_dim - n_time * cfg.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": zeros(batch, text_dim), "time_ids": zeros(batch, n_time)}
        if getattr(cfg, "class_embed_type", None) is not None or getattr(cfg, "num_class_embeds", None):
            kwargs["class_labels"] = torch.zeros(batch, dtype=torch.long, device=device)
        return ProbeSpec(kwargs, "sample", (2, 3), batch, None)

    if cls == "UNetMotionModel":
        # Trap: encoder states are per frame, (batch * frames, tokens, dim).
        kwargs = {
            "sample": zeros(batch, in_ch, frames, h, w),
            "timestep": timestep,
            "encoder_hidden_states": zeros(batch * frames, tokens, ctx),
            "return_dict": False,
        }
        return ProbeSpec(kwargs, "sample", (3, 4), batch, frames)

    if cls == "UNet3DConditionModel":
        kwargs = {
            "sample": zeros(batch, in_ch, frames, h, w),
            "timestep": timestep,
            "encoder_hidden_states": zeros(batch, tokens, ctx),
            "return_dict": False,
        }
        return ProbeSpec(kwargs, "sample", (3, 4), batch, frames)

    if cls == "UNetSpatioTemporalConditionModel":
        n_ids = 3
        kwargs = {
            "sample": zeros(batch, frames, in_ch, h, w),
            "timestep": timestep,
            "encoder_hidden_states": zeros(batch, 1, ctx),
            "added_time_ids": zeros(batch, n_ids),
            "return_dict": False,
        }
        return ProbeSpec(kwargs, "sample", (3, 4), batch, frames)

    raise MappingError(
        f"don't know how to call {cls}; pass inputs= with example keyword arguments to map it"
    )
