"""Dispersed kernels computed per forward from the transform R and the live conv weight.

Expected values come from a transcription of ScaleCrafter's ``inflate_kernels`` (official
code: ``einsum("mn, ion -> iom", R, weight.view(i, o, -1))`` then ``view(i, o, k, k)``) with the
published ``R20to1_new.mat``, and from the float64 product ``w @ R.T`` the stored-kernel path
computed before (so the on-the-fly path is bit-identical to it). No library code computes an
expected value.
"""

from __future__ import annotations

import math

import pytest
import scipy.io
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import reference_path
from unet_surgery.errors import TransformError
from unet_surgery.ops.dispersion import TransformParams, transform_tensor
from unet_surgery.ops.redilate import (
    ConvSetting,
    dispersed_weight,
    dispersion_of,
    redilate_,
    restore_,
)


def published_R() -> torch.Tensor:
    mat = scipy.io.loadmat(reference_path("scalecrafter", "transforms", "R20to1_new.mat"))
    return torch.tensor(mat["R"], dtype=torch.float64)


def official_inflate(weight: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """ScaleCrafter's inflate_kernels, transcribed: per (out, in) pair, vec(W5) = R @ vec(W3), in the weight's dtype."""
    i, o = weight.shape[:2]
    k = int(math.sqrt(R.shape[0]))
    inflated = torch.einsum("mn,ion->iom", R.to(dtype=weight.dtype), weight.reshape(i, o, -1))
    return inflated.reshape(i, o, k, k)


def stored_kernel_of_before(weight: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The kernel the library stored at apply before on-the-fly dispersion: float64 product on CPU, cast back."""
    flat = weight.detach().to(torch.float64).reshape(*weight.shape[:-2], 9)
    return (flat @ R.T).reshape(*weight.shape[:-2], 5, 5).to(weight.dtype).contiguous()


def conv(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(4, 6, 3, padding=1).to(dtype)


@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_forward_equals_the_published_inflation_at_half_the_factor(factor: float) -> None:
    c, R = conv(), published_R()
    x = torch.randn(2, 4, 12, 11, dtype=torch.float64)
    d = int(factor / 2)
    expected = F.conv2d(x, official_inflate(c.weight.detach(), R), c.bias, padding=2 * d, dilation=d)
    with torch.no_grad():
        redilate_(c, ConvSetting(factor, use_dispersed=True), dispersion=R)
        got = c(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_on_the_fly_is_bit_identical_to_the_stored_kernel_path(dtype: torch.dtype) -> None:
    c, R = conv(dtype), published_R()
    x = torch.randn(1, 4, 10, 10).to(dtype)
    kernel = stored_kernel_of_before(c.weight, R)
    with torch.no_grad():
        redilate_(c, ConvSetting(4.0, use_dispersed=True), dispersion=R)
        assert torch.equal(dispersed_weight(c), kernel)
        on_the_fly = c(x)
        assert torch.equal(on_the_fly, F.conv2d(x, kernel, c.bias, 1, 4, 2))
        # the explicit-kernel keyword (public API) still runs that kernel
        redilate_(c, ConvSetting(4.0, use_dispersed=True), dispersed_weight=kernel, replace=True)
        assert torch.equal(c(x), on_the_fly)


def test_weight_edits_after_redilate_are_respected() -> None:
    c, R = conv(), published_R()
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    redilate_(c, ConvSetting(2.0, use_dispersed=True), dispersion=R)
    old = c.weight.detach().clone()
    low_rank = torch.randn(6, 2, dtype=torch.float64) @ torch.randn(2, 4 * 9, dtype=torch.float64)
    with torch.no_grad():
        c.weight.add_(0.1 * low_rank.reshape(6, 4, 3, 3))  # a LoRA merge, in place
        got = c(x)
    new = old + 0.1 * low_rank.reshape(6, 4, 3, 3)
    expected = F.conv2d(x, official_inflate(new, R), c.bias, padding=2, dilation=1)
    stale = F.conv2d(x, official_inflate(old, R), c.bias, padding=2, dilation=1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, stale, atol=1e-3)


def test_gradients_reach_the_weight_through_the_dispersed_kernel() -> None:
    c, R = conv(), published_R()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    w = c.weight.detach().clone().requires_grad_(True)
    F.conv2d(x, official_inflate(w, R), c.bias.detach(), padding=2).square().sum().backward()
    redilate_(c, ConvSetting(2.0, use_dispersed=True), dispersion=R)
    c(x).square().sum().backward()
    torch.testing.assert_close(c.weight.grad, w.grad, rtol=1e-10, atol=1e-12)


def test_conv3d_disperses_every_temporal_tap() -> None:
    torch.manual_seed(1)
    c3, R = nn.Conv3d(3, 2, (3, 3, 3), padding=1).double(), published_R()
    x = torch.randn(1, 3, 4, 8, 8, dtype=torch.float64)
    w = c3.weight.detach()
    taps = torch.stack([official_inflate(w[:, :, t], R) for t in range(3)], dim=2)
    expected = F.conv3d(x, taps, c3.bias, padding=(1, 2, 2))
    with torch.no_grad():
        redilate_(c3, ConvSetting(2.0, use_dispersed=True), dispersion=R)
        torch.testing.assert_close(c3(x), expected, rtol=1e-12, atol=1e-12)


def test_R_is_a_shared_plain_attribute_not_a_buffer() -> None:
    a, b = conv(torch.float32, 0), conv(torch.float32, 1)
    keys = {id(m): (set(m.state_dict()), dict(m.named_buffers())) for m in (a, b)}
    R = transform_tensor(TransformParams())
    assert transform_tensor(TransformParams(3, 5, 2, 3, 0.05)) is R  # one object per transform
    for m in (a, b):
        redilate_(m, 2.0, dispersion=R)
        assert dispersion_of(m) is R
        assert (set(m.state_dict()), dict(m.named_buffers())) == keys[id(m)]
    a.half()
    assert dispersion_of(a) is R and R.dtype == torch.float64  # .to() leaves R alone
    x = torch.randn(1, 4, 6, 6).half()
    redilate_(a, ConvSetting(2.0, use_dispersed=True), dispersion=R, replace=True)
    assert a(x).dtype == torch.float16 and dispersed_weight(a).dtype == torch.float16
    restore_(a)
    assert dispersion_of(a) is None and "_redilate_dispersion" not in a.__dict__


def test_bad_dispersion_arguments_are_refused_before_touching_the_conv() -> None:
    c, R = conv(), published_R()
    with pytest.raises(TransformError, match="not both"):
        redilate_(c, 2.0, dispersion=R, dispersed_weight=torch.zeros(6, 4, 5, 5, dtype=torch.float64))
    with pytest.raises(TransformError, match=r"not \(L\*L, S\*S\)"):
        redilate_(c, 2.0, dispersion=torch.zeros(24, 9, dtype=torch.float64))
    with pytest.raises(TransformError, match="does not end in a 5x5 kernel"):  # R for 5x5 kernels on a 3x3 conv
        redilate_(c, 2.0, dispersion=torch.zeros(49, 25, dtype=torch.float64))
    with pytest.raises(TransformError, match="larger"):  # 3x3 -> 1x1 is not a dispersion
        redilate_(c, 2.0, dispersion=torch.zeros(1, 9, dtype=torch.float64))
    with pytest.raises(TransformError, match="floating-point"):
        redilate_(c, 2.0, dispersion=torch.zeros(25, 9, dtype=torch.int64))
    assert type(c) is nn.Conv2d
    redilate_(c, ConvSetting(2.0, use_dispersed=True))
    with pytest.raises(TransformError, match="given none"):
        c(torch.randn(1, 4, 6, 6, dtype=torch.float64))
    assert dispersed_weight(c) is None
