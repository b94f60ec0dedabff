"""Scale fusion against a literal transcription of the official FreeScale HEAD code.

``_head_*`` below transcribe ``scale_attention.py`` of ali-vilab/FreeScale at d5a2256 (the
file as left by the "fix filter" commits 0b2f58f/b7c40ae of 2025-03-07): ``gaussian_kernel``,
``gaussian_filter`` (a ``conv3d`` over each batch item's (h, w, channel) volume), ``get_views``
and the self-attention part of ``scale_forward`` (``four_window`` and ``fast_mode``'s
``fourg_window``). Changes, all named where they occur:

* the constants 1024 (training width in pixels) and 128 (training latent side) become the
  parameters ``base_px``/``base_latent`` so tiny models can run it (1024/128 are SDXL's);
* ``random.randint`` becomes a ``randint`` argument: ``_no_jitter`` (always 0), or a replay of
  the offsets our op used, which checks each against the official ``randint`` bounds;
* the crop ``value[:, r:-r]`` is written ``value[:, r:size + r]``: the same for r > 0, and
  for r = 0 (windows under 8 tokens, official: an empty tensor) the uncropped grid.

Our op runs with its default blur and, through the pass, with its own window rule; nothing
is passed by hand but what the pass would pass.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from einops import rearrange
from torch import nn

from tests.conftest import preset_map
from unet_surgery import apply
from unet_surgery.ops.scale_fusion import fusion_window, scale_fusion
from unet_surgery.presets import build_unet, example_inputs

C, HEADS = 8, 2
Randint = Callable[[int, int], int]


# --------------------------------------------------------------------------- the transcription


def _head_gaussian_kernel(kernel_size=3, sigma=1.0, channels=3):
    x_coord = torch.arange(kernel_size)
    gaussian_1d = torch.exp(-((x_coord - (kernel_size - 1) / 2) ** 2) / (2 * sigma**2))
    gaussian_1d = gaussian_1d / gaussian_1d.sum()
    gaussian_3d = gaussian_1d[:, None, None] * gaussian_1d[None, :, None] * gaussian_1d[None, None, :]
    kernel = gaussian_3d[None, None, :, :, :].repeat(channels, 1, 1, 1, 1)
    return kernel


def _head_gaussian_filter(latents, kernel_size=3, sigma=1.0):
    channels = latents.shape[0]
    kernel = _head_gaussian_kernel(kernel_size, sigma, channels).to(latents.device, latents.dtype)
    blurred_latents = F.conv3d(latents.unsqueeze(0), kernel, padding=kernel_size // 2, groups=channels)[0]
    return blurred_latents


def _head_get_views(height, width, h_window_size=128, w_window_size=128, scale_factor=8, *, randint: Randint):
    height = int(height)
    width = int(width)
    h_window_stride = h_window_size // 2
    w_window_stride = w_window_size // 2
    h_window_size = int(h_window_size / scale_factor)
    w_window_size = int(w_window_size / scale_factor)
    h_window_stride = int(h_window_stride / scale_factor)
    w_window_stride = int(w_window_stride / scale_factor)
    num_blocks_height = int((height - h_window_size) / h_window_stride - 1e-6) + 2 if height > h_window_size else 1
    num_blocks_width = int((width - w_window_size) / w_window_stride - 1e-6) + 2 if width > w_window_size else 1
    total_num_blocks = int(num_blocks_height * num_blocks_width)
    views = []
    for i in range(total_num_blocks):
        h_start = int((i // num_blocks_width) * h_window_stride)
        h_end = h_start + h_window_size
        w_start = int((i % num_blocks_width) * w_window_stride)
        w_end = w_start + w_window_size

        if h_end > height:
            h_start = int(h_start + height - h_end)
            h_end = int(height)
        if w_end > width:
            w_start = int(w_start + width - w_end)
            w_end = int(width)
        if h_start < 0:
            h_end = int(h_end - h_start)
            h_start = 0
        if w_start < 0:
            w_end = int(w_end - w_start)
            w_start = 0

        random_jitter = True
        if random_jitter:
            h_jitter_range = h_window_size // 8
            w_jitter_range = w_window_size // 8
            h_jitter = 0
            w_jitter = 0

            if (w_start != 0) and (w_end != width):
                w_jitter = randint(-w_jitter_range, w_jitter_range)
            elif (w_start == 0) and (w_end != width):
                w_jitter = randint(-w_jitter_range, 0)
            elif (w_start != 0) and (w_end == width):
                w_jitter = randint(0, w_jitter_range)
            if (h_start != 0) and (h_end != height):
                h_jitter = randint(-h_jitter_range, h_jitter_range)
            elif (h_start == 0) and (h_end != height):
                h_jitter = randint(-h_jitter_range, 0)
            elif (h_start != 0) and (h_end == height):
                h_jitter = randint(0, h_jitter_range)
            h_start += h_jitter + h_jitter_range
            h_end += h_jitter + h_jitter_range
            w_start += w_jitter + w_jitter_range
            w_end += w_jitter + w_jitter_range

        views.append((h_start, h_end, w_start, w_end))
    return views


def _head_numbers(num_tokens, current_hw, *, base_px=1024, base_latent=128):
    """The opening of ``scale_forward``: scales, level grid, window (``sub``) and jitter ranges."""
    current_scale_num_h, current_scale_num_w = current_hw[0] // base_px, current_hw[1] // base_px

    ratio_hw = current_scale_num_h / current_scale_num_w
    latent_h = int((num_tokens * ratio_hw) ** 0.5)
    latent_w = int(latent_h / ratio_hw)
    scale_factor = base_latent * current_scale_num_h / latent_h
    if ratio_hw > 1:
        sub_h = base_latent
        sub_w = int(base_latent / ratio_hw)
    else:
        sub_h = int(base_latent * ratio_hw)
        sub_w = base_latent

    h_jitter_range = int(sub_h / scale_factor // 8)
    w_jitter_range = int(sub_w / scale_factor // 8)
    return dict(s_h=current_scale_num_h, s_w=current_scale_num_w, latent_h=latent_h, latent_w=latent_w,
                scale_factor=scale_factor, sub_h=sub_h, sub_w=sub_w, h_jitter_range=h_jitter_range,
                w_jitter_range=w_jitter_range)


def _head_self_attention(attn1, norm_hidden_states, current_hw, fast_mode, *, randint: Randint,
                         base_px=1024, base_latent=128):
    """``scale_forward`` from its scale numbers to ``attn_output`` (before the residual add)."""
    n = _head_numbers(norm_hidden_states.shape[1], current_hw, base_px=base_px, base_latent=base_latent)
    current_scale_num_h, current_scale_num_w = n["s_h"], n["s_w"]
    latent_h, latent_w, scale_factor = n["latent_h"], n["latent_w"], n["scale_factor"]
    sub_h, sub_w = n["sub_h"], n["sub_w"]
    h_jitter_range, w_jitter_range = n["h_jitter_range"], n["w_jitter_range"]
    views = _head_get_views(latent_h, latent_w, sub_h, sub_w, scale_factor=scale_factor, randint=randint)

    current_scale_num = max(current_scale_num_h, current_scale_num_w)
    global_views = [[h, w] for h in range(current_scale_num_h) for w in range(current_scale_num_w)]

    # four_window and fourg_window share the local branch; norm_hidden_states_ is the padded grid.
    grid = rearrange(norm_hidden_states, "bh (h w) d -> bh h w d", h=latent_h)
    norm_hidden_states_ = F.pad(grid, (0, 0, w_jitter_range, w_jitter_range, h_jitter_range, h_jitter_range), "constant", 0)
    value = torch.zeros_like(norm_hidden_states_)
    count = torch.zeros_like(norm_hidden_states_)
    for view in views:
        h_start, h_end, w_start, w_end = view
        local_states = norm_hidden_states_[:, h_start:h_end, w_start:w_end, :]
        local_states = rearrange(local_states, "bh h w d -> bh (h w) d")
        local_output = attn1(local_states)
        local_output = rearrange(local_output, "bh (h w) d -> bh h w d", h=int(sub_h / scale_factor))
        value[:, h_start:h_end, w_start:w_end, :] += local_output * 1
        count[:, h_start:h_end, w_start:w_end, :] += 1

    # Official: value[:, h_jitter_range:-h_jitter_range, w_jitter_range:-w_jitter_range, :].
    value = value[:, h_jitter_range:latent_h + h_jitter_range, w_jitter_range:latent_w + w_jitter_range, :]
    count = count[:, h_jitter_range:latent_h + h_jitter_range, w_jitter_range:latent_w + w_jitter_range, :]
    attn_output = torch.where(count > 0, value / count, value)

    gaussian_local = _head_gaussian_filter(attn_output, kernel_size=(2 * current_scale_num - 1), sigma=1.0)

    if not fast_mode:  # four_window
        attn_output_global = attn1(norm_hidden_states)
        attn_output_global = rearrange(attn_output_global, "bh (h w) d -> bh h w d", h=latent_h)
    else:  # fourg_window
        value = torch.zeros_like(grid)
        count = torch.zeros_like(grid)
        for global_view in global_views:
            h, w = global_view
            global_states = grid[:, h::current_scale_num_h, w::current_scale_num_w, :]
            global_states = rearrange(global_states, "bh h w d -> bh (h w) d")
            global_output = attn1(global_states)
            global_output = rearrange(global_output, "bh (h w) d -> bh h w d", h=int(global_output.shape[1] ** 0.5))
            value[:, h::current_scale_num_h, w::current_scale_num_w, :] += global_output * 1
            count[:, h::current_scale_num_h, w::current_scale_num_w, :] += 1
        attn_output_global = torch.where(count > 0, value / count, value)

    gaussian_global = _head_gaussian_filter(attn_output_global, kernel_size=(2 * current_scale_num - 1), sigma=1.0)

    attn_output = gaussian_local + (attn_output_global - gaussian_global)
    return rearrange(attn_output, "bh h w d -> bh (h w) d")


def _no_jitter(low: int, high: int) -> int:
    assert low <= 0 <= high
    return 0


# --------------------------------------------------------------------------- replaying our jitter


class _Recorder:
    """An ``attend`` that records every token batch it is given."""

    def __init__(self, attend: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.attend, self.batches = attend, []

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.batches.append(tokens.detach().clone())
        return self.attend(tokens)


def _replay(batches: list[torch.Tensor], x: torch.Tensor, current_hw, fast: bool, **base) -> Randint:
    """The official ``randint`` replaying the window offsets our op used, in the official order.

    The official numbers give the level grid, the windows, the jitter ranges and, with no
    jitter, every view's place in the zero-padded grid. Every window our op attended to is
    found there (by its first non-padding token: the tokens are random, so each value sits at
    one place; then the whole window is compared). ``randint(low, high)`` then returns, view by
    view and w before h as ``get_views`` draws them, the offset our op used for that view, and
    checks it lies in ``[low, high]``.
    """
    n = _head_numbers(x.shape[1], current_hw, **base)
    gh, gw, sf = n["latent_h"], n["latent_w"], n["scale_factor"]
    wh, ww = int(n["sub_h"] / sf), int(n["sub_w"] / sf)
    rh, rw = n["h_jitter_range"], n["w_jitter_range"]
    b = x.shape[0]
    padded = F.pad(x.reshape(b, gh, gw, -1), (0, 0, rw, rw, rh, rh))
    where = {float(v): divmod(i, padded.shape[2]) for i, v in enumerate(padded[0, :, :, 0].flatten()) if v != 0}
    places = []
    rows = [t[k : k + b] for t in batches if t.shape[1] == wh * ww for k in range(0, t.shape[0], b)]
    for t in rows:
        first = int(torch.nonzero(t[0, :, 0])[0])
        if float(t[0, first, 0]) not in where:
            continue  # a fast-mode sub-grid with a window's token count
        top, left = where[float(t[0, first, 0])]
        top, left = top - first // ww, left - first % ww
        if torch.equal(t.reshape(b, wh, ww, -1), padded[:, top : top + wh, left : left + ww]):
            places.append((top, left))
    nominal = _head_get_views(gh, gw, n["sub_h"], n["sub_w"], scale_factor=sf, randint=_no_jitter)
    assert len(places) == len(nominal)  # as many windows as official views
    queue: list[int] = []
    for h0, _, w0, _ in nominal:
        found = [(top - h0, left - w0) for top, left in places if abs(top - h0) <= rh and abs(left - w0) <= rw]
        assert len(found) == 1, (h0, w0, found)
        jh, jw = found[0]
        queue += ([jw] if ww < gw else []) + ([jh] if wh < gh else [])
    queue.reverse()

    def randint(low: int, high: int) -> int:
        value = queue.pop()
        assert low <= value <= high, (low, value, high)
        return value

    randint.queue = queue  # type: ignore[attr-defined]
    return randint


# --------------------------------------------------------------------------- the op


def _attn(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention(C, heads=HEADS, dim_head=C // HEADS, bias=True).to(torch.float64).eval()


# (s_h, s_w): 2x area 2:1 both ways, 4x area square, 8x area 2:1, a 3:1 window of non-power-of-two width.
SCALES = [(2, 1), (1, 2), (2, 2), (4, 2), (2, 4), (3, 1)]


@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("fast", [False, True], ids=["full", "fast"])
@pytest.mark.parametrize("jitter", [False, True], ids=["still", "jitter"])
def test_op_matches_head(scale, fast, jitter):
    """Level grid = 16 tokens per training side; the official 1024/128 constants, unchanged."""
    base = 16
    grid = (base * scale[0], base * scale[1])
    window, s = fusion_window(grid, (base, base))
    attn = _attn()
    x = torch.randn(2, grid[0] * grid[1], C, dtype=torch.float64)
    rec = _Recorder(attn)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        got = scale_fusion(rec, x, grid, window, jitter=0.125 if jitter else 0.0, generator=gen,
                           fast_mode=fast, scale=s)
        hw = (1024 * scale[0], 1024 * scale[1])
        randint = _replay(rec.batches, x, hw, fast) if jitter else _no_jitter
        expected = _head_self_attention(attn, x, hw, fast, randint=randint)
    if jitter:
        assert randint.queue == []  # type: ignore[attr-defined]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_jitter_replay_really_moves_windows():
    """The jittered case above is not the still one in disguise."""
    grid, base = (32, 16), 16
    window, s = fusion_window(grid, (base, base))
    attn = _attn()
    x = torch.randn(2, grid[0] * grid[1], C, dtype=torch.float64)
    rec = _Recorder(attn)
    with torch.no_grad():
        scale_fusion(rec, x, grid, window, jitter=0.125, generator=torch.Generator().manual_seed(5), scale=s)
    randint = _replay(rec.batches, x, (2048, 1024), False)
    assert any(v != 0 for v in randint.queue)  # type: ignore[attr-defined]


def test_official_windows_and_scale():
    """fusion_window against the official sub_h/sub_w and scale numbers (pixels, SDXL)."""
    for hw in [(1024, 1024), (2048, 2048), (4096, 4096), (2048, 1024), (1024, 2048), (4096, 2048),
               (3072, 1024), (1024, 3072), (3072, 2048), (8192, 4096), (4096, 3072)]:
        s_h, s_w = hw[0] // 1024, hw[1] // 1024
        ratio_hw = s_h / s_w
        sub = (128, int(128 / ratio_hw)) if ratio_hw > 1 else (int(128 * ratio_hw), 128)
        assert fusion_window((hw[0] // 8, hw[1] // 8), (128, 128)) == (sub, (s_h, s_w)), hw


# --------------------------------------------------------------------------- through the pass


class _RecordingProcessor:
    """Wraps an attention processor and records the token batches of every call."""

    def __init__(self, inner) -> None:
        self.inner, self.batches = inner, []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        self.batches.append(hidden_states.detach().clone())
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _keep_first(seen: dict, path: str, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
    seen.setdefault(path, (args[0].detach().clone(), out.detach().clone()))


LAYERS = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1",  # level 1
          "down_blocks.2.attentions.0.transformer_blocks.1.attn1"]  # level 2


@pytest.mark.parametrize(("target", "fast", "jitter"), [
    ((512, 256), False, True),   # 2:1, 2x area
    ((256, 512), True, False),   # 1:2, fast strides (1, 2)
    ((512, 512), True, True),    # square, 4x area
    ((768, 256), False, False),  # 3:1: level-2 window 2 = floor(10 / 4), the official int()
], ids=["512x256", "256x512-fast", "512x512-fast", "768x256"])
def test_pass_matches_head(target, fast, jitter):
    """A recipe's scale_fusion on a tiny SDXL: two attn1 layers against the transcription."""
    model = build_unet("sdxl", size="tiny", device="cpu", dtype=torch.float64)
    plain = {p: copy.deepcopy(model.get_submodule(p)) for p in LAYERS}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    recorders = {}
    for p in LAYERS:
        module = model.get_submodule(p)
        recorders[p] = _RecordingProcessor(module.processor)
        module.set_processor(recorders[p])
        module.register_forward_hook(functools.partial(_keep_first, seen, p))
    recipe = {"name": "fs", "base_resolution": [256, 256], "target_resolutions": [list(target)],
              "passes": [{"type": "scale_fusion", "select": {"op": ["attention"], "kind": ["self"], "axis": ["spatial"]},
                          "jitter": jitter, "fast_mode": fast}]}
    inputs = example_inputs(model, height=target[0], width=target[1], dtype=torch.float64)
    with apply(model, recipe, unet_map=preset_map("sdxl", "tiny"), force=True), torch.no_grad():
        model(**inputs)
    for p in LAYERS:
        x, out = seen[p]
        base = {"base_px": 256, "base_latent": 32}
        with torch.no_grad():
            randint = _replay(recorders[p].batches, x, target, fast, **base) if jitter else _no_jitter
            expected = _head_self_attention(plain[p], x, target, fast, randint=randint, **base)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
