"""Procedural toy images: one filled shape on a muted background.

The data is deliberately simple so that a ~4M-parameter pixel-space UNet learns it on a CPU in
minutes, and so that "how many objects are in this image" is measurable without a classifier:
every training image holds exactly one saturated object on a low-saturation background. A model
sampled above its training resolution that draws two or more objects is repeating itself, which
is the failure the high-resolution recipes are meant to reduce.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "COLOURS",
    "COLOUR_NAMES",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "SHAPES",
    "SIZE_RANGE",
    "TEXTURE_AMPLITUDE",
    "make_batch",
    "shape_coverage",
    "stripe_texture",
]

IMAGE_SIZE = 32
SHAPES: tuple[str, ...] = ("disc", "square", "triangle")
NUM_CLASSES = len(SHAPES)
SIZE_RANGE: tuple[float, float] = (0.35, 0.60)
"""Object side (disc diameter, square side, triangle base and height) as a fraction of the image side."""

COLOUR_NAMES: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
COLOURS = torch.tensor(
    [
        [0.95, -0.80, -0.80],
        [-0.80, 0.85, -0.70],
        [-0.75, -0.60, 0.95],
        [0.95, 0.85, -0.85],
        [0.90, -0.80, 0.90],
        [-0.80, 0.90, 0.90],
    ],
    dtype=torch.float32,
)
"""Saturated object colours in [-1, 1] RGB; all far from any background grey."""

TEXTURE_AMPLITUDE = 0.15
"""Peak luminance amplitude of the textured toys' stripes (images in [-1, 1]). Small enough that
the stripes stay far below the object metric's foreground threshold (RGB distance 0.5: the
stripes add at most sqrt(3) * 0.15 = 0.26), large enough that a 4M-parameter model learns them."""

_SUPERSAMPLE = 2  # anti-aliased edges: rasterise at 2x and average-pool


def _rand(n: int, generator: torch.Generator, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _coverage(
    labels: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, side: torch.Tensor, size: int
) -> torch.Tensor:
    """Anti-aliased ``(n, size, size)`` coverage of shape ``labels[i]`` (fractions of the side)."""
    n = labels.shape[0]
    hi = size * _SUPERSAMPLE
    coords = (torch.arange(hi, dtype=torch.float32) + 0.5) / hi  # pixel centres in [0, 1]
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    xx, yy = xx.unsqueeze(0), yy.unsqueeze(0)  # (1, H, W)
    dx = xx - cx.view(n, 1, 1)
    dy = yy - cy.view(n, 1, 1)
    half = (side / 2).view(n, 1, 1)

    disc = dx.square() + dy.square() <= half.square()
    square = (dx.abs() <= half) & (dy.abs() <= half)
    # Upright isosceles triangle inscribed in the side x side box: apex at the top centre.
    rel_y = (dy + half) / (2 * half)  # 0 at the apex row, 1 at the base
    triangle = (rel_y >= 0) & (rel_y <= 1) & (dx.abs() <= rel_y * half)
    masks = torch.stack([disc, square, triangle], dim=1).float()  # (n, 3, H, W)
    mask = masks[torch.arange(n), labels]  # (n, H, W)
    return torch.nn.functional.avg_pool2d(mask.unsqueeze(1), _SUPERSAMPLE).squeeze(1)


def shape_coverage(
    label: int, cx: float, cy: float, side: float, *, size: int = IMAGE_SIZE
) -> torch.Tensor:
    """Anti-aliased ``(size, size)`` coverage in [0, 1] of one shape, as in :func:`make_batch`.

    ``cx``, ``cy`` (box centre) and ``side`` are fractions of the image side. Exposed so that
    tests can compose images with several touching or overlapping objects drawn like training data.
    """

    def one(v: float) -> torch.Tensor:
        return torch.tensor([v], dtype=torch.float32)

    labels = torch.tensor([label], dtype=torch.long)
    return _coverage(labels, one(cx), one(cy), one(side), size)[0]


def stripe_texture(
    angle: torch.Tensor, phase: torch.Tensor, period: float, height: int, width: int
) -> torch.Tensor:
    """``(n, H, W)`` unit-amplitude stripes ``cos(2 pi (x cos a + y sin a) / period + phase)``.

    ``x``, ``y`` are pixel centres in output pixels, so the period is ``period`` pixels at every
    image size: a sinusoid below Nyquist (period > 2) needs no anti-aliasing.
    """
    n = angle.shape[0]
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    along = torch.cos(angle).view(n, 1, 1) * xx + torch.sin(angle).view(n, 1, 1) * yy
    return torch.cos(2 * math.pi * along / period + phase.view(n, 1, 1))


def make_batch(
    n: int,
    generator: torch.Generator,
    *,
    size: int = IMAGE_SIZE,
    texture_period: float | None = None,
    texture_amplitude: float = TEXTURE_AMPLITUDE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` images and their shape labels from ``generator`` (reproducible for a seed).

    Returns ``(images, labels)``: float32 ``(n, 3, size, size)`` in [-1, 1] and int64 ``(n,)`` with
    the index into :data:`SHAPES`. The label is the shape only; the colour is a nuisance variable,
    so a class-conditional model must still learn all colours for each shape.

    ``texture_period`` (pixels, > 2) gives the object's fill and the background each a luminance
    stripe texture of that period, at independent random orientations and phases and peak
    amplitude ``texture_amplitude``: the detail a model sampled above its training size must
    draw at the same pixel scale (``toy-detail``, ``toy-eps``). Without it the stream of random
    numbers, and so every image, is exactly that of the flat toys.
    """
    if texture_period is not None and not texture_period > 2:
        raise ValueError(f"texture_period must exceed 2 pixels (Nyquist), got {texture_period}")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    colour_idx = torch.randint(0, len(COLOURS), (n,), generator=generator)
    side = _rand(n, generator, *SIZE_RANGE)  # fraction of image side
    # Centre so that the whole object (a side x side box) lies inside the image.
    cx = side / 2 + (1 - side) * torch.rand(n, generator=generator)
    cy = side / 2 + (1 - side) * torch.rand(n, generator=generator)

    # Background: a grey tone, a slight tint, and a faint linear gradient in a random direction.
    grey = _rand(n, generator, -0.45, 0.35)
    tint = _rand(3 * n, generator, -0.06, 0.06).view(n, 3)
    grad_amp = _rand(n, generator, 0.0, 0.12)
    grad_angle = _rand(n, generator, 0.0, 2 * math.pi)

    mask = _coverage(labels, cx, cy, side, size).unsqueeze(1)  # (n, 1, H, W)

    lo_coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    ly, lx = torch.meshgrid(lo_coords, lo_coords, indexing="ij")
    ramp = torch.cos(grad_angle).view(n, 1, 1) * lx + torch.sin(grad_angle).view(n, 1, 1) * ly
    background = (grey.view(n, 1, 1, 1) + tint.view(n, 3, 1, 1)) + (
        grad_amp.view(n, 1, 1) * ramp
    ).unsqueeze(1)
    colour = COLOURS[colour_idx].view(n, 3, 1, 1)
    fill = colour.expand(n, 3, size, size)
    if texture_period is not None:
        angles = _rand(2 * n, generator, 0.0, math.pi)
        phases = _rand(2 * n, generator, 0.0, 2 * math.pi)
        stripes = texture_amplitude * stripe_texture(angles, phases, texture_period, size, size)
        background = background + stripes[:n].unsqueeze(1)
        # The colour is scaled down by the amplitude so that the stripes are not clipped at +-1.
        fill = fill * (1 - texture_amplitude) + stripes[n:].unsqueeze(1)
    images = background * (1 - mask) + fill * mask
    return images.clamp(-1, 1).contiguous(), labels
