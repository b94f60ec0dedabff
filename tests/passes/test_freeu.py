"""The ``freeu`` pass equals diffusers' ``enable_freeu`` on diffusers and LDM layouts.

Oracles: diffusers 0.42.1 itself (``enable_freeu`` on the same weights), and a transcription
of diffusers' ``fourier_filter`` / ``apply_freeu`` written below (the published formulas, in
this file's own code), which also replaces diffusers' own function inside its up blocks as a
second, independent model-level reference. The module lists are typed from diffusers' code:
``UNet2DConditionModel`` builds ``up_blocks[i]`` with ``resolution_idx=i`` and ``apply_freeu``
acts only for ``resolution_idx`` 0 and 1, before every resnet of those blocks
(``layers_per_block + 1`` = 3 resnets each in SD1.5 and SDXL).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import preset_map
from unet_surgery import apply
from unet_surgery.errors import RecipeError, SelectionError
from unet_surgery.passes import make_plan
from unet_surgery.passes.freeu import FreeUPass
from unet_surgery.passes.freeu.builder import SETTINGS, freeu_recipe
from unet_surgery.passes.freeu.skip_merge import (
    FreeUSetting,
    backbone_scale,
    fourier_filter,
    freeu_merge,
)
from unet_surgery.patching.patch import NoEffectWarning
from unet_surgery.presets import build_unet, example_inputs, randomize_zero_init_
from unet_surgery.recipes import LevelRange, Recipe, ScheduleSpec, Selector, parse_recipe

# Published settings (shared reference notes: ScaleCrafter scripts for SD1.5, FreeScale for SDXL).
SD15 = {"b1": 1.2, "b2": 1.4, "s1": 0.9, "s2": 0.2}
SDXL = {"b1": 1.1, "b2": 1.2, "s1": 0.6, "s2": 0.4}

# What diffusers patches (resolution_idx 0 and 1 = up_blocks.0 and up_blocks.1, every resnet).
DIFFUSERS_STAGES = {
    **{f"up_blocks.0.resnets.{j}": 1 for j in range(3)},
    **{f"up_blocks.1.resnets.{j}": 2 for j in range(3)},
}
# The same merges in the LDM layout: output_blocks[i*3 + j] = [resnet, ...] of up level i.
LDM_STAGES = {f"output_blocks.{k}.0": 1 if k < 3 else 2 for k in range(6)}


# ----------------------------------------------------------------------------- transcription


def ref_fourier_filter(x_in: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """diffusers.utils.torch_utils.fourier_filter (0.42.1), transcribed."""
    x = x_in
    B, C, H, W = x.shape
    if (W & (W - 1)) != 0 or (H & (H - 1)) != 0:  # noqa: SIM114  (both branches kept as published)
        x = x.to(dtype=torch.float32)
    elif x.dtype != torch.float32:
        x = x.to(dtype=torch.float32)
    x_freq = torch.fft.fftn(x, dim=(-2, -1))
    x_freq = torch.fft.fftshift(x_freq, dim=(-2, -1))
    B, C, H, W = x_freq.shape
    mask = torch.ones((B, C, H, W), device=x.device)
    crow, ccol = H // 2, W // 2
    mask[..., crow - threshold : crow + threshold, ccol - threshold : ccol + threshold] = scale
    x_freq = x_freq * mask
    x_freq = torch.fft.ifftshift(x_freq, dim=(-2, -1))
    x_filtered = torch.fft.ifftn(x_freq, dim=(-2, -1)).real
    return x_filtered.to(dtype=x_in.dtype)


def ref_apply_freeu(resolution_idx: int, hidden_states: torch.Tensor, res_hidden_states: torch.Tensor, **kw: Any):
    """diffusers.utils.torch_utils.apply_freeu (0.42.1), transcribed."""
    if resolution_idx in (0, 1):
        b, s = (kw["b1"], kw["s1"]) if resolution_idx == 0 else (kw["b2"], kw["s2"])
        half = hidden_states.shape[1] // 2
        hidden_states[:, :half] = hidden_states[:, :half] * b
        res_hidden_states = ref_fourier_filter(res_hidden_states, threshold=1, scale=s)
    return hidden_states, res_hidden_states


def ref_v2_backbone(h: torch.Tensor, b: float, half: int) -> torch.Tensor:
    """FreeU README from 2023-10-18, ``Free_UNetModel.forward``, the backbone part of a stage,
    transcribed (the published ``h[:, :640]`` is the first half of 1280 channels: ``half``)."""
    hidden_mean = h.mean(1).unsqueeze(1)
    B = hidden_mean.shape[0]
    hidden_max, _ = torch.max(hidden_mean.view(B, -1), dim=-1, keepdim=True)
    hidden_min, _ = torch.min(hidden_mean.view(B, -1), dim=-1, keepdim=True)
    hidden_mean = (hidden_mean - hidden_min.unsqueeze(2).unsqueeze(3)) / (hidden_max - hidden_min).unsqueeze(2).unsqueeze(3)
    h[:, :half] = h[:, :half] * ((b - 1) * hidden_mean + 1)
    return h


def ref_apply_freeu_v2(resolution_idx: int, hidden_states: torch.Tensor, res_hidden_states: torch.Tensor, **kw: Any):
    """``ref_apply_freeu`` with the v2 backbone scaling, at diffusers' stages."""
    if resolution_idx in (0, 1):
        b, s = (kw["b1"], kw["s1"]) if resolution_idx == 0 else (kw["b2"], kw["s2"])
        hidden_states = ref_v2_backbone(hidden_states, b, hidden_states.shape[1] // 2)
        res_hidden_states = ref_fourier_filter(res_hidden_states, threshold=1, scale=s)
    return hidden_states, res_hidden_states


# ----------------------------------------------------------------------------- helpers


def recipe_of(*passes: Any, base: int = 512) -> Recipe:
    return Recipe(name="test-freeu", base_resolution=(base, base), target_resolutions=((base, base),), passes=passes)


def run(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return getattr(out, "sample", out)


@functools.cache
def tiny64(name: str) -> nn.Module:
    model = build_unet(name, size="tiny", device="cpu", dtype=torch.float64)
    randomize_zero_init_(model, 1, include_constant=True)
    return model


def with_diffusers_freeu(model: nn.Module, settings: dict[str, float]) -> nn.Module:
    ref = copy.deepcopy(model)
    ref.enable_freeu(**settings)
    return ref


def run_diffusers_freeu_with(apply_freeu: Any, model: nn.Module, settings: dict[str, float],
                             inputs: dict[str, Any]) -> torch.Tensor:
    """diffusers' FreeU blocks with their ``apply_freeu`` replaced by ``apply_freeu`` for one run."""
    import diffusers.models.unets.unet_2d_blocks as blocks

    original = blocks.apply_freeu
    blocks.apply_freeu = apply_freeu
    try:
        return run(with_diffusers_freeu(model, settings), inputs)
    finally:
        blocks.apply_freeu = original


# ----------------------------------------------------------------------------- the op


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("hw", [(8, 8), (6, 6), (5, 7), (2, 2), (1, 1), (16, 4)])
@pytest.mark.parametrize("threshold", [0, 1, 2])
def test_fourier_filter_is_diffusers_fourier_filter(dtype: torch.dtype, hw: tuple[int, int], threshold: int) -> None:
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    ours, ref = fourier_filter(x, threshold, 0.3), ref_fourier_filter(x, threshold, 0.3)
    assert ours.dtype == dtype
    assert torch.equal(ours, ref)


def test_fourier_filter_scales_the_dc_of_a_constant_map_and_nothing_else() -> None:
    # A constant map is pure DC: the filter multiplies it by the scale. A map without DC and
    # without the lowest frequencies (a checkerboard: all energy at Nyquist) is left alone.
    const = torch.full((1, 2, 8, 8), 3.0, dtype=torch.float64)
    torch.testing.assert_close(fourier_filter(const, 1, 0.25), const * 0.25, rtol=0, atol=1e-6)
    idx = torch.arange(8)
    checker = ((idx[:, None] + idx[None, :]) % 2 * 2 - 1).to(torch.float64).expand(1, 2, 8, 8)
    torch.testing.assert_close(fourier_filter(checker, 1, 0.25), checker, rtol=0, atol=1e-6)
    # threshold 1 on a 2x2 map covers the whole spectrum: a plain product.
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(fourier_filter(x, 1, 0.5), x * 0.5, rtol=0, atol=1e-6)


@pytest.mark.parametrize("skip_first", [False, True])
def test_merge_is_apply_freeu_then_cat(skip_first: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    h, s = torch.randn(2, 6, 8, 8, generator=gen, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    rh, rs = ref_apply_freeu(1, h.clone(), s.clone(), b1=9.0, s1=9.0, b2=1.4, s2=0.2)
    expected = torch.cat([rs, rh] if skip_first else [rh, rs], dim=1)
    x = torch.cat([s, h] if skip_first else [h, s], dim=1)
    setting = FreeUSetting(6, 4, skip_first, backbone=1.4, skip=0.2, threshold=1)
    assert torch.equal(freeu_merge(x, setting), expected)
    assert torch.equal(x, torch.cat([s, h] if skip_first else [h, s], dim=1))  # input untouched


def test_structure_backbone_scaling_is_the_v2_code() -> None:
    h = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(backbone_scale(h, 1.3, structure=True), ref_v2_backbone(h.clone(), 1.3, 3), rtol=0, atol=1e-12)
    assert torch.equal(backbone_scale(h, 1.3), torch.cat([h[:, :3] * 1.3, h[:, 3:]], 1))


# ----------------------------------------------------------------------------- whole models


@pytest.mark.parametrize(
    ("name", "settings", "hw"),
    # 192x192 px: SD1.5's FreeU levels are 3x3 and 6x6 latents (the square of threshold 1
    # covers part of a 3x3 spectrum); 128x96 px: SDXL's are 4x3 and 8x6. None is a power of
    # two on every side (diffusers' other dtype branch).
    [("sd15", SD15, (192, 192)), ("sdxl", SDXL, (128, 96))],
)
def test_pass_equals_diffusers_enable_freeu_in_float64(name: str, settings: dict[str, float], hw: tuple[int, int]) -> None:
    model = tiny64(name)
    inputs = example_inputs(model, height=hw[0], width=hw[1], dtype=torch.float64)
    plain = run(model, inputs)
    expected = run(with_diffusers_freeu(model, settings), inputs)
    # Second reference: diffusers' blocks calling the transcription instead of their own code.
    transcribed = run_diffusers_freeu_with(ref_apply_freeu, model, settings, inputs)
    unet_map = preset_map(name, "tiny")
    with apply(model, freeu_recipe(unet_map, base=512, **settings), unet_map=unet_map, force=True) as patch:
        assert {p: e.stage for p, e in patch.plan.entries("freeu").items()} == DIFFUSERS_STAGES
        ours = run(model, inputs)
    assert (expected - plain).abs().max() > 1e-2  # FreeU really changes the output
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, transcribed, rtol=0, atol=1e-6)


def test_a_threshold_other_than_one_equals_the_transcription_with_that_threshold() -> None:
    """diffusers hard-codes threshold 1; the FreeU README's ``Fourier_filter(x, threshold, scale)``
    takes it as an argument. At 192x192 px SD1.5's FreeU levels are 3x3 and 6x6 latents, where
    a square of half side 2 covers more of the spectrum than one of half side 1."""
    def apply_freeu_threshold_2(resolution_idx: int, hidden_states: torch.Tensor, res_hidden_states: torch.Tensor,
                                **kw: Any):
        if resolution_idx in (0, 1):
            b, s = (kw["b1"], kw["s1"]) if resolution_idx == 0 else (kw["b2"], kw["s2"])
            half = hidden_states.shape[1] // 2
            hidden_states[:, :half] = hidden_states[:, :half] * b
            res_hidden_states = ref_fourier_filter(res_hidden_states, threshold=2, scale=s)
        return hidden_states, res_hidden_states

    model = tiny64("sd15")
    inputs = example_inputs(model, height=192, width=192, dtype=torch.float64)
    expected = run_diffusers_freeu_with(apply_freeu_threshold_2, model, SD15, inputs)
    threshold_1 = run(with_diffusers_freeu(model, SD15), inputs)
    unet_map = preset_map("sd15", "tiny")
    with apply(model, freeu_recipe(unet_map, base=512, threshold=2, **SD15), unet_map=unet_map, force=True):
        ours = run(model, inputs)
    assert (expected - threshold_1).abs().max() > 1e-3  # the threshold matters at these sizes
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_structure_scaling_equals_diffusers_blocks_with_the_v2_code() -> None:
    # No library implements v2 at diffusers' stages; the reference is diffusers' up blocks
    # calling the transcribed v2 code. 128 px: the lowest level is 2x2 (a 1x1 map has no range).
    model = tiny64("sd15")
    inputs = example_inputs(model, height=128, width=128, dtype=torch.float64)
    expected = run_diffusers_freeu_with(ref_apply_freeu_v2, model, SD15, inputs)
    unet_map = preset_map("sd15", "tiny")
    with apply(model, recipe_of(FreeUPass(backbone_scaling="structure", **SD15)), unet_map=unet_map, force=True):
        ours = run(model, inputs)
    constant = run(with_diffusers_freeu(model, SD15), inputs)
    assert (expected - constant).abs().max() > 1e-3  # v2 is not v1
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_apply_remove_is_bit_exact() -> None:
    model = tiny64("sd15")
    inputs = example_inputs(model, height=64, width=64, dtype=torch.float64)
    types = {n: type(m) for n, m in model.named_modules()}
    state = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    plain = run(model, inputs)
    unet_map = preset_map("sd15", "tiny")
    for _ in range(2):
        patch = apply(model, "freeu-sd15", unet_map=unet_map, force=True)
        assert not torch.equal(run(model, inputs), plain)
        patch.remove()
        assert torch.equal(run(model, inputs), plain)
    assert {n: type(m) for n, m in model.named_modules()} == types
    after = model.state_dict()
    assert all(after[k].data_ptr() == p and torch.equal(after[k], v) for k, (p, v) in state.items())
    assert all(not any(a.startswith("_unet_surgery") for a in vars(m)) for m in model.modules())


def test_schedule_window_follows_the_sampler_steps() -> None:
    model = tiny64("sd15")
    inputs = example_inputs(model, height=64, width=64, dtype=torch.float64)
    unet_map = preset_map("sd15", "tiny")
    config = FreeUPass(schedule=ScheduleSpec(tau=1, steps=2), **SD15)
    with apply(model, recipe_of(config), unet_map=unet_map, force=True) as patch:
        patch.set_timesteps([999, 499])
        first = run(model, {**inputs, "timestep": torch.tensor([999])})
        second = run(model, {**inputs, "timestep": torch.tensor([499])})
    expected_first = run(with_diffusers_freeu(model, SD15), {**inputs, "timestep": torch.tensor([999])})
    torch.testing.assert_close(first, expected_first, rtol=0, atol=1e-6)
    assert torch.equal(second, run(model, {**inputs, "timestep": torch.tensor([499])}))


def test_composes_with_redilation_as_the_composition_of_the_references() -> None:
    # Re-dilated convs inside FreeU'd resnets: ours (one recipe, two passes) against diffusers'
    # enable_freeu with only the re-dilation applied by us.
    model = tiny64("sd15")
    inputs = example_inputs(model, height=128, width=128, dtype=torch.float64)
    unet_map = preset_map("sd15", "tiny")
    redilate = parse_recipe({
        "name": "r", "base_resolution": [64, 64], "target_resolutions": [[128, 128]],
        "passes": [{"type": "redilate", "select": {"op": ["conv2d"], "kernel": [3], "level": "2..", "stage": ["up"]}, "factor": 2}],
    })
    ref = with_diffusers_freeu(model, SD15)
    with apply(ref, redilate, unet_map=unet_map) as patch:
        assert any(p.startswith("up_blocks.0.resnets.0.") for p in patch.plan.paths("convs"))
        expected = run(ref, inputs)
    both = recipe_of(*redilate.passes, FreeUPass(**SD15), base=64)
    with apply(model, both, unet_map=unet_map) as patch:
        assert set(patch.plan.entries("freeu")) == set(DIFFUSERS_STAGES)
        ours = run(model, inputs)
    assert (expected - run(with_diffusers_freeu(model, SD15), inputs)).abs().max() > 1e-2  # re-dilation acts
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.requires_ldm
def test_ldm_layout_equals_diffusers_enable_freeu_on_the_same_weights() -> None:
    from unet_surgery.loading import convert_ldm_unet

    ldm = build_unet("ldm_sd15", size="tiny", device="cpu")  # the LDM UNet runs in float32 only
    randomize_zero_init_(ldm, 2, include_constant=True)
    unet = build_unet("sd15", size="tiny", device="cpu")
    unet.load_state_dict(convert_ldm_unet(ldm.state_dict(), 2))
    inputs = example_inputs(ldm, height=192, width=192)
    plain = run(ldm, inputs)
    unet.enable_freeu(**SD15)
    with torch.no_grad():
        expected = unet(sample=inputs["x"], timestep=inputs["timesteps"], encoder_hidden_states=inputs["context"]).sample
    unet_map = preset_map("ldm_sd15", "tiny")
    with apply(ldm, "freeu-sd15", unet_map=unet_map) as patch:
        assert {p: e.stage for p, e in patch.plan.entries("freeu").items()} == LDM_STAGES
        ours = run(ldm, inputs)
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)  # float32 throughout


# ----------------------------------------------------------------------------- selection


# hidden + skip channels of each merge, from the configs' block_out_channels: SD1.5/SD2.1
# (320, 640, 1280, 1280), SDXL (320, 640, 1280); the skips pop in reverse down-path order.
SPLIT_SD15 = [(1280, 1280), (1280, 1280), (1280, 1280), (1280, 1280), (1280, 1280), (1280, 640)]
SPLIT_SDXL = [(1280, 1280), (1280, 1280), (1280, 640), (1280, 640), (640, 640), (640, 320)]


@pytest.mark.parametrize(
    ("name", "expected", "split"),
    [
        ("sd15", DIFFUSERS_STAGES, SPLIT_SD15),
        ("sdxl", DIFFUSERS_STAGES, SPLIT_SDXL),
        ("ldm_sd15", LDM_STAGES, SPLIT_SD15),
        ("ldm_sd21", LDM_STAGES, SPLIT_SD15),
    ],
)
def test_builder_selects_what_diffusers_patches_on_full_maps(name: str, expected: dict[str, int], split: list) -> None:
    unet_map = preset_map(name)
    settings = SETTINGS[name.removeprefix("ldm_")]
    entries = make_plan(freeu_recipe(unet_map, base=512, **settings), unet_map).entries("freeu")
    assert {p: e.stage for p, e in entries.items()} == expected
    assert [(e.hidden_channels, e.skip_channels) for e in entries.values()] == split
    for entry in entries.values():
        factors = (settings["b1"], settings["s1"]) if entry.stage == 1 else (settings["b2"], settings["s2"])
        assert (entry.backbone, entry.skip) == factors


def test_selection_errors_and_no_effect() -> None:
    unet_map = preset_map("sd15", "tiny")
    with pytest.raises(SelectionError, match="two stages only"):
        make_plan(recipe_of(FreeUPass(select=Selector(level=LevelRange(1, 3)))), unet_map)
    with pytest.raises(SelectionError, match="receives no skip concatenation"):
        make_plan(recipe_of(FreeUPass(select=Selector(paths=("up_blocks.0.resnets.9",)))), unet_map)
    only = make_plan(recipe_of(FreeUPass(select=Selector(paths=("up_blocks.1.*",)))), unet_map)
    assert {p: e.stage for p, e in only.entries("freeu").items()} == {p: 2 for p in DIFFUSERS_STAGES if p.startswith("up_blocks.1")}
    with pytest.raises(RecipeError, match="not by kernel"):
        parse_recipe({"name": "x", "base_resolution": [512, 512], "target_resolutions": [[512, 512]],
                      "passes": [{"type": "freeu", "select": {"kernel": [3]}}]})
    model = build_unet("sd15", size="tiny", device="meta")
    with pytest.warns(NoEffectWarning, match="factor of the selected stages is 1"):
        apply(model, recipe_of(FreeUPass(b1=1.0, b2=1.0, s1=1.0, s2=1.0)), unet_map=unet_map, force=True).remove()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["animatediff", "modelscope_t2v"])
def test_video_unets_equal_diffusers_enable_freeu(name: str) -> None:
    # UNetMotionModel and UNet3DConditionModel have diffusers' FreeU too (resolution_idx 0, 1).
    model = build_unet(name, size="tiny", device="cpu", dtype=torch.float64)
    randomize_zero_init_(model, 3, include_constant=True)
    inputs = example_inputs(model, height=128, width=128, dtype=torch.float64)
    expected = run(with_diffusers_freeu(model, SD15), inputs)
    unet_map = preset_map(name, "tiny")
    with apply(model, freeu_recipe(unet_map, base=512, **SD15), unet_map=unet_map, force=True) as patch:
        assert {p: e.stage for p, e in patch.plan.entries("freeu").items()} == DIFFUSERS_STAGES
        ours = run(model, inputs)
    assert (expected - run(model, inputs)).abs().max() > 1e-2
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_adapter_round_trip(tmp_path) -> None:
    from unet_surgery.export import load_patch, save_patch

    model = tiny64("sd15")
    inputs = example_inputs(model, height=64, width=64, dtype=torch.float64)
    unet_map = preset_map("sd15", "tiny")
    with apply(model, "freeu-sd15", unet_map=unet_map, force=True) as patch:
        expected = run(model, inputs)
        save_patch(patch, tmp_path / "adapter")
    with load_patch(model, tmp_path / "adapter", unet_map=unet_map) as reloaded:
        assert reloaded.plan.paths("skip_merges") == sorted(DIFFUSERS_STAGES)
        assert torch.equal(run(model, inputs), expected)


@pytest.mark.slow
def test_pt2_phases_equal_the_eager_model(tmp_path) -> None:
    # A FreeU window of one step out of two: two static programs, each equal to eager FreeU.
    from unet_surgery.export import Pt2Runner, export_pt2

    model = build_unet("sd15", size="tiny", device="cpu")
    inputs = example_inputs(model, height=128, width=128)
    config = FreeUPass(schedule=ScheduleSpec(tau=1, steps=2), **SD15)
    with apply(model, recipe_of(config), unet_map=preset_map("sd15", "tiny"), force=True) as patch:
        export_pt2(patch, tmp_path / "pt2", height=128, width=128, num_steps=2)
        runner = Pt2Runner(tmp_path / "pt2")
        assert runner.manifest["step_phase"] == [0, 1]
        patch.set_timesteps(runner.timesteps)
        outputs = []
        for t in runner.timesteps:
            eager = run(model, {**inputs, "timestep": torch.full((1,), int(t))})
            assert torch.equal(runner(inputs["sample"], torch.tensor(int(t)), inputs["encoder_hidden_states"]), eager)
            outputs.append(eager)
    plain = [run(model, {**inputs, "timestep": torch.full((1,), int(t))}) for t in runner.timesteps]
    assert not torch.equal(outputs[0], plain[0]) and torch.equal(outputs[1], plain[1])


def test_builder_on_the_toy_unet_equals_enable_freeu() -> None:
    # The toy is a diffusers UNet2DConditionModel with one layer per block: 2 merges per stage.
    from unet_surgery.graph import map_unet
    from unet_surgery.toy.model import load_toy

    unet = copy.deepcopy(load_toy("toy").unet).double().eval()
    unet_map = map_unet(unet, latent_hw=(64, 64))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, unet.config.in_channels, 64, 64, generator=gen, dtype=torch.float64)
    context = torch.randn(1, 1, unet.config.cross_attention_dim, generator=gen, dtype=torch.float64)
    inputs = {"sample": x, "timestep": torch.tensor([500]), "encoder_hidden_states": context}
    expected = run(with_diffusers_freeu(unet, SD15), inputs)
    with apply(unet, freeu_recipe(unet_map, base=64, vae_scale_factor=1, **SD15), unet_map=unet_map, force=True) as patch:
        assert sorted(patch.plan.entries("freeu")) == [f"up_blocks.{i}.resnets.{j}" for i in (0, 1) for j in (0, 1)]
        ours = run(unet, inputs)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
