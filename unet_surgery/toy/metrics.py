"""Object counting for toy images: how often does a sample hold exactly one object?

Training images hold exactly one saturated object on a muted background, so a sample with two or
more separate foreground blobs is a repetition, the artefact that appears when a UNet is sampled
above its training resolution. Segmentation is deliberately classifier-free: the background colour
is the median of the border pixels, foreground is every pixel whose RGB distance from it exceeds
a threshold, and objects are connected components above a minimum area (relative to the image
area, so the same parameters work at 32, 64 and 128 px).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "DEFAULT_METRIC_PARAMS",
    "ImageStats",
    "analyse_image",
    "analyse_images",
    "foreground_mask",
    "stats_dict",
    "summarise",
]

DEFAULT_METRIC_PARAMS: dict[str, float | int] = {
    "border": 2,
    "threshold": 0.5,
    "min_area_frac": 0.003,
}
"""``border``: border width (px) for the background estimate; ``threshold``: RGB distance (images in
[-1, 1]) from the background that counts as foreground; ``min_area_frac``: components smaller than
this fraction of the image area are specks, not objects."""


@dataclass(frozen=True)
class ImageStats:
    """Per-image result. ``size`` = sqrt(largest area) / image side; ``extent`` = its bbox side."""

    num_objects: int
    size: float
    extent: float
    areas: tuple[int, ...]


def _to_numpy(image: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {arr.shape}")
    return arr


def foreground_mask(
    image: torch.Tensor | np.ndarray,
    *,
    border: int = int(DEFAULT_METRIC_PARAMS["border"]),
    threshold: float = float(DEFAULT_METRIC_PARAMS["threshold"]),
) -> np.ndarray:
    """Boolean ``(H, W)`` mask of pixels far (RGB distance) from the border-median background."""
    arr = _to_numpy(image)
    _, h, w = arr.shape
    ring = np.ones((h, w), dtype=bool)
    ring[border : h - border, border : w - border] = False
    background = np.median(arr[:, ring], axis=1)
    dist = np.sqrt(((arr - background[:, None, None]) ** 2).sum(axis=0))
    return dist > threshold


def analyse_image(
    image: torch.Tensor | np.ndarray,
    *,
    border: int = int(DEFAULT_METRIC_PARAMS["border"]),
    threshold: float = float(DEFAULT_METRIC_PARAMS["threshold"]),
    min_area_frac: float = float(DEFAULT_METRIC_PARAMS["min_area_frac"]),
) -> ImageStats:
    """Count objects in one ``(3, H, W)`` image in [-1, 1] and measure the largest one."""
    mask = foreground_mask(image, border=border, threshold=threshold)
    h, w = mask.shape
    labelled, n = ndimage.label(mask)
    if n == 0:
        return ImageStats(0, 0.0, 0.0, ())
    areas = np.bincount(labelled.ravel(), minlength=n + 1)[1:]
    keep = np.flatnonzero(areas >= min_area_frac * h * w)
    if keep.size == 0:
        return ImageStats(0, 0.0, 0.0, ())
    kept = areas[keep]
    largest = int(keep[np.argmax(kept)]) + 1
    side = float(np.sqrt(h * w))
    rows, cols = ndimage.find_objects(labelled)[largest - 1]
    extent = max((rows.stop - rows.start) / h, (cols.stop - cols.start) / w)
    return ImageStats(
        num_objects=int(keep.size),
        size=float(np.sqrt(kept.max()) / side),
        extent=float(extent),
        areas=tuple(int(a) for a in sorted(kept, reverse=True)),
    )


def analyse_images(images: torch.Tensor | np.ndarray, **params: float) -> list[ImageStats]:
    """:func:`analyse_image` over a ``(N, 3, H, W)`` batch."""
    return [analyse_image(img, **params) for img in images]


def summarise(stats: list[ImageStats]) -> dict[str, float]:
    """Mean objects per image, fraction with exactly one / more than one / none, mean object size.

    Sizes are averaged over images that hold at least one object.
    """
    if not stats:
        raise ValueError("no images to summarise")
    counts = np.array([s.num_objects for s in stats])
    sized = [s.size for s in stats if s.num_objects > 0]
    return {
        "n_images": len(stats),
        "mean_objects": float(counts.mean()),
        "frac_one": float((counts == 1).mean()),
        "frac_multi": float((counts > 1).mean()),
        "frac_none": float((counts == 0).mean()),
        "mean_size": float(np.mean(sized)) if sized else 0.0,
    }


def stats_dict(stats: ImageStats) -> dict:
    """JSON-friendly form of one :class:`ImageStats`."""
    return asdict(stats)
