"""Honest object metrics for toy images: how many objects, of which shape, at what scale?

Training images hold exactly one saturated convex shape (disc, square or upright triangle, all of
aspect ~1) on a muted background, so a sample with two or more objects is a repetition, the
artefact that appears when a UNet is sampled above its training resolution, and a sample whose one
object has another shape has lost its class. Everything here is classifier-free and independent of
any model: it only knows the generator's three shapes.

1. Segmentation: the background colour is the median of the border pixels; foreground is every
   pixel whose RGB distance from it, smoothed over about half a training pixel (sampling noise
   makes ragged edges), exceeds a threshold; blobs are 4-connected components above a minimum
   area (a fraction of the image area).
2. Shape fit: each blob is compared (IoU) with the three training templates, each placed from the
   blob's moments or bounding box at a few scales. A blob is *one object* if a template explains it
   (IoU >= ``min_fit``), or if it is convex (digital solidity >= ``min_solidity``) with aspect ~1
   (moment elongation <= ``max_elongation``), so that an unusual but single shape is not counted as
   several. Any other blob is *merged* (touching or overlapping copies) and counts as the number of
   distance-transform peaks it holds, at least 2.
3. Class and scale: the best template of the largest one-object blob gives the shape class (none
   if no template reaches ``min_fit``) and, from the blob's anti-aliasing-aware area, the object's
   side (disc diameter, square side, triangle base = height) relative to the image side, the same
   unit as :data:`~unet_surgery.toy.data.SIZE_RANGE`.

All parameters are relative to the image side or area, so they hold at 32, 64 and 128 px.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from unet_surgery.toy.data import SHAPES

__all__ = [
    "DEFAULT_METRIC_PARAMS",
    "ImageStats",
    "analyse_image",
    "analyse_images",
    "classify_mask",
    "foreground_mask",
    "stats_dict",
    "summarise",
]

DEFAULT_METRIC_PARAMS: dict[str, float | int] = {
    "border": 2,
    "threshold": 0.5,
    "min_area_frac": 0.003,
    "min_fit": 0.8,
    "min_solidity": 0.95,
    "max_elongation": 1.25,
    "residual_frac": 0.06,
    "smooth": 0.5,
}
"""``border``: border width (px) for the background estimate; ``threshold``: RGB distance (images in
[-1, 1]) from the background that counts as foreground; ``min_area_frac``: blobs smaller than
this fraction of the image area are specks, not objects; ``min_fit``: template IoU above which a
blob is one object; ``min_solidity`` / ``max_elongation``: a convex blob of aspect ~1 is one object
even when no template fits it; ``residual_frac``: a blob/template misfit thicker than twice this
fraction of the object side is another object; ``smooth``: Gaussian sigma of the distance map, in
training (32 px) pixels, scaled with the image."""

_SCALES = (0.92, 1.0, 1.08)
_PEAK_LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_PEAK_DYNAMIC = 0.1
_LUMP_IOU = 0.5
_TRAIN_SIDE = 32  # the toy's training resolution: ``smooth`` is in its pixels
_AREA_TO_SIDE2 = (4 / np.pi, 1.0, 2.0)  # side**2 / area of disc, square, triangle


@dataclass(frozen=True)
class ImageStats:
    """Per-image result.

    ``num_objects``: objects after splitting merged blobs; ``size`` = sqrt(largest blob area) /
    image side; ``extent`` = largest blob's bounding-box side / image side; ``areas``: blob areas
    (px), largest first. ``num_blobs``: connected blobs (the old, merge-blind count); ``merged``:
    blobs that no single shape explains. ``shape`` / ``shape_index``: best template of the largest
    one-object blob (``None`` / -1 if there is none, or no template fits it); ``shape_fit``: its
    IoU; ``scale``: the object's side / image side (0 if unclassified). ``label`` /
    ``class_kept``: the requested class and whether the image holds exactly one object, of that
    class (``None`` when no label was given).
    """

    num_objects: int
    size: float
    extent: float
    areas: tuple[int, ...]
    num_blobs: int = 0
    merged: int = 0
    shape: str | None = None
    shape_index: int = -1
    shape_fit: float = 0.0
    scale: float = 0.0
    label: int | None = None
    class_kept: bool | None = None


@dataclass(frozen=True)
class _BlobFit:
    shape_index: int
    iou: float
    side_px: float
    single: bool
    count: int


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
    return _background_distance(_to_numpy(image), border) > threshold


def _background_distance(arr: np.ndarray, border: int) -> np.ndarray:
    _, h, w = arr.shape
    ring = np.ones((h, w), dtype=bool)
    ring[border : h - border, border : w - border] = False
    background = np.median(arr[:, ring], axis=1)
    return np.sqrt(((arr - background[:, None, None]) ** 2).sum(axis=0))


def _soft_area(dist: np.ndarray, blob: np.ndarray) -> float:
    """Anti-aliasing-aware area of one blob: the sum of per-pixel coverage.

    Coverage is the distance from the background over the object's own contrast (median over its
    interior), summed over the blob grown by a pixel. The thresholded mask is biased by up to a
    pixel of edge (more after upsampling); this sum is not, so it gives an unbiased scale.
    """
    core = ndimage.binary_erosion(blob)
    contrast = float(np.median(dist[core if core.any() else blob]))
    ring = ndimage.binary_dilation(blob)
    return float(np.clip(dist[ring] / max(contrast, 1e-6), 0.0, 1.0).sum())


def _template(index: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, side: float):
    """Pixel-centre rasterisation of training shape ``index`` with box centre (cy, cx), in px."""
    half = side / 2
    dx, dy = xx - cx, yy - cy
    if index == 0:
        return dx * dx + dy * dy <= half * half
    if index == 1:
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    rel_y = (dy + half) / side  # 0 at the apex row, 1 at the base
    return (rel_y >= 0) & (rel_y <= 1) & (np.abs(dx) <= rel_y * half)


def _candidates(index: int, blob: np.ndarray, yy: np.ndarray, xx: np.ndarray):
    """Placements (cy, cx, side) of template ``index`` from the blob's moments and its bbox."""
    area = float(blob.sum())
    my, mx = float(yy[blob].mean()), float(xx[blob].mean())
    rows, cols = np.flatnonzero(blob.any(axis=1)), np.flatnonzero(blob.any(axis=0))
    by, bx = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
    bside = float(max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1)
    if index == 0:
        yield my, mx, 2 * np.sqrt(area / np.pi)
    elif index == 1:
        yield my, mx, np.sqrt(area)
    else:
        side = np.sqrt(2 * area)  # the centroid lies side/6 below the box centre
        yield my - side / 6, mx, side
    yield by, bx, bside


def classify_mask(
    blob: np.ndarray, residual_frac: float = float(DEFAULT_METRIC_PARAMS["residual_frac"])
) -> tuple[int, float, float, tuple[float, ...]]:
    """Best training template for one boolean blob: ``(shape_index, iou, side_px, ious)``.

    Each template is placed from the blob's moments and from its bounding box at a few scales
    and the best IoU is kept; comparing IoUs across templates classifies the shape. If the blob
    and the best template differ by a lump thicker than ``2 * residual_frac`` of the side (a
    second shape sticking out, not anti-aliasing or staircase edges), its IoU is capped below any
    sensible ``min_fit``.
    """
    rows, cols = np.flatnonzero(blob.any(axis=1)), np.flatnonzero(blob.any(axis=0))
    if rows.size == 0:
        return -1, 0.0, 0.0, (0.0,) * len(SHAPES)
    margin = int(0.15 * max(rows[-1] - rows[0], cols[-1] - cols[0])) + 2
    r0, c0 = max(rows[0] - margin, 0), max(cols[0] - margin, 0)
    crop = blob[r0 : rows[-1] + 1 + margin, c0 : cols[-1] + 1 + margin]
    pad = np.zeros((crop.shape[0] + 2 * margin, crop.shape[1] + 2 * margin), dtype=bool)
    pad[margin : margin + crop.shape[0], margin : margin + crop.shape[1]] = crop
    yy, xx = np.mgrid[0 : pad.shape[0], 0 : pad.shape[1]].astype(np.float32) + 0.5
    area = int(pad.sum())
    ious, sides, masks = [], [], []
    for index in range(len(SHAPES)):
        best, best_side, best_mask = 0.0, 0.0, pad
        for cy, cx, side in _candidates(index, pad, yy, xx):
            for scale in _SCALES:
                t = _template(index, yy, xx, cy, cx, side * scale)
                inter = int((t & pad).sum())
                iou = inter / (area + int(t.sum()) - inter)
                if iou > best:
                    best, best_side, best_mask = iou, side * scale, t
        ious.append(best)
        sides.append(best_side)
        masks.append(best_mask)
    index = int(np.argmax(ious))
    if residual_frac > 0:  # a thick lump of misfit is a second object, not a ragged edge
        depth = max(1, round(residual_frac * sides[index]))
        lump = ndimage.binary_erosion(masks[index] ^ pad, iterations=depth)
        if lump.any():
            ious[index] = min(ious[index], _LUMP_IOU)
    return index, float(ious[index]), float(sides[index]), tuple(float(i) for i in ious)


def _solidity(blob: np.ndarray) -> float:
    """Pixel count over the lattice points a convex set with the same hull would hold.

    The hull is taken over pixel centres; by Pick's theorem a convex digital set of hull area H
    and hull perimeter P holds about H + P/2 + 1 pixels, so a convex blob scores ~1 at any size.
    """
    edge = blob & ~ndimage.binary_erosion(blob)
    pts = np.argwhere(edge).astype(np.float64)
    if len(pts) < 3:
        return 1.0
    try:
        hull = ConvexHull(pts)
    except QhullError:  # collinear pixels: a line is convex
        return 1.0
    return float(blob.sum() / (hull.volume + hull.area / 2 + 1))


def _elongation(blob: np.ndarray) -> float:
    """sqrt of the covariance eigenvalue ratio (1 for a disc or square, 1.15 for the triangle)."""
    pts = np.argwhere(blob).astype(np.float64)
    cov = np.cov(pts.T) + np.eye(2) / 12  # + the variance of a uniform unit pixel
    lo, hi = np.linalg.eigvalsh(cov)
    return float(np.sqrt(hi / max(lo, 1e-9)))


def _count_peaks(blob: np.ndarray) -> int:
    """Objects in a merged blob: the most distance-transform peaks separated at any level.

    A component of the level set ``{edt >= t}`` counts only if its own peak rises a clear margin
    above ``t`` (a robust "dynamic"), so pixel-plateau noise on a ridge is not counted as an object.
    """
    edt = ndimage.distance_transform_edt(np.pad(blob, 1))
    top = float(edt.max())
    margin = max(1.0, _PEAK_DYNAMIC * top)
    best = 1
    for level in _PEAK_LEVELS:
        t = level * top
        lab, n = ndimage.label(edt >= t)
        if n > best:
            peaks = ndimage.maximum(edt, lab, index=np.arange(1, n + 1))
            best = max(best, int((np.asarray(peaks) >= t + margin).sum()))
    return best


def _fit_blob(
    blob: np.ndarray,
    *,
    min_fit: float,
    min_solidity: float,
    max_elongation: float,
    residual_frac: float,
) -> _BlobFit:
    index, iou, side, _ = classify_mask(blob, residual_frac)
    single = iou >= min_fit or (
        _solidity(blob) >= min_solidity and _elongation(blob) <= max_elongation
    )
    count = 1 if single else max(2, _count_peaks(blob))
    return _BlobFit(index, iou, side, single, count)


def analyse_image(
    image: torch.Tensor | np.ndarray,
    *,
    label: int | None = None,
    border: int = int(DEFAULT_METRIC_PARAMS["border"]),
    threshold: float = float(DEFAULT_METRIC_PARAMS["threshold"]),
    min_area_frac: float = float(DEFAULT_METRIC_PARAMS["min_area_frac"]),
    min_fit: float = float(DEFAULT_METRIC_PARAMS["min_fit"]),
    min_solidity: float = float(DEFAULT_METRIC_PARAMS["min_solidity"]),
    max_elongation: float = float(DEFAULT_METRIC_PARAMS["max_elongation"]),
    residual_frac: float = float(DEFAULT_METRIC_PARAMS["residual_frac"]),
    smooth: float = float(DEFAULT_METRIC_PARAMS["smooth"]),
) -> ImageStats:
    """Count, classify and measure the objects in one ``(3, H, W)`` image in [-1, 1].

    ``label`` is the requested class (index into :data:`~unet_surgery.toy.data.SHAPES`), if known.
    """
    dist = _background_distance(_to_numpy(image), border)
    h, w = dist.shape
    # Sampled images have per-pixel noise: smooth on the scale of a training pixel so that ragged,
    # speckled edges do not read as non-convex (a no-op for clean generator edges).
    sigma = smooth * np.sqrt(h * w) / _TRAIN_SIDE
    mask = (ndimage.gaussian_filter(dist, sigma) if sigma > 0 else dist) > threshold
    labelled, n = ndimage.label(mask)
    label = None if label is None else int(label)
    empty = ImageStats(0, 0.0, 0.0, (), label=label, class_kept=None if label is None else False)
    if n == 0:
        return empty
    areas = np.bincount(labelled.ravel(), minlength=n + 1)[1:]
    keep = np.flatnonzero(areas >= min_area_frac * h * w)
    if keep.size == 0:
        return empty
    keep = keep[np.argsort(-areas[keep], kind="stable")]  # largest first
    boxes = ndimage.find_objects(labelled)
    fits = []
    for k in keep:
        rows, cols = boxes[k]
        blob = labelled[rows, cols] == k + 1
        fit = _fit_blob(
            blob,
            min_fit=min_fit,
            min_solidity=min_solidity,
            max_elongation=max_elongation,
            residual_frac=residual_frac,
        )
        fits.append(fit)
    side = float(np.sqrt(h * w))
    rows, cols = boxes[keep[0]]
    extent = max((rows.stop - rows.start) / h, (cols.stop - cols.start) / w)
    num_objects = sum(f.count for f in fits)
    main_k = next((i for i, f in enumerate(fits) if f.single), None)
    main = None if main_k is None else fits[main_k]
    # A single blob that no template fits (e.g. an apex-down triangle) has no training class.
    shape_index = -1 if main is None or main.iou < min_fit else main.shape_index
    scale = 0.0
    if main is not None and shape_index >= 0:
        rows, cols = boxes[keep[main_k]]
        grown = (
            slice(max(rows.start - 1, 0), rows.stop + 1),
            slice(max(cols.start - 1, 0), cols.stop + 1),
        )
        area = _soft_area(dist[grown], labelled[grown] == keep[main_k] + 1)
        scale = float(np.sqrt(area * _AREA_TO_SIDE2[shape_index]) / side)
    class_kept = None if label is None else bool(num_objects == 1 and shape_index == label)
    return ImageStats(
        num_objects=num_objects,
        size=float(np.sqrt(areas[keep[0]]) / side),
        extent=float(extent),
        areas=tuple(int(a) for a in areas[keep]),
        num_blobs=int(keep.size),
        merged=sum(not f.single for f in fits),
        shape=None if shape_index < 0 else SHAPES[shape_index],
        shape_index=shape_index,
        shape_fit=0.0 if main is None else main.iou,
        scale=scale,
        label=label,
        class_kept=class_kept,
    )


def analyse_images(
    images: torch.Tensor | np.ndarray,
    labels: Sequence[int] | torch.Tensor | np.ndarray | None = None,
    **params: Any,
) -> list[ImageStats]:
    """:func:`analyse_image` over a ``(N, 3, H, W)`` batch, with optional requested labels."""
    if labels is None:
        return [analyse_image(img, **params) for img in images]
    labels = [int(v) for v in labels]
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    return [
        analyse_image(img, label=lab, **params) for img, lab in zip(images, labels, strict=True)
    ]


def summarise(
    stats: list[ImageStats],
    labels: Sequence[int] | torch.Tensor | np.ndarray | None = None,
    *,
    size_range: tuple[float, float] | None = None,
) -> dict[str, float | None]:
    """Fractions of images with exactly one / several / no object, with a merged blob, and with
    the requested class kept; mean objects per image; mean size and scale.

    With the training ``size_range`` (object side / image side), ``frac_scale_in_range`` is the
    fraction of images holding exactly one object whose scale lies in that range, widened by one
    training pixel (1/32) on each side: the metric's own precision.

    ``frac_class_kept`` is the fraction of images holding exactly one object, of the requested
    class (from ``labels``, else from the stats' own labels; ``None`` if no label is known).
    Sizes and scales are averaged over images that hold an object that has them.
    """
    if not stats:
        raise ValueError("no images to summarise")
    counts = np.array([s.num_objects for s in stats])
    if labels is not None:
        want = [int(v) for v in labels]
        if len(want) != len(stats):
            raise ValueError(f"{len(want)} labels for {len(stats)} images")
    elif all(s.label is not None for s in stats):
        want = [int(s.label) for s in stats]  # type: ignore[arg-type]
    else:
        want = None
    kept = (
        None
        if want is None
        else float(
            np.mean(
                [
                    s.num_objects == 1 and s.shape_index == w
                    for s, w in zip(stats, want, strict=True)
                ]
            )
        )
    )
    sized = [s.size for s in stats if s.num_objects > 0]
    scaled = [s.scale for s in stats if s.scale > 0]
    in_range = None
    if size_range is not None:
        lo, hi = size_range[0] - 1 / _TRAIN_SIDE, size_range[1] + 1 / _TRAIN_SIDE
        in_range = float(np.mean([s.num_objects == 1 and lo <= s.scale <= hi for s in stats]))
    return {
        "n_images": len(stats),
        "mean_objects": float(counts.mean()),
        "frac_one": float((counts == 1).mean()),
        "frac_multi": float((counts > 1).mean()),
        "frac_none": float((counts == 0).mean()),
        "frac_merged": float(np.mean([s.merged > 0 for s in stats])),
        "frac_class_kept": kept,
        "mean_size": float(np.mean(sized)) if sized else 0.0,
        "mean_scale": float(np.mean(scaled)) if scaled else 0.0,
        "frac_scale_in_range": in_range,
    }


def stats_dict(stats: ImageStats) -> dict:
    """JSON-friendly form of one :class:`ImageStats`."""
    return asdict(stats)
