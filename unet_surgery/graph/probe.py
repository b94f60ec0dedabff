"""Fallback mapper: forward hooks on fake tensors, for models that ``torch.export`` rejects.

Runs the model once under ``FakeTensorMode`` (no memory, no compute, any device) and records
every convolution and attention module as it is called. Hooks see modules, not dataflow, so
stages and skip connections stay unknown; the map says so.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from unet_surgery.graph.inputs import ProbeSpec
from unet_surgery.graph.records import AttentionRecord, ConvRecord, UNetMap

_CONTEXT_KWARGS = ("encoder_hidden_states", "context")


def _is_attention(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("to_q", "to_k", "to_v"))


def _level(shape: torch.Size, latent: tuple[int, int]) -> int | None:
    if len(shape) < 4:
        return None
    rh, rw = latent[0] / shape[-2], latent[1] / shape[-1]
    if rh != rw or rh < 1 or not math.log2(rh).is_integer():
        return None
    return int(math.log2(rh))


def probe_unet(model: nn.Module, spec: ProbeSpec) -> UNetMap:
    """Map ``model`` with forward hooks; stages and skips are reported unknown."""
    sample = spec.kwargs[spec.sample_key]
    hd, wd = spec.spatial_dims
    latent = (int(sample.shape[hd]), int(sample.shape[wd]))
    order = 0
    convs: dict[str, ConvRecord] = {}
    attentions: dict[str, AttentionRecord] = {}
    levels_seen: dict[str, int | None] = {}
    handles = []

    def conv_hook(path: str):
        def hook(module: nn.modules.conv._ConvNd, args: tuple[Any, ...], output: torch.Tensor) -> None:
            nonlocal order
            order += 1
            if path in convs:
                return
            rank = module.weight.dim() - 2
            kernel = tuple(module.kernel_size)
            if rank == 3:
                axis = "temporal" if max(kernel[1:]) == 1 and kernel[0] > 1 else (
                    "spatiotemporal" if kernel[0] > 1 else "spatial")
            else:
                axis = "temporal" if rank == 1 else "spatial"
            padding = module.padding if not isinstance(module.padding, str) else (0,) * rank
            convs[path] = ConvRecord(
                path=path, op=f"conv{rank}d", kernel=kernel, stride=tuple(module.stride),  # type: ignore[arg-type]
                dilation=tuple(module.dilation), padding=tuple(padding),
                in_channels=module.in_channels, out_channels=module.out_channels, groups=module.groups,
                level=_level(args[0].shape, latent), out_level=_level(output.shape, latent),
                stage=None, axis=axis, order=order,  # type: ignore[arg-type]
            )
        return hook

    def attn_hook(path: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            nonlocal order
            order += 1
            if path in attentions or not args:
                return
            x = args[0]
            context = next((kwargs[k] for k in _CONTEXT_KWARGS if kwargs.get(k) is not None), None)
            if context is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
                context = args[1]
            kind = "self" if context is None or context is x else "cross"
            # Level: the latest conv's output level is the feature map this attention reads.
            level = levels_seen.get("last")
            seq = x.shape[-2] if x.dim() >= 3 else None
            axis = None
            if seq is not None and level is not None and seq == (latent[0] * latent[1]) // 4**level:
                axis = "spatial"
            elif seq is not None and spec.frames is not None and seq == spec.frames:
                axis = "temporal"
            attentions[path] = AttentionRecord(
                path=path, op="attention", kind=kind, axis=axis, level=level,  # type: ignore[arg-type]
                stage=None, query_dim=int(x.shape[-1]), order=order,
            )
        return hook

    def track_level(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor):
            level = _level(output.shape, latent)
            if level is not None:
                levels_seen["last"] = level

    for path, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            handles.append(module.register_forward_hook(conv_hook(path)))
            handles.append(module.register_forward_hook(track_level))
        elif _is_attention(module):
            handles.append(module.register_forward_pre_hook(attn_hook(path), with_kwargs=True))
        elif isinstance(module, nn.GroupNorm):
            handles.append(module.register_forward_hook(track_level))
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_kwargs = {
                k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in spec.kwargs.items()
            }
            model(**fake_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    levels = [c.level for c in convs.values() if c.level is not None]
    unknown = ["ConvRecord.stage", "AttentionRecord.stage", "skips"]
    if any(a.axis is None for a in attentions.values()):
        unknown.append("AttentionRecord.axis")
    return UNetMap(
        model_class=type(model).__name__,
        method="probe",
        convs=sorted(convs.values(), key=lambda r: r.order),
        attentions=sorted(attentions.values(), key=lambda r: r.order),
        skips=[],
        num_levels=max(levels) + 1 if levels else 0,
        probe_latent=tuple(int(s) for s in sample.shape),
        unknown_fields=unknown,
    )
