"""FouriScale's low-pass filter of a conv input, applied before the dilated conv.

A conv dilated by ``s`` sees frequencies up to ``s`` times higher than at the training size;
FouriScale (Huang et al., ECCV 2024; official code ``model.py``, ``FouriConvProcessor``) first
removes them in the Fourier domain so that the dilated conv stays consistent across sizes.
What the official code does, carried over here:

* the input is zero-padded at the bottom/right to ``(int(h_base * r), int(w_base * r))`` with
  ``r = max(ceil(H / h_base), ceil(W / w_base))`` -- a whole multiple of the layer's size at
  the training resolution, so a non-square input is padded to the base aspect ratio;
* ``fftn`` over the last two dims (default "backward" normalisation), ``fftshift``, times a
  mask, ``ifftshift``, ``ifftn``, real part, crop back to ``H x W``;
* the mask is the outer product of two 1-D profiles. Per axis, with ``N`` the padded size,
  ``M = N // 2`` and ``k`` the distance from the centre, ``m(k) = clamp((1 - v) / R *
  (M / s + 1 - k) + 1, v, 1)``: 1 up to ``M / s + 1``, then a linear ramp of ``R`` samples
  down to the floor ``v``. The strong mask has ``R = max(N // 8, 1)``, the weak mask (the
  guidance branch) ``R = (s - 1) * N // (2 * s)`` (all ones when that is 0). The profile is
  laid out as ``[m(M-1) .. m(0), m(0) .. m(M-1)]``, so after ``fftshift`` the zero frequency
  (index ``M``) gets ``m(0)`` and negative frequency ``-k`` gets ``m(k - 1)``.

Deliberate differences: the official code always filters in float32 (and builds the mask in
float32); here the filter runs in the input's dtype when that is float32 or wider (float32 for
half precision), so float64 runs are exact to float64 rounding. For an odd padded size (which
the official code cannot handle: its mask is ``2 * (N // 2)`` long) the profile is extended by
one sample on the high-frequency side, ``m(N - M - 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from unet_surgery.errors import TransformError

__all__ = ["LowPass", "lowpass_filter", "lowpass_mask", "lowpass_profile", "padded_size"]


@dataclass(frozen=True)
class LowPass:
    """A FouriScale filter setting for one UNet call.

    ``scale`` is the (float) dilation the layer's conv runs at, before dividing by the conv's
    stride. ``base_hw`` is the latent size at the training resolution and ``target_h`` the
    height of the UNet's latent on this call: a layer whose input is ``H`` high filters over
    multiples of ``base_hw / (target_h / H)`` (the official SDXL formula, which is the
    official SD1.5 per-layer table whenever the latent divides evenly). ``value`` is the
    mask's floor (0 in the official SD1.5/2.1 scripts, 0.6 for SDXL); ``weak`` selects the
    guidance branch's wider ramp. ``scale_floor`` False drops the ``max(., 1)`` on the
    mask's scale ``scale / stride`` (the official SDXL processor's weak mask does).
    """

    scale: float
    base_hw: tuple[int, int]
    target_h: int
    value: float = 0.0
    weak: bool = False
    scale_floor: bool = True

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise TransformError(f"low-pass scale must be finite and > 0, got {self.scale!r}")
        if min(self.base_hw) <= 0 or self.target_h <= 0:
            raise TransformError(f"low-pass sizes must be positive, got base {self.base_hw}, target {self.target_h}")
        if not 0.0 <= self.value <= 1.0:
            raise TransformError(f"low-pass floor must be in [0, 1], got {self.value!r}")


def lowpass_profile(n: int, scale: float, value: float, *, weak: bool = False, dtype: torch.dtype = torch.float64) -> Tensor:
    """The 1-D mask over an axis of ``n`` samples, in ``fftshift`` order (see module doc)."""
    half = n // 2
    ramp = (scale - 1) * n // (scale * 2) if weak else max(n // 8, 1)
    k = torch.arange(n - half, dtype=dtype)
    if ramp == 0:
        prof = torch.ones_like(k)
    else:
        prof = ((1 - value) / ramp * (half / scale + 1 - k) + 1).clamp(min=value).clamp(max=1.0)
    return torch.cat([prof[:half].flip(0), prof])


def lowpass_mask(
    size: tuple[int, int], scale_hw: tuple[float, float], value: float, *, weak: bool = False,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The 2-D mask (outer product of the two profiles) for a padded ``size``."""
    mh = lowpass_profile(size[0], scale_hw[0], value, weak=weak, dtype=dtype)
    mw = lowpass_profile(size[1], scale_hw[1], value, weak=weak, dtype=dtype)
    return torch.outer(mh, mw)


def padded_size(hw: tuple[int, int], base_hw: tuple[float, float]) -> tuple[int, int]:
    """Smallest multiple ``r`` of the base size covering ``hw`` (one ``r`` for both axes)."""
    r = int(max(math.ceil(hw[0] / base_hw[0]), math.ceil(hw[1] / base_hw[1])))
    return int(base_hw[0] * r), int(base_hw[1] * r)


def lowpass_filter(x: Tensor, setting: LowPass, stride: tuple[int, int]) -> Tensor:
    """``x`` (..., H, W) low-pass filtered for a conv of ``stride`` (returns a new tensor).

    The mask's scale per axis is ``max(setting.scale / stride, 1)``: a strided conv samples
    less densely, so it needs less filtering (none at all when ``scale <= stride``). Without
    ``setting.scale_floor`` it is ``setting.scale / stride`` (the official SDXL weak mask).
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    down = setting.target_h / h
    base = (setting.base_hw[0] / down, setting.base_hw[1] / down)
    ph, pw = padded_size((h, w), base)
    if ph < h or pw < w:
        raise TransformError(f"low-pass padding {ph}x{pw} is smaller than the input {h}x{w}")
    dtype = x.dtype
    work = x if dtype in (torch.float32, torch.float64) else x.float()
    if (ph, pw) != (h, w):
        work = F.pad(work, (0, pw - w, 0, ph - h))
    floor = 1.0 if setting.scale_floor else 0.0
    scale = (max(setting.scale / stride[0], floor), max(setting.scale / stride[1], floor))
    mask = lowpass_mask((ph, pw), scale, setting.value, weak=setting.weak, dtype=work.dtype).to(work.device)
    spec = torch.fft.fftshift(torch.fft.fftn(work, dim=(-2, -1)), dim=(-2, -1)) * mask
    out = torch.fft.ifftn(torch.fft.ifftshift(spec, dim=(-2, -1)), dim=(-2, -1)).real
    return out[..., :h, :w].to(dtype)
