"""Re-dilated convolution (ScaleCrafter): run a pretrained conv with its kernel spread out.

A conv trained at resolution H sees features at the wrong scale at resolution f*H.  Dilating
its kernel by f (and the padding with it) restores the receptive field it was trained with.
For a fractional f the input is resized so that an integer dilation ceil(f) can be used.

Two layers of API:

* :func:`redilated_conv` -- a pure function, ``conv`` + input + factor -> output;
* :func:`redilate_` / :func:`restore_` -- an in-place *class swap* of an existing
  ``nn.Conv2d``/``nn.Conv3d``: the module keeps its parameters (no copies, same state_dict
  keys) and reads its :class:`ConvSetting` from a *factor source* on every forward, so a
  schedule can change the factor from one UNet call to the next.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unet_surgery.errors import TransformError
from unet_surgery.ops import rewrite
from unet_surgery.ops.dispersion import apply_transform, check_transform_fits
from unet_surgery.ops.lowpass import LowPass, lowpass_filter

__all__ = [
    "BatchSplit",
    "ConvSetting",
    "FactorSource",
    "RedilatedConv2d",
    "RedilatedConv3d",
    "current_setting",
    "dispersed_weight",
    "dispersion_of",
    "is_redilated",
    "redilate_",
    "redilated_conv",
    "restore_",
]

_ConvNd: TypeAlias = nn.Conv2d | nn.Conv3d


@dataclass(frozen=True)
class ConvSetting:
    """What a re-dilated conv does on one forward.

    ``factor`` is the dilation factor for the conv's own kernel (1 = the plain conv).
    ``use_dispersed`` switches to the dispersed (e.g. 5x5) kernel, computed on that forward
    from the transform ``R`` given to :func:`redilate_` and the live weight; it already covers
    ``scale`` times the area, so it runs with ``factor * dispersed_factor_scale`` (ScaleCrafter: f/2). ``lowpass`` (FouriScale) filters
    the input in the Fourier domain before the conv (:func:`~unet_surgery.ops.lowpass.lowpass_filter`).
    """

    factor: float = 1.0
    use_dispersed: bool = False
    lowpass: LowPass | None = None

    def __post_init__(self) -> None:
        _check_factor(self.factor)


FactorSource: TypeAlias = float | ConvSetting | Callable[[], "float | ConvSetting | BatchSplit"]
"""A constant factor/setting, or a zero-argument callable read on every forward."""


def _check_factor(factor: object) -> float:
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
        raise TransformError(f"dilation factor must be a number, got {factor!r}")
    value = float(factor)
    if not math.isfinite(value) or value <= 0:
        raise TransformError(f"dilation factor must be a finite number > 0, got {factor!r}")
    return value


OFF = ConvSetting(1.0, False)
"""The plain conv."""


# ---------------------------------------------------------------------------------------------
# Functional form
# ---------------------------------------------------------------------------------------------


def _numeric_padding(conv: _ConvNd) -> tuple[int, ...]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0,) * len(conv.kernel_size)
        # 'same' (stride 1 only, enforced by torch): symmetric only for odd effective kernels.
        pads = []
        for k, dil in zip(conv.kernel_size, conv.dilation, strict=True):
            total = dil * (k - 1)
            if total % 2:
                raise TransformError(
                    f"cannot re-dilate a padding='same' conv with even kernel {conv.kernel_size}"
                )
            pads.append(total // 2)
        return tuple(pads)
    return tuple(conv.padding)


_RESIZE_UPCAST: set[tuple[str, torch.dtype]] = set()


def _bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners=False) of a 4-D tensor.

    Half-precision bilinear is implemented on CPU in current torch; where a backend lacks it
    we resize in float32 and cast back (remembered per device type and dtype).
    """
    key = (x.device.type, x.dtype)
    if key not in _RESIZE_UPCAST:
        try:
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        except (RuntimeError, NotImplementedError):
            if x.dtype not in (torch.float16, torch.bfloat16):
                raise
            _RESIZE_UPCAST.add(key)
    out = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
    return out.to(x.dtype)


def _resize_frames(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize the last two dims; a 5-D (N, C, T, H, W) tensor is resized frame by frame."""
    if tuple(x.shape[-2:]) == size:
        return x
    if x.ndim == 4:
        return _bilinear(x, size)
    n, c, t, h, w = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
    frames = _bilinear(frames, size)
    return frames.reshape(n, t, c, *size).permute(0, 2, 1, 3, 4)


def _dilated_forward(
    conv: _ConvNd, x: Tensor, d: int, weight: Tensor, bias: Tensor | None
) -> Tensor:
    """Run ``conv``'s op with spatial dilation and padding multiplied by ``d``.

    The padding is ``d * (p + dil * (K - k) // 2)`` per spatial dim, with ``p``/``dil``/``k``
    the conv's own padding, dilation and kernel size and ``K`` the kernel actually used, so a
    larger (dispersed) kernel keeps the output size of the original conv.
    """
    spatial = len(conv.kernel_size) - 2  # 0 for Conv2d, 1 for Conv3d (leading temporal dim)
    pads = list(_numeric_padding(conv))
    dils = list(conv.dilation)
    for i in range(spatial, len(pads)):
        big, small = weight.shape[2 + i], conv.kernel_size[i]
        if (big - small) % 2:
            raise TransformError(
                f"override kernel {tuple(weight.shape[2:])} and conv kernel {conv.kernel_size} "
                "differ by an odd size; the extra taps cannot be centred"
            )
        pads[i] = d * (pads[i] + conv.dilation[i] * (big - small) // 2)
        dils[i] = d * conv.dilation[i]
    op = F.conv2d if x.ndim == 4 else F.conv3d
    if conv.padding_mode != "zeros":
        pad_arg: list[int] = []
        for p in reversed(pads):
            pad_arg += [p, p]
        mode = conv.padding_mode
        x = F.pad(x, pad_arg, mode=mode)
        return op(x, weight, bias, conv.stride, 0, tuple(dils), conv.groups)
    return op(x, weight, bias, conv.stride, tuple(pads), tuple(dils), conv.groups)


def redilated_conv(
    conv: _ConvNd,
    x: Tensor,
    factor: float,
    *,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Apply ``conv`` to ``x`` with its spatial kernel re-dilated by ``factor``.

    * factor 1 without overrides: exactly ``conv``'s own forward (bit-identical, no extra work);
    * integer d: dilation and padding times d;
    * fractional f (reference): d = ceil(f); resize ``x`` bilinearly to round(H*d/f) x
      round(W*d/f), run the d-dilated conv, resize the result to (int(H/sh), int(W/sw)).

    ``weight`` replaces the kernel (e.g. a dispersed 5x5 for a 3x3 conv) while keeping the
    conv's stride, groups and padding rule; ``bias=None`` means the conv's own bias.  For an
    ``nn.Conv3d`` only the two spatial dims are re-dilated and the resizes act per frame.
    """
    if not isinstance(conv, (nn.Conv2d, nn.Conv3d)):
        raise TransformError(
            f"re-dilation needs an nn.Conv2d or nn.Conv3d, got {type(conv).__name__}"
        )
    f = _check_factor(factor)
    if f == 1.0 and weight is None and bias is None:
        return conv._conv_forward(x, conv.weight, conv.bias)
    if conv.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise TransformError(f"unsupported padding_mode {conv.padding_mode!r}")
    w = conv.weight if weight is None else weight
    b = conv.bias if bias is None else bias
    if w.ndim != conv.weight.ndim or w.shape[:-2] != conv.weight.shape[:-2]:
        raise TransformError(
            f"override weight {tuple(w.shape)} must match the conv's {tuple(conv.weight.shape)} "
            "in every dim but the last two"
        )
    if x.ndim != conv.weight.ndim:
        raise TransformError(
            f"{type(conv).__name__} expects a {conv.weight.ndim}-D batched input, got {x.ndim}-D"
        )
    d = math.ceil(f)
    if d == f:
        return _dilated_forward(conv, x, d, w, b)
    h, wd = x.shape[-2:]
    ratio = d / f
    inner = _resize_frames(x, (round(h * ratio), round(wd * ratio)))
    out = _dilated_forward(conv, inner, d, w, b)
    sh, sw = conv.stride[-2:]
    # int(H/s) as published; at least 1, so a 1-pixel map (where the published size is 0) runs
    return _resize_frames(out, (max(1, int(h / sh)), max(1, int(wd / sw))))


# ---------------------------------------------------------------------------------------------
# In-place class swap (the shared mechanism of unet_surgery.ops.rewrite)
# ---------------------------------------------------------------------------------------------

_SCALE = "_redilate_dispersed_scale"
_TRANSFORM = "_redilate_dispersion"  # R: a plain attribute, shared by every conv with that transform
_DISPERSED = "_redilate_dispersed_weight"  # an explicit kernel: a non-persistent buffer (moves with .to())


def current_setting(conv: nn.Module) -> ConvSetting:
    """The setting a re-dilated conv would use on its next forward (OFF for a plain conv)."""
    if not is_redilated(conv):
        return OFF
    return _resolve(rewrite.source(conv))


def dispersed_weight(conv: nn.Module) -> Tensor | None:
    """The dispersed kernel a re-dilated conv uses now (None if it has none).

    With a transform ``R`` it is computed from the live weight on this call, exactly as the
    forward does (detached); with an explicit kernel given to :func:`redilate_`, that kernel.
    """
    if not is_redilated(conv):
        return None
    if _DISPERSED in conv._buffers:
        return conv._buffers[_DISPERSED]
    transform = conv.__dict__.get(_TRANSFORM)
    if transform is None:
        return None
    weight = cast(Tensor, conv.weight)
    with torch.no_grad():
        return apply_transform(weight.detach(), transform)


def dispersion_of(conv: nn.Module) -> Tensor | None:
    """The dispersion transform ``R`` a re-dilated conv holds (None if it has none)."""
    return conv.__dict__.get(_TRANSFORM) if is_redilated(conv) else None


def _resolve(source: FactorSource) -> ConvSetting:
    value = source() if callable(source) else source
    if isinstance(value, BatchSplit):  # report the first slice's setting
        return value.parts[0][1]
    if isinstance(value, ConvSetting):
        return value
    return ConvSetting(_check_factor(value))


@dataclass(frozen=True)
class BatchSplit:
    """Different settings for consecutive slices of one batch (noise-damped guidance).

    ``parts`` are ``(rows, setting)`` in units of the model's batch; a conv whose input batch
    is ``k`` times larger (video UNets fold frames into the batch) scales the slices by ``k``.
    """

    parts: tuple[tuple[int, ConvSetting], ...]

    def __post_init__(self) -> None:
        if not self.parts or any(rows < 1 for rows, _ in self.parts):
            raise TransformError(f"BatchSplit needs positive row counts, got {self.parts!r}")


class _RedilatedMixin(rewrite.Rewritten):
    """Forward of a class-swapped conv."""

    _rewrite_prefix = "Redilated"
    _rewrite_attrs = (_SCALE, _TRANSFORM)
    _rewrite_buffers = (_DISPERSED,)

    def forward(self, input: Tensor) -> Tensor:
        conv: Any = self
        value = rewrite.read_setting(conv)
        if isinstance(value, BatchSplit):
            return _split_forward(conv, input, value)
        return _setting_forward(conv, input, _resolve(value))


def _setting_forward(conv: Any, input: Tensor, setting: ConvSetting) -> Tensor:
    if setting.lowpass is not None:
        input = lowpass_filter(input, setting.lowpass, conv.stride[-2:])
    if setting.use_dispersed:
        weight = conv._buffers.get(_DISPERSED)
        if weight is None:
            transform = conv.__dict__.get(_TRANSFORM)
            if transform is None:
                raise TransformError(
                    "factor source asked for the dispersed kernel but redilate_ was given none"
                )
            weight = apply_transform(conv.weight, transform)  # per forward: the live weight
        factor = setting.factor * conv.__dict__[_SCALE]
        return redilated_conv(conv, input, factor, weight=weight)
    if setting.factor == 1.0:
        return conv._conv_forward(input, conv.weight, conv.bias)
    return redilated_conv(conv, input, setting.factor)


def _split_forward(conv: Any, input: Tensor, split: BatchSplit) -> Tensor:
    settings = [s for _, s in split.parts]
    if all(s == settings[0] for s in settings):
        return _setting_forward(conv, input, settings[0])
    total = sum(rows for rows, _ in split.parts)
    if input.shape[0] % total:
        raise TransformError(f"batch of {input.shape[0]} does not split into {total} model rows")
    k = input.shape[0] // total
    chunks = input.split([rows * k for rows, _ in split.parts])
    return torch.cat([_setting_forward(conv, c, s) for c, s in zip(chunks, settings, strict=True)])


class RedilatedConv2d(_RedilatedMixin, nn.Conv2d):
    """An ``nn.Conv2d`` swapped in place by :func:`redilate_`; never constructed directly."""

    _rewrite_base = nn.Conv2d


class RedilatedConv3d(_RedilatedMixin, nn.Conv3d):
    """An ``nn.Conv3d`` swapped in place by :func:`redilate_` (spatial dims only)."""

    _rewrite_base = nn.Conv3d


rewrite.register_swapped(_RedilatedMixin, nn.Conv2d, RedilatedConv2d)
rewrite.register_swapped(_RedilatedMixin, nn.Conv3d, RedilatedConv3d)


def _swap_class_for(cls: type[nn.Module]) -> type[nn.Module]:
    """The re-dilated counterpart of ``cls``; a subclass must keep conv's own forward."""
    base = nn.Conv3d if issubclass(cls, nn.Conv3d) else nn.Conv2d
    if cls.forward is not base.forward:
        raise TransformError(
            f"{cls.__name__} overrides forward(); re-dilating it would drop that behaviour"
        )
    return rewrite.swapped_class(_RedilatedMixin, cls)


def is_redilated(conv: nn.Module) -> bool:
    """Whether ``conv`` is currently class-swapped by :func:`redilate_`."""
    return rewrite.is_rewritten(conv, _RedilatedMixin)


def redilate_(
    conv: _ConvNd,
    factor: FactorSource,
    *,
    dispersion: Tensor | np.ndarray | None = None,
    dispersed_weight: Tensor | None = None,
    dispersed_factor_scale: float = 0.5,
    replace: bool = False,
) -> _ConvNd:
    """Swap ``conv``'s class in place so that it re-dilates by the factor ``factor`` yields.

    ``factor`` is a number, a :class:`ConvSetting` or a zero-argument callable returning
    either; it is read on every forward.  While the setting says ``use_dispersed`` the conv
    runs a dispersed kernel with the factor multiplied by ``dispersed_factor_scale``
    (1/scale of the transform; ScaleCrafter: f/2). The kernel comes from either

    * ``dispersion`` -- the transform ``R`` (L*L, S*S), e.g. ``transform_tensor(params)``: the
      kernel ``R @ w`` is computed from the live ``conv.weight`` on every such forward, so no
      kernel is stored and later weight edits (LoRA) count. ``R`` is kept as a plain
      attribute, not copied (convs given the same tensor share it), and never moved by ``.to()``;
    * ``dispersed_weight`` -- an explicit kernel, attached as a non-persistent buffer (it
      follows ``.to()``, never enters the state_dict, and does *not* follow weight edits).

    Giving both is an error. Re-dilating an already re-dilated conv raises
    :class:`TransformError` unless ``replace=True``, which updates the source (and the
    dispersion) in place.  A conv whose instance carries its own ``forward`` is refused (see
    :mod:`unet_surgery.ops.rewrite`).
    Returns ``conv`` itself.
    """
    if not isinstance(conv, (nn.Conv2d, nn.Conv3d)):
        raise TransformError(
            f"re-dilation needs an nn.Conv2d or nn.Conv3d, got {type(conv).__name__}"
        )
    if not (callable(factor) or isinstance(factor, ConvSetting)):
        _check_factor(factor)
    _check_factor(dispersed_factor_scale)
    if dispersion is not None and dispersed_weight is not None:
        raise TransformError("give redilate_ either dispersion (R) or dispersed_weight (a kernel), not both")
    if isinstance(dispersion, np.ndarray):
        dispersion = torch.from_numpy(np.array(dispersion, dtype=np.float64))
    if dispersion is not None:
        _check_dispersion(conv, dispersion)
    if dispersed_weight is not None:
        expected = conv.weight.shape[:-2]
        if dispersed_weight.ndim != conv.weight.ndim or dispersed_weight.shape[:-2] != expected:
            raise TransformError(
                f"dispersed weight {tuple(dispersed_weight.shape)} does not fit conv weight "
                f"{tuple(conv.weight.shape)}"
            )
    if is_redilated(conv) and not replace:
        raise TransformError("conv is already re-dilated; call restore_ first or pass replace=True")
    swapped = type(conv) if is_redilated(conv) else _swap_class_for(type(conv))
    buffers = {} if dispersed_weight is None else {_DISPERSED: dispersed_weight.detach()}
    attrs: dict[str, Any] = {_SCALE: float(dispersed_factor_scale)}
    if dispersion is not None:
        attrs[_TRANSFORM] = dispersion
    rewrite.install(conv, swapped, factor, replace=replace, attrs=attrs, buffers=buffers)
    return conv


def _check_dispersion(conv: _ConvNd, transform: Tensor) -> None:
    """``R`` must map this conv's S x S kernel to a larger L x L one centred on it."""
    if not isinstance(transform, Tensor) or not transform.is_floating_point():
        raise TransformError(f"dispersion must be a floating-point matrix R, got {type(transform).__name__}")
    check_transform_fits(transform, conv.weight.shape)
    big, small = math.isqrt(transform.shape[0]), conv.kernel_size[-1]
    if big <= small or (big - small) % 2:
        raise TransformError(
            f"dispersion R {tuple(transform.shape)} must map the {small}x{small} kernel to a larger "
            "kernel with an even number of extra taps"
        )


def restore_(conv: nn.Module) -> nn.Module:
    """Undo :func:`redilate_`: original class back, added attributes gone.  Returns ``conv``."""
    if not is_redilated(conv):
        raise TransformError(f"{type(conv).__name__} is not re-dilated; nothing to restore")
    return rewrite.restore(conv)
