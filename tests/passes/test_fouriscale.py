"""FouriScale: the ``fouriscale`` pass against a transcription of the official code.

The reference below transcribes LeonHLJ/FouriScale (``model.py``: ``FouriConvProcessor`` and
``FouriConvProcessor_XL``; ``text2image.py`` / ``text2image_xl.py``: the per-step dilation and
the layer lists in ``assets/layer_settings``). The official loop batches ``[uncond, cond,
cond]``: the first two thirds get the strong mask (and, on SDXL, the full dilation), the last
third (FouriScale guidance) the weak one. The pass acts on a ``[uncond, cond]`` batch and must
equal the first two thirds. One deliberate change in the transcription: the official code
filters in float32 (``.type(torch.float32)``, ``torch.arange(H).float()``); here in the input's
dtype, so the comparison is at float64 rounding.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.conftest import preset_map
from unet_surgery import apply
from unet_surgery.ops.lowpass import LowPass, lowpass_filter
from unet_surgery.presets import build_unet, example_inputs, randomize_zero_init_

# ----------------------------------------------------------------------------- transcription
# assets/layer_settings/sd1.5.txt (= sd2.1.txt) and sdxl.txt, typed from the official repository.
OFFICIAL_SD15_LAYERS = [
    "down_blocks.2.resnets.0.conv1",
    "down_blocks.2.resnets.0.conv2",
    "down_blocks.2.resnets.1.conv1",
    "down_blocks.2.resnets.1.conv2",
    "down_blocks.2.downsamplers.0.conv",
    "down_blocks.3.resnets.0.conv1",
    "down_blocks.3.resnets.0.conv2",
    "down_blocks.3.resnets.1.conv1",
    "down_blocks.3.resnets.1.conv2",
    "up_blocks.0.resnets.0.conv1",
    "up_blocks.0.resnets.0.conv2",
    "up_blocks.0.resnets.1.conv1",
    "up_blocks.0.resnets.1.conv2",
    "up_blocks.0.resnets.2.conv1",
    "up_blocks.0.resnets.2.conv2",
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.1.resnets.0.conv1",
    "up_blocks.1.resnets.0.conv2",
    "up_blocks.1.resnets.1.conv1",
    "up_blocks.1.resnets.1.conv2",
    "up_blocks.1.resnets.2.conv1",
    "up_blocks.1.resnets.2.conv2",
    "up_blocks.1.upsamplers.0.conv",
    "up_blocks.2.resnets.0.conv1",
    "up_blocks.2.resnets.0.conv2",
    "up_blocks.2.resnets.1.conv1",
    "up_blocks.2.resnets.1.conv2",
    "up_blocks.2.resnets.2.conv1",
    "up_blocks.2.resnets.2.conv2",
    "up_blocks.2.upsamplers.0.conv",
    "mid_block.resnets.0.conv1",
    "mid_block.resnets.0.conv2",
    "mid_block.resnets.1.conv1",
    "mid_block.resnets.1.conv2",
]
OFFICIAL_SDXL_LAYERS = [
    "down_blocks.2.resnets.0.conv1",
    "down_blocks.2.resnets.0.conv2",
    "down_blocks.2.resnets.1.conv1",
    "down_blocks.2.resnets.1.conv2",
    "up_blocks.0.resnets.0.conv1",
    "up_blocks.0.resnets.0.conv2",
    "up_blocks.0.resnets.1.conv1",
    "up_blocks.0.resnets.1.conv2",
    "up_blocks.0.resnets.2.conv1",
    "up_blocks.0.resnets.2.conv2",
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.1.resnets.0.conv1",
    "up_blocks.1.resnets.0.conv2",
    "up_blocks.1.resnets.1.conv1",
    "up_blocks.1.resnets.1.conv2",
    "up_blocks.1.resnets.2.conv1",
    "up_blocks.1.resnets.2.conv2",
    "mid_block.resnets.0.conv1",
    "mid_block.resnets.0.conv2",
    "mid_block.resnets.1.conv1",
    "mid_block.resnets.1.conv2",
]


def official_lowpass_filter(input: Tensor, h_scale: float, w_scale: float, value: float) -> Tensor:
    B, C, H, W = input.shape
    H, R_h = H // 2, max(H // 8, 1)
    W, R_w = W // 2, max(W // 8, 1)
    ones_h = torch.ones(H, dtype=input.dtype)
    ones_w = torch.ones(W, dtype=input.dtype)
    if R_h == 0:
        mask_h = ones_h
    else:
        mask_h = torch.min(torch.max((1 - value) / R_h * (H / h_scale + 1 - torch.arange(H, dtype=input.dtype)) + 1,
                                     ones_h * value), ones_h)
    if R_w == 0:
        mask_w = ones_w
    else:
        mask_w = torch.min(torch.max((1 - value) / R_w * (W / w_scale + 1 - torch.arange(W, dtype=input.dtype)) + 1,
                                     ones_w * value), ones_w)
    mask = torch.ger(mask_h, mask_w)
    mask = torch.cat((torch.flip(mask, [1]), mask), 1)
    mask = torch.cat((torch.flip(mask, [0]), mask), 0)
    return mask.unsqueeze(0).unsqueeze(0).repeat(B // 3, C, 1, 1)


def official_weak_lowpass_filter(input: Tensor, h_scale: float, w_scale: float, value: float) -> Tensor:
    B, C, H, W = input.shape
    H, R_h = H // 2, (h_scale - 1) * H // (h_scale * 2)
    W, R_w = W // 2, (w_scale - 1) * W // (w_scale * 2)
    ones_h = torch.ones(H, dtype=input.dtype)
    ones_w = torch.ones(W, dtype=input.dtype)
    if R_h == 0:
        mask_h = ones_h
    else:
        mask_h = torch.min(torch.max((1 - value) / R_h * (H / h_scale + 1 - torch.arange(H, dtype=input.dtype)) + 1,
                                     ones_h * value), ones_h)
    if R_w == 0:
        mask_w = ones_w
    else:
        mask_w = torch.min(torch.max((1 - value) / R_w * (W / w_scale + 1 - torch.arange(W, dtype=input.dtype)) + 1,
                                     ones_w * value), ones_w)
    mask = torch.ger(mask_h, mask_w)
    mask = torch.cat((torch.flip(mask, [1]), mask), 1)
    mask = torch.cat((torch.flip(mask, [0]), mask), 0)
    return mask.unsqueeze(0).unsqueeze(0).repeat(B // 3, C, 1, 1)


FILTER_EFFECT: list[float] = []  # how much each official filter call changed its input (not official)


def official_filtered(module: nn.Conv2d, input: Tensor, dilation: float, h_base: float, w_base: float,
                      value: float, weak_value: float, weak_scale_floor: bool) -> Tensor:
    """The ``if self.apply_filter:`` block of both processors (float32 cast dropped)."""
    filtered_input = input
    r = int(max(math.ceil(filtered_input.shape[-2] / h_base), math.ceil(filtered_input.shape[-1] / w_base)))
    padding_size = (int(h_base * r), int(w_base * r))
    if (filtered_input.shape[-2], filtered_input.shape[-1]) == padding_size:
        pad_flag = False
    else:
        padding_height = padding_size[0] - filtered_input.shape[-2]
        padding_width = padding_size[1] - filtered_input.shape[-1]
        filtered_input = F.pad(filtered_input, (0, padding_width, 0, padding_height))
        pad_flag = True
    filtered_input_fft = torch.fft.fftn(filtered_input, dim=(-2, -1))
    filtered_input_fft = torch.fft.fftshift(filtered_input_fft, dim=(-2, -1))
    mask = official_lowpass_filter(filtered_input, max(dilation / module.stride[0], 1),
                                   max(dilation / module.stride[1], 1), value=value)
    if weak_scale_floor:  # SD1.5/2.1 processor
        weak_mask = official_weak_lowpass_filter(filtered_input, max(dilation / module.stride[0], 1),
                                                 max(dilation / module.stride[1], 1), value=weak_value)
    else:  # SDXL processor
        weak_mask = official_weak_lowpass_filter(filtered_input, dilation / module.stride[0],
                                                 dilation / module.stride[1], value=weak_value)
    low = filtered_input_fft * torch.cat([mask, mask, weak_mask], 0)
    low = torch.fft.ifftshift(low, dim=(-2, -1))
    low = torch.fft.ifftn(low, dim=(-2, -1)).real
    if pad_flag:
        low = low[:, :, :low.shape[-2] - padding_height, :low.shape[-1] - padding_width]
    FILTER_EFFECT.append(float((low[: len(low) // 3 * 2] - input[: len(low) // 3 * 2]).abs().max()))
    return low


def _set_dilation(module: nn.Conv2d, d: float) -> None:
    module.dilation = (int(math.ceil(d)), int(math.ceil(d)))  # noqa: RUF046  (as published)
    module.padding = (int(module.dilation[-2] * (module.weight.shape[-2] - 1) // 2),
                      int(module.dilation[-1] * (module.weight.shape[-1] - 1) // 2))


class OfficialFouriConv:
    """``FouriConvProcessor`` (``xl=False``) or ``FouriConvProcessor_XL`` (``xl=True``)."""

    def __init__(self, module, dilation, *, h_base=1.0, w_base=1.0, target_size=None, base_size=None,
                 xl=False, apply_filter=False, activate=False):
        self.module, self.dilation, self.xl = module, float(dilation), xl
        self.h_base, self.w_base = h_base, w_base
        self.target_size, self.base_size = target_size, base_size
        self.apply_filter, self.activate = apply_filter, activate

    def __call__(self, input: Tensor, **kwargs) -> Tensor:
        module = self.module
        if not self.activate or self.dilation == 1:
            return module._conv_forward(input, module.weight, module.bias)
        ori_dilation, ori_padding = module.dilation, module.padding
        _set_dilation(module, self.dilation)
        if self.apply_filter:
            if self.xl:
                down_ratio = self.target_size[0] / input.shape[-2]
                h_base, w_base = self.base_size[0] / down_ratio, self.base_size[1] / down_ratio
                input = official_filtered(module, input, self.dilation, h_base, w_base, 0.6, 0.6, False)
            else:
                input = official_filtered(module, input, self.dilation, self.h_base, self.w_base, 0.0, 0.0, True)
        if self.xl:
            B = len(input)
            output = module._conv_forward(input[:B // 3 * 2], module.weight, module.bias)
            _set_dilation(module, max(self.dilation / 1.5, 1))
            weak_output = module._conv_forward(input[-B // 3:], module.weight, module.bias)
            output = torch.cat([output, weak_output], 0)
        else:
            output = module._conv_forward(input, module.weight, module.bias)
        module.dilation, module.padding = ori_dilation, ori_padding
        return output


def official_cur_dilation(dilation: float, i: int, start_step: int, stop_step: int, progressive: bool = True) -> float:
    """text2image.py's per-step dilation."""
    if progressive and i >= start_step:
        return max((dilation - 1.0) * ((stop_step - i) / (stop_step - start_step)) + 1.0, 1.0)
    return dilation


def install_official(model: nn.Module, layers: list[str], i: int, *, dilation: float, start: int, stop: int,
                     xl: bool, base_latent: tuple[int, int], latent: tuple[int, int], levels: dict[str, int]) -> None:
    """pipeline_processor's loop body: a processor per listed layer for step ``i``.

    ``levels`` gives the layer's base feature size divisor (the official SD ``base_settings``
    file lists 64 / 2**level per layer; here the tiny base latent over the same power of 2).
    """
    for name, module in model.named_modules():
        if name in layers:
            cur = official_cur_dilation(dilation, i, start, stop)
            apply_filter = "upsamplers" not in name
            div = 2 ** levels[name]
            if xl:
                module.forward = OfficialFouriConv(
                    module, cur, target_size=(latent[0] * 8, latent[1] * 8),
                    base_size=(base_latent[0] * 8, base_latent[1] * 8), xl=True,
                    activate=i < stop, apply_filter=apply_filter)
            else:
                module.forward = OfficialFouriConv(
                    module, cur, h_base=base_latent[0] / div, w_base=base_latent[1] / div,
                    activate=i < stop, apply_filter=apply_filter)


# SD base_settings for the tiny SD1.5 layout (4 levels, like sd1.5.txt: 64, 32, 16, 8 at 512).
SD15_LEVEL = {p: int(p.split(".")[1]) if p.startswith("down") else (3 if p.startswith("mid") else 3 - int(p.split(".")[1]))
              for p in OFFICIAL_SD15_LAYERS}
SDXL_LEVEL = {p: 0 for p in OFFICIAL_SDXL_LAYERS}  # unused: the XL processor derives its base


# ----------------------------------------------------------------------------- helpers
TIMESTEPS = [float(t) for t in range(981, 0, -20)]  # 50 DDIM "leading" timesteps (steps_offset 1)


def _three(value):
    """[u, c] -> [u, c, c] along dim 0 (what the official loop feeds the UNet)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 2:
        return torch.cat([value[:1], value[1:], value[1:]])
    if isinstance(value, dict):
        return {k: _three(v) for k, v in value.items()}
    return value


def _double(value):
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _double(v) for k, v in value.items()}
    return value


def _run(model: nn.Module, inputs: dict) -> Tensor:
    with torch.no_grad():
        return model(**inputs).sample


@functools.cache
def _built(name: str) -> nn.Module:
    model = build_unet(name, size="tiny", device="cpu")
    randomize_zero_init_(model)
    return model.double()


def _models(name: str) -> tuple[nn.Module, nn.Module]:
    """The tiny UNet in float64 (built once per session) and a copy for the reference."""
    return copy.deepcopy(_built(name)), copy.deepcopy(_built(name))


def _recipe(layers: list[str], base_px: tuple[int, int], *, start: int, stop: int, value: float,
            progressive: bool = True) -> dict:
    ups = [p for p in layers if "upsamplers" in p]
    rest = [p for p in layers if "upsamplers" not in p]
    common = {"start_step": start, "stop_step": stop, "mask_value": value, "progressive": progressive}
    return {
        "name": "fouriscale-test", "base_resolution": list(base_px), "target_resolutions": [[base_px[0] * 2, base_px[1] * 2]],
        "passes": [
            {"type": "fouriscale", "select": {"paths": rest}, **common},
            *([{"type": "fouriscale", "select": {"paths": ups}, "filter": False, **common}] if ups else []),
        ],
    }


CASES = {
    # name: official layers, xl, levels
    "sd15": (OFFICIAL_SD15_LAYERS, False, SD15_LEVEL),
    "sdxl": (OFFICIAL_SDXL_LAYERS, True, SDXL_LEVEL),
}


# ----------------------------------------------------------------------------- UNet level


@pytest.mark.parametrize(
    ("name", "latent", "base_latent"),
    [("sd15", (16, 16), (4, 4)), ("sd15", (16, 32), (8, 8)), ("sdxl", (16, 16), (4, 4))],
    ids=["sd15", "sd15-wide", "sdxl"],
)
def test_patched_unet_equals_official_transcription(name: str, latent: tuple[int, int], base_latent: tuple[int, int]) -> None:
    """Dilation 4, so that the masks cut frequencies even on tiny feature maps."""
    layers, xl, levels = CASES[name]
    start, stop, value = (20, 35, 0.6) if xl else (20, 35, 0.0)
    model, reference = _models(name)
    inputs = _double(example_inputs(model, batch=2, height=latent[0] * 8, width=latent[1] * 8))
    dilation = max(math.ceil(latent[0] / base_latent[0]), math.ceil(latent[1] / base_latent[1]))
    recipe = _recipe(layers, (base_latent[0] * 8, base_latent[1] * 8), start=start, stop=stop, value=value)
    patch = apply(model, recipe, unet_map=preset_map(name, "tiny"), force=True)
    patch.set_timesteps(TIMESTEPS)
    for i in (27, 40):  # inside the window (progressive: fractional dilation), outside it
        step_inputs = dict(inputs, timestep=torch.tensor(TIMESTEPS[i], dtype=torch.float64))
        ours = _run(model, step_inputs)
        install_official(reference, layers, i, dilation=dilation, start=start, stop=stop, xl=xl,
                         base_latent=base_latent, latent=latent, levels=levels)
        FILTER_EFFECT.clear()
        official = _run(reference, {k: _three(v) for k, v in step_inputs.items()})
        assert (max(FILTER_EFFECT, default=0.0) > 1e-2) == (i < stop)  # the official filter really filters
        for mod in reference.modules():
            mod.__dict__.pop("forward", None)
        torch.testing.assert_close(ours, official[:2], rtol=0, atol=1e-6)
        assert (ours - official[:2]).abs().max() < 1e-9  # float64 rounding, far below the tolerance
        if i >= stop:  # outside the window: the plain UNet, bit for bit
            assert torch.equal(ours, _run(reference, step_inputs))
        elif latent == (16, 16):  # the pass really acts inside the window
            assert (ours - _run(reference, step_inputs)).abs().max() > 1e-4
    patch.remove()


# ----------------------------------------------------------------------------- op level


@pytest.mark.parametrize("value", [0.0, 0.6])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    ("hw", "base", "scale"),
    [((16, 16), (8, 8), 2.0), ((12, 20), (8, 8), 1.6), ((10, 6), (4, 6), 3.0), ((16, 32), (16, 16), 2.5)],
)
def test_filter_equals_official_mask_and_padding(hw, base, scale, stride, value) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, *hw, generator=gen, dtype=torch.float64)
    conv = nn.Conv2d(5, 5, 3, stride=stride, padding=1)
    # target_h == H: the layer's base size is base_hw itself
    ours = lowpass_filter(x, LowPass(scale, base, hw[0], value), (stride, stride))
    ours_weak = lowpass_filter(x, LowPass(scale, base, hw[0], value, weak=True), (stride, stride))
    official = official_filtered(conv, torch.cat([x, x, x]), scale, base[0], base[1], value, value, True)
    torch.testing.assert_close(ours, official[:3], rtol=0, atol=1e-12)
    torch.testing.assert_close(ours_weak, official[6:], rtol=0, atol=1e-12)
    assert ours.shape == x.shape


def test_filter_base_follows_the_layer_size() -> None:
    # At a layer 4 times smaller than the latent, the base is 4 times smaller too (official XL).
    x = torch.randn(1, 2, 8, 12, dtype=torch.float64)
    conv = nn.Conv2d(2, 2, 3, padding=1)
    ours = lowpass_filter(x, LowPass(2.0, (16, 16), 32, 0.6), (1, 1))
    official = official_filtered(conv, torch.cat([x, x, x]), 2.0, 16 / (32 / 8), 16 / (32 / 8), 0.6, 0.6, False)
    torch.testing.assert_close(ours, official[:1], rtol=0, atol=1e-12)


def test_filter_identities() -> None:
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    # A floor of 1 keeps every frequency; so does a strided conv at scale <= stride.
    torch.testing.assert_close(lowpass_filter(x, LowPass(2.0, (4, 4), 8, 1.0), (1, 1)), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(lowpass_filter(x, LowPass(2.0, (4, 4), 8, 0.0), (2, 2)), x, rtol=0, atol=1e-12)
    # A constant image is pure DC, which every mask keeps.
    c = torch.full((1, 1, 8, 8), 3.0, dtype=torch.float64)
    torch.testing.assert_close(lowpass_filter(c, LowPass(4.0, (8, 8), 8, 0.0), (1, 1)), c, rtol=0, atol=1e-12)
    # Half precision is filtered in float32 and cast back.
    h = lowpass_filter(x.half(), LowPass(2.0, (4, 4), 8, 0.0), (1, 1))
    assert h.dtype == torch.float16


# ----------------------------------------------------------------------------- builder


@pytest.mark.parametrize(
    ("name", "base", "target", "window", "value"),
    [  # configs/*.yaml of the official repository
        ("sd15", (512, 512), (1024, 1024), (10, 30), 0.0),
        ("sd15", (512, 512), (1280, 1280), (10, 30), 0.0),
        ("sd21", (512, 512), (1024, 2048), (20, 35), 0.0),
        ("sd15", (512, 512), (2048, 2048), (20, 35), 0.0),
        ("sdxl", (1024, 1024), (2048, 2048), (20, 35), 0.6),
        ("sdxl", (1024, 1024), (4096, 4096), (20, 35), 0.6),
    ],
)
def test_builder_selects_the_official_layers(name, base, target, window, value) -> None:
    from unet_surgery.passes import make_plan
    from unet_surgery.passes.fouriscale.builder import fouriscale_recipe

    listed = OFFICIAL_SDXL_LAYERS if name == "sdxl" else OFFICIAL_SD15_LAYERS
    unet_map = preset_map(name, "full")
    recipe = fouriscale_recipe(unet_map, base, target, guidance=False)  # the layers; guidance: test_fouriscale_guidance.py
    plan = make_plan(recipe, unet_map)
    assert sorted(plan.layers) == sorted(listed)
    unfiltered = sorted(p for c in recipe.passes if not c.filter for p in c.select.paths)
    assert unfiltered == sorted(p for p in listed if "upsamplers" in p)
    for c in recipe.passes:
        assert (c.start_step, c.stop_step, c.mask_value, c.dilation, c.progressive) == (*window, value, "auto", True)


# ----------------------------------------------------------------------------- patch mechanics


def test_apply_remove_is_bit_exact() -> None:
    model = copy.deepcopy(_built("sd15"))
    inputs = _double(example_inputs(model, batch=2, height=128, width=128))
    inputs["timestep"] = torch.tensor(TIMESTEPS[25], dtype=torch.float64)
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    base = _run(model, inputs)
    patch = apply(model, _recipe(OFFICIAL_SD15_LAYERS, (64, 64), start=20, stop=35, value=0.0),
                  unet_map=preset_map("sd15", "tiny"))
    patch.set_timesteps(TIMESTEPS)
    assert model.state_dict().keys() == before.keys()
    assert not torch.equal(_run(model, inputs), base)
    patch.remove()
    assert torch.equal(_run(model, inputs), base)
    after = model.state_dict()
    assert all(after[k].data_ptr() == p and torch.equal(after[k], v) for k, (p, v) in before.items())
    assert all(type(m).__name__ != "RedilatedConv2d" for m in model.modules())


def test_composes_with_noise_damped_cfg() -> None:
    """FouriScale on the main branch, ScaleCrafter's damped branch on its own table.

    Expected (the published noise-damped formula): uncond' = eps_v(u) and
    cond' = eps_v(u) + eps_d(c) - eps_d(u), with eps_d the official FouriScale UNet and eps_v
    the UNet whose listed convs are dilated by 2 (no filter; integer dilation in the official
    processor), every other conv plain.
    """
    damped = ["down_blocks.3.resnets.0.conv1", "mid_block.resnets.0.conv1", "mid_block.resnets.1.conv2",
              "down_blocks.1.resnets.0.conv1"]
    model, reference = _models("sd15")
    base_latent, latent, i = (8, 8), (16, 16), 27
    recipe = _recipe(OFFICIAL_SD15_LAYERS, (64, 64), start=20, stop=35, value=0.0)
    recipe["passes"].append({"type": "noise_damped_cfg", "select": {"paths": damped}, "factor": 2, "schedule": {"tau": 30}})
    inputs = _double(example_inputs(model, batch=2, height=128, width=128))
    inputs["timestep"] = torch.tensor(TIMESTEPS[i], dtype=torch.float64)
    patch = apply(model, recipe, unet_map=preset_map("sd15", "tiny"))
    patch.set_timesteps(TIMESTEPS)
    patch.enable_noise_damped_cfg()
    ours = _run(model, inputs)
    patch.remove()

    install_official(reference, OFFICIAL_SD15_LAYERS, i, dilation=2, start=20, stop=35, xl=False,
                     base_latent=base_latent, latent=latent, levels=SD15_LEVEL)
    eps_d = _run(reference, {k: _three(v) for k, v in inputs.items()})[:2]
    for mod in reference.modules():
        mod.__dict__.pop("forward", None)
    for name in damped:
        conv = reference.get_submodule(name)
        conv.forward = OfficialFouriConv(conv, 2, activate=True, apply_filter=False)
    eps_v = _run(reference, {k: v[:1] if isinstance(v, Tensor) and v.dim() and v.shape[0] == 2 else v
                             for k, v in inputs.items()})
    expected = torch.cat([eps_v, eps_v + eps_d[1:] - eps_d[:1]])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("latent", "value", "progressive"),
                         [((16, 32), 0.0, True), ((24, 24), 0.6, True), ((16, 32), 0.0, False),
                          ((20, 16), 0.0, True)])  # 2.5x the base height: ceil gives dilation 3
def test_setting_follows_the_official_schedule(latent: tuple[int, int], value: float, progressive: bool) -> None:
    """Per step: dilation ceil(d_i), filter scale d_i, base and target as the official XL processor.
    Without the progressive decay the full dilation runs up to step 29 and step 30 is plain."""
    from unet_surgery.ops.redilate import ConvSetting
    from unet_surgery.runtime import MAIN, UNetCall

    model = build_unet("sd15", size="tiny", device="meta")
    recipe = _recipe(OFFICIAL_SD15_LAYERS, (64, 64), start=10, stop=30, value=value, progressive=progressive)
    patch = apply(model, recipe, unet_map=preset_map("sd15", "tiny"))
    patch.set_timesteps(TIMESTEPS)
    dilation = max(math.ceil(latent[0] / 8), math.ceil(latent[1] / 8))  # text2image.py
    filtered = patch.plan.layers["mid_block.resnets.0.conv1"]
    upsampler = patch.plan.layers["up_blocks.0.upsamplers.0.conv"]
    for i, t in enumerate(TIMESTEPS):
        call = UNetCall(timestep=t, latent_hw=latent, batch=2, step=i)
        cur = official_cur_dilation(dilation, i, 10, 30, progressive)
        if i < 30:  # activate=i < stop_step
            lowpass = LowPass(cur, (8, 8), latent[0], value)
            assert patch.layer_setting(filtered, MAIN, call) == ConvSetting(math.ceil(cur), False, lowpass)
            assert patch.layer_setting(upsampler, MAIN, call) == ConvSetting(math.ceil(cur), False, None)
        else:
            assert patch.layer_setting(filtered, MAIN, call) == ConvSetting(1.0, False, None)
    patch.remove()


@pytest.mark.parametrize("n", [20, 25, 75])
def test_schedule_of_another_step_count_is_the_50_step_one_scaled(n: int) -> None:
    """start/stop are in units of a 50-step run (``steps: 50``): on an ``n``-step sampler the
    window is ``i < 30 * n / 50`` and the decay runs from ``10 * n / 50`` (n = 25: step 14 is
    the last active one, 15 plain)."""
    from unet_surgery.ops.redilate import ConvSetting
    from unet_surgery.runtime import MAIN, UNetCall

    model = build_unet("sd15", size="tiny", device="meta")
    patch = apply(model, _recipe(OFFICIAL_SD15_LAYERS, (64, 64), start=10, stop=30, value=0.0),
                  unet_map=preset_map("sd15", "tiny"))
    timesteps = [999.0 - i * 999.0 / (n - 1) for i in range(n)]
    patch.set_timesteps(timesteps)
    latent, dilation = (16, 32), 4.0  # max(ceil(16 / 8), ceil(32 / 8))
    start, stop = 10 * n / 50, 30 * n / 50
    filtered = patch.plan.layers["mid_block.resnets.0.conv1"]
    active = []
    for i, t in enumerate(timesteps):
        got = patch.layer_setting(filtered, MAIN, UNetCall(timestep=t, latent_hw=latent, batch=1, step=i))
        if i < stop:
            cur = official_cur_dilation(dilation, i, start, stop)  # type: ignore[arg-type]
            assert got == ConvSetting(math.ceil(cur), False, LowPass(cur, (8, 8), latent[0], 0.0)), i
            active.append(i)
        else:
            assert got == ConvSetting(1.0, False, None), i
    assert active == list(range(math.ceil(stop)))
    patch.remove()


# assets/base_settings/sdxl.txt, typed from the official repository ("h/w:height,width").
OFFICIAL_SDXL_BASE_SETTINGS = """0.25:512,2048
0.26:512,1984
0.27:512,1920
0.28:512,1856
0.32:576,1792
0.33:576,1728
0.35:576,1664
0.4:640,1600
0.42:640,1536
0.48:704,1472
0.5:704,1408
0.52:704,1344
0.57:768,1344
0.6:768,1280
0.68:832,1216
0.72:832,1152
0.78:896,1152
0.82:896,1088
0.88:960,1088
0.94:960,1024
1.0:1024,1024
1.07:1024,960
1.13:1088,960
1.21:1088,896
1.29:1152,896
1.38:1152,832
1.46:1216,832
1.67:1280,768
1.75:1344,768
2.0:1408,704
2.09:1472,704
2.4:1536,640
2.5:1600,640
2.89:1664,576
3.0:1728,576
3.11:1792,576
3.62:1856,512
3.75:1920,512
3.88:1984,512
4.0:2048,512"""


def official_find_smallest_padding_pair(height: int, width: int, base_settings: dict) -> tuple:
    """text2image_xl.py's find_smallest_padding_pair, transcribed."""
    min_padding_size = float("inf")
    result_pair = None
    for _aspect_ratio, size in base_settings.items():
        base_height, base_width = size
        scale_height = math.ceil(height / base_height)
        scale_width = math.ceil(width / base_width)
        if scale_height == scale_width:
            padding_height = base_height * scale_height
            padding_width = base_width * scale_width
            padding_size = (padding_height - height) + (padding_width - width)
            if padding_size < min_padding_size and padding_height >= height and padding_width >= width:
                min_padding_size = padding_size
                result_pair = (base_height, base_width)
    return result_pair


@pytest.mark.parametrize("target", [(2048, 2048), (2560, 2560), (2048, 4096), (4096, 4096), (1536, 2560),
                                    (3072, 1024), (1280, 3200), (2304, 1792), (4096, 1024), (1080, 1920)])
def test_sdxl_base_size_is_the_official_table_pick(target: tuple[int, int]) -> None:
    from unet_surgery.passes.fouriscale.builder import fouriscale_recipe, table_base_size

    table = {}
    for line in OFFICIAL_SDXL_BASE_SETTINGS.splitlines():  # read_base_settings
        aspect_ratio, dilate = line.split(":")
        table[aspect_ratio] = [float(s) for s in dilate.split(",")]
    expected = official_find_smallest_padding_pair(*target, table)
    assert table_base_size(target) == tuple(int(v) for v in expected)
    recipe = fouriscale_recipe(preset_map("sdxl", "full"), 1024, target, guidance=False)
    (config, *_) = recipe.passes
    ref = config.base_size or recipe.base_resolution
    assert tuple(ref) == tuple(int(v) for v in expected)
