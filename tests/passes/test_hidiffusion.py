"""HiDiffusion (RAU-Net + MSW-MSA) equals a transcription of the official code.

The reference is the official module replacement (megvii-research/HiDiffusion @ e9ec39a,
``hidiffusion/hidiffusion.py``) transcribed below by hand and installed on a deep copy of
the model, exactly as ``apply_hidiffusion`` installs it: class swaps of the listed modules,
``num_upsamplers += 12`` and a pre-hook recording the input size. Its per-module step
counters are set to the step under test (the official counters advance once per UNet call).
MSW-MSA draws its shift from torch's global generator in both, so seeding it before each call
makes the draws equal. Expected module lists and thresholds are typed from the official code.
"""

from __future__ import annotations

import copy
import functools
import math
import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import preset_map
from unet_surgery import apply, load_recipe
from unet_surgery.errors import RecipeError, SelectionError
from unet_surgery.ops import redilated_conv
from unet_surgery.passes import make_plan
from unet_surgery.presets import build_unet, example_inputs, preset_config, randomize_zero_init_
from unet_surgery.recipes import parse_recipe, to_data
from unet_surgery.recipes.hidiffusion import hidiffusion_recipe

# ============================================================================================
# Transcription of the official code (diffusers 0.42 names: ``use_layer_norm`` is
# ``norm_type == "layer_norm"``; the ControlNet, LoRA, FreeU and gradient-checkpointing
# branches, inactive here, are left out).
# ============================================================================================

switching_threshold_ratio_dict = {
    "sd15_1024": {"T1_ratio": 0.4, "T2_ratio": 0.0},
    "sd15_2048": {"T1_ratio": 0.7, "T2_ratio": 0.3},
    "sdxl_2048": {"T1_ratio": 0.4, "T2_ratio": 0.0},
    "sdxl_4096": {"T1_ratio": 0.7, "T2_ratio": 0.3},
    "sdxl_turbo_1024": {"T1_ratio": 0.5, "T2_ratio": 0.0},
}
text_to_img_controlnet_switching_threshold_ratio_dict = {
    "sdxl_2048": {"T1_ratio": 0.5, "T2_ratio": 0.0},
}
is_aggressive_raunet = True
aggressive_step = 8
inpainting_is_aggressive_raunet = False
playground_is_aggressive_raunet = False
# The latent side from which the official code uses its "4x" rows (``ori_H < 256`` for SD1.5,
# ``< 512`` for SDXL). A test of the 4x rows lowers them to its tiny latent (a 2048-pixel
# SD1.5 latent has 65536 tokens at the windowed level, too large for a CPU test); the rest of
# the official forward is unchanged.
FOUR_X_FROM = {"sd15": 256, "sdxl": 512}


def sd15_hidiffusion_key() -> dict[str, list[str]]:
    return {
        "down_module_key": ["down_blocks.0.downsamplers.0.conv"],
        "down_module_key_extra": ["down_blocks.1"],
        "up_module_key": ["up_blocks.2.upsamplers.0.conv"],
        "up_module_key_extra": ["up_blocks.2"],
        "windown_attn_module_key": [
            "down_blocks.0.attentions.0.transformer_blocks.0",
            "down_blocks.0.attentions.1.transformer_blocks.0",
            "up_blocks.3.attentions.0.transformer_blocks.0",
            "up_blocks.3.attentions.1.transformer_blocks.0",
            "up_blocks.3.attentions.2.transformer_blocks.0",
        ],
    }


def sdxl_hidiffusion_key() -> dict[str, list[str]]:
    return {
        "down_module_key": ["down_blocks.1"],
        "down_module_key_extra": ["down_blocks.1.downsamplers.0.conv"],
        "up_module_key": ["up_blocks.1"],
        "up_module_key_extra": ["up_blocks.0.upsamplers.0.conv"],
        "windown_attn_module_key": [
            f"{b}.attentions.{a}.transformer_blocks.{t}"
            for b, n in (("down_blocks.1", 2), ("up_blocks.1", 3))
            for a in range(n)
            for t in range(2)
        ],
    }


def sdxl_turbo_hidiffusion_key() -> dict[str, list[str]]:
    keys = sdxl_hidiffusion_key()
    return {k: keys[k] for k in ("down_module_key", "up_module_key", "windown_attn_module_key")}


def _switching_ratio(self: Any) -> None:
    """The threshold block every official forward repeats."""
    self.max_timestep = self.info["pipeline"]._num_timesteps
    ori_H, ori_W = self.info["size"]
    if self.model == "sd15":
        if ori_H < FOUR_X_FROM["sd15"] or ori_W < FOUR_X_FROM["sd15"]:
            self.T1_ratio = switching_threshold_ratio_dict["sd15_1024"][self.switching_threshold_ratio]
        else:
            self.T1_ratio = switching_threshold_ratio_dict["sd15_2048"][self.switching_threshold_ratio]
    elif self.model == "sdxl":
        if ori_H < FOUR_X_FROM["sdxl"] or ori_W < FOUR_X_FROM["sdxl"]:
            if self.info["text_to_img_controlnet"]:
                self.T1_ratio = text_to_img_controlnet_switching_threshold_ratio_dict["sdxl_2048"][self.switching_threshold_ratio]
            else:
                self.T1_ratio = switching_threshold_ratio_dict["sdxl_2048"][self.switching_threshold_ratio]
            if self.info["is_inpainting_task"]:
                self.aggressive_raunet = inpainting_is_aggressive_raunet
            elif self.info["is_playground"]:
                self.aggressive_raunet = playground_is_aggressive_raunet
            else:
                self.aggressive_raunet = is_aggressive_raunet
        else:
            self.T1_ratio = switching_threshold_ratio_dict["sdxl_4096"][self.switching_threshold_ratio]
    elif self.model == "sdxl_turbo":
        self.T1_ratio = switching_threshold_ratio_dict["sdxl_turbo_1024"][self.switching_threshold_ratio]


def _block_thresholds(self: Any) -> None:
    if self.aggressive_raunet:
        self.T1_start = int(aggressive_step / 50 * self.max_timestep)
        self.T1_end = int(self.max_timestep * self.T1_ratio)
        self.T1 = 0
    else:
        self.T1 = int(self.max_timestep * self.T1_ratio)


def _sampler_thresholds(self: Any) -> None:
    if self.aggressive_raunet:
        self.T1 = int(aggressive_step / 50 * self.max_timestep)
    else:
        self.T1 = int(self.max_timestep * self.T1_ratio)


def _tick(self: Any) -> None:
    self.timestep += 1
    if self.timestep == self.max_timestep:
        self.timestep = 0


class _Counters:
    timestep = 0
    aggressive_raunet = False
    T1_ratio = 0
    T1_start = 0
    T1_end = 0
    T1 = 0
    max_timestep = 50


def make_transformer_block(block_class):
    class transformer_block(block_class):
        _parent = block_class

        def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                    encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                    class_labels=None, added_cond_kwargs=None):
            def window_partition(x, window_size, shift_size, H, W):
                B, N, C = x.shape  # noqa: RUF059 (transcribed as published)
                x = x.view(B, H, W, C)
                if H % 2 != 0 or W % 2 != 0:
                    x = F.interpolate(x.permute(0, 3, 1, 2).contiguous(), size=(window_size[0] * 2, window_size[1] * 2),
                                      mode="bicubic").permute(0, 2, 3, 1).contiguous()
                if shift_size[0] > 0:
                    x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
                x = x.view(B, 2, window_size[0], 2, window_size[1], C)
                windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size[0], window_size[1], C)
                return windows.view(-1, window_size[0] * window_size[1], C)

            def window_reverse(windows, window_size, H, W, shift_size):
                B, N, C = windows.shape  # noqa: RUF059 (transcribed as published)
                windows = windows.view(-1, window_size[0], window_size[1], C)
                B = int(windows.shape[0] / 4)
                x = windows.view(B, 2, 2, window_size[0], window_size[1], -1)
                x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, window_size[0] * 2, window_size[1] * 2, -1)
                if shift_size[0] > 0:
                    x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
                if H % 2 != 0 or W % 2 != 0:
                    x = F.interpolate(x.permute(0, 3, 1, 2).contiguous(), size=(H, W),
                                      mode="bicubic").permute(0, 2, 3, 1).contiguous()
                return x.view(B, H * W, C)

            assert self.norm_type == "layer_norm" and self.pos_embed is None
            norm_hidden_states = self.norm1(hidden_states)
            rand_num = torch.rand(1)
            B, N, C = hidden_states.shape  # noqa: RUF059 (transcribed as published)
            ori_H, ori_W = self.info["size"]
            downsample_ratio = round(((ori_H * ori_W) / N) ** 0.5)
            H, W = (math.ceil(ori_H / downsample_ratio), math.ceil(ori_W / downsample_ratio))
            widow_size = (math.ceil(H / 2), math.ceil(W / 2))
            if rand_num <= 0.25:
                shift_size = (0, 0)
            if rand_num > 0.25 and rand_num <= 0.5:
                shift_size = (widow_size[0] // 4, widow_size[1] // 4)
            if rand_num > 0.5 and rand_num <= 0.75:
                shift_size = (widow_size[0] // 4 * 2, widow_size[1] // 4 * 2)
            if rand_num > 0.75 and rand_num <= 1:
                shift_size = (widow_size[0] // 4 * 3, widow_size[1] // 4 * 3)
            norm_hidden_states = window_partition(norm_hidden_states, widow_size, shift_size, H, W)
            cross_attention_kwargs = cross_attention_kwargs.copy() if cross_attention_kwargs is not None else {}
            attn_output = self.attn1(
                norm_hidden_states,
                encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                attention_mask=attention_mask,
                **cross_attention_kwargs,
            )
            attn_output = window_reverse(attn_output, widow_size, H, W, shift_size)
            hidden_states = attn_output + hidden_states
            if self.attn2 is not None:
                norm_hidden_states = self.norm2(hidden_states)
                attn_output = self.attn2(norm_hidden_states, encoder_hidden_states=encoder_hidden_states,
                                         attention_mask=encoder_attention_mask, **cross_attention_kwargs)
                hidden_states = attn_output + hidden_states
            norm_hidden_states = self.norm3(hidden_states)
            ff_output = self.ff(norm_hidden_states)
            return ff_output + hidden_states

    return transformer_block


def make_cross_attn_down_block(block_class):
    class cross_attn_down_block(_Counters, block_class):
        _parent = block_class

        def forward(self, hidden_states, temb=None, encoder_hidden_states=None, attention_mask=None,
                    cross_attention_kwargs=None, encoder_attention_mask=None, additional_residuals=None):
            _switching_ratio(self)
            _block_thresholds(self)
            output_states = ()
            blocks = list(zip(self.resnets, self.attentions))  # noqa: B905 (transcribed as published)
            for i, (resnet, attn) in enumerate(blocks):
                hidden_states = resnet(hidden_states, temb)
                hidden_states = attn(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                     cross_attention_kwargs=cross_attention_kwargs, attention_mask=attention_mask,
                                     encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]
                if i == len(blocks) - 1 and additional_residuals is not None:
                    hidden_states = hidden_states + additional_residuals
                if i == 0:  # noqa: SIM102 (transcribed as published)
                    if (self.aggressive_raunet and self.timestep >= self.T1_start and self.timestep < self.T1_end) or self.timestep < self.T1:
                        self.info["upsample_size"] = (hidden_states.shape[2], hidden_states.shape[3])
                        hidden_states = F.avg_pool2d(hidden_states, kernel_size=(2, 2), ceil_mode=True)
                output_states = output_states + (hidden_states,)  # noqa: RUF005 (transcribed as published)
            if self.downsamplers is not None:
                for downsampler in self.downsamplers:
                    hidden_states = downsampler(hidden_states)
                output_states = output_states + (hidden_states,)  # noqa: RUF005 (transcribed as published)
            _tick(self)
            return hidden_states, output_states

    return cross_attn_down_block


def make_cross_attn_up_block(block_class):
    class cross_attn_up_block(_Counters, block_class):
        _parent = block_class

        def forward(self, hidden_states, res_hidden_states_tuple, temb=None, encoder_hidden_states=None,
                    cross_attention_kwargs=None, upsample_size=None, attention_mask=None,
                    encoder_attention_mask=None):
            _switching_ratio(self)
            _block_thresholds(self)
            for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):  # noqa: B905 (transcribed as published)
                res_hidden_states = res_hidden_states_tuple[-1]
                res_hidden_states_tuple = res_hidden_states_tuple[:-1]
                hidden_states = torch.cat([hidden_states, res_hidden_states], dim=1)
                hidden_states = resnet(hidden_states, temb)
                hidden_states = attn(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                     cross_attention_kwargs=cross_attention_kwargs, attention_mask=attention_mask,
                                     encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]
                if i == 1:  # noqa: SIM102 (transcribed as published)
                    if (self.aggressive_raunet and self.timestep >= self.T1_start and self.timestep < self.T1_end) or self.timestep < self.T1:
                        hidden_states = F.interpolate(hidden_states, size=self.info["upsample_size"], mode="bicubic")
            if self.upsamplers is not None:
                for upsampler in self.upsamplers:
                    hidden_states = upsampler(hidden_states, upsample_size)
            _tick(self)
            return hidden_states

    return cross_attn_up_block


def make_downsampler_block(block_class):
    class downsampler_block(_Counters, block_class):
        _parent = block_class

        def forward(self, hidden_states, scale=1.0):
            _switching_ratio(self)
            _sampler_thresholds(self)
            if self.timestep < self.T1:
                self.ori_stride, self.ori_padding, self.ori_dilation = self.stride, self.padding, self.dilation
                self.stride, self.padding, self.dilation = (4, 4), (2, 2), (2, 2)
            hidden_states = F.conv2d(hidden_states, self.weight, self.bias, self.stride, self.padding,
                                     self.dilation, self.groups)
            if self.timestep < self.T1:
                self.stride, self.padding, self.dilation = self.ori_stride, self.ori_padding, self.ori_dilation
            _tick(self)
            return hidden_states

    return downsampler_block


def make_upsampler_block(block_class):
    class upsampler_block(_Counters, block_class):
        _parent = block_class

        def forward(self, hidden_states, scale=1.0):
            _switching_ratio(self)
            _sampler_thresholds(self)
            _tick(self)
            return F.conv2d(hidden_states, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    return upsampler_block


def apply_hidiffusion(diffusion_model, model: str, num_steps: int = 50, apply_raunet=True, apply_window_attn=True,
                      *, controlnet: bool = False, inpainting: bool = False, playground: bool = False):
    """``apply_hidiffusion`` for a bare UNet of a known family (``model``: sd15, sdxl or
    sdxl_turbo); the flags are what the official code reads from the pipeline (``hasattr(model,
    'controlnet')``, ``'inpainting'`` / ``'playground'`` in its ``name_or_path``)."""
    diffusion_model.num_upsamplers += 12
    info = {"size": None, "upsample_size": None, "hooks": [], "text_to_img_controlnet": controlnet,
            "is_inpainting_task": inpainting, "is_playground": playground,
            "pipeline": types.SimpleNamespace(_num_timesteps=num_steps)}
    diffusion_model.info = info

    def hook(module, args):
        module.info["size"] = (args[0].shape[2], args[0].shape[3])

    info["hooks"].append(diffusion_model.register_forward_pre_hook(hook))
    if model == "sdxl_turbo":  # the official turbo branch: the pooling pair on T1, windows
        keys = sdxl_turbo_hidiffusion_key()
        for key, module in diffusion_model.named_modules():
            if apply_raunet and key in keys["down_module_key"]:
                module.__class__ = make_cross_attn_down_block(module.__class__)
                module.switching_threshold_ratio = "T1_ratio"
            if apply_raunet and key in keys["up_module_key"]:
                module.__class__ = make_cross_attn_up_block(module.__class__)
                module.switching_threshold_ratio = "T1_ratio"
            if apply_window_attn and key in keys["windown_attn_module_key"]:
                module.__class__ = make_transformer_block(module.__class__)
            module.model = model
            module.info = info
        return diffusion_model
    keys = sd15_hidiffusion_key() if model == "sd15" else sdxl_hidiffusion_key()
    # sd15: convs switch on T1, blocks on T2; sdxl: blocks on T1, convs on T2.
    conv_ratio, block_ratio = ("T1_ratio", "T2_ratio") if model == "sd15" else ("T2_ratio", "T1_ratio")
    down_conv = keys["down_module_key" if model == "sd15" else "down_module_key_extra"]
    down_block = keys["down_module_key_extra" if model == "sd15" else "down_module_key"]
    up_conv = keys["up_module_key" if model == "sd15" else "up_module_key_extra"]
    up_block = keys["up_module_key_extra" if model == "sd15" else "up_module_key"]
    for key, module in diffusion_model.named_modules():
        if apply_raunet and key in down_conv:
            module.__class__ = make_downsampler_block(module.__class__)
            module.switching_threshold_ratio = conv_ratio
        if apply_raunet and key in down_block:
            module.__class__ = make_cross_attn_down_block(module.__class__)
            module.switching_threshold_ratio = block_ratio
        if apply_raunet and key in up_conv:
            module.__class__ = make_upsampler_block(module.__class__)
            module.switching_threshold_ratio = conv_ratio
        if apply_raunet and key in up_block:
            module.__class__ = make_cross_attn_up_block(module.__class__)
            module.switching_threshold_ratio = block_ratio
        if apply_window_attn and key in keys["windown_attn_module_key"]:
            module.__class__ = make_transformer_block(module.__class__)
        module.model = model
        module.info = info
    return diffusion_model


# ============================================================================================
# Helpers
# ============================================================================================

TIMESTEPS = torch.arange(980, -1, -20)  # a 50-step trajectory; step i runs at TIMESTEPS[i]
RECIPES = {"sd15": "hidiffusion-sd15-1024x1024", "sdxl": "hidiffusion-sdxl-2048x2048"}


@functools.cache
def tiny(name: str) -> torch.nn.Module:
    """One float64 tiny model per preset for the whole module (every test removes its patch)."""
    dtype = torch.float32 if name.startswith("ldm") else torch.float64  # LDM runs float32 only
    model = build_unet(name, size="tiny", device="cpu", dtype=dtype)
    randomize_zero_init_(model)
    return model


def inputs_for(model, hw: tuple[int, int], batch: int = 1, seed: int = 1) -> dict[str, Any]:
    dtype = next(model.parameters()).dtype
    return example_inputs(model, batch=batch, height=hw[0] * 8, width=hw[1] * 8, seed=seed, dtype=dtype)


def at_step(inputs: dict[str, Any], step: int) -> dict[str, Any]:
    sample, timestep = ("sample", "timestep") if "sample" in inputs else ("x", "timesteps")  # diffusers / LDM
    return {**inputs, timestep: torch.full((inputs[sample].shape[0],), int(TIMESTEPS[step]))}


def _sample(out: Any) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else out


def official_out(ref, inputs: dict[str, Any], step: int, seed: int = 0) -> torch.Tensor:
    """One official call at ``step``: counters set to the step, called as pipelines do (positional)."""
    for module in ref.modules():
        if hasattr(type(module), "_parent"):
            module.timestep = step
    kwargs = dict(at_step(inputs, step))
    sample, timestep = kwargs.pop("sample"), kwargs.pop("timestep")
    torch.manual_seed(seed)
    with torch.no_grad():
        return ref(sample, timestep, **kwargs).sample


def patched_out(model, inputs: dict[str, Any], step: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return _sample(model(**at_step(inputs, step)))


@functools.cache
def _official(name: str, apply_raunet: bool, apply_window_attn: bool):
    return apply_hidiffusion(copy.deepcopy(tiny(name)), name, apply_raunet=apply_raunet,
                             apply_window_attn=apply_window_attn)


def official_copy(model, name: str, apply_raunet: bool = True, apply_window_attn: bool = True):
    """The official HiDiffusion installed on a deep copy of ``tiny(name)`` (cached)."""
    assert model is tiny(name)
    return _official(name, apply_raunet, apply_window_attn)


# ============================================================================================
# Equality with the official code
# ============================================================================================

# Official windows (num_steps 50): sd15 at 1024: downsampler while step < 20. sdxl at 2048
# (aggressive): downsampler while step < 8, pooling on [8, 20). MSW-MSA on every step.
CASES = [
    ("sd15", (16, 32), [0, 19, 20]),
    ("sd15", (17, 23), [0]),  # odd grid: MSW-MSA's bicubic resize; the UNet forwards sizes
    ("sdxl", (32, 32), [7, 8, 19, 20]),
    ("sdxl", (33, 47), [12]),  # odd latent: the UNet forwards sizes; ceil grids at the pooled level
]


@pytest.mark.parametrize(("name", "hw", "steps"), CASES)
def test_shipped_recipe_equals_official_code(name, hw, steps) -> None:
    model = tiny(name)
    ref = official_copy(model, name)
    inputs = inputs_for(model, hw)
    with apply(model, RECIPES[name], unet_map=preset_map(name, "tiny"), force=True) as patch:
        patch.set_timesteps(TIMESTEPS)
        for step in steps:
            out = patched_out(model, inputs, step, seed=step)
            expected = official_out(ref, inputs, step, seed=step)
            assert out.shape == expected.shape
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


# 4x area (the official "sd15_2048" / "sdxl_4096" rows): both RAU-Net pairs act on the first
# steps (sd15: downsampler while step < 35, pooling while step < 15; sdxl: pooling while
# step < 35, downsampler while step < 15), each pair with its own recorded size.
FOUR_X = [("sd15", 512, 2048, (32, 64), [0, 14, 15, 35]), ("sdxl", 1024, 4096, (32, 32), [0, 14, 15, 35])]


@pytest.mark.parametrize(("name", "base", "target", "hw", "steps"), FOUR_X)
def test_builder_at_4x_area_equals_official_code(name, base, target, hw, steps, monkeypatch) -> None:
    """The builder's 4x recipe against the official 4x rows over the switching steps; at
    step 0 both pairs act in the same UNet call (two recorded sizes in flight at once)."""
    monkeypatch.setitem(FOUR_X_FROM, name, min(hw))
    model = tiny(name)
    ref = apply_hidiffusion(copy.deepcopy(model), name)
    inputs = inputs_for(model, hw)
    unet_map = preset_map(name, "tiny")
    recipe = hidiffusion_recipe(unet_map, base, target)
    assert len([p for p in recipe.passes if type(p).type == "rau_net"]) == 2
    with apply(model, recipe, unet_map=unet_map, force=True) as patch:
        patch.set_timesteps(TIMESTEPS)
        for step in steps:
            out = patched_out(model, inputs, step, seed=step)
            expected = official_out(ref, inputs, step, seed=step)
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


# Latents that halve evenly to the deepest level but not once RAU-Net reduced them, so the
# plain 2x upsampling misses a skip (diffusers forwards no sizes: every side is a multiple
# of 2**num_upsamplers). sd15 40x56: 40 -4x-> 10 -pool-> 5 -> 3 -> 2, and 2 * 2 != 3; at step
# 20 (downsampler alone) 10 -> 5 -> 3, 2 * 3 != 5. sdxl 36x44: 36 -> 18 -pool-> 9 -> 5 at
# step 20 (pooling alone), 2 * 5 != 9; at step 0 the downsampler pair reduces 9 -4x-> 3.
UNEVEN = [("sd15", 512, 2048, (40, 56), [0, 20]), ("sdxl", 1024, 4096, (36, 44), [0, 20])]


@pytest.mark.parametrize(("name", "base", "target", "hw", "steps"), UNEVEN)
def test_builder_at_4x_area_on_sizes_that_halve_unevenly_equals_official_code(
    name, base, target, hw, steps, monkeypatch
) -> None:
    """The official code forwards every skip size to its upsampler (``num_upsamplers += 12``);
    the samplers below a RAU-Net pair keep their level's size, which is the same computation."""
    monkeypatch.setitem(FOUR_X_FROM, name, min(hw))
    model = tiny(name)
    ref = apply_hidiffusion(copy.deepcopy(model), name)
    inputs = inputs_for(model, hw)
    unet_map = preset_map(name, "tiny")
    with apply(model, hidiffusion_recipe(unet_map, base, target), unet_map=unet_map, force=True) as patch:
        patch.set_timesteps(TIMESTEPS)
        for step in steps:
            out = patched_out(model, inputs, step, seed=step)
            expected = official_out(ref, inputs, step, seed=step)
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_toy_eps_at_4x_per_side_restores_before_the_first_unpooled_skip() -> None:
    """toy-eps has one transformer per down stage (layers_per_block 1), two per up stage. The
    pooled skip of down transformer 0 is taken by up resnet 0; up resnet 1 takes the level's
    unpooled input, so the size must be back after up transformer 0 (the published ``i == 1``
    fits only two transformers per down stage). Sampled as the demo does, 128x128 from 32."""
    from unet_surgery.demo import recipe_for
    from unet_surgery.graph import map_unet
    from unet_surgery.toy.model import load_toy
    from unet_surgery.toy.sampling import sample_recipe

    toy = load_toy("toy-eps")
    unet_map = map_unet(toy.unet, latent_hw=(64, 64))
    recipe = recipe_for("hidiffusion", unet_map, 128)
    pool_pass = next(i for i, p in enumerate(recipe.passes) if "attention" in (p.select.op or ()))
    blocks = set(make_plan(recipe, unet_map).planned_by(pool_pass))
    assert {"down_blocks.1.attentions.0", "up_blocks.2.attentions.0"} <= blocks
    assert "up_blocks.2.attentions.1" not in blocks
    steps = 4  # int(4 * 0.3) = 1: step 0 has both pairs, steps 1-1 the downsampler alone
    plain = sample_recipe(toy, None, torch.tensor([1]), seeds=[5], size=128, steps=steps)
    patched = sample_recipe(toy, recipe, torch.tensor([1]), seeds=[5], size=128, steps=steps, unet_map=unet_map)
    assert patched.shape == plain.shape == (1, 3, 128, 128)
    assert torch.isfinite(patched).all() and not patched.equal(plain)


# The official settings picked from the pipeline. Official windows: sdxl-turbo at 4 steps:
# pooling while step < int(4 * 0.5) = 2; inpainting / playground at 2048: pooling while
# step < 20, no downsampler (T2 0, not aggressive); controlnet at 2048: downsampler while
# step < 8, pooling on [8, 25); at 4x area the flags change nothing (sdxl_4096 row). SD1.5
# reads no flag. ``differs`` is a step where the variant's setting is not the standard one.
VARIANT_CASES = [
    ("sdxl", "sdxl-turbo", 512, 1024, (32, 32), 4, [0, 1, 2, 3], 1),
    ("sdxl", "inpainting", 1024, 2048, (32, 32), 50, [0, 8, 19, 20], 0),
    ("sdxl", "playground", 1024, 2048, (32, 40), 50, [7, 19, 20], 7),
    ("sdxl", "controlnet", 1024, 2048, (32, 32), 50, [7, 8, 24, 25], 22),
    ("sdxl", "controlnet", 1024, 4096, (32, 32), 50, [14, 15, 35], None),
    ("sd15", "inpainting", 512, 1024, (16, 32), 50, [0, 19, 20], None),
]
OFFICIAL_FLAGS = {"inpainting": {"inpainting": True}, "playground": {"playground": True},
                  "controlnet": {"controlnet": True}, "sdxl-turbo": {}}


@pytest.mark.parametrize(("name", "variant", "base", "target", "hw", "num_steps", "steps", "differs"), VARIANT_CASES)
def test_builder_variant_equals_official_code(name, variant, base, target, hw, num_steps, steps, differs,
                                              monkeypatch) -> None:
    if target >= 4 * base:
        monkeypatch.setitem(FOUR_X_FROM, name, min(hw))
    model = tiny(name)
    official_model = "sdxl_turbo" if variant == "sdxl-turbo" else name
    ref = apply_hidiffusion(copy.deepcopy(model), official_model, num_steps, **OFFICIAL_FLAGS[variant])
    timesteps = torch.linspace(999, 0, num_steps).round().long()
    inputs = inputs_for(model, hw)
    unet_map = preset_map(name, "tiny")

    def call(unet, step, official):
        kwargs = {**inputs, "timestep": torch.full((1,), int(timesteps[step]))}
        if official:
            for module in unet.modules():
                if hasattr(type(module), "_parent"):
                    module.timestep = step
        torch.manual_seed(step)
        with torch.no_grad():
            return _sample(unet(kwargs.pop("sample"), kwargs.pop("timestep"), **kwargs) if official else unet(**kwargs))

    outs = {}
    for which in (variant, "standard"):
        with apply(model, hidiffusion_recipe(unet_map, base, target, variant=which), unet_map=unet_map, force=True) as patch:
            patch.set_timesteps(timesteps)
            outs[which] = {step: call(model, step, False) for step in [*steps, differs] if step is not None}
    for step in steps:
        torch.testing.assert_close(outs[variant][step], call(ref, step, True), rtol=0, atol=1e-6)
    if differs is not None:  # the variant is a setting of its own there
        assert (outs[variant][differs] - outs["standard"][differs]).abs().max() > 1e-3


def test_turbo_setting_needs_an_sdxl_like_map() -> None:
    with pytest.raises(SelectionError, match=r"sdxl-turbo.*SD1\.5-like"):
        hidiffusion_recipe(preset_map("sd15", "tiny"), 512, 1024, variant="sdxl-turbo")
    with pytest.raises(SelectionError, match="unknown variant 'turbo'"):
        hidiffusion_recipe(preset_map("sdxl", "tiny"), 512, 1024, variant="turbo")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_each_pass_alone_equals_the_official_switch(name) -> None:
    """apply_raunet / apply_window_attn of the official code against one pass type each; and
    the patched model differs from the plain one, so the comparison is not vacuous."""
    model = tiny(name)
    inputs = inputs_for(model, (32, 32) if name == "sdxl" else (16, 16))
    recipe = load_recipe(RECIPES[name])
    plain = patched_out(model, inputs, 0)
    for keep, official_kwargs in (("rau_net", {"apply_window_attn": False}), ("msw_msa", {"apply_raunet": False})):
        doc = to_data(recipe)
        doc["passes"] = [p for p in doc["passes"] if p["type"] == keep]
        ref = official_copy(model, name, **official_kwargs)
        step = 10 if (name, keep) == ("sdxl", "rau_net") else 0  # sdxl pooling window [8, 20)
        unpatched = patched_out_plain(model, inputs, step)
        with apply(model, parse_recipe(doc), unet_map=preset_map(name, "tiny"), force=True) as patch:
            patch.set_timesteps(TIMESTEPS)
            out = patched_out(model, inputs, step, seed=5)
        torch.testing.assert_close(out, official_out(ref, inputs, step, seed=5), rtol=0, atol=1e-6)
        assert (out - unpatched).abs().max() > 1e-3
    assert torch.equal(patched_out(model, inputs, 0), plain)


def patched_out_plain(model, inputs, step):
    with torch.no_grad():
        return _sample(model(**at_step(inputs, step)))


def test_seeded_shift_draws_the_official_stream() -> None:
    """``seed: s`` draws as the official code does after ``torch.manual_seed(s)``, advancing over
    calls; and the global generator is left alone."""
    model = tiny("sd15")
    ref = official_copy(model, "sd15")
    inputs = inputs_for(model, (16, 16))
    doc = to_data(load_recipe(RECIPES["sd15"]))
    doc["passes"][1]["seed"] = 7
    with apply(model, parse_recipe(doc), unet_map=preset_map("sd15", "tiny"), force=True) as patch:
        patch.set_timesteps(TIMESTEPS)
        torch.manual_seed(123)
        with torch.no_grad():
            first, second = model(**at_step(inputs, 30)).sample, model(**at_step(inputs, 30)).sample
        untouched = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(untouched, torch.rand(1))
    torch.manual_seed(7)
    for module in ref.modules():
        if hasattr(type(module), "_parent"):
            module.timestep = 30
    kwargs = dict(at_step(inputs, 30))
    sample, timestep = kwargs.pop("sample"), kwargs.pop("timestep")
    with torch.no_grad():
        expected_first = ref(sample, timestep, **kwargs).sample
        expected_second = ref(sample, timestep, **kwargs).sample
    torch.testing.assert_close(first, expected_first, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, expected_second, rtol=0, atol=1e-6)
    assert not torch.allclose(first, second)  # 5 layers drew again: some shift changed


def test_two_seeded_passes_draw_from_their_own_generators() -> None:
    """Two msw_msa passes seeded 1 and 2 (down side, up side of level 0) each draw from their
    own generator in execution order: equal to the same layers with the shifts those draws
    give fixed, one pass per layer (quarter k for u in (k/4, (k+1)/4], the official rule)."""
    model = tiny("sd15")
    inputs = inputs_for(model, (16, 16))
    unet_map = preset_map("sd15", "tiny")
    attn = {"op": ["attention"], "kind": ["self"], "axis": ["spatial"], "level": 0}
    base = {"name": "two-seeds", "base_resolution": [512, 512], "target_resolutions": [[1024, 1024]]}
    seeded = parse_recipe({**base, "passes": [
        {"type": "msw_msa", "select": {**attn, "stage": ["down"]}, "seed": 1},
        {"type": "msw_msa", "select": {**attn, "stage": ["up"]}, "seed": 2},
    ]})
    paths = {stage: sorted(p for p, layer in make_plan(seeded, unet_map).layers.items()
                           if layer.entry("msw_msa").config.seed == seed)
             for stage, seed in (("down", 1), ("up", 2))}
    assert (len(paths["down"]), len(paths["up"])) == (2, 3)

    def quarters(seed: int, n: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [min(3, max(0, math.ceil(float(torch.rand(1, generator=g)) * 4) - 1)) for _ in range(n)]

    fixed = [{"type": "msw_msa", "select": {"paths": [path]}, "shift": q}
             for stage, seed in (("down", 1), ("up", 2))
             for path, q in zip(paths[stage], quarters(seed, len(paths[stage])), strict=True)]
    assert len({f["shift"] for f in fixed}) > 1  # the draws differ, so the order matters
    with apply(model, seeded, unet_map=unet_map, force=True) as patch:
        patch.set_timesteps(TIMESTEPS)
        out = patched_out(model, inputs, 0)
    with apply(model, parse_recipe({**base, "passes": fixed}), unet_map=unet_map, force=True) as patch:
        patch.set_timesteps(TIMESTEPS)
        expected = patched_out(model, inputs, 0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("shift", [0, 2])
def test_fixed_shift_is_the_official_rule_for_that_quarter(shift) -> None:
    """``shift: k`` equals the official draw landing in quarter k (u = (k + 0.5) / 4)."""
    model = tiny("sd15")
    ref = official_copy(model, "sd15", apply_raunet=False)
    inputs = inputs_for(model, (16, 16))
    doc = to_data(load_recipe(RECIPES["sd15"]))
    doc["passes"] = [dict(doc["passes"][1], shift=shift)]
    with apply(model, parse_recipe(doc), unet_map=preset_map("sd15", "tiny"), force=True) as patch:
        patch.set_timesteps(TIMESTEPS)
        out = patched_out(model, inputs, 0)
    original = torch.rand
    torch.rand = lambda *a, **k: torch.tensor([(shift + 0.5) / 4])  # type: ignore[assignment]
    try:
        expected = official_out(ref, inputs, 0)
    finally:
        torch.rand = original
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


# ============================================================================================
# apply / remove
# ============================================================================================


@pytest.mark.parametrize("recipe", ["hidiffusion-sd15-1024x1024", "hidiffusion-sd21-1024x1024", "hidiffusion-sdxl-2048x2048"])
def test_apply_remove_is_bit_exact(recipe) -> None:
    name = load_recipe(recipe).model
    model = tiny(name)
    inputs = inputs_for(model, (32, 32) if name == "sdxl" else (16, 16), batch=2)
    classes = {n: type(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = patched_out(model, inputs, 0)
    outs = []
    for _ in range(2):
        with apply(model, recipe, unet_map=preset_map(name, "tiny"), force=True) as patch:
            patch.set_timesteps(TIMESTEPS)
            outs.append(patched_out(model, inputs, 10, seed=3))
        assert {n: type(m) for n, m in model.named_modules()} == classes
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert not any(k.startswith("_unet_surgery") for m in model.modules() for k in vars(m))
        assert torch.equal(patched_out(model, inputs, 0), before)
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], patched_out(model, inputs, 10))


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_rau_net_stays_off_where_the_deepest_level_cannot_halve_again(name) -> None:
    """A latent smaller than 2**(D+1) (D the deepest level, from the preset's block count)
    has under 2x2 at the deepest level, which RAU-Net's extra halving would empty; the plain
    model runs such a call, so the patched one must too and compute what the plain one does.
    At the threshold RAU-Net acts."""
    model = tiny(name)
    deepest = len(preset_config(name, size="tiny")["block_out_channels"]) - 1
    recipe = to_data(load_recipe(RECIPES[name]))
    recipe["passes"] = [p for p in recipe["passes"] if p["type"] == "rau_net"]
    smalls = [inputs_for(model, (n, n)) for n in (3, 2 ** (deepest + 1) - 1)]  # 3: a 24-pixel image
    edge = inputs_for(model, (2 ** (deepest + 1),) * 2)
    plain_smalls = [patched_out(model, small, 0) for small in smalls]
    plain_edge = patched_out(model, edge, 0)
    with apply(model, recipe, unet_map=preset_map(name, "tiny"), force=True) as patch:
        patch.set_timesteps(TIMESTEPS)
        for small, plain in zip(smalls, plain_smalls, strict=True):
            assert torch.equal(patched_out(model, small, 0), plain)
        assert not torch.allclose(patched_out(model, edge, 0), plain_edge)


def test_window_grid_where_the_official_ratio_rule_misses() -> None:
    """A 17x9 latent: stride-2 convs give ceil halves (k=3, p=1: floor((n - 1) / 2) + 1), so
    17 -> 9 -> 5 and 9 -> 5 -> 3; the official rule r = round(sqrt(153 / 15)) = 3 reads
    (ceil(17/3), ceil(9/3)) = (6, 3), 18 tokens, and its reshape fails. Where the rule holds
    its grid is kept (it is the official one)."""
    from unet_surgery.ops.hidiffusion import token_grid

    assert token_grid((17, 9), 15) == (5, 3)
    assert token_grid((17, 9), 45) == (9, 5)  # rule: r = round(sqrt(153 / 45)) = 2 -> (9, 5)
    assert token_grid((16, 32), 128) == (8, 16)
    model = tiny("sdxl")
    inputs = inputs_for(model, (17, 9))
    plain = patched_out(model, inputs, 0)
    with apply(model, RECIPES["sdxl"], unet_map=preset_map("sdxl", "tiny"), force=True) as patch:
        patch.set_timesteps(TIMESTEPS)
        for step in (0, 10, 30):  # RAU-Net conv, RAU-Net pooling, MSW-MSA alone
            out = patched_out(model, inputs, step)
            assert out.shape == plain.shape and torch.isfinite(out).all()


# ============================================================================================
# Composition: RAU-Net + MSW-MSA + noise-damped guidance
# ============================================================================================


def hand_redilated(model, paths_to_factor):
    return [
        model.get_submodule(p).register_forward_hook(lambda m, a, o, f=f: redilated_conv(m, a[0], f))
        for p, f in paths_to_factor.items()
    ]


@pytest.mark.parametrize(("name", "hw", "step"), [("sd15", (16, 16), 0), ("sdxl", (32, 32), 10), ("sdxl", (32, 32), 4)])
def test_composed_with_noise_damped_guidance(name, hw, step) -> None:
    """eps_v(u) + w (eps_d(c) - eps_d(u)) with every eps the official HiDiffusion model, the
    damped one re-dilated by hand: equal to the single patched, guided call."""
    w = 7.5
    doc = to_data(load_recipe(RECIPES[name]))
    level1 = {"op": ["conv2d"], "kernel": [3], "stride": [1], "stage": ["down"], "level": 1}
    doc["passes"].append({"type": "noise_damped_cfg", "select": level1, "factor": 2.0, "schedule": {"tau": 30}})
    model = tiny(name)
    ref = official_copy(model, name)
    inputs = inputs_for(model, hw, batch=2, seed=4)
    inputs["sample"] = inputs["sample"][:1].repeat(2, 1, 1, 1)
    with apply(model, parse_recipe(doc), unet_map=preset_map(name, "tiny"), force=True) as patch:
        patch.set_timesteps(TIMESTEPS)
        patch.enable_noise_damped_cfg()
        damped_paths = sorted(patch.plan.entries("noise_damped_cfg"))
        out = patched_out(model, inputs, step, seed=11)
    combined = out[:1] + w * (out[1:] - out[:1])

    # The 3x3 resnet convs of down_blocks.1, by name (diffusers layout of both presets).
    damped = {f"down_blocks.1.resnets.{r}.{c}": 2.0 for r in (0, 1) for c in ("conv1", "conv2")}
    assert damped_paths == sorted(damped)

    def half(part):
        return {k: (v[part : part + 1] if isinstance(v, torch.Tensor) and v.dim() else
                    {kk: vv[part : part + 1] for kk, vv in v.items()} if isinstance(v, dict) else v)
                for k, v in inputs.items()}

    u, c = half(0), half(1)
    eps_d_u, eps_d_c = official_out(ref, u, step, seed=11), official_out(ref, c, step, seed=11)
    handles = hand_redilated(ref, damped)
    eps_v_u = official_out(ref, u, step, seed=11)
    for h in handles:
        h.remove()
    reference = eps_v_u + w * (eps_d_c - eps_d_u)
    torch.testing.assert_close(combined, reference, rtol=0, atol=1e-6)
    assert (eps_v_u - eps_d_u).abs().max() > 1e-3  # the damped branch differs


# ============================================================================================
# Selection: the builder and the shipped recipes name the official modules
# ============================================================================================


def selected(recipe, unet_map) -> dict[str, set[str]]:
    """What a plan rewrites, in the official code's terms (blocks, convs, transformer blocks)."""
    plan = make_plan(recipe, unet_map)
    out: dict[str, set[str]] = {"conv": set(), "block": set(), "window": set(), "size": set()}
    for path, layer in plan.layers.items():
        rau = layer.entry("rau_net")
        if rau is not None and all(role.level is not None for role in rau.roles):
            out["size"].add(path)
        elif layer.rewrite.name == "window_attention":
            assert path.endswith(".attn1")
            out["window"].add(path.removesuffix(".attn1"))
        elif layer.record is not None:
            out["conv"].add(path)
        else:
            out["block"].add(path)
    return out


def official_selection(name: str, with_blocks: bool = True) -> dict[str, set[str]]:
    keys = sd15_hidiffusion_key() if name == "sd15" else sdxl_hidiffusion_key()
    every = [p for k in ("down_module_key", "down_module_key_extra", "up_module_key", "up_module_key_extra") for p in keys[k]]
    convs = {p for p in every if p.endswith(".conv")}
    # The official block forwards pool after attentions[0] (i == 0) and resize after attentions[1] (i == 1).
    down_block, up_block = sorted(p for p in every if not p.endswith(".conv"))
    blocks = {f"{down_block}.attentions.0", f"{up_block}.attentions.1"} if with_blocks else set()
    # The official code forwards every skip size to its upsampler (``num_upsamplers += 12``);
    # ours keeps the sizes of the levels below the RAU-Net pair: SD1.5 levels 1 and 2 (their
    # downsamplers and the upsamplers into them); SDXL's only such level, 1, is the pair's own.
    size = {"down_blocks.1.downsamplers.0.conv", "down_blocks.2.downsamplers.0.conv",
            "up_blocks.0.upsamplers.0.conv", "up_blocks.1.upsamplers.0.conv"} if name == "sd15" else set()
    return {"conv": convs, "block": blocks, "window": set(keys["windown_attn_module_key"]), "size": size}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "base", "target", "blocks"),
    [("sd15", 512, 1024, False), ("sd15", 512, 2048, True), ("sd21", 512, 1024, False),
     ("sdxl", 1024, 2048, True), ("sdxl", 1024, 4096, True)],
)
def test_builder_selects_the_official_modules_on_full_maps(name, base, target, blocks) -> None:
    unet_map = preset_map(name)
    recipe = hidiffusion_recipe(unet_map, base, target)
    assert selected(recipe, unet_map) == official_selection("sdxl" if name == "sdxl" else "sd15", blocks)


@pytest.mark.parametrize(
    ("name", "base", "target", "expected"),
    # (kind, start, switch) per RAU-Net pair, from switching_threshold_ratio_dict / aggressive_step.
    [("sd15", 512, 1024, [("conv", 0.0, 0.4)]),
     ("sd15", 512, 2048, [("conv", 0.0, 0.7), ("block", 0.0, 0.3)]),
     ("sdxl", 1024, 2048, [("block", 8 / 50, 0.4), ("conv", 0.0, 8 / 50)]),
     ("sdxl", 1024, 4096, [("block", 0.0, 0.7), ("conv", 0.0, 0.3)]),
     ("sdxl", 1024, (2048, 4096), [("block", 8 / 50, 0.4), ("conv", 0.0, 8 / 50)])],
)
def test_builder_uses_the_official_thresholds(name, base, target, expected) -> None:
    recipe = hidiffusion_recipe(preset_map(name, "tiny"), base, target)
    got = [("conv" if "conv2d" in (p.select.op or ()) else "block", p.start, p.switch)
           for p in recipe.passes if type(p).type == "rau_net"]
    assert got == expected


SHIPPED_VARIANTS = {"hidiffusion-sdxl-turbo-1024x1024": "sdxl-turbo", "hidiffusion-sdxl-inpainting-2048x2048": "inpainting",
                    "hidiffusion-playground-2048x2048": "playground", "hidiffusion-sdxl-controlnet-2048x2048": "controlnet"}


@pytest.mark.parametrize("recipe", [
    "hidiffusion-sd15-1024x1024", "hidiffusion-sd21-1024x1024", "hidiffusion-sdxl-2048x2048",
    "hidiffusion-sd15-2048x2048", "hidiffusion-sd21-2048x2048", "hidiffusion-sdxl-4096x4096", *SHIPPED_VARIANTS])
def test_shipped_recipe_is_the_builder_recipe(recipe) -> None:
    shipped = load_recipe(recipe)
    unet_map = preset_map(shipped.model, "tiny")
    built = hidiffusion_recipe(unet_map, shipped.base_resolution, shipped.target_resolutions[0],
                               variant=SHIPPED_VARIANTS.get(recipe, "standard"))  # type: ignore[arg-type]
    assert selected(shipped, unet_map) == selected(built, unet_map)
    assert [to_data(p) for p in shipped.passes] == [to_data(p) for p in built.passes]


@pytest.mark.requires_ldm
def test_ldm_layout_selects_the_same_roles() -> None:
    """The map records are layout-neutral: the SD1.5 recipe finds LDM's downsampler, upsampler
    conv and level-0 self-attention, and runs and removes cleanly."""
    unet_map = preset_map("ldm_sd15", "tiny")
    got = selected(load_recipe(RECIPES["sd15"]), unet_map)
    assert got["conv"] == {"input_blocks.3.0.op", "output_blocks.8.2.conv"}
    # levels 1 and 2 keep their sizes: their downsamplers and the upsamplers into them
    assert got["size"] == {"input_blocks.6.0.op", "input_blocks.9.0.op", "output_blocks.2.1.conv",
                           "output_blocks.5.2.conv"}
    assert got["window"] == {f"{b}.1.transformer_blocks.0" for b in ("input_blocks.1", "input_blocks.2",
                                                                     "output_blocks.9", "output_blocks.10",
                                                                     "output_blocks.11")}
    model = tiny("ldm_sd15")
    inputs = inputs_for(model, (16, 16))
    before = patched_out_plain(model, inputs, 0)
    with apply(model, RECIPES["sd15"], unet_map=unet_map, force=True) as patch:
        patch.set_timesteps(TIMESTEPS)
        assert not torch.allclose(patched_out(model, inputs, 0), before)
    assert torch.equal(patched_out_plain(model, inputs, 0), before)


def test_misuse_is_refused() -> None:
    unet_map = preset_map("sd15", "tiny")
    base = {"name": "x", "base_resolution": [512, 512], "target_resolutions": [[1024, 1024]]}
    bad = [
        {"type": "rau_net", "select": {"op": ["conv2d"], "stride": [1], "stage": ["down"], "level": 0}, "switch": 0.4},
        {"type": "rau_net", "select": {"op": ["attention"], "kind": ["cross"], "level": 1}, "switch": 0.4},
        {"type": "rau_net", "select": {"op": ["attention"], "kind": ["self"], "stage": ["down"], "level": 1},
         "switch": 0.4, "restore_after": 3},
        {"type": "msw_msa", "select": {"op": ["attention"], "kind": ["cross"], "level": 0}},
    ]
    for p in bad:
        with pytest.raises(SelectionError):
            make_plan(parse_recipe({**base, "passes": [p]}), unet_map)
    with pytest.raises(RecipeError, match="shift"):
        parse_recipe({**base, "passes": [{"type": "msw_msa", "select": {"level": 0}, "shift": 4}]})
    with pytest.raises(RecipeError, match="switch"):
        parse_recipe({**base, "passes": [{"type": "rau_net", "select": {"level": 0}, "switch": 1.5}]})


def test_export_phases_freeze_a_fixed_shift_and_refuse_a_random_one() -> None:
    """A .pt2 export freezes every phase's settings: a fixed MSW-MSA shift freezes (the phases
    then hold that quarter on every windowed layer), a random shift is refused naming the layer."""
    from unet_surgery.export.phases import default_timesteps, enumerate_phases
    from unet_surgery.ops.hidiffusion import WindowSetting

    unet_map = preset_map("sd15", "tiny")
    model = build_unet("sd15", size="tiny", device="meta")
    timesteps = default_timesteps(50)
    for shift in (2, None):
        doc = to_data(load_recipe(RECIPES["sd15"]))
        doc["passes"][1] = dict(doc["passes"][1], shift=shift)
        with apply(model, parse_recipe(doc), unet_map=unet_map, force=True) as patch:
            phases, table = enumerate_phases(patch, timesteps, (16, 16))
            errors = [e for phase in phases for e in phase.freeze_errors(patch)]
            windows = [s for phase in phases for _, s in phase.layers if isinstance(s, WindowSetting)]
        assert len(table) == 50 and len(phases) == 2  # RAU-Net on for steps < 20, then off
        assert len(windows) == 2 * 5 and {w.quarter for w in windows} == {shift}
        if shift is None:
            assert errors and all("random MSW-MSA shift" in e for e in errors)
            assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in errors[0]
        else:
            assert errors == []


def test_a_downsampler_without_an_upsampler_back_into_its_level_is_refused() -> None:
    """RAU-Net's downsampler form pairs the strided conv of level L with the conv right after the
    upsampling back into L. A map whose stride-2 conv sits at the deepest level has no such
    upsampling (the first up conv there follows the mid block at the same level): refused, not
    paired with an ordinary resnet conv."""
    import dataclasses

    from unet_surgery.graph.records import UNetMap

    unet_map = UNetMap.from_dict(preset_map("sd15", "tiny").to_dict())
    deepest = unet_map.num_levels - 1
    path = "down_blocks.2.downsamplers.0.conv"
    unet_map.convs = [dataclasses.replace(c, level=deepest) if c.path == path else c for c in unet_map.convs]
    doc = {"name": "x", "base_resolution": [64, 64], "target_resolutions": [[128, 128]],
           "passes": [{"type": "rau_net", "select": {"paths": [path]}, "switch": 0.4}]}
    with pytest.raises(SelectionError, match=f"no upsampler conv into level {deepest}"):
        make_plan(parse_recipe(doc), unet_map)
    doc["passes"][0]["select"]["paths"] = ["down_blocks.1.downsamplers.0.conv"]  # level 1: its upsampler exists
    plan = make_plan(parse_recipe(doc), unet_map)
    assert sorted(plan.entries("rau_net")) == ["down_blocks.1.downsamplers.0.conv", "up_blocks.1.upsamplers.0.conv"]
