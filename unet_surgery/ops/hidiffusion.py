"""HiDiffusion's two rewrites: RAU-Net (resolution-aware U-Net) and MSW-MSA windowed attention.

Above the training resolution the top levels of an SD UNet see objects larger than they were
trained on and duplicate them; HiDiffusion (megvii-research/HiDiffusion, ``hidiffusion.py``)
shrinks the feature map once more during the early steps so the deep levels see a
training-size layout (RAU-Net), and restricts the top-level self-attention to four windows
(MSW-MSA), which is both faster and as good as global attention there.

* **RAU-Net, conv form** (``make_diffusers_downsampler_block``): a stride-2 3x3 downsampler
  runs with stride 4, padding 2, dilation 2 (a 4x reduction); the upsampler conv of the same
  level gets its input resized (nearest) to the size the downsampler saw. The official code
  gets the latter by forwarding upsample sizes to every upsampler (``num_upsamplers += 12``).
* **RAU-Net, block form** (``make_diffusers_cross_attn_{down,up}_block``): the output of the
  first transformer of a down block is average-pooled 2x2 (``ceil_mode``); the output of the
  second transformer of the matching up block is resized bicubically back to the size before
  the pooling.
* **MSW-MSA** (``make_diffusers_transformer_block``): the tokens of a self-attention are
  rolled by a shift, split into 2x2 windows of ``ceil(H/2) x ceil(W/2)`` tokens, attended per
  window and put back. The shift is ``k * (window // 4)`` per side with ``k`` drawn uniformly
  from 0..3 on every call (``torch.rand(1)``, thresholds 0.25/0.5/0.75).

Each form is a class swap on :mod:`unet_surgery.ops.rewrite` reading its setting per forward.
A RAU-Net pair shares a :class:`SizeLink`: the down layer records the size it reduced from,
the up layer restores exactly that size on the same call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unet_surgery.errors import TransformError
from unet_surgery.ops import rewrite

__all__ = [
    "RauSetting",
    "SizeLink",
    "WindowSetting",
    "msw_shift",
    "token_grid",
    "window_partition",
    "window_reverse",
    "windowed_attention",
]

HW = tuple[int, int]


# ---------------------------------------------------------------------------------------------
# MSW-MSA: the numbers
# ---------------------------------------------------------------------------------------------


def token_grid(latent_hw: HW, num_tokens: int) -> HW:
    """The (H, W) token grid of a layer with ``num_tokens`` tokens, as the official code finds it:
    ratio ``r = round(sqrt(h * w / N))`` of the UNet input size, then ``ceil(h / r), ceil(w / r)``."""
    h, w = latent_hw
    ratio = round(((h * w) / num_tokens) ** 0.5)
    if ratio < 1:
        raise TransformError(f"{num_tokens} tokens is more than the latent {latent_hw} has")
    grid = (math.ceil(h / ratio), math.ceil(w / ratio))
    if grid[0] * grid[1] == num_tokens:
        return grid
    return _halved_grid(latent_hw, num_tokens)


def _halved_grid(latent_hw: HW, num_tokens: int) -> HW:
    """The grid of ``num_tokens`` among the sizes the UNet reaches by halving the latent.

    Where the official ratio rule misses (odd sizes halved several times: a 17x9 latent reaches
    5x3, which the rule reads as 6x3, and the official code fails on the reshape), the grid is
    one of the sizes that stride-2 convs (``ceil``) and 2x2 pooling (``floor``) produce; the
    candidate closest to the latent's aspect ratio wins.
    """
    sizes: set[HW] = {(latent_hw[0], latent_hw[1])}
    found: set[HW] = set()
    for _ in range(12):
        sizes = {(f(a / 2), f(b / 2)) for a, b in sizes for f in (math.ceil, math.floor) if f(a / 2) and f(b / 2)}
        found |= {s for s in sizes if s[0] * s[1] == num_tokens}
    if not found:
        raise TransformError(f"{num_tokens} tokens match no feature-map size of a {latent_hw} latent")
    aspect = latent_hw[0] / latent_hw[1]
    return min(sorted(found), key=lambda s: abs(math.log(s[0] / s[1] / aspect)))


def msw_shift(window: HW, u: float) -> HW:
    """The official shift for a uniform draw ``u``: quarter ``k`` = 0..3 of each window side."""
    k = 0 if u <= 0.25 else 1 if u <= 0.5 else 2 if u <= 0.75 else 3
    return (window[0] // 4 * k, window[1] // 4 * k)


def window_partition(tokens: Tensor, grid: HW, window: HW, shift: HW) -> Tensor:
    """``(B, H*W, C)`` -> ``(4B, wh*ww, C)``: roll by ``-shift``, cut 2x2 windows.

    An odd grid side is first resized bicubically to twice the window (as published).
    """
    b, _, c = tokens.shape
    h, w = grid
    x = tokens.reshape(b, h, w, c)
    if h % 2 or w % 2:
        x = F.interpolate(x.permute(0, 3, 1, 2), size=(2 * window[0], 2 * window[1]), mode="bicubic")
        x = x.permute(0, 2, 3, 1)
    if shift[0] > 0:  # the published test looks at the first side only
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.reshape(b, 2, window[0], 2, window[1], c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * 4, window[0] * window[1], c)


def window_reverse(windows: Tensor, grid: HW, window: HW, shift: HW) -> Tensor:
    """Inverse of :func:`window_partition`: ``(4B, wh*ww, C)`` -> ``(B, H*W, C)``."""
    c = windows.shape[-1]
    b = windows.shape[0] // 4
    x = windows.reshape(b, 2, 2, window[0], window[1], c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, 2 * window[0], 2 * window[1], c)
    if shift[0] > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    h, w = grid
    if h % 2 or w % 2:
        x = F.interpolate(x.permute(0, 3, 1, 2), size=(h, w), mode="bicubic").permute(0, 2, 3, 1)
    return x.reshape(b, h * w, c)


def windowed_attention(attend: Callable[[Tensor], Tensor], tokens: Tensor, latent_hw: HW, u: float) -> Tensor:
    """MSW-MSA of ``tokens`` ``(B, N, C)``: ``attend`` (the layer's own attention) per window."""
    grid = token_grid(latent_hw, tokens.shape[1])
    window = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))
    shift = msw_shift(window, u)
    out = attend(window_partition(tokens, grid, window, shift))
    return window_reverse(out, grid, window, shift)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowSetting:
    """An active MSW-MSA forward: the UNet input size and where the shift comes from.

    ``quarter`` None draws the shift on every forward (the published behaviour) from
    ``generator``, or from torch's global generator when that is None (exactly as published:
    ``torch.rand(1)``); 0..3 fixes it. Every field takes part in equality (a generator by
    identity): equal settings are shared per call, so two passes seeded differently must
    never compare equal.
    """

    latent_hw: HW
    quarter: int | None = None
    generator: torch.Generator | None = None

    def draw(self) -> float:
        if self.quarter is not None:
            return (self.quarter + 0.5) / 4
        return float(torch.rand(1, generator=self.generator))


@dataclass(eq=False)
class SizeLink:
    """The size a RAU-Net down layer reduced from, handed to its up layer on the same call.

    Compared by identity: each pair has its own link.
    """

    size: HW | None = None


@dataclass(frozen=True)
class RauSetting:
    """An active RAU-Net layer: its side of the pair and the link it shares with the other.

    The link takes part in equality (by identity), so the settings of two pairs never
    compare equal and never share one link. ``reduce`` False is a down side that only
    records its input size (a sampler below the pair, whose up side then restores that
    size, as the official forwarded upsample sizes do).
    """

    side: Literal["down", "up"]
    link: SizeLink
    reduce: bool = True


def _resolve(module: nn.Module, kind: type) -> Any:
    value = rewrite.read_setting(module)
    if value is None or isinstance(value, kind):
        return value
    raise TransformError(f"{type(module).__name__}: setting source gave {type(value).__name__}, expected {kind.__name__}")


# ---------------------------------------------------------------------------------------------
# Class swaps
# ---------------------------------------------------------------------------------------------


class _WindowedAttentionMixin(rewrite.Rewritten):
    """Self-attention forward over MSW-MSA windows; cross-attention and masks run plain."""

    _rewrite_prefix = "Windowed"
    _cross_name: str
    _mask_name: str

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        base_forward = self._rewrite_base.forward
        setting = _resolve(self, WindowSetting)  # type: ignore[arg-type]
        cross = args[0] if args else kwargs.get(self._cross_name)
        if setting is None or cross is not None or len(args) > 2 or hidden_states.ndim != 3:
            return base_forward(self, hidden_states, *args, **kwargs)
        mask = args[1] if len(args) > 1 else kwargs.get(self._mask_name)
        extra = {k: v for k, v in kwargs.items() if k not in (self._cross_name, self._mask_name)}
        if mask is not None:  # the published block passes the mask on to every window
            extra[self._mask_name] = mask

        def attend(tokens: Tensor) -> Tensor:
            return base_forward(self, tokens, **extra)

        return windowed_attention(attend, hidden_states, setting.latent_hw, setting.draw())


def _attention_class(cls: type[nn.Module]) -> type[nn.Module]:
    cross, mask = rewrite.attention_arguments(cls)
    return rewrite.swapped_class(_WindowedAttentionMixin, cls, _cross_name=cross, _mask_name=mask)


def window_attention_(attn: nn.Module, source: Any) -> nn.Module:
    """Swap ``attn`` so self-attention calls run MSW-MSA while ``source`` gives a setting."""
    return rewrite.install(attn, _attention_class(type(attn)), source)


class _RauConvMixin(rewrite.Rewritten):
    """A RAU-Net conv: the downsampler (stride 4, padding 2, dilation 2) or the upsampler conv."""

    _rewrite_prefix = "ResolutionAware"

    def forward(self, x: Tensor) -> Tensor:
        setting = _resolve(self, RauSetting)  # type: ignore[arg-type]
        conv: Any = self
        if setting is None:
            return self._rewrite_base.forward(self, x)
        if setting.side == "down":
            setting.link.size = (int(x.shape[-2]), int(x.shape[-1]))
            if not setting.reduce:
                return self._rewrite_base.forward(self, x)
            return F.conv2d(x, conv.weight, conv.bias, (4, 4), (2, 2), (2, 2), conv.groups)
        size, setting.link.size = setting.link.size, None
        if size is not None and tuple(x.shape[-2:]) != size:
            # The parent upsampled 2x from h'; nearest from 2h' to T picks the same rows as
            # nearest from h' to T, which is what the official forwarded upsample size does.
            x = F.interpolate(x, size=size, mode="nearest")
        return self._rewrite_base.forward(self, x)


def rau_conv_(conv: nn.Module, source: Any) -> nn.Module:
    """Swap a 3x3 conv (a stride-2 downsampler or an upsampler's conv) into its RAU-Net form."""
    if not isinstance(conv, nn.Conv2d):
        raise TransformError(f"RAU-Net rewrites 2-D convolutions, got {type(conv).__name__}")
    return rewrite.install(conv, rewrite.swapped_class(_RauConvMixin, type(conv)), source)


def _map_output(out: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to the feature map a transformer returns (tensor, tuple or output object)."""
    if isinstance(out, Tensor):
        return fn(out)
    if isinstance(out, tuple):
        return (fn(out[0]), *out[1:])
    if hasattr(out, "sample"):
        out.sample = fn(out.sample)
        return out
    raise TransformError(f"cannot find the feature map in a {type(out).__name__} output")


class _RauBlockMixin(rewrite.Rewritten):
    """A transformer whose output is pooled 2x2 (down) or resized back (up) by RAU-Net."""

    _rewrite_prefix = "ResolutionAware"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self._rewrite_base.forward(self, *args, **kwargs)
        setting = _resolve(self, RauSetting)  # type: ignore[arg-type]
        if setting is None:
            return out
        link = setting.link
        if setting.side == "down":

            def pool(x: Tensor) -> Tensor:
                link.size = (int(x.shape[-2]), int(x.shape[-1]))
                return F.avg_pool2d(x, kernel_size=(2, 2), ceil_mode=True)

            return _map_output(out, pool)
        size, link.size = link.size, None
        if size is None:
            return out
        return _map_output(out, lambda x: F.interpolate(x, size=size, mode="bicubic"))


def rau_block_(block: nn.Module, source: Any) -> nn.Module:
    """Swap a spatial transformer (diffusers Transformer2DModel, LDM SpatialTransformer)."""
    return rewrite.install(block, rewrite.swapped_class(_RauBlockMixin, type(block)), source)
