"""Scale-fusion self-attention (FreeScale): local detail from windows, layout from global attention.

Above training resolution, global self-attention sees more tokens than it was trained on and
its output goes flat and repetitive; attention restricted to training-size windows keeps the
local detail but loses the global layout.  FreeScale keeps the low frequencies of the global
result and the high frequencies of the local one::

    out = G(local) + (global - G(global))

``G`` is a Gaussian blur (kernel size ``2 * ceil(max(s_h, s_w)) - 1``, sigma 1, zero padding;
by default 3-D over (h, w, channel) as the official code computes it since March 2025),
``s = (s_h, s_w)`` the per-axis scale of the layer (``grid / window`` unless given).  ``local``
averages attention over windows of ``window_hw`` tokens placed at a stride of half a window
(optionally jittered), ``global`` is the layer's plain attention over all tokens (or, in
``fast_mode``, attention over the strided sub-grids ``h::s_h, w::s_w``).  :func:`fusion_window`
gives the official window and scale for a grid and a training-size grid.

Two layers of API, as for re-dilation:

* :func:`scale_fusion` -- a pure function of an ``attend`` callable (the layer's own
  self-attention on a ``(B', N', C)`` token batch) and the tokens;
* :func:`fuse_attention_` / :func:`restore_attention_` -- an in-place *class swap* of a
  diffusers ``Attention`` or an LDM ``CrossAttention``: weights stay shared, state_dict keys
  unchanged, and a :class:`FusionSetting` is read from a source on every forward.

See ``docs/ops/scale_fusion.md`` for where this follows or departs from the published code.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unet_surgery.errors import TransformError
from unet_surgery.ops import rewrite

__all__ = [
    "BLURS",
    "PUBLISHED_JITTER",
    "FusionSetting",
    "FusionSource",
    "current_fusion",
    "fuse_attention_",
    "fusion_kernel_size",
    "fusion_window",
    "gaussian_blur",
    "is_fused",
    "level_hw",
    "restore_attention_",
    "scale_fusion",
    "window_starts",
]

Blur: TypeAlias = Literal["published", "published-2024", "volumetric", "spatial"]
BLURS: tuple[str, ...] = ("published", "published-2024", "volumetric", "spatial")
"""``published``: 3-D over (h, w, channel) of every batch item, what the official code computes
at its HEAD (d5a2256, since the "fix filter" commits 0b2f58f/b7c40ae of 2025-03-07);
``published-2024``: (w, channel) per token row, what the official code computed before those
commits (e.g. 94b6b59, December 2024); ``volumetric``: an alias of ``published`` (its name
before the official code moved to the 3-D blur); ``spatial``: 2-D over (h, w), every channel
on its own."""

_BLUR_DIMS: dict[str, tuple[int, ...]] = {
    "published": (1, 2, 3),
    "published-2024": (2, 3),
    "volumetric": (1, 2, 3),
    "spatial": (1, 2),
}
"""Axes of the ``(B, h, w, C)`` token grid each blur runs its 1-D Gaussian along."""

PUBLISHED_JITTER = 0.125
"""The published jitter range: up to 1/8 of the window in each direction."""

Attend: TypeAlias = Callable[[Tensor], Tensor]
HW: TypeAlias = tuple[int, int]


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def _check_hw(value: object, what: str) -> HW:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
        or min(int(v) for v in value) < 1
    ):
        raise TransformError(f"{what} must be two positive integers (h, w), got {value!r}")
    return int(value[0]), int(value[1])


def _check_jitter(jitter: object) -> float:
    if isinstance(jitter, bool) or not isinstance(jitter, numbers.Real):
        raise TransformError(f"jitter must be a number, got {jitter!r}")
    value = float(jitter)
    # Up to 1/4, neighbouring windows (half a window apart) can never pull apart far enough to
    # leave a token uncovered: stride + 2 * reach <= window.
    if not (0.0 <= value <= 0.25):
        raise TransformError(f"jitter must be a window fraction in [0, 0.25], got {jitter!r}")
    return value


def _check_blur(blur: object) -> Blur:
    if blur not in BLURS:
        raise TransformError(f"blur must be one of {BLURS}, got {blur!r}")
    return blur  # type: ignore[return-value]


def _scale_hw(scale: float | tuple[float, float] | None, grid: HW, window: HW) -> tuple[float, float]:
    if scale is None:
        return grid[0] / window[0], grid[1] / window[1]
    values = scale if isinstance(scale, (tuple, list)) else (scale, scale)
    if len(values) != 2:
        raise TransformError(f"scale must be a number or a pair, got {scale!r}")
    out: list[float] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (0 < float(v) < math.inf):
            raise TransformError(f"scale must be finite and > 0, got {scale!r}")
        out.append(float(v))
    return out[0], out[1]


def _ceil(value: float) -> int:
    """Ceiling that ignores float noise (64/32*1.0000000001 stays 2)."""
    return max(1, math.ceil(value - 1e-9))


def fusion_kernel_size(scale_hw: tuple[float, float]) -> int:
    """Blur kernel size ``2 * ceil(max(s_h, s_w)) - 1`` (the published rule, ceil for s not int)."""
    return 2 * _ceil(max(scale_hw)) - 1


def fusion_window(grid_hw: HW, base_hw: HW) -> tuple[HW, tuple[float, float]]:
    """The official window and per-axis scale for a token grid and the training-size grid.

    FreeScale's ``scale_forward`` (HEAD d5a2256) takes ``s = (s_h, s_w)`` from the target size
    and gives the axis with the larger scale a window of the training size and the other axis
    ``floor(grid / max(s))`` tokens (``sub_w = int(128 / ratio_hw)``): both sides are
    ``grid / max(s_h, s_w)``, the windows keep the image's aspect ratio, and at square sizes
    the window is the training grid.  ``s`` also sets the blur size and the fast-mode strides,
    so it is returned rather than re-derived as ``grid / window``.  Exact integer arithmetic:
    the official float ``int(128 / ratio)`` gives the same windows at every size it runs at.
    """
    (gh, gw), (bh, bw) = _check_hw(grid_hw, "grid_hw"), _check_hw(base_hw, "base_hw")
    # s_h >= s_w: h gets the training size, w its share; else the other way round.
    window = (bh, gw * bh // gh) if gh * bw >= gw * bh else (gh * bw // gw, bw)
    window = (max(1, min(window[0], gh)), max(1, min(window[1], gw)))
    return window, (gh / bh, gw / bw)


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------


def window_starts(size: int, window: int) -> list[int]:
    """Window starts along one dim: stride ``window // 2``, the last window ends at the border.

    Same placement as the published sliding-window scheme: ``ceil((size - window) / stride) + 1``
    windows at multiples of the stride, the one that would overhang moved back to end at
    ``size``; a single window when the dim is no larger than the window.
    """
    if size <= window:
        return [0]
    stride = max(1, window // 2)
    count = -(-(size - window) // stride) + 1
    return [min(i * stride, size - window) for i in range(count)]


def _jitter_bounds(starts: list[int], size: int, window: int) -> list[tuple[int, int]]:
    """Allowed jitter per window (published rule): interior windows move either way, the first
    only outwards (into the padding), the last only outwards, a full-size window not at all."""
    bounds = []
    for s in starts:
        first, last = s == 0, s + window >= size
        bounds.append((0 if last else -1, 0 if first else 1))
    return bounds


def _draw(bounds: list[tuple[int, int]], reach: int, count: int, gen: torch.Generator | None):
    """Integer jitters in ``[lo * reach, hi * reach]`` for ``count`` windows per start."""
    if reach == 0:
        return torch.zeros(count, len(bounds), dtype=torch.long)
    lo = torch.tensor([b[0] * reach for b in bounds], dtype=torch.long)
    hi = torch.tensor([b[1] * reach for b in bounds], dtype=torch.long)
    u = torch.rand(count, len(bounds), generator=gen, dtype=torch.float64)
    return torch.minimum(lo + (u * (hi - lo + 1).double()).long(), hi)


def _window_index(
    grid: HW, window: HW, reach: HW, gen: torch.Generator | None, device: torch.device
) -> Tensor:
    """Flat token indices ``(num_windows, wh * ww)`` of every window into the padded grid.

    The grid is padded by ``reach`` tokens on each side (zeros, as published) so jittered
    windows stay in range; windows are listed row-major (all w-positions of the first row...).
    """
    (gh, gw), (wh, ww), (rh, rw) = grid, window, reach
    hs, ws = window_starts(gh, wh), window_starts(gw, ww)
    nh, nw = len(hs), len(ws)
    # One jitter per window and dim (the published code draws each view independently).
    jh = _draw(_jitter_bounds(hs, gh, wh), rh, nw, gen).T  # (nh, nw)
    jw = _draw(_jitter_bounds(ws, gw, ww), rw, nh, gen)  # (nh, nw)
    top = torch.tensor(hs, dtype=torch.long)[:, None] + rh + jh
    left = torch.tensor(ws, dtype=torch.long)[None, :] + rw + jw
    rows = top.reshape(-1, 1, 1) + torch.arange(wh).reshape(1, wh, 1)
    cols = left.reshape(-1, 1, 1) + torch.arange(ww).reshape(1, 1, ww)
    index = rows * (gw + 2 * rw) + cols
    return index.reshape(nh * nw, wh * ww).to(device)


def _local_attention(
    attend: Attend,
    tokens: Tensor,
    grid: HW,
    window: HW,
    jitter: float,
    gen: torch.Generator | None,
    chunk_size: int | None,
) -> Tensor:
    """Window-averaged attention ``(B, N, C)``; windows stacked into the batch dim, in chunks."""
    b, n, c = tokens.shape
    (gh, gw), (wh, ww) = grid, window
    reach = (math.floor(wh * jitter + 1e-9), math.floor(ww * jitter + 1e-9))
    index = _window_index(grid, window, reach, gen, tokens.device)
    num, per = index.shape
    hp, wp = gh + 2 * reach[0], gw + 2 * reach[1]
    padded = tokens.reshape(b, gh, gw, c)
    if reach != (0, 0):
        padded = F.pad(padded, (0, 0, reach[1], reach[1], reach[0], reach[0]))
    padded = padded.reshape(b, hp * wp, c)
    if chunk_size is None:
        # At most half the global call's tokens per call: the local branch then peaks below the
        # global call it sits beside (measured: benchmarks/bench_scale_fusion.py), and the
        # calls stay few (4x area: 9 windows in 5 calls; 16x area: 49 in 7).
        chunk_size = max(1, n // (2 * per))
    total = tokens.new_zeros(b, hp * wp, c)
    for first in range(0, num, chunk_size):
        idx = index[first : first + chunk_size]
        k = idx.shape[0]
        # (B, k*per, C) -> window-major batch (k*B, per, C): the same as calling per window.
        batch = padded[:, idx.reshape(-1)].reshape(b, k, per, c).transpose(0, 1)
        out = attend(batch.reshape(k * b, per, c))
        if out.shape != (k * b, per, c):
            raise TransformError(f"attend returned {tuple(out.shape)}, expected {(k * b, per, c)}")
        out = out.reshape(k, b, per, c).transpose(0, 1).reshape(b, k * per, c)
        total.index_add_(1, idx.reshape(-1), out.to(total.dtype))
    count = torch.zeros(hp * wp, dtype=total.dtype, device=total.device)
    count.index_add_(0, index.reshape(-1), torch.ones_like(index.reshape(-1), dtype=total.dtype))
    total = total.reshape(b, hp, wp, c)[:, reach[0] : reach[0] + gh, reach[1] : reach[1] + gw]
    count = count.reshape(hp, wp)[reach[0] : reach[0] + gh, reach[1] : reach[1] + gw]
    return (total / count.clamp_min(1).unsqueeze(-1)).reshape(b, n, c)


def _subgrid_attention(attend: Attend, tokens: Tensor, grid: HW, stride: HW) -> Tensor:
    """``fast_mode`` global branch: attention within each strided sub-grid ``i::sh, j::sw``.

    Sub-grids of equal shape (all of them when the stride divides the grid; at most four shapes
    otherwise) go through one batched call.
    """
    b, n, c = tokens.shape
    (gh, gw), (sh, sw) = grid, stride
    x = tokens.reshape(b, gh, gw, c)
    out = torch.empty_like(x)
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i in range(sh):
        for j in range(sw):
            groups.setdefault((len(range(i, gh, sh)), len(range(j, gw, sw))), []).append((i, j))
    for (h, w), offsets in groups.items():
        batch = torch.cat([x[:, i::sh, j::sw].reshape(b, h * w, c) for i, j in offsets])
        res = attend(batch)
        if res.shape != batch.shape:
            raise TransformError(f"attend returned {tuple(res.shape)}, expected {batch.shape}")
        for k, (i, j) in enumerate(offsets):
            out[:, i::sh, j::sw] = res[k * b : (k + 1) * b].reshape(b, h, w, c)
    return out.reshape(b, n, c)


# ---------------------------------------------------------------------------------------------
# Blur
# ---------------------------------------------------------------------------------------------


def _gaussian_1d(kernel_size: int, sigma: float) -> list[float]:
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).tolist()


def _blur_dim(x: Tensor, dim: int, kernel: list[float]) -> Tensor:
    """Zero-padded 1-D 'same' convolution of ``x`` along ``dim`` (a separable Gaussian pass).

    Written as k shifted multiply-adds rather than ``conv1d``: the token tensors are long in
    every dim, and conv1d over millions of short rows is an order of magnitude slower and
    allocates im2col buffers.
    """
    half = len(kernel) // 2
    size = x.shape[dim]
    out = x * kernel[half]
    for t, weight in enumerate(kernel):
        d = t - half
        if d == 0 or abs(d) >= size:
            continue
        # out[i] += g[t] * x[i + d] wherever i + d is inside; outside it is zero padding.
        dst = out.narrow(dim, max(0, -d), size - abs(d))
        dst.add_(x.narrow(dim, max(0, d), size - abs(d)), alpha=weight)
    return out


def gaussian_blur(
    x: Tensor, grid_hw: HW, kernel_size: int, *, blur: Blur = "published", sigma: float = 1.0
) -> Tensor:
    """Blur tokens ``(B, h*w, C)`` with the fusion Gaussian; returns the same shape.

    Separable passes with zero padding equal the full 2-D/3-D zero-padded convolution exactly
    (in real arithmetic).  ``published`` (alias ``volumetric``) blurs along h, w and the channel
    axis -- the official ``gaussian_filter`` since March 2025, a ``conv3d`` over each batch
    item's (h, w, C) volume; ``published-2024`` blurs along w and C of every token row -- the
    earlier ``conv2d``, which took h as its channel axis; ``spatial`` blurs h and w only and
    never mixes channels.
    """
    _check_blur(blur)
    if kernel_size <= 1:
        return x
    b, n, c = x.shape
    kernel = _gaussian_1d(kernel_size, sigma)
    grid = x.reshape(b, grid_hw[0], grid_hw[1], c)
    for dim in _BLUR_DIMS[blur]:
        grid = _blur_dim(grid, dim, kernel)
    return grid.reshape(b, n, c)


# ---------------------------------------------------------------------------------------------
# Functional form
# ---------------------------------------------------------------------------------------------


def scale_fusion(
    attend: Attend,
    hidden_states: Tensor,
    grid_hw: HW,
    window_hw: HW,
    *,
    blur: Blur = "published",
    jitter: float = 0.0,
    generator: torch.Generator | None = None,
    fast_mode: bool = False,
    scale: float | tuple[float, float] | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """FreeScale self-attention: ``G(local) + (global - G(global))`` for tokens ``(B, h*w, C)``.

    ``attend`` runs the layer's own self-attention on a ``(B', N', C)`` batch.  ``window_hw`` is
    the training-resolution token grid of this level; a window larger than the grid is clipped
    to it, and when it covers the whole grid the result is ``attend(hidden_states)`` exactly.
    ``jitter`` (a window fraction, published 1/8) shifts every window by a random amount drawn
    from ``generator`` (CPU; None = torch's global RNG) with the input zero-padded by that
    range.  ``scale`` overrides ``s = grid / window`` for the blur size and fast-mode strides
    (:func:`fusion_window` gives the official windows together with their scale).
    ``chunk_size`` caps windows per ``attend`` call (default: as many as fit in half the token
    count of the global call).
    """
    if hidden_states.ndim != 3:
        raise TransformError(f"scale fusion needs tokens (B, N, C), got {hidden_states.ndim}-D")
    grid = _check_hw(grid_hw, "grid_hw")
    window = _check_hw(window_hw, "window_hw")
    blur = _check_blur(blur)
    jitter = _check_jitter(jitter)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise TransformError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    n = hidden_states.shape[1]
    if grid[0] * grid[1] != n:
        raise TransformError(f"grid {grid} has {grid[0] * grid[1]} tokens, hidden_states {n}")
    window = (min(window[0], grid[0]), min(window[1], grid[1]))
    if window == grid:
        return attend(hidden_states)
    s = _scale_hw(scale, grid, window)
    local = _local_attention(attend, hidden_states, grid, window, jitter, generator, chunk_size)
    if fast_mode:
        stride = (min(_ceil(s[0]), grid[0]), min(_ceil(s[1]), grid[1]))
        glob = _subgrid_attention(attend, hidden_states, grid, stride)
    else:
        glob = attend(hidden_states)
    # G is linear: G(local) + (global - G(global)) == global + G(local - global), one blur.
    return glob + gaussian_blur(local - glob, grid, fusion_kernel_size(s), blur=blur)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusionSetting:
    """What a fused self-attention does on one forward.

    ``grid_hw``/``window_hw`` are the token grid and the window, either at the layer's own
    level or at any finer level (e.g. latent size and a window in latent tokens): a patched
    layer divides both by the power of two that makes the grid match its token count (the grid
    with ``ceil`` per halving, as strided 3x3 downsamplers do; the window with ``floor``, as
    the official ``int(sub / scale_factor)``).  ``scale_hw`` is the per-axis scale for the blur
    size and fast-mode strides (None: ``grid / window`` at the layer's level); it is the same
    at every level.  ``seed`` None draws jitter from torch's global RNG; an int seeds a
    per-layer generator that advances on every forward.
    """

    active: bool = True
    grid_hw: HW | None = None
    window_hw: HW | None = None
    blur: Blur = "published"
    jitter: float = PUBLISHED_JITTER
    seed: int | None = None
    fast_mode: bool = False
    scale_hw: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        _check_blur(self.blur)
        if self.scale_hw is not None:
            object.__setattr__(self, "scale_hw", _scale_hw(self.scale_hw, (1, 1), (1, 1)))
        object.__setattr__(self, "jitter", _check_jitter(self.jitter))
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
        ):
            raise TransformError(f"seed must be an integer or None, got {self.seed!r}")
        for name in ("grid_hw", "window_hw"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _check_hw(value, name))
            elif self.active:
                raise TransformError(f"an active FusionSetting needs {name}")


FusionSource: TypeAlias = FusionSetting | Callable[[], FusionSetting | None] | None
"""A constant setting (None = off), or a zero-argument callable read on every forward."""


def level_hw(grid_hw: HW, window_hw: HW, num_tokens: int) -> tuple[HW, HW]:
    """Grid and window at the level that has ``num_tokens`` tokens.

    Halves both until the grid has ``num_tokens`` tokens, at most 8 times: the grid with
    ``ceil`` (a strided 3x3 downsampler's output size), the window with ``floor`` (the official
    ``int(sub / scale_factor)``, never below 1); the two agree wherever the window is a power
    of two times the level's.  Raises :class:`TransformError` when no level fits.
    """
    grid, window = _check_hw(grid_hw, "grid_hw"), _check_hw(window_hw, "window_hw")
    for _ in range(9):
        if grid[0] * grid[1] == num_tokens:
            return grid, window
        grid = (-(-grid[0] // 2), -(-grid[1] // 2))
        window = (max(1, window[0] // 2), max(1, window[1] // 2))
    raise TransformError(f"no downsampling level of grid {tuple(grid_hw)} has {num_tokens} tokens")


# ---------------------------------------------------------------------------------------------
# In-place class swap (the shared mechanism of unet_surgery.ops.rewrite)
# ---------------------------------------------------------------------------------------------

_RNG = "_fusion_rng"  # (seed, torch.Generator) while a seeded setting has been used


def _resolve(source: Any) -> FusionSetting | None:
    value = source() if callable(source) else source
    if value is None or isinstance(value, FusionSetting):
        return value
    raise TransformError(f"fusion source gave {type(value).__name__}, expected FusionSetting/None")


def current_fusion(attn: nn.Module) -> FusionSetting | None:
    """The setting a fused attention would use on its next forward (None if not fused/off)."""
    if not is_fused(attn):
        return None
    setting = _resolve(rewrite.source(attn))
    return setting if setting is not None and setting.active else None


class _FusedAttentionMixin(rewrite.Rewritten):
    """Forward of a class-swapped attention; only un-masked 3-D self-attention is fused.

    ``_fusion_cross``/``_fusion_mask`` name the base forward's second and third parameters
    (cross-attention input and mask).
    """

    _rewrite_prefix = "Fused"
    _rewrite_attrs = (_RNG,)
    _fusion_cross: str
    _fusion_mask: str

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        base_forward = self._rewrite_base.forward
        setting = _resolve(rewrite.source(self))  # type: ignore[arg-type]
        cross = args[0] if args else kwargs.get(self._fusion_cross)
        mask = args[1] if len(args) > 1 else kwargs.get(self._fusion_mask)
        if (
            setting is None
            or not setting.active
            or cross is not None
            or mask is not None
            or len(args) > 2
            or hidden_states.ndim != 3
        ):
            return base_forward(self, hidden_states, *args, **kwargs)
        extra = {
            k: v for k, v in kwargs.items() if k not in (self._fusion_cross, self._fusion_mask)
        }

        def attend(tokens: Tensor) -> Tensor:
            return base_forward(self, tokens, **extra)

        assert setting.grid_hw is not None and setting.window_hw is not None
        grid, window = level_hw(setting.grid_hw, setting.window_hw, hidden_states.shape[1])
        return scale_fusion(
            attend,
            hidden_states,
            grid,
            window,
            blur=setting.blur,
            jitter=setting.jitter,
            generator=self._fusion_generator(setting),
            fast_mode=setting.fast_mode,
            scale=setting.scale_hw,
        )

    def _fusion_generator(self, setting: FusionSetting) -> torch.Generator | None:
        """The per-layer jitter generator: (re)seeded when the seed changes, then advancing."""
        if setting.seed is None or setting.jitter == 0:
            return None
        held = self.__dict__.get(_RNG)
        if held is None or held[0] != setting.seed:
            held = (setting.seed, torch.Generator().manual_seed(int(setting.seed)))
            self.__dict__[_RNG] = held
        return held[1]


def _swap_class_for(cls: type[nn.Module]) -> type[nn.Module]:
    """The fused counterpart of an attention class, made once per class."""
    cross, mask = rewrite.attention_arguments(cls)
    return rewrite.swapped_class(_FusedAttentionMixin, cls, _fusion_cross=cross, _fusion_mask=mask)


def is_fused(attn: nn.Module) -> bool:
    """Whether ``attn`` is currently class-swapped by :func:`fuse_attention_`."""
    return rewrite.is_rewritten(attn, _FusedAttentionMixin)


def fuse_attention_(attn: nn.Module, source: FusionSource, *, replace: bool = False) -> nn.Module:
    """Swap ``attn``'s class in place so that its self-attention calls use scale fusion.

    ``source`` is a :class:`FusionSetting`, None, or a zero-argument callable returning either,
    read on every forward; None or an inactive setting runs the original forward.  Calls with
    a cross-attention input, a mask, or non-token (4-D) input always run the original forward,
    which is also what fusion calls as ``attend``, so any attention processor keeps working.
    Fusing an already fused module raises :class:`TransformError` unless ``replace=True``
    (which swaps the source and drops the jitter generator).  A module whose instance carries
    its own ``forward`` is refused.  Returns ``attn``.
    """
    if not isinstance(attn, nn.Module):
        raise TransformError(f"scale fusion needs an attention nn.Module, got {type(attn)!r}")
    if not (source is None or callable(source) or isinstance(source, FusionSetting)):
        raise TransformError(
            f"fusion source must be a FusionSetting, None or a callable, got {source!r}"
        )
    if is_fused(attn) and not replace:
        raise TransformError(
            "attention is already fused; call restore_attention_ first or pass replace=True"
        )
    swapped = type(attn) if is_fused(attn) else _swap_class_for(type(attn))
    return rewrite.install(attn, swapped, source, replace=replace)


def restore_attention_(attn: nn.Module) -> nn.Module:
    """Undo :func:`fuse_attention_`: original class back, added attributes gone."""
    if not is_fused(attn):
        raise TransformError(f"{type(attn).__name__} is not fused; nothing to restore")
    return rewrite.restore(attn)
