"""Native detail: was the texture drawn at the output resolution, or blown up from a small image?

The textured toys (``toy-detail``, ``toy-eps``) learn images whose object and background carry
luminance stripes of a fixed period ``P`` in *output pixels* (``texture_period`` in the model's
``toy_config.json``). A method that generates detail at a larger size draws stripes of period
``P`` there too; a method that upsamples a small image (bicubic, or a hires fix that keeps too
much of the upsampled image) shows stripes of period ``k * P`` at ``k``-times the side, or none.
Two numbers tell them apart, both from the image alone, with nothing from the code under test:

1. **Period**: the dominant period of the luminance spectrum among periods from 2 px (Nyquist) to
   ``3 P``, after a Gaussian high-pass of sigma ``P / 2`` that damps the objects' edges and the
   background gradient (at 32 px an object's edge otherwise outweighs the stripes at ``3 P``); the spectrum of the Hann-windowed image is zero-padded
   (interpolated) so the period is read to a fraction of a pixel at any size.
2. **Contrast**: the RMS luminance in the band of periods within ``period_tol`` of ``P``
   (Parseval over the unwindowed spectrum), i.e. how much texture of the right scale there is.
   Pure stripes of peak amplitude ``A`` have contrast ``A / sqrt(2)``.

An image has *native detail* when its period is within ``period_tol`` (20 %) of ``P`` and its
contrast is at least ``contrast_ratio`` (70 %) of a reference: the contrast of 1x samples of the
same model. A flat image has no peak above the noise floor: its period is ``None`` and it fails.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "DEFAULT_CONTRAST_RATIO",
    "DEFAULT_PERIOD_TOL",
    "DetailStats",
    "analyse_detail",
    "dominant_period",
    "summarise_detail",
    "texture_contrast",
]

DEFAULT_PERIOD_TOL = 0.2
"""A period within 20 % of the texture period counts as the texture's."""
DEFAULT_CONTRAST_RATIO = 0.7
"""Native detail needs at least 70 % of the 1x samples' texture contrast."""
_MIN_PEAK = 0.005
"""Spectral peaks with less RMS luminance than this (images in [-1, 1]) are noise, not texture:
8-bit quantisation alone leaves about 0.002."""
_MIN_PADDED = 256


@dataclass(frozen=True)
class DetailStats:
    """Per-image result: ``period`` in output pixels (``None``: no texture peak at all),
    ``contrast`` (RMS luminance at the texture's period), ``native`` (period and contrast both
    pass; ``None`` when no reference contrast was given)."""

    period: float | None
    contrast: float
    native: bool | None = None


def _luminance(image: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr.mean(axis=0)
    if arr.ndim != 2:
        raise ValueError(f"expected a (C, H, W) or (H, W) image, got shape {arr.shape}")
    if min(arr.shape) < 4:
        raise ValueError(f"image of {arr.shape[0]}x{arr.shape[1]} px is too small to measure")
    if not np.isfinite(arr).all():
        raise ValueError("image holds NaN or infinite values")
    return arr


def _radial_frequency(shape: tuple[int, int]) -> np.ndarray:
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    return np.sqrt(fy**2 + fx**2)


def dominant_period(
    image: torch.Tensor | np.ndarray, texture_period: float
) -> tuple[float | None, float]:
    """``(period, amplitude)`` of the strongest spectral peak with a period in [2, 3 P] px.

    ``amplitude`` is the peak's RMS luminance estimate; ``period`` is ``None`` when it is below
    the noise floor (a flat image).
    """
    grey = _luminance(image)
    high = grey - ndimage.gaussian_filter(grey, sigma=texture_period / 2, mode="reflect")
    h, w = high.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    padded = (max(_MIN_PADDED, 2 * h), max(_MIN_PADDED, 2 * w))
    spectrum = np.abs(np.fft.fft2(high * window, s=padded))
    freq = _radial_frequency(padded)
    band = (freq >= 1.0 / (3.0 * texture_period)) & (freq <= 0.5)
    spectrum = np.where(band, spectrum, 0.0)
    peak = np.unravel_index(int(np.argmax(spectrum)), spectrum.shape)
    # A sinusoid of amplitude A gives a windowed peak of A * sum(window) / 2; RMS is A / sqrt 2.
    amplitude = float(spectrum[peak]) * 2.0 / float(window.sum()) / math.sqrt(2.0)
    if amplitude < _MIN_PEAK:
        return None, amplitude
    return 1.0 / float(freq[peak]), amplitude


def texture_contrast(
    image: torch.Tensor | np.ndarray, texture_period: float, *, period_tol: float = DEFAULT_PERIOD_TOL
) -> float:
    """RMS luminance of the periods within ``period_tol`` of ``texture_period`` (Parseval)."""
    grey = _luminance(image)
    spectrum = np.fft.fft2(grey - grey.mean())
    freq = _radial_frequency(grey.shape)
    band = (freq >= 1.0 / ((1 + period_tol) * texture_period)) & (
        freq <= 1.0 / ((1 - period_tol) * texture_period)
    )
    power = float((np.abs(spectrum[band]) ** 2).sum())
    return math.sqrt(power) / grey.size


def analyse_detail(
    image: torch.Tensor | np.ndarray,
    texture_period: float,
    reference_contrast: float | None = None,
    *,
    period_tol: float = DEFAULT_PERIOD_TOL,
    contrast_ratio: float = DEFAULT_CONTRAST_RATIO,
) -> DetailStats:
    """Period, contrast and (given the 1x reference contrast) whether the detail is native."""
    if not texture_period > 2:
        raise ValueError(f"texture_period must exceed 2 px, got {texture_period}")
    period, _ = dominant_period(image, texture_period)
    contrast = texture_contrast(image, texture_period, period_tol=period_tol)
    native = None
    if reference_contrast is not None:
        native = (
            period is not None
            and abs(period - texture_period) <= period_tol * texture_period
            and contrast >= contrast_ratio * reference_contrast
        )
    return DetailStats(period=period, contrast=contrast, native=native)


def summarise_detail(stats: Sequence[DetailStats]) -> dict[str, Any]:
    """Rates over a set of images: native detail, period reproduced, median contrast and period."""
    if not stats:
        raise ValueError("no images to summarise")
    n = len(stats)
    periods = [s.period for s in stats if s.period is not None]
    return {
        "images": n,
        "native_detail": sum(bool(s.native) for s in stats) / n,
        "no_texture": sum(s.period is None for s in stats) / n,
        "median_period": float(np.median(periods)) if periods else None,
        "median_contrast": float(np.median([s.contrast for s in stats])),
        "per_image": [asdict(s) for s in stats],
    }
