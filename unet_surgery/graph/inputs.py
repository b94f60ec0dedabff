"""How each UNet class is called (:class:`CallSpec`), and probe inputs built from it.

One call spec per model class -- argument names, latent layout, per-frame states -- serves the
mapper (probe inputs: zeros on the model's own device, ``meta`` costs nothing, since the map
depends only on shapes), the presets' example inputs, ``.pt2`` export and the call tracker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

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


Layout = Literal["BCHW", "BCFHW", "BFCHW"]


@dataclass(frozen=True)
class CallSpec:
    """How one UNet class is called: argument names, latent layout and per-frame states.

    The one place this is known; used by the mapper's probe inputs, the presets' example
    inputs, ``.pt2`` export and the call tracker. ``context_per_frame``: the encoder states are
    already repeated per frame, ``(B * F, tokens, dim)`` (``UNetMotionModel`` does not repeat
    them itself); ``context_tokens`` fixes the token count (SVD: one CLIP image embedding).
    """

    model_class: str
    sample: str
    timestep: str
    context: str | None
    layout: Layout
    context_per_frame: bool = False
    context_tokens: int | None = None
    added_time_ids: int = 0  # SVD: fps, motion bucket, noise augmentation
    return_dict: bool = True  # forward takes return_dict

    @property
    def spatial_dims(self) -> tuple[int, int]:
        return (2, 3) if self.layout == "BCHW" else (3, 4)

    @property
    def channel_dim(self) -> int:
        return 2 if self.layout == "BFCHW" else 1

    @property
    def is_video(self) -> bool:
        return self.layout != "BCHW"


_S, _T, _EHS = "sample", "timestep", "encoder_hidden_states"  # the diffusers names
CALL_SPECS: dict[str, CallSpec] = {
    spec.model_class: spec
    for spec in (
        CallSpec("UNetModel", "x", "timesteps", "context", "BCHW", return_dict=False),  # LDM / CompVis
        CallSpec("UNet2DModel", _S, _T, None, "BCHW"),
        CallSpec("UNet2DConditionModel", _S, _T, _EHS, "BCHW"),
        CallSpec("UNetMotionModel", _S, _T, _EHS, "BCFHW", context_per_frame=True),
        CallSpec("UNet3DConditionModel", _S, _T, _EHS, "BCFHW"),
        CallSpec("UNetSpatioTemporalConditionModel", _S, _T, _EHS, "BFCHW", context_tokens=1, added_time_ids=3),
    )
}


def call_spec(model: nn.Module) -> CallSpec | None:
    """The call spec of ``model``'s class (None for a class we do not know how to call)."""
    cls = type(model).__name__
    if cls == "UNetModel" and not hasattr(model, "input_blocks"):
        return None
    spec = CALL_SPECS.get(cls)
    if spec is not None and cls != "UNetModel" and getattr(model, "config", None) is None:
        return None
    return spec


@dataclass(frozen=True)
class CallFacts:
    """What a model's configuration says about its inputs' widths."""

    in_channels: int
    context_dim: int | None
    text_time: tuple[int, int] | None = None  # SDXL added conditioning: (text dim, time ids)
    class_labels: bool = False
    ldm_y: int | None = None  # LDM class conditioning: ADM vector width, 0 for integer labels


def facts_from_config(model_class: str, cfg: Any) -> CallFacts:
    """Facts from a diffusers config (object or dict) or LDM ``params`` dict."""

    def get(name: str, default: Any = None) -> Any:
        return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)

    if model_class == "UNetModel":
        return CallFacts(get("in_channels"), get("context_dim"))
    ctx = get("cross_attention_dim")
    if isinstance(ctx, (list, tuple)):
        ctx = ctx[0]
    text_time = None
    if get("addition_embed_type") == "text_time":
        n_time = 6  # original size, crop top-left, target size
        text_time = (get("projection_class_embeddings_input_dim") - n_time * get("addition_time_embed_dim"), n_time)
    labels = bool(get("num_class_embeds")) or (model_class == "UNet2DConditionModel" and get("class_embed_type") is not None)
    return CallFacts(get("in_channels"), ctx if model_class != "UNet2DModel" else None, text_time, labels)


def _cross_attention_dim(model: nn.Module) -> int | None:
    """Width of the encoder states, read from the first cross-attention key projection."""
    for name, module in model.named_modules():
        if name.endswith("attn2.to_k") and isinstance(module, nn.Linear):
            return module.in_features
    return None


def facts_from_model(model: nn.Module, spec: CallSpec) -> CallFacts:
    """Facts of a model instance (its diffusers config, or the LDM module's attributes)."""
    if spec.model_class != "UNetModel":
        return facts_from_config(spec.model_class, model.config)
    ldm: Any = model
    y = None
    if getattr(ldm, "num_classes", None) is not None:
        seq: Any = ldm.label_emb if isinstance(ldm.label_emb, nn.Sequential) else None
        y = seq[0][0].in_features if seq is not None else 0
    return CallFacts(int(ldm.in_channels), _cross_attention_dim(model), ldm_y=y)


def call_inputs(
    spec: CallSpec,
    facts: CallFacts,
    *,
    batch: int,
    latent_hw: tuple[int, int],
    frames: int | None,
    tokens: int,
    tensor: Callable[[tuple[int, ...]], torch.Tensor],
    timestep: torch.Tensor,
    time_ids: Callable[[str, int], torch.Tensor],
    labels: Callable[[tuple[int, ...]], torch.Tensor],
) -> dict[str, Any]:
    """Keyword arguments for one forward of a ``spec`` model.

    ``tensor(shape)`` makes the float inputs (drawn in a fixed order: sample, encoder states,
    text embeddings), ``time_ids(kind, batch)`` the SDXL (``"text_time"``) or SVD (``"svd"``)
    conditioning ids, ``labels(shape)`` integer class labels.
    """
    h, w = latent_hw
    c = facts.in_channels
    if spec.is_video and (frames is None or frames < 1):
        raise MappingError(f"{spec.model_class} needs num_frames >= 1, got {frames}")
    f = frames or 1
    shape = {"BCHW": (batch, c, h, w), "BCFHW": (batch, c, f, h, w), "BFCHW": (batch, f, c, h, w)}[spec.layout]
    kwargs: dict[str, Any] = {spec.sample: tensor(shape), spec.timestep: timestep}
    if spec.context is not None and facts.context_dim is not None:
        rows = batch * f if spec.context_per_frame else batch
        kwargs[spec.context] = tensor((rows, spec.context_tokens or tokens, facts.context_dim))
    if spec.added_time_ids:
        kwargs["added_time_ids"] = time_ids("svd", batch)
    if facts.text_time is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": tensor((batch, facts.text_time[0])), "time_ids": time_ids("text_time", batch)}
    if facts.class_labels:
        kwargs["class_labels"] = labels((batch,))
    if facts.ldm_y is not None:
        kwargs["y"] = tensor((batch, facts.ldm_y)) if facts.ldm_y else labels((batch,))
    return kwargs


def _param(model: nn.Module) -> torch.Tensor:
    try:
        return next(model.parameters())
    except StopIteration as exc:
        raise MappingError(f"{type(model).__name__} has no parameters: not a UNet") from exc


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
    spec = call_spec(model)
    if spec is None:
        raise MappingError(
            f"don't know how to call {type(model).__name__}: it is neither a diffusers UNet nor an LDM "
            "UNetModel (pass inputs= with example keyword arguments)"
        )
    kwargs = call_inputs(
        spec,
        facts_from_model(model, spec),
        batch=batch,
        latent_hw=latent_hw,
        frames=frames if spec.is_video else None,
        tokens=tokens,
        tensor=lambda shape: torch.zeros(*shape, device=device, dtype=dtype),
        timestep=torch.full((batch,), 10, device=device, dtype=torch.long),
        time_ids=lambda kind, rows: torch.zeros(rows, 6 if kind == "text_time" else 3, device=device, dtype=dtype),
        labels=lambda shape: torch.zeros(*shape, dtype=torch.long, device=device),
    )
    if spec.return_dict:
        kwargs["return_dict"] = False
    return ProbeSpec(kwargs, spec.sample, spec.spatial_dims, batch, frames if spec.is_video else None)
