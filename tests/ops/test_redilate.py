"""Re-dilated convolution: exact identities of the functional op and the in-place class swap."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from unet_surgery.errors import TransformError
from unet_surgery.ops import dispersion_transform
from unet_surgery.ops.dispersion import disperse_kernel
from unet_surgery.ops.redilate import (
    ConvSetting,
    RedilatedConv2d,
    RedilatedConv3d,
    current_setting,
    is_redilated,
    redilate_,
    redilated_conv,
    restore_,
)

FAST = settings(max_examples=25, deadline=None)


def _conv2d(
    cin,
    cout,
    k,
    *,
    stride=1,
    padding=None,
    dilation=1,
    groups=1,
    bias=True,
    mode="zeros",
    dtype=torch.float64,
    seed=0,
):
    torch.manual_seed(seed)
    pad = (k // 2) * dilation if padding is None else padding
    conv = nn.Conv2d(
        cin * groups,
        cout * groups,
        k,
        stride=stride,
        padding=pad,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=mode,
    )
    return conv.to(dtype)


def _nearest(x: torch.Tensor, d: int) -> torch.Tensor:
    """Nearest upsampling of the last two dims by an integer factor (any rank)."""
    return x.repeat_interleave(d, dim=-2).repeat_interleave(d, dim=-1)


def _reference(conv: nn.Conv2d, x: torch.Tensor, f: float) -> torch.Tensor:
    """The README's formula transcribed literally (always resizes, 3x3 'same' convs only)."""
    d = math.ceil(f)
    r = d / f
    h, w = x.shape[-2:]
    y = F.interpolate(x, size=(round(h * r), round(w * r)), mode="bilinear", align_corners=False)
    k = conv.kernel_size[0]
    y = F.conv2d(y, conv.weight, conv.bias, conv.stride, d * (k // 2), d, conv.groups)
    s = conv.stride[0]
    return F.interpolate(y, size=(int(h / s), int(w / s)), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- functional identities


@FAST
@given(
    cin=st.integers(1, 3),
    cout=st.integers(1, 3),
    k=st.sampled_from([1, 3, 5]),
    stride=st.sampled_from([1, 2]),
    h=st.integers(3, 9),
    w=st.integers(3, 9),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    three_d=st.booleans(),
)
def test_factor_one_is_the_plain_conv_bit_for_bit(cin, cout, k, stride, h, w, dtype, three_d):
    torch.manual_seed(1)
    if three_d:
        conv = nn.Conv3d(
            cin, cout, (3, k, k), stride=(1, stride, stride), padding=(1, k // 2, k // 2)
        )
        x = torch.randn(2, cin, 3, h, w)
    else:
        conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
        x = torch.randn(2, cin, h, w)
    conv, x = conv.to(dtype), x.to(dtype)
    with torch.no_grad():
        expected = conv(x)
        assert torch.equal(redilated_conv(conv, x, 1), expected)
        assert torch.equal(redilated_conv(conv, x, 1.0), expected)
        redilate_(conv, 1.0)
        assert torch.equal(conv(x), expected)


@FAST
@given(
    cin=st.integers(1, 3),
    cout=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    k=st.sampled_from([1, 3, 5]),
    pad_kind=st.sampled_from(["same", "zero", "one"]),
    dilation=st.sampled_from([1, 2]),
    d=st.sampled_from([2, 3]),
    h=st.integers(2, 6),
    w=st.integers(2, 6),
    mode=st.sampled_from(["zeros", "circular", "replicate"]),
    bias=st.booleans(),
)
def test_redilated_conv_commutes_with_nearest_upsampling(
    cin, cout, groups, k, pad_kind, dilation, d, h, w, mode, bias
):
    """redilated(d)(up_d(x)) == up_d(conv(x)) for stride 1 -- exact in real arithmetic."""
    pad = {"same": dilation * (k // 2), "zero": 0, "one": 1}[pad_kind]
    assume(mode == "zeros" or (pad <= h and pad <= w))  # torch pads at most the input size
    assume(min(h, w) + 2 * pad >= dilation * (k - 1) + 1)  # the plain conv has an output
    conv = _conv2d(
        cin, cout, k, padding=pad, dilation=dilation, groups=groups, bias=bias, mode=mode
    )
    x = torch.randn(2, cin * groups, h, w, dtype=torch.float64)
    with torch.no_grad():
        plain = conv(x)
        got = redilated_conv(conv, _nearest(x, d), d)
    assert got.shape == _nearest(plain, d).shape
    torch.testing.assert_close(got, _nearest(plain, d), rtol=0, atol=1e-12)


@FAST
@given(
    d=st.sampled_from([2, 3]),
    h=st.integers(2, 6),
    frames=st.integers(1, 3),
    kt=st.sampled_from([1, 3]),
)
def test_conv3d_commutes_with_per_frame_nearest_upsampling(d, h, frames, kt):
    torch.manual_seed(2)
    conv = nn.Conv3d(2, 3, (kt, 3, 3), padding=(kt // 2, 1, 1)).double()
    x = torch.randn(1, 2, frames, h, h + 1, dtype=torch.float64)
    with torch.no_grad():
        got = redilated_conv(conv, _nearest(x, d), d)
        expected = _nearest(conv(x), d)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_fp32_nearest_identity_at_tight_tolerance():
    conv = _conv2d(8, 8, 3, dtype=torch.float32)
    x = torch.randn(2, 8, 12, 10)
    with torch.no_grad():
        got = redilated_conv(conv, _nearest(x, 2), 2)
        expected = _nearest(conv(x), 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@FAST
@given(
    f=st.sampled_from([1.25, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]),
    stride=st.sampled_from([1, 2]),
    h=st.integers(4, 12),
    w=st.integers(4, 12),
)
def test_matches_the_reference_formula(f, stride, h, w):
    # For integer f the reference skips the resizes; they are only the identity when the stride
    # divides the size (int(W/2) < conv output for odd W), so compare there.
    assume(f != int(f) or (h % stride == 0 and w % stride == 0))
    conv = _conv2d(2, 3, 3, stride=stride)
    x = torch.randn(2, 2, h, w, dtype=torch.float64)
    with torch.no_grad():
        got = redilated_conv(conv, x, f)
        expected = _reference(conv, x, f)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@FAST
@given(d=st.sampled_from([2, 3, 4]), stride=st.sampled_from([1, 2]), h=st.integers(4, 10))
def test_integer_valued_float_factor_equals_integer_path(d, stride, h):
    conv = _conv2d(2, 2, 3, stride=stride, dtype=torch.float32)
    x = torch.randn(1, 2, h, h + 2)
    with torch.no_grad():
        assert torch.equal(redilated_conv(conv, x, float(d)), redilated_conv(conv, x, d))
        # The integer path is the plain conv with dilation and padding multiplied by d.
        manual = F.conv2d(x, conv.weight, conv.bias, stride, d, d)
        assert torch.equal(redilated_conv(conv, x, d), manual)


def test_fractional_output_size_follows_reference_for_stride_two():
    conv = _conv2d(1, 1, 3, stride=2)
    x = torch.randn(1, 1, 16, 9, dtype=torch.float64)
    assert redilated_conv(conv, x, 1.5).shape[-2:] == (8, 4)  # int(H/2), int(W/2)
    assert redilated_conv(conv, x, 2).shape[-2:] == conv(x).shape[-2:] == (8, 5)
    # where int(H/2) is 0 (a 1-pixel map) the output keeps one pixel, like the plain conv
    tiny = torch.randn(1, 1, 1, 2, dtype=torch.float64)
    assert redilated_conv(conv, tiny, 1.5).shape[-2:] == conv(tiny).shape[-2:] == (1, 1)


@FAST
@given(
    f=st.sampled_from([1.5, 2, 2.5, 3]),
    h=st.integers(3, 8),
    frames=st.integers(1, 3),
    stride=st.sampled_from([1, 2]),
)
def test_conv3d_with_temporal_kernel_one_equals_per_frame_conv2d(f, h, frames, stride):
    torch.manual_seed(3)
    c3 = nn.Conv3d(2, 3, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1)).double()
    c2 = nn.Conv2d(2, 3, 3, stride=stride, padding=1).double()
    with torch.no_grad():
        c2.weight.copy_(c3.weight[:, :, 0])
        c2.bias.copy_(c3.bias)
        x = torch.randn(2, 2, frames, h, h + 1, dtype=torch.float64)
        got = redilated_conv(c3, x, f)
        expected = torch.stack([redilated_conv(c2, x[:, :, t], f) for t in range(frames)], dim=2)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@FAST
@given(f=st.sampled_from([1.5, 2, 2.5, 3]), h=st.integers(3, 7), frames=st.integers(1, 4))
def test_conv3d_with_temporal_kernel_three_equals_manual_sum_over_taps(f, h, frames):
    """out[t] = b + sum_tau redilated2d(x[t + tau - 1], W[:, :, tau]) with zero temporal padding."""
    torch.manual_seed(4)
    c3 = nn.Conv3d(2, 3, (3, 3, 3), padding=(1, 1, 1)).double()
    x = torch.randn(1, 2, frames, h, h + 2, dtype=torch.float64)
    xp = F.pad(x, (0, 0, 0, 0, 1, 1))
    with torch.no_grad():
        got = redilated_conv(c3, x, f)
        taps = []
        for tau in range(3):
            c2 = nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
            c2.weight.copy_(c3.weight[:, :, tau])
            taps.append(c2)
        frames_out = []
        for t in range(frames):
            acc = sum(redilated_conv(taps[tau], xp[:, :, t + tau], f) for tau in range(3))
            frames_out.append(acc + c3.bias.view(1, -1, 1, 1))
        expected = torch.stack(frames_out, dim=2)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@FAST
@given(
    large=st.sampled_from([5, 7]),
    d=st.sampled_from([1, 2, 3]),
    stride=st.sampled_from([1, 2]),
    h=st.integers(4, 9),
)
def test_zero_padded_override_kernel_equals_own_kernel(large, d, stride, h):
    """The override's padding d*(p + (K-k)/2) keeps a zero-bordered KxK equal to the kxk conv."""
    conv = _conv2d(2, 3, 3, stride=stride)
    border = (large - 3) // 2
    big = F.pad(conv.weight.detach(), (border,) * 4)
    x = torch.randn(1, 2, h, h + 1, dtype=torch.float64)
    with torch.no_grad():
        got = redilated_conv(conv, x, d, weight=big)
        expected = redilated_conv(conv, x, d)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("large", [5, 7])
@pytest.mark.parametrize("factor", [2, 3, 1.5, 2.5])
def test_dispersed_override_runs_dilated_large_kernel(large, factor):
    conv = _conv2d(3, 4, 3)
    w_big = disperse_kernel(conv.weight.detach(), dispersion_transform(3, large))
    x = torch.randn(2, 3, 8, 10, dtype=torch.float64)
    with torch.no_grad():
        got = redilated_conv(conv, x, factor, weight=w_big)
        d = math.ceil(factor)
        r = d / factor
        y = F.interpolate(
            x, size=(round(8 * r), round(10 * r)), mode="bilinear", align_corners=False
        )
        y = F.conv2d(y, w_big, conv.bias, 1, d * (large // 2), d)
        expected = F.interpolate(y, size=(8, 10), mode="bilinear", align_corners=False)
    assert got.shape == conv(x).shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_mode_is_respected(mode):
    conv = _conv2d(2, 2, 3, mode=mode)
    x = torch.randn(1, 2, 7, 8, dtype=torch.float64)
    zeros = _conv2d(2, 2, 3)
    with torch.no_grad():
        # Factor 1 through the override path must equal the module's own padded forward.
        got = redilated_conv(conv, x, 1, weight=conv.weight)
        torch.testing.assert_close(got, conv(x), rtol=0, atol=1e-12)
        manual = F.conv2d(F.pad(x, (2, 2, 2, 2), mode=mode), conv.weight, conv.bias, dilation=2)
        torch.testing.assert_close(redilated_conv(conv, x, 2), manual, rtol=0, atol=1e-12)
        assert not torch.allclose(redilated_conv(zeros, x, 2), manual)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("factor", [2, 2.5])
def test_half_precision_close_to_fp32(dtype, factor):
    conv = _conv2d(4, 4, 3, dtype=torch.float32)
    x = torch.randn(1, 4, 10, 10)
    with torch.no_grad():
        ref = redilated_conv(conv, x, factor)
        got = redilated_conv(conv.to(dtype), x.to(dtype), factor)
    assert got.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)


def test_half_resize_falls_back_to_fp32_where_unsupported(monkeypatch):
    from unet_surgery.ops import redilate as mod

    real = F.interpolate
    calls = []

    def picky(x, *args, **kwargs):
        calls.append(x.dtype)
        if x.dtype == torch.float16:
            raise RuntimeError("\"upsample_bilinear2d\" not implemented for 'Half'")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(mod.F, "interpolate", picky)
    monkeypatch.setattr(mod, "_RESIZE_UPCAST", set())
    conv = _conv2d(2, 2, 3, dtype=torch.float16)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float16)
    with torch.no_grad():
        out = redilated_conv(conv, x, 1.5)
        out2 = redilated_conv(conv, x, 1.5)
    assert out.dtype == torch.float16 and torch.equal(out, out2)
    assert calls[0] == torch.float16 and torch.float16 not in calls[1:]


def test_functional_rejects_bad_input():
    conv = _conv2d(2, 2, 3)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    for bad in (0, -2, float("nan"), float("inf"), True, "2"):
        with pytest.raises(TransformError):
            redilated_conv(conv, x, bad)
    with pytest.raises(TransformError, match="odd size"):
        redilated_conv(conv, x, 2, weight=torch.zeros(2, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(TransformError):
        redilated_conv(conv, x, 2, weight=torch.zeros(3, 2, 5, 5, dtype=torch.float64))
    with pytest.raises(TransformError):
        redilated_conv(nn.Linear(2, 2), x, 2)  # type: ignore[arg-type]
    same_even = nn.Conv2d(1, 1, 2, padding="same").double()
    with pytest.raises(TransformError, match="even kernel"):
        redilated_conv(same_even, torch.randn(1, 1, 5, 5, dtype=torch.float64), 2)


def test_string_paddings_are_resolved():
    same = nn.Conv2d(1, 2, 3, padding="same").double()
    valid = nn.Conv2d(1, 2, 3, padding="valid").double()
    x = torch.randn(1, 1, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        for conv in (same, valid):
            torch.testing.assert_close(
                redilated_conv(conv, _nearest(x, 2), 2), _nearest(conv(x), 2), rtol=0, atol=1e-12
            )


# --------------------------------------------------------------------------- class swap


def _snapshot(conv: nn.Module) -> dict:
    return {
        "class": type(conv),
        "dict_keys": sorted(vars(conv)),
        "buffers": dict(conv._buffers),
        "non_persistent": set(conv._non_persistent_buffers_set),
        "state": {k: (v.data_ptr(), v.clone()) for k, v in conv.state_dict().items()},
    }


@pytest.mark.parametrize("three_d", [False, True])
def test_redilate_and_restore_leave_the_module_bit_for_bit(three_d):
    torch.manual_seed(5)
    if three_d:
        conv = nn.Conv3d(3, 4, (3, 3, 3), padding=1)
        x = torch.randn(1, 3, 2, 8, 8)
        swapped_cls = RedilatedConv3d
    else:
        conv = nn.Conv2d(3, 4, 3, padding=1)
        x = torch.randn(2, 3, 8, 8)
        swapped_cls = RedilatedConv2d
    before = _snapshot(conv)
    with torch.no_grad():
        out_before = conv(x)
        w5 = disperse_kernel(conv.weight.detach(), dispersion_transform())
        redilate_(conv, lambda: ConvSetting(2.0, use_dispersed=True), dispersed_weight=w5)
        assert type(conv) is swapped_cls and is_redilated(conv)
        assert isinstance(conv, type(conv)._rewrite_base)
        mid = {k: v.data_ptr() for k, v in conv.state_dict().items()}
        assert mid == {k: p for k, (p, _) in before["state"].items()}  # same keys, no copies
        assert not torch.allclose(conv(x), out_before)
        restore_(conv)
        after = _snapshot(conv)
        assert torch.equal(conv(x), out_before)
    assert after["class"] is before["class"]
    assert after["dict_keys"] == before["dict_keys"]
    assert after["buffers"] == before["buffers"]
    assert after["non_persistent"] == before["non_persistent"]
    for key, (ptr, value) in before["state"].items():
        assert after["state"][key][0] == ptr
        assert torch.equal(after["state"][key][1], value)
    assert not is_redilated(conv)


def test_factor_source_is_read_on_every_forward():
    conv = _conv2d(2, 3, 3)
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    schedule = iter([2, 1, 2.5, 3, ConvSetting(1.5)])
    current = {"f": 1.0}

    def source() -> float | ConvSetting:
        return current["f"]

    with torch.no_grad():
        expected = {f: redilated_conv(conv, x, f) for f in (1, 2, 2.5, 3, 1.5)}
        redilate_(conv, source)
        for f in schedule:
            current["f"] = f
            value = f.factor if isinstance(f, ConvSetting) else f
            assert torch.equal(conv(x), expected[value])
            assert current_setting(conv).factor == value


def test_dispersed_setting_uses_attached_kernel_at_scaled_factor():
    conv = _conv2d(2, 3, 3)
    x = torch.randn(1, 2, 12, 12, dtype=torch.float64)
    w5 = disperse_kernel(conv.weight.detach(), dispersion_transform())
    setting = {"v": ConvSetting(4.0, use_dispersed=True)}
    with torch.no_grad():
        redilate_(conv, lambda: setting["v"], dispersed_weight=w5)
        assert torch.equal(conv(x), redilated_conv(conv, x, 2.0, weight=w5))
        setting["v"] = ConvSetting(3.0, use_dispersed=True)
        assert torch.equal(conv(x), redilated_conv(conv, x, 1.5, weight=w5))
        setting["v"] = ConvSetting(3.0)
        assert torch.equal(conv(x), redilated_conv(conv, x, 3.0))
    assert "_redilate_dispersed_weight" not in conv.state_dict()
    conv.float()
    assert conv._redilate_dispersed_weight.dtype == torch.float32  # follows .to()/.float()


def test_redilate_twice_raises_unless_replace():
    conv = _conv2d(1, 1, 3)
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    w5 = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    redilate_(conv, 2.0, dispersed_weight=w5)
    with pytest.raises(TransformError, match="already re-dilated"):
        redilate_(conv, 3.0)
    redilate_(conv, 3.0, replace=True)
    assert "_redilate_dispersed_weight" not in conv._buffers
    with torch.no_grad():
        assert torch.equal(conv(x), redilated_conv(conv, x, 3))
    with pytest.raises(TransformError, match="none"):
        redilate_(conv, ConvSetting(2.0, True), replace=True)(x)
    restore_(conv)
    with pytest.raises(TransformError, match="not re-dilated"):
        restore_(conv)


def test_redilate_validates_before_touching_the_module():
    conv = _conv2d(2, 2, 3)
    before = _snapshot(conv)
    with pytest.raises(TransformError):
        redilate_(conv, 0.0)
    with pytest.raises(TransformError):
        redilate_(conv, 2.0, dispersed_weight=torch.zeros(3, 2, 5, 5))
    with pytest.raises(TransformError):
        redilate_(nn.Linear(2, 2), 2.0)  # type: ignore[arg-type]
    assert _snapshot(conv)["dict_keys"] == before["dict_keys"] and type(conv) is nn.Conv2d


def test_subclasses_keep_their_type_unless_they_override_forward():
    class Plain(nn.Conv2d):
        pass

    class Custom(nn.Conv2d):
        def forward(self, input):
            return super().forward(input) * 2

    conv = Plain(1, 1, 3, padding=1).double()
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    redilate_(conv, 2)
    assert isinstance(conv, Plain) and is_redilated(conv)
    with torch.no_grad():
        assert torch.equal(conv(x), redilated_conv(conv, x, 2))
    restore_(conv)
    assert type(conv) is Plain
    with pytest.raises(TransformError, match="overrides forward"):
        redilate_(Custom(1, 1, 3), 2)


def test_module_valued_source_is_not_registered_as_a_submodule():
    class Source(nn.Module):
        def __call__(self) -> float:
            return 2.0

    conv = _conv2d(1, 1, 3)
    keys = set(conv.state_dict())
    redilate_(conv, Source())
    assert set(conv.state_dict()) == keys and not list(conv.children())
    assert current_setting(conv) == ConvSetting(2.0)
