"""The detail metric reads a texture's period in output pixels and tells native from blown-up.

Expected values come from the images' construction (stripes of a known period and amplitude, the
Parseval identity RMS = A / sqrt 2) and from bicubic resizing (a k-times upsample has k-times the
period), never from the metric itself.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unet_surgery.toy.data import TEXTURE_AMPLITUDE, make_batch, stripe_texture
from unet_surgery.toy.detail import (
    analyse_detail,
    dominant_period,
    summarise_detail,
    texture_contrast,
)

P = 4.0
REFERENCE = TEXTURE_AMPLITUDE / math.sqrt(2)  # RMS of stripes of peak amplitude A


def stripes(period: float, angle: float, size: int, amplitude: float = 0.2) -> torch.Tensor:
    field = amplitude * stripe_texture(torch.tensor([angle]), torch.tensor([0.3]), period, size, size)
    return field.expand(3, size, size).clone() - 0.1


@pytest.mark.parametrize(("period", "angle", "size"), [(3.0, 0.0, 64), (5.0, 0.52, 64), (6.5, 1.9, 96), (4.0, 2.7, 32)])
def test_period_and_contrast_of_pure_stripes(period, angle, size):
    image = stripes(period, angle, size, amplitude=0.2)
    found, _ = dominant_period(image, period)
    assert found == pytest.approx(period, rel=0.04)
    # Parseval: stripes of peak amplitude 0.2 have RMS 0.2 / sqrt 2 (a few % leaks out of the
    # band where the period does not divide the image side)
    assert texture_contrast(image, period) == pytest.approx(0.2 / math.sqrt(2), rel=0.08)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_generator_images_have_native_detail_at_every_size(size):
    images, _ = make_batch(24, torch.Generator().manual_seed(size), size=size, texture_period=P)
    stats = [analyse_detail(im, P, REFERENCE) for im in images]
    assert all(s.native for s in stats), [(s.period, s.contrast) for s in stats if not s.native]
    assert all(abs(s.period - P) <= 0.1 * P for s in stats)  # type: ignore[operator]


@pytest.mark.parametrize(("size", "factor"), [(32, 2), (32, 4), (64, 2), (64, 4), (128, 2)])
def test_bicubic_upsampled_images_are_not_native(size, factor):
    images, _ = make_batch(16, torch.Generator().manual_seed(size + factor), size=size, texture_period=P)
    up = F.interpolate(images, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)
    stats = [analyse_detail(im, P, REFERENCE) for im in up]
    assert not any(s.native for s in stats)
    if factor == 2:  # the stripes are still there, at twice the period
        assert all(s.period == pytest.approx(2 * P, rel=0.1) for s in stats)
    assert all(s.contrast < 0.3 * REFERENCE for s in stats)


def test_flat_images_fail_without_crashing():
    flat, _ = make_batch(8, torch.Generator().manual_seed(0), size=64)  # the flat toys' data
    stats = [analyse_detail(im, P, REFERENCE) for im in flat]
    assert not any(s.native for s in stats)
    blank = analyse_detail(torch.full((3, 32, 32), 0.2), P, REFERENCE)
    assert blank.period is None and blank.contrast == 0.0 and blank.native is False
    summary = summarise_detail([blank, *stats])
    assert summary["native_detail"] == 0.0 and summary["no_texture"] >= 1 / 9


def test_native_needs_both_period_and_contrast():
    image = stripes(P, 0.4, 64, amplitude=TEXTURE_AMPLITUDE)
    assert analyse_detail(image, P, REFERENCE).native is True
    assert analyse_detail(image, P, REFERENCE / 0.69).native is False  # contrast under 70 %
    assert analyse_detail(stripes(1.3 * P, 0.4, 64), P, REFERENCE).native is False  # 30 % off
    assert analyse_detail(image, P).native is None  # no reference: not judged


@pytest.mark.parametrize(
    ("image", "period", "message"),
    [
        (torch.full((3, 16, 16), float("nan")), P, "NaN"),
        (torch.zeros(3, 3, 3), P, "too small"),
        (torch.zeros(2, 3, 16, 16), P, "expected a"),
        (torch.zeros(3, 16, 16), 2.0, "must exceed 2"),
    ],
)
def test_bad_inputs_are_one_clear_error(image, period, message):
    with pytest.raises(ValueError, match=message):
        analyse_detail(image, period)


def test_textured_data_keeps_the_flat_draws_and_adds_stripes_of_the_period():
    flat, flat_labels = make_batch(6, torch.Generator().manual_seed(5))
    textured, labels = make_batch(6, torch.Generator().manual_seed(5), texture_period=P)
    assert torch.equal(labels, flat_labels)  # texture draws come after every flat draw
    assert textured.min() >= -1 and textured.max() <= 1
    # background corners (objects never reach them at this seed): the stripes' peak amplitude
    corner = (textured - flat)[:, :, :3, :3]
    assert corner.abs().max() <= TEXTURE_AMPLITUDE + 1e-6
    assert corner.abs().max() >= 0.5 * TEXTURE_AMPLITUDE
    with pytest.raises(ValueError, match="exceed 2 pixels"):
        make_batch(2, torch.Generator().manual_seed(0), texture_period=2.0)
