"""FreeU stages by level (the pass, as diffusers) against stages by channel count (FreeU repo).

The official code (ChenyangSi/FreeU @ 3676d36, ``demo/free_lunch_utils.py``) replaces the
forward of diffusers' ``UpBlock2D`` / ``CrossAttnUpBlock2D`` with a copy whose only change is a
hook before each ``cat([hidden, skip])``: ``if hidden.shape[1] == 1280`` stage 1, ``if == 640``
stage 2 (``Fourier_filter`` in float32). diffusers 0.42.1 has the same hook at the same place
(``apply_freeu``), choosing by ``resolution_idx`` instead. So the official up-block forward is
diffusers' forward with ``apply_freeu`` swapped for ``official_hook`` below, a transcription of
the official hook in which the tiny models' widest and second-widest up widths stand in for
1280 and 640. (The official ``CrossAttnUpBlock2D`` copy also drops ``encoder_attention_mask``
from the attention call; it is None here, so that changes nothing.)

The tiny models here are the tiny presets with the published width ratios: SD1.5 (32, 64, 128,
128) for (320, 640, 1280, 1280), SDXL (32, 64, 128) for (320, 640, 1280); 128 and 64 stand in
for 1280 and 640. The presets' own widths, (32, 64, 64, 64) and (32, 64, 64), do not keep the
ratios (64 is two levels' width there), so the channel rule would pick other merges than on the
full models. The merge sets below are typed from the architecture, not from our code: up block ``i`` has
three resnets; the first one receives the previous block's width, the others the block's own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

from unet_surgery import apply
from unet_surgery.graph import map_unet
from unet_surgery.passes.freeu.builder import freeu_recipe
from unet_surgery.presets import build_unet, example_inputs, randomize_zero_init_

SD15 = {"b1": 1.2, "b2": 1.4, "s1": 0.9, "s2": 0.2}  # freeu-sd15
SDXL = {"b1": 1.1, "b2": 1.2, "s1": 0.6, "s2": 0.4}  # freeu-sdxl
WIDTHS = {"sd15": (32, 64, 128, 128), "sdxl": (32, 64, 128)}  # 1/10 of the published widths

# Hidden (backbone) channels entering each up resnet of full SD1.5: up_blocks.0 and .1 are
# 1280 wide and receive 1280; up_blocks.2 (640) receives 1280 then 640, 640; up_blocks.3
# (320) receives 640 then 320, 320. SDXL (320, 640, 1280): 1280 x3; 1280, 640, 640; 640, 320, 320.
CHANNEL_RULE = {
    "sd15": {
        **{f"up_blocks.{i}.resnets.{j}": 1 for i in (0, 1) for j in range(3)},
        "up_blocks.2.resnets.0": 1, "up_blocks.2.resnets.1": 2, "up_blocks.2.resnets.2": 2,
        "up_blocks.3.resnets.0": 2,
    },
    "sdxl": {
        **{f"up_blocks.0.resnets.{j}": 1 for j in range(3)},
        "up_blocks.1.resnets.0": 1, "up_blocks.1.resnets.1": 2, "up_blocks.1.resnets.2": 2,
        "up_blocks.2.resnets.0": 2,
    },
}
# diffusers' resolution_idx 0 and 1 (and the pass): the two lowest-resolution up levels.
LEVEL_RULE = {f"up_blocks.{i}.resnets.{j}": i + 1 for i in (0, 1) for j in range(3)}


def official_fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """``Fourier_filter`` of the FreeU demo code, transcribed (float32, mask on the CPU)."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x_freq = torch.fft.fftshift(torch.fft.fftn(x, dim=(-2, -1)), dim=(-2, -1))
    B, C, H, W = x_freq.shape
    mask = torch.ones((B, C, H, W))
    crow, ccol = H // 2, W // 2
    mask[..., crow - threshold : crow + threshold, ccol - threshold : ccol + threshold] = scale
    x_freq = torch.fft.ifftshift(x_freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(x_freq, dim=(-2, -1)).real.to(dtype)


StageOf = Callable[[int, int], int]  # (resolution_idx, hidden channels) -> stage 0 / 1 / 2


def by_channels(stage1: int, stage2: int) -> StageOf:
    """The official rule, with ``stage1`` / ``stage2`` standing in for 1280 / 640."""
    return lambda _idx, channels: 1 if channels == stage1 else 2 if channels == stage2 else 0


def by_level(idx: int, _channels: int) -> int:
    return idx + 1 if idx in (0, 1) else 0


def official_hook(stage_of: StageOf, touched: list[tuple[int, int]]) -> Callable[..., Any]:
    """The official FreeU hook (``if h.shape[1] == 1280: ... if h.shape[1] == 640: ...``) as a
    drop-in for diffusers' ``apply_freeu``; records ``(resolution_idx, stage)`` of every call."""

    def hook(resolution_idx: int, hidden: torch.Tensor, skip: torch.Tensor, **kw: float):
        stage = stage_of(resolution_idx, hidden.shape[1])
        touched.append((resolution_idx, stage))
        if stage:
            b, s = (kw["b1"], kw["s1"]) if stage == 1 else (kw["b2"], kw["s2"])
            half = hidden.shape[1] // 2
            hidden[:, :half] = hidden[:, :half] * b
            skip = official_fourier_filter(skip, threshold=1, scale=s)
        return hidden, skip

    return hook


@contextmanager
def hooked(stage_of: StageOf) -> Iterator[list[tuple[int, int]]]:
    import diffusers.models.unets.unet_2d_blocks as blocks

    touched: list[tuple[int, int]] = []
    original = blocks.apply_freeu
    blocks.apply_freeu = official_hook(stage_of, touched)
    try:
        yield touched
    finally:
        blocks.apply_freeu = original


def touched_merges(calls: list[tuple[int, int]]) -> dict[str, int]:
    """``(resolution_idx, stage)`` in call order -> {up_blocks.i.resnets.j: stage} where stage > 0."""
    seen: dict[int, int] = {}
    merges = {}
    for idx, stage in calls:
        j = seen.get(idx, 0)
        seen[idx] = j + 1
        if stage:
            merges[f"up_blocks.{idx}.resnets.{j}"] = stage
    return merges


def tiny_model(name: str) -> nn.Module:
    """The tiny preset at 1/10 of the published widths (module docstring), float64, seeded."""
    from diffusers import UNet2DConditionModel

    config = dict(build_unet(name, size="tiny", device="meta").config)
    config["block_out_channels"] = WIDTHS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = UNet2DConditionModel.from_config(config).double().eval()
    randomize_zero_init_(model, 1, include_constant=True)
    return model


def run(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def measure(name: str, settings: dict[str, float], hw: tuple[int, int] = (128, 128)) -> dict[str, Any]:
    """Outputs of the tiny float64 UNet: plain, the pass (by level), the official hook by level
    and by channel count, at timestep 500; the merges each hook touched."""
    model = tiny_model(name)
    inputs = example_inputs(name, size="tiny", height=hw[0], width=hw[1], dtype=torch.float64)
    inputs["timestep"] = torch.tensor([500])
    widths = sorted(set(model.config.block_out_channels), reverse=True)
    hooked_model = copy.deepcopy(model)
    hooked_model.enable_freeu(**settings)
    with hooked(by_level) as calls:
        level = run(hooked_model, inputs)
    level_merges = touched_merges(calls)
    with hooked(by_channels(widths[0], widths[1])) as calls:
        channels = run(hooked_model, inputs)
    channel_merges = touched_merges(calls)
    unet_map = map_unet(model, latent_hw=(hw[0] // 8, hw[1] // 8))
    plain = run(model, inputs)
    with apply(model, freeu_recipe(unet_map, base=512, **settings), unet_map=unet_map, force=True) as patch:
        ours = run(model, inputs)
        pass_merges = {p: e.stage for p, e in patch.plan.entries("freeu").items()}
    return {"plain": plain, "ours": ours, "level": level, "channels": channels, "widths": widths[:2],
            "level_merges": level_merges, "channel_merges": channel_merges, "pass_merges": pass_merges}


@pytest.mark.parametrize(("name", "settings"), [("sd15", SD15), ("sdxl", SDXL)])
def test_channel_rule_touches_other_merges_and_changes_the_output(name: str, settings: dict[str, float]) -> None:
    m = measure(name, settings)
    assert m["widths"] == [128, 64]
    assert m["channel_merges"] == CHANNEL_RULE[name]
    assert m["level_merges"] == m["pass_merges"] == LEVEL_RULE
    # Same hook, stages by level: the pass is the official code up to the stage rule.
    torch.testing.assert_close(m["ours"], m["level"], rtol=0, atol=1e-12)
    # By channel count the output moves by a good share of FreeU's own effect (measured: 1.9x
    # on SD1.5, 0.43x on SDXL; scripts/freeu_stage_rule.py).
    effect = (m["ours"] - m["plain"]).abs().max()
    assert effect > 1e-2
    assert (m["channels"] - m["ours"]).abs().max() > 0.1 * effect
