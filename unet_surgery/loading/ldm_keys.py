"""LDM (CompVis) UNet checkpoints: recognising the layout and renaming keys to diffusers'."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from unet_surgery.errors import CheckpointError

LDM_PREFIX = "model.diffusion_model."

_CROSS_KEY = re.compile(r"(?:^|\.)attn2\.to_k\.weight$")


def detect_layout(keys: Iterable[str]) -> str | None:
    """``"ldm"`` (``model.diffusion_model.*`` or bare ``input_blocks.*``), ``"diffusers"``, or None."""
    keys = list(keys)
    if any(k.startswith((LDM_PREFIX, "input_blocks.")) for k in keys):
        return "ldm"
    if "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys):
        return "diffusers"
    return None


def detect_architecture(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, str]:
    """(layout, preset) of a single-file UNet checkpoint from its keys and shapes.

    layout is ``"ldm"`` (``model.diffusion_model.*`` or bare ``input_blocks.*``) or
    ``"diffusers"``; the preset is recognised by the cross-attention width and SDXL's
    additional embedding.

    Args:
        shapes: every tensor name of the checkpoint with its shape.
    """
    keys = list(shapes)
    layout = detect_layout(keys)
    if any(k.startswith(LDM_PREFIX) for k in keys):
        shapes = {k[len(LDM_PREFIX):]: v for k, v in shapes.items() if k.startswith(LDM_PREFIX)}
    unet_keys = list(shapes)
    if layout is None:
        sample = ", ".join(keys[:3]) or "no tensors"
        raise CheckpointError(f"unknown checkpoint layout: neither LDM nor diffusers UNet keys (first keys: {sample})")
    context = {shapes[k][1] for k in unet_keys if _CROSS_KEY.search(k)}
    if not context:
        raise CheckpointError("unknown UNet: the checkpoint has no cross-attention (attn2.to_k) weights")
    width = context.pop()
    sdxl = any(k.startswith(("label_emb.", "add_embedding.")) for k in unet_keys)
    if sdxl and width == 2048:
        return layout, "sdxl"
    if width == 768:
        return layout, "sd15"
    if width == 1024:
        return layout, "sd21"
    raise CheckpointError(f"unknown UNet: cross-attention width {width} matches no shipped preset (SD1.5 768, SD2.1 1024, SDXL 2048)")


_RESNET_RENAMES = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)

_TOP_RENAMES = (
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
)

def _resnet(rest: str) -> str:
    for old, new in _RESNET_RENAMES:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest

def ldm_to_diffusers_key(key: str, layers_per_block: int) -> str:
    """The diffusers ``UNet2DConditionModel`` name of one LDM ``UNetModel`` key.

    The LDM UNet numbers its blocks flatly: ``input_blocks[1 + i*(L+1) + j]`` is layer ``j`` of
    level ``i`` (``[resnet, attention]``) and ``j == L`` the level's downsampler;
    ``output_blocks[i*(L+1) + j]`` is ``[resnet, attention?, upsampler?]``. Unknown keys are
    returned unchanged (the caller's exact key-set check then names them).
    """
    for old, new in _TOP_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    parts = key.split(".", 3)
    if len(parts) < 3:
        return key
    L = layers_per_block
    if parts[0] == "input_blocks" and len(parts) == 4:
        k, s, rest = int(parts[1]), int(parts[2]), parts[3]
        i, j = divmod(k - 1, L + 1)
        if j == L:
            return f"down_blocks.{i}.downsamplers.0.conv." + rest.removeprefix("op.")
        if s == 0:
            return f"down_blocks.{i}.resnets.{j}.{_resnet(rest)}"
        return f"down_blocks.{i}.attentions.{j}.{rest}"
    if parts[0] == "middle_block":
        s, rest = int(parts[1]), ".".join(parts[2:])
        if s == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{s // 2}.{_resnet(rest)}"
    if parts[0] == "output_blocks" and len(parts) == 4:
        k, s, rest = int(parts[1]), int(parts[2]), parts[3]
        i, j = divmod(k, L + 1)
        if s == 0:
            return f"up_blocks.{i}.resnets.{j}.{_resnet(rest)}"
        if rest.startswith("conv."):  # Upsample (slot 1 on attention-free levels, else 2)
            return f"up_blocks.{i}.upsamplers.0.{rest}"
        return f"up_blocks.{i}.attentions.{j}.{rest}"
    return key

def convert_ldm_unet(state: Mapping[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """LDM UNet weights (``model.diffusion_model.`` prefix optional) renamed to diffusers keys.

    Only the UNet's keys are taken (a full SD checkpoint also holds the VAE, text encoder and
    EMA copies). Renaming only: tensors are shared, not copied.
    """
    if any(k.startswith(LDM_PREFIX) for k in state):
        state = {k[len(LDM_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_PREFIX)}
    return {ldm_to_diffusers_key(k, layers_per_block): v for k, v in state.items()}
