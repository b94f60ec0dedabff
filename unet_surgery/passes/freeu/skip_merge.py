"""FreeU (Si et al., 2023): amplify the backbone, damp the skip's low frequencies.

In the up path every resnet receives ``cat([backbone, skip])``. FreeU multiplies the first
half of the backbone channels by ``b`` and scales the centre of the skip's (shifted) 2-D
spectrum by ``s``, at the two lowest-resolution up levels. Diffusers (``apply_freeu``)
picks those levels by up-block index; this module works on the concatenated tensor itself,
so the same rewrite serves every layout whose map knows the split (diffusers up-block
resnets, LDM ``output_blocks`` ResBlocks):

* :func:`fourier_filter` / :func:`freeu_merge` -- the pure functions;
* :func:`freeu_` / :func:`restore_freeu_` -- an in-place class swap of the module that
  receives the concatenation; a :class:`FreeUSetting` (or None: plain) is read from a source
  on every forward.

Precision follows both official implementations: the filter runs in float32 whatever the
input dtype (diffusers and the FreeU repository both cast), and the result is cast back.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from unet_surgery.errors import TransformError
from unet_surgery.ops import rewrite

__all__ = [
    "FreeUSetting",
    "FreeUSource",
    "backbone_scale",
    "fourier_filter",
    "freeu_",
    "freeu_merge",
    "is_freeu",
    "restore_freeu_",
]


def fourier_filter(x: Tensor, threshold: int, scale: float) -> Tensor:
    """Scale the ``2*threshold`` square at the centre of ``x``'s shifted 2-D spectrum by ``scale``.

    Over the last two dims. The square is the slice ``[H//2 - t : H//2 + t]`` (and likewise
    in W) with Python's slice rules, as published: for ``H < 2t`` a negative start wraps, so
    on tiny maps the square may cover the whole spectrum or, for ``t > H//2``, only its end.
    """
    x32 = x.to(torch.float32)
    h, w = x32.shape[-2:]
    freq = torch.fft.fftshift(torch.fft.fftn(x32, dim=(-2, -1)), dim=(-2, -1))
    mask = torch.ones((h, w), dtype=torch.float32, device=x.device)
    crow, ccol = h // 2, w // 2
    mask[crow - threshold : crow + threshold, ccol - threshold : ccol + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)


def backbone_scale(h: Tensor, factor: float, *, structure: bool = False) -> Tensor:
    """The first half of ``h``'s channels (dim 1) times ``factor``; a new tensor.

    ``structure``: FreeU's v2 ("structure-related") scaling from its README of 2023-10-18:
    the factor becomes ``(factor - 1) * m + 1`` per pixel, ``m`` the channel mean of ``h``
    min-max normalised over each sample's map (a constant map divides by zero, as published).
    """
    half = h.shape[1] // 2
    if not structure:
        return torch.cat([h[:, :half] * factor, h[:, half:]], dim=1)
    mean = h.mean(1, keepdim=True)
    flat = mean.reshape(h.shape[0], -1)
    shape = (h.shape[0],) + (1,) * (h.ndim - 1)
    lo = flat.min(dim=-1).values.reshape(shape)
    hi = flat.max(dim=-1).values.reshape(shape)
    scale = (factor - 1) * ((mean - lo) / (hi - lo)) + 1
    return torch.cat([h[:, :half] * scale, h[:, half:]], dim=1)


@dataclass(frozen=True)
class FreeUSetting:
    """What a FreeU'd module does to its input on one call.

    ``hidden_channels``/``skip_channels`` split the concatenated input (``skip_first`` when
    the skip operand comes first); ``backbone`` is ``b``, ``skip`` is ``s``; ``structure``
    selects FreeU v2's structure-related backbone scaling (:func:`backbone_scale`).
    """

    hidden_channels: int
    skip_channels: int
    skip_first: bool = False
    backbone: float = 1.0
    skip: float = 1.0
    threshold: int = 1
    structure: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_channels", "skip_channels", "threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < (0 if name == "threshold" else 1):
                raise TransformError(f"{name} must be a {'non-negative' if name == 'threshold' else 'positive'} integer, got {value!r}")
        for name in ("backbone", "skip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TransformError(f"{name} must be a number, got {value!r}")


FreeUSource: TypeAlias = FreeUSetting | Callable[[], FreeUSetting | None] | None
"""A constant setting (None = plain), or a zero-argument callable read on every forward."""


def freeu_merge(x: Tensor, setting: FreeUSetting) -> Tensor:
    """``cat([b-scaled backbone, filtered skip])`` from the concatenation ``x`` (same order)."""
    hidden, skip = setting.hidden_channels, setting.skip_channels
    if x.ndim < 3 or x.shape[1] != hidden + skip:
        raise TransformError(
            f"FreeU expected {hidden} + {skip} input channels in dim 1, got shape {tuple(x.shape)}"
        )
    if setting.skip_first:
        s, h = x[:, :skip], x[:, skip:]
    else:
        h, s = x[:, :hidden], x[:, hidden:]
    h = backbone_scale(h, setting.backbone, structure=setting.structure)
    s = fourier_filter(s, setting.threshold, setting.skip)
    return torch.cat([s, h] if setting.skip_first else [h, s], dim=1)


def _resolve(source: Any) -> FreeUSetting | None:
    value = source() if callable(source) else source
    if value is None or isinstance(value, FreeUSetting):
        return value
    raise TransformError(f"FreeU source gave {type(value).__name__}, expected FreeUSetting/None")


class _FreeUMixin(rewrite.Rewritten):
    """Forward of a module receiving a skip concatenation: FreeU on its input, then the original.

    ``_freeu_arg`` names the base forward's first parameter (the concatenated tensor), for
    callers that pass it by keyword.
    """

    _rewrite_prefix = "FreeU"
    _freeu_arg: str

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        base_forward = self._rewrite_base.forward
        setting = _resolve(rewrite.source(self))  # type: ignore[arg-type]
        if setting is not None:
            if args:
                args = (freeu_merge(args[0], setting), *args[1:])
            else:
                kwargs[self._freeu_arg] = freeu_merge(kwargs[self._freeu_arg], setting)
        return base_forward(self, *args, **kwargs)


def is_freeu(module: nn.Module) -> bool:
    """Whether ``module`` is currently class-swapped by :func:`freeu_`."""
    return rewrite.is_rewritten(module, _FreeUMixin)


def freeu_(module: nn.Module, source: FreeUSource) -> nn.Module:
    """Swap ``module``'s class in place so that FreeU shapes its (concatenated) first input.

    ``source`` is a :class:`FreeUSetting`, None, or a zero-argument callable returning either,
    read on every forward. Weights, ``state_dict`` keys and hooks are untouched. Returns
    ``module``.
    """
    if not isinstance(module, nn.Module):
        raise TransformError(f"FreeU needs an nn.Module, got {type(module)!r}")
    if not (source is None or callable(source) or isinstance(source, FreeUSetting)):
        raise TransformError(f"FreeU source must be a FreeUSetting, None or a callable, got {source!r}")
    cls = type(module)
    params = list(inspect.signature(cls.forward).parameters)[1:]
    if not params:
        raise TransformError(f"{cls.__name__}.forward takes no input to apply FreeU to")
    swapped = rewrite.swapped_class(_FreeUMixin, cls, _freeu_arg=params[0])
    return rewrite.install(module, swapped, source)


def restore_freeu_(module: nn.Module) -> nn.Module:
    """Undo :func:`freeu_`: original class back, added attributes gone."""
    if not is_freeu(module):
        raise TransformError(f"{type(module).__name__} is not FreeU'd; nothing to restore")
    return rewrite.restore(module)
