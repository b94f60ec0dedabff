"""Scale-fusion self-attention: the op against a deliberately literal transcription of the
published formula, the blur variants, fast mode, jitter and the in-place class swap.

The official HEAD code itself (windows, strides, 3-D blur) is transcribed in
``test_scale_fusion_head.py``; here ``_blur_reference`` keeps the earlier official blur
(``published-2024``) beside it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from unet_surgery.errors import TransformError
from unet_surgery.ops.scale_fusion import (
    FusionSetting,
    current_fusion,
    fuse_attention_,
    fusion_kernel_size,
    gaussian_blur,
    is_fused,
    level_hw,
    restore_attention_,
    scale_fusion,
    window_starts,
)

FAST = settings(max_examples=20, deadline=None)
C, HEADS = 8, 2


def _dtype(attn: nn.Module) -> torch.dtype:
    return next(attn.parameters()).dtype


def _diffusers_attn(dtype=torch.float64, seed=0) -> Attention:
    torch.manual_seed(seed)
    return Attention(C, heads=HEADS, dim_head=C // HEADS, bias=False).to(dtype).eval()


def _ldm_attn(dtype=torch.float32, seed=0) -> nn.Module:
    """LDM attention runs q.k in float32 whatever the input (_ATTN_PRECISION), so float32."""
    from ldm.modules import attention as ldm_attention

    torch.manual_seed(seed)
    return ldm_attention.CrossAttention(C, heads=HEADS, dim_head=C // HEADS).to(dtype).eval()


# --------------------------------------------------------------------------- direct reference


def _starts(size: int, window: int) -> list[int]:
    """The published view placement (get_views), transcribed with its float arithmetic."""
    stride = window // 2
    n = int((size - window) / stride - 1e-6) + 2 if size > window else 1
    out = []
    for i in range(n):
        start = i * stride
        if start + window > size:
            start = size - window
        out.append(max(start, 0))
    return out


def _gauss1d(k: int) -> torch.Tensor:
    x = torch.arange(k, dtype=torch.float64)
    g = torch.exp(-((x - (k - 1) / 2) ** 2) / 2.0)
    return g / g.sum()


def _blur_reference(x: torch.Tensor, k: int, blur: str) -> torch.Tensor:
    """Full (non-separable) Gaussian convolutions of a (B, h, w, C) tensor, zero padded."""
    g = _gauss1d(k).to(x.dtype)
    _, h, _, c = x.shape
    if blur == "published-2024":
        # The official gaussian_filter before 0b2f58f/b7c40ae (e.g. 94b6b59) on its
        # (B, h, w, C) tensor: conv2d with groups=shape[1] sees h as its channels.
        kernel = (g[:, None] * g[None, :])[None, None].repeat(h, 1, 1, 1)
        return F.conv2d(x, kernel, padding=k // 2, groups=h)
    if blur in ("published", "volumetric"):  # HEAD: conv3d over each item's (h, w, C)
        kernel = g[:, None, None] * g[None, :, None] * g[None, None, :]
        return F.conv3d(x[:, None], kernel[None, None], padding=k // 2)[:, 0]
    kernel = (g[:, None] * g[None, :])[None, None].repeat(c, 1, 1, 1)
    out = F.conv2d(x.permute(0, 3, 1, 2), kernel, padding=k // 2, groups=c)
    return out.permute(0, 2, 3, 1)


def _reference(attend, x, grid, window, blur="published", fast=False, scale=None):
    """G(local) + (global - G(global)) with one attention call per window / sub-grid."""
    b, n, c = x.shape
    gh, gw = grid
    wh, ww = min(window[0], gh), min(window[1], gw)
    if (wh, ww) == (gh, gw):
        return attend(x)
    xs = x.reshape(b, gh, gw, c)
    value = torch.zeros_like(xs)
    count = torch.zeros_like(xs)
    for h0 in _starts(gh, wh):
        for w0 in _starts(gw, ww):
            tokens = xs[:, h0 : h0 + wh, w0 : w0 + ww].reshape(b, wh * ww, c)
            value[:, h0 : h0 + wh, w0 : w0 + ww] += attend(tokens).reshape(b, wh, ww, c)
            count[:, h0 : h0 + wh, w0 : w0 + ww] += 1
    local = torch.where(count > 0, value / count, value)
    s_h, s_w = scale if scale is not None else (gh / wh, gw / ww)
    if fast:
        th, tw = math.ceil(s_h), math.ceil(s_w)
        glob = torch.zeros_like(xs)
        for i in range(th):
            for j in range(tw):
                sub = xs[:, i::th, j::tw]
                sh, sw = sub.shape[1:3]
                glob[:, i::th, j::tw] = attend(sub.reshape(b, sh * sw, c)).reshape(b, sh, sw, c)
    else:
        glob = attend(x).reshape(b, gh, gw, c)
    k = 2 * math.ceil(max(s_h, s_w)) - 1
    out = _blur_reference(local, k, blur) + (glob - _blur_reference(glob, k, blur))
    return out.reshape(b, n, c)


grids = st.tuples(st.integers(3, 18), st.integers(3, 18))
windows = st.tuples(st.integers(2, 9), st.integers(2, 9))


# --------------------------------------------------------------------------- functional op


LDM = [False, pytest.param(True, marks=pytest.mark.requires_ldm, id="ldm")]


@pytest.mark.parametrize("ldm", LDM)
@FAST
@given(
    grid=grids,
    window=windows,
    blur=st.sampled_from(["published", "published-2024", "volumetric", "spatial"]),
    fast=st.booleans(),
)
def test_matches_direct_reference(ldm, grid, window, blur, fast):
    attn = _ldm_attn() if ldm else _diffusers_attn()
    x = torch.randn(2, grid[0] * grid[1], C, dtype=_dtype(attn))
    with torch.no_grad():
        got = scale_fusion(attn, x, grid, window, blur=blur, fast_mode=fast)
        expected = _reference(attn, x, grid, window, blur, fast)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("grid", "window"),
    [
        ((16, 16), (8, 8)),
        ((16, 8), (8, 8)),
        ((24, 16), (8, 8)),
        ((20, 13), (8, 8)),
        ((9, 30), (8, 8)),
    ],
)
@pytest.mark.parametrize("blur", ["published", "published-2024", "spatial"])
def test_matches_direct_reference_fp32_at_sd_like_shapes(grid, window, blur):
    attn = _diffusers_attn(torch.float32)
    x = torch.randn(2, grid[0] * grid[1], C)
    with torch.no_grad():
        got = scale_fusion(attn, x, grid, window, blur=blur)
        expected = _reference(attn, x, grid, window, blur)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("ldm", LDM)
@FAST
@given(side=st.tuples(st.integers(1, 12), st.integers(1, 12)))
def test_scale_one_is_plain_attention_bit_for_bit(ldm, side):
    attn = _ldm_attn(torch.float32) if ldm else _diffusers_attn(torch.float32)
    x = torch.randn(2, side[0] * side[1], C)
    bigger = (side[0] + 3, side[1] + 1)  # a window larger than the grid is clipped to it
    with torch.no_grad():
        expected = attn(x)
        assert torch.equal(scale_fusion(attn, x, side, side, jitter=0.125), expected)
        assert torch.equal(scale_fusion(attn, x, side, bigger, fast_mode=True), expected)


def test_windows_are_batched_into_few_calls():
    calls: list[tuple[int, ...]] = []
    attn = _diffusers_attn()

    def attend(t):
        calls.append(tuple(t.shape))
        return attn(t)

    x = torch.randn(2, 32 * 32, C, dtype=_dtype(attn))
    with torch.no_grad():
        default = scale_fusion(attend, x, (32, 32), (16, 16))  # 4x area: 9 windows
        assert calls == [(4, 256, C)] * 4 + [(2, 256, C), (2, 1024, C)]
        for chunk in (1, 2, 9, 100):
            other = scale_fusion(attn, x, (32, 32), (16, 16), chunk_size=chunk)
            torch.testing.assert_close(other, default, rtol=0, atol=1e-12)


def test_window_placement_follows_published_views():
    for size in range(1, 70):
        for window in range(2, 33):
            assert window_starts(size, window) == _starts(size, window)
    assert window_starts(64, 32) == [0, 16, 32]
    assert window_starts(40, 32) == [0, 8]


def test_kernel_size_rounds_non_integer_scales_up():
    assert fusion_kernel_size((1.0, 1.0)) == 1
    assert fusion_kernel_size((2.0, 1.0)) == 3
    assert fusion_kernel_size((2.5, 1.0)) == 5
    assert fusion_kernel_size((4.0, 4.0)) == 7
    assert fusion_kernel_size((64 / 32, 64 / 32)) == 3


def test_scale_override_changes_kernel_and_fast_strides():
    attn = _diffusers_attn()
    x = torch.randn(1, 16 * 16, C, dtype=_dtype(attn))
    with torch.no_grad():
        base = scale_fusion(attn, x, (16, 16), (8, 8), fast_mode=True)
        same = scale_fusion(attn, x, (16, 16), (8, 8), fast_mode=True, scale=2)
        other = scale_fusion(attn, x, (16, 16), (8, 8), fast_mode=True, scale=(4, 4))
    assert torch.equal(base, same)
    assert not torch.allclose(base, other)


# --------------------------------------------------------------------------- blur variants


def _impulse(h=7, w=6, c=9):
    x = torch.zeros(1, h, w, c, dtype=torch.float64)
    x[0, 3, 2, 4] = 1.0
    return x


@pytest.mark.parametrize("blur", ["published", "published-2024", "volumetric", "spatial"])
@pytest.mark.parametrize("k", [3, 5])
def test_blur_equals_full_kernel_convolution(blur, k):
    x = torch.randn(2, 7, 6, 9, dtype=torch.float64)
    got = gaussian_blur(x.reshape(2, 42, 9), (7, 6), k, blur=blur)
    torch.testing.assert_close(
        got.reshape(x.shape), _blur_reference(x, k, blur), atol=1e-12, rtol=0
    )


def test_spatial_blur_never_mixes_channels_published_does():
    x = _impulse()
    flat = x.reshape(1, -1, 9)
    spatial = gaussian_blur(flat, (7, 6), 3, blur="spatial").reshape(x.shape)
    published = gaussian_blur(flat, (7, 6), 3, blur="published").reshape(x.shape)
    old = gaussian_blur(flat, (7, 6), 3, blur="published-2024").reshape(x.shape)
    others = [c for c in range(9) if c != 4]
    assert torch.count_nonzero(spatial[..., others]) == 0
    assert spatial[0, :, :, 4].sum() == pytest.approx(1.0)
    assert torch.count_nonzero(published[..., 3]) > 0 and torch.count_nonzero(published[..., 5]) > 0
    assert torch.count_nonzero(old[..., 3]) > 0 and torch.count_nonzero(old[..., 5]) > 0
    # The 2024 filter ran conv2d over (w, C) with h as its channel axis: no mixing in h;
    # HEAD's conv3d mixes all three axes.
    rows = [r for r in range(7) if r != 3]
    assert torch.count_nonzero(old[:, rows]) == 0
    assert torch.count_nonzero(published[:, rows]) > 0
    for blurred in (published, old):
        torch.testing.assert_close(blurred.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_volumetric_is_published():
    x = torch.randn(2, 7 * 6, 9, dtype=torch.float64)
    a = gaussian_blur(x, (7, 6), 5, blur="volumetric")
    assert torch.equal(a, gaussian_blur(x, (7, 6), 5, blur="published"))


def test_blur_variants_change_the_fused_output():
    attn = _diffusers_attn()
    x = torch.randn(2, 16 * 16, C, dtype=_dtype(attn))
    blurs = ("published", "published-2024", "spatial")
    with torch.no_grad():
        outs = {b: scale_fusion(attn, x, (16, 16), (8, 8), blur=b) for b in blurs}
    assert not torch.allclose(outs["published"], outs["spatial"])
    assert not torch.allclose(outs["published"], outs["published-2024"])


# --------------------------------------------------------------------------- jitter


def _window_mean(t: torch.Tensor) -> torch.Tensor:
    """A toy attention whose output depends on the window's content."""
    return t.mean(dim=1, keepdim=True).expand_as(t) + 0.5 * t


@FAST
@given(
    grid=grids, window=windows, jitter=st.sampled_from([0.125, 0.2, 0.25]), seed=st.integers(0, 9)
)
def test_token_wise_attention_is_unchanged_by_any_jitter(grid, window, jitter, seed):
    """Every token is covered by some window whatever the jitter (count > 0 everywhere)."""
    x = torch.randn(2, grid[0] * grid[1], C, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    got = scale_fusion(lambda t: 2 * t, x, grid, window, jitter=jitter, generator=gen)
    torch.testing.assert_close(got, 2 * x, rtol=0, atol=1e-12)


def test_jitter_is_deterministic_with_a_seed_and_zero_means_none():
    x = torch.randn(2, 32 * 24, C, dtype=torch.float64)
    args = (_window_mean, x, (32, 24), (16, 16))
    a = scale_fusion(*args, jitter=0.125, generator=torch.Generator().manual_seed(3))
    b = scale_fusion(*args, jitter=0.125, generator=torch.Generator().manual_seed(3))
    c = scale_fusion(*args, jitter=0.125, generator=torch.Generator().manual_seed(4))
    plain = scale_fusion(*args)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.allclose(a, plain)
    assert torch.equal(scale_fusion(*args, jitter=0, generator=torch.Generator()), plain)
    # A jitter range below one token (window 8 * 0.1 < 1) is no jitter either.
    small = (_window_mean, x, (32, 24), (8, 7))
    assert torch.equal(scale_fusion(*small, jitter=0.1), scale_fusion(*small))


# --------------------------------------------------------------------------- class swap


def _setting(**kw) -> FusionSetting:
    base = {"grid_hw": (16, 12), "window_hw": (8, 8), "jitter": 0.0}
    return FusionSetting(**(base | kw))


@pytest.mark.parametrize("ldm", LDM)
@pytest.mark.parametrize("fast", [False, True])
def test_patched_module_equals_scale_fusion(ldm, fast):
    attn = _ldm_attn() if ldm else _diffusers_attn()
    plain = copy.deepcopy(attn)
    fuse_attention_(attn, _setting(fast_mode=fast, blur="spatial"))
    x = torch.randn(2, 16 * 12, C, dtype=_dtype(attn))
    with torch.no_grad():
        expected = scale_fusion(plain, x, (16, 12), (8, 8), blur="spatial", fast_mode=fast)
        assert torch.equal(attn(x), expected)


def test_setting_at_latent_level_is_rescaled_to_the_layer():
    assert level_hw((128, 96), (64, 64), 64 * 48) == ((64, 48), (32, 32))
    assert level_hw((100, 75), (64, 64), 13 * 10) == ((13, 10), (8, 8))
    # The official window at a level is int(sub / scale_factor): 3:1 SDXL (3072x1024) has
    # sub_w = int(128 / 3) = 42, so int(42 / 2) = 21 and int(42 / 4) = 10 tokens; the grid
    # halves with ceil like a strided conv (an odd 25 gives 13).
    assert level_hw((384, 128), (128, 42), 192 * 64) == ((192, 64), (64, 21))
    assert level_hw((384, 128), (128, 42), 96 * 32) == ((96, 32), (32, 10))
    assert level_hw((50, 25), (16, 5), 25 * 13) == ((25, 13), (8, 2))
    with pytest.raises(TransformError):
        level_hw((16, 16), (8, 8), 100)
    attn, plain = _diffusers_attn(), _diffusers_attn()
    fuse_attention_(attn, _setting(grid_hw=(32, 24), window_hw=(16, 16)))
    x = torch.randn(1, 16 * 12, C, dtype=_dtype(attn))
    with torch.no_grad():
        assert torch.equal(attn(x), scale_fusion(plain, x, (16, 12), (8, 8)))


@pytest.mark.parametrize("ldm", LDM)
def test_cross_attention_masked_and_inactive_calls_are_untouched(ldm):
    attn = _ldm_attn() if ldm else _diffusers_attn()
    plain = copy.deepcopy(attn)
    state = {"setting": _setting()}
    fuse_attention_(attn, lambda: state["setting"])
    x = torch.randn(2, 16 * 12, C, dtype=_dtype(attn))
    ctx = torch.randn(2, 5, C, dtype=_dtype(attn))
    cross = "context" if ldm else "encoder_hidden_states"
    with torch.no_grad():
        assert torch.equal(attn(x, **{cross: ctx}), plain(x, **{cross: ctx}))
        assert torch.equal(attn(x, ctx), plain(x, ctx))
        if not ldm:
            mask = torch.zeros(2, 1, 16 * 12, dtype=_dtype(attn))
            assert torch.equal(attn(x, attention_mask=mask), plain(x, attention_mask=mask))
            img = torch.randn(2, C, 4, 4, dtype=torch.float64)  # 4-D (mid-block style) input
            assert torch.equal(attn(img), plain(img))
        fused = attn(x)
        assert not torch.allclose(fused, plain(x))
        state["setting"] = None  # the source is read on every forward
        assert torch.equal(attn(x), plain(x))
        assert current_fusion(attn) is None
        state["setting"] = _setting(active=False)
        assert torch.equal(attn(x), plain(x))
        state["setting"] = _setting()
        assert torch.equal(attn(x), fused)
        assert current_fusion(attn) == _setting()


@pytest.mark.parametrize("fast", [False, True])
def test_setting_scale_reaches_the_op(fast):
    """scale_hw sets the kernel and fast strides: a 32x16 grid with a 16x8 window and scale
    (2, 1) (the official 2:1 numbers) is not the default scale grid / window = (2, 2)."""
    attn, plain = _diffusers_attn(), _diffusers_attn()
    setting = _setting(grid_hw=(32, 16), window_hw=(16, 8), scale_hw=(2, 1), fast_mode=fast)
    fuse_attention_(attn, setting)
    x = torch.randn(1, 32 * 16, C, dtype=_dtype(attn))
    with torch.no_grad():
        got = attn(x)
        expected = _reference(plain, x, (32, 16), (16, 8), "published", fast, scale=(2, 1))
        assert torch.equal(got, scale_fusion(plain, x, (32, 16), (16, 8), fast_mode=fast, scale=(2, 1)))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        if fast:  # strides (2, 1), not (2, 2)
            assert not torch.allclose(got, scale_fusion(plain, x, (32, 16), (16, 8), fast_mode=True))
    with pytest.raises(TransformError):
        _setting(scale_hw=(0, 1))


def test_any_attention_processor_is_used_as_attend():
    attn = _diffusers_attn()
    attn.set_processor(AttnProcessor())  # the classic (non-SDPA) processor
    plain = copy.deepcopy(attn)
    fuse_attention_(attn, _setting())
    x = torch.randn(1, 16 * 12, C, dtype=_dtype(attn))
    with torch.no_grad():
        assert torch.equal(attn(x), scale_fusion(plain, x, (16, 12), (8, 8)))


@pytest.mark.parametrize("ldm", LDM)
def test_restore_is_bit_exact_and_weights_stay_shared(ldm):
    attn = _ldm_attn() if ldm else _diffusers_attn()
    cls, keys = type(attn), set(attn.__dict__)
    ptrs = {k: v.data_ptr() for k, v in attn.state_dict().items()}
    x = torch.randn(1, 16 * 12, C, dtype=_dtype(attn))
    with torch.no_grad():
        before = attn(x)
        fuse_attention_(attn, _setting(jitter=0.125, seed=1))
        assert is_fused(attn) and isinstance(attn, cls)
        assert {k: v.data_ptr() for k, v in attn.state_dict().items()} == ptrs
        attn(x)
        restore_attention_(attn)
        assert type(attn) is cls and set(attn.__dict__) == keys and not is_fused(attn)
        assert {k: v.data_ptr() for k, v in attn.state_dict().items()} == ptrs
        assert torch.equal(attn(x), before)
    with pytest.raises(TransformError):
        restore_attention_(attn)


def test_seeded_jitter_replays_and_advances():
    a, b = _diffusers_attn(), _diffusers_attn()
    for m in (a, b):
        fuse_attention_(m, _setting(grid_hw=(32, 24), window_hw=(16, 16), jitter=0.125, seed=7))
    x = torch.randn(1, 32 * 24, C, dtype=torch.float64)
    with torch.no_grad():
        first, second = a(x), a(x)
        assert torch.equal(b(x), first) and torch.equal(b(x), second)
        assert not torch.equal(first, second)  # the generator advances per forward
        fuse_attention_(
            a, _setting(grid_hw=(32, 24), window_hw=(16, 16), jitter=0.125, seed=7), replace=True
        )
        assert torch.equal(a(x), first)  # replace restarts the generator


def test_errors():
    attn = _diffusers_attn()
    x = torch.randn(1, 10, C, dtype=_dtype(attn))
    with pytest.raises(TransformError):
        scale_fusion(attn, x, (4, 4), (2, 2))  # 16 tokens != 10
    with pytest.raises(TransformError):
        scale_fusion(attn, x, (5, 2), (2, 2), blur="box")  # type: ignore[arg-type]
    with pytest.raises(TransformError):
        scale_fusion(attn, x, (5, 2), (2, 2), jitter=0.3)
    with pytest.raises(TransformError):
        FusionSetting(grid_hw=None, window_hw=(8, 8))
    with pytest.raises(TransformError):
        FusionSetting(grid_hw=(8, 0), window_hw=(8, 8))
    with pytest.raises(TransformError):
        fuse_attention_(nn.Linear(4, 4), _setting())
    fuse_attention_(attn, _setting())
    with pytest.raises(TransformError):
        fuse_attention_(attn, _setting())
    fuse_attention_(attn, None, replace=True)
    assert current_fusion(attn) is None
    FusionSetting(active=False)  # an inactive setting needs no sizes


# --------------------------------------------------------------------------- jitter directions


def _window_offsets(grid, window, jitter, seed):
    """Top-left corner of every local window the op attends to, read back from the tokens.

    Each token carries its (row + 1, col + 1); zero padding carries (0, 0). A window's corner
    is a real token's coordinate minus its position inside the window, whatever the padding.
    """
    gh, gw = grid
    wh, ww = window
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    x = torch.stack([rows + 1, cols + 1], dim=-1).reshape(1, gh * gw, 2).double()
    corners = []

    def attend(t):
        if t.shape[1] == wh * ww:
            for win in t:
                j = int(torch.nonzero(win[:, 0])[0])
                corners.append((int(win[j, 0]) - 1 - j // ww, int(win[j, 1]) - 1 - j % ww))
        return t

    scale_fusion(attend, x, grid, window, jitter=jitter, generator=torch.Generator().manual_seed(seed))
    return corners


def test_jitter_moves_interior_windows_both_ways_and_edge_windows_outwards():
    """The published rule (FreeScale's get_views with random_jitter): a window that touches
    neither border moves by randint(-r, r), the first by randint(-r, 0), the last by
    randint(0, r), with r = floor(window * 1/8). Nominal starts from ``_starts`` above."""
    grid, window, jitter = (40, 40), (16, 16), 0.125
    reach = math.floor(16 * jitter)
    starts = _starts(40, 16)  # [0, 8, 16, 24]: two interior windows per dim
    assert len(starts) == 4
    seen: dict[int, set[int]] = {s: set() for s in starts}
    for seed in range(40):
        corners = _window_offsets(grid, window, jitter, seed)
        assert len(corners) == len(starts) ** 2
        for k, (top, left) in enumerate(corners):  # row-major over (h start, w start)
            for start, corner in ((starts[k // len(starts)], top), (starts[k % len(starts)], left)):
                seen[start].add(corner - start)
    for start, offsets in seen.items():
        first, last = start == 0, start + 16 >= 40
        lo, hi = (0 if last else -reach), (0 if first else reach)
        assert min(offsets) >= lo and max(offsets) <= hi, (start, sorted(offsets))
        if not first and not last:  # interior: both directions occur
            assert min(offsets) < 0 < max(offsets), (start, sorted(offsets))
        if first:
            assert min(offsets) < 0
        if last:
            assert max(offsets) > 0


# --------------------------------------------------------------------------- the pass on a UNet


def _fused_unet_output(height: int, width: int, **options: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny SD1.5 (native 64x64) with every self-attention fused, and the plain model, at ``height x width``."""
    from tests.conftest import preset_map
    from unet_surgery import apply
    from unet_surgery.presets import build_unet, example_inputs

    unet = build_unet("sd15", size="tiny", device="cpu")
    inputs = example_inputs(unet, height=height, width=width)
    doc = {"name": "t", "base_resolution": [64, 64], "target_resolutions": [[height, width]],
           "passes": [{"type": "scale_fusion", "select": {"op": "attention", "kind": "self"}, **options}]}
    with torch.no_grad():
        plain = unet(**inputs).sample
        with apply(unet, doc, unet_map=preset_map("sd15", "tiny")):
            fused = unet(**inputs).sample
    return fused, plain


def test_the_pass_without_jitter_does_not_depend_on_the_seed() -> None:
    """jitter: false places every window where the grid puts it: the seed has nothing to move."""
    a, plain = _fused_unet_output(128, 128, jitter=False, seed=0)
    b, _ = _fused_unet_output(128, 128, jitter=False, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, plain)
    c, _ = _fused_unet_output(128, 128, jitter=True, seed=0)  # window 8 at the top level: 1 token of jitter
    d, _ = _fused_unet_output(128, 128, jitter=True, seed=5)
    assert not torch.equal(c, d)


def test_the_pass_fuses_a_latent_larger_than_the_base_on_one_side_only() -> None:
    """64x128 from a 64x64 base has twice the base's tokens: fusion engages (windows of the base
    height, half as wide as the grid); at 64x64 the pass is plain attention, bit for bit."""
    fused, plain = _fused_unet_output(64, 128, jitter=False)
    assert not torch.equal(fused, plain)
    fused, plain = _fused_unet_output(64, 64, jitter=False)
    assert torch.equal(fused, plain)
