"""FouriScale's guidance branch (``fouriscale_guidance``) against a transcription of the official code.

The official loop (LeonHLJ/FouriScale @ 6fb392e, ``text2image.py`` / ``text2image_xl.py``)
batches ``[uncond, cond, cond]`` with embeddings ``[neg, pos, pos]``; the convs are the
processors transcribed in ``test_fouriscale.py`` (the third slice gets the weak mask and, in the
SDXL processor, dilation ``ceil(max(d / 1.5, 1))``); every ``attn1`` runs
``TrainingFreeAttnProcessor`` (transcribed below: ``key[-1] = key[-2]; query[-1] = query[-2]``);
the guided prediction is ``eps_u + w * (eps_3 - eps_u)``, with ``w * 2.4`` before ``start_step``
under ``--amp_guidance``. The patched UNet gets the pipeline's ``[uncond, cond]`` batch and its
output goes through the pipeline's own ``eps_u + w * (cond - eps_u)``.

Tolerance: both sides run in float64 (the official code's float32 casts in the filter are the
one deliberate change of the transcription, as in ``test_fouriscale.py``); the two sides order
the same operations differently (the batch split, ``w * 2.4`` vs ``2.4`` then ``w``), so they
agree to float64 rounding: asserted below 1e-9 on outputs of order 1, with 1e-6 as the
reported tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tests.conftest import preset_map
from tests.passes.test_fouriscale import (
    CASES,
    OFFICIAL_SD15_LAYERS,
    TIMESTEPS,
    _double,
    _models,
    _recipe,
    _run,
    _three,
    install_official,
)
from unet_surgery import apply
from unet_surgery.errors import SelectionError
from unet_surgery.presets import example_inputs

W = 7.5  # guidance scale
AMP = 2.4  # text2image_xl.py: guidance_scale * 2.4 while i < start_step


class OfficialTrainingFreeAttnProcessor:
    """``TrainingFreeAttnProcessor`` of text2image_xl.py (= text2image.py), transcribed."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        is_selfatten = encoder_hidden_states is None
        assert is_selfatten == ("attn1" in self.name)
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        # modification, fouriscale guidance
        if is_selfatten:
            batch_size_prompt = batch_size // 3
            key = key.view(3, batch_size_prompt, attn.heads, -1, head_dim)
            query = query.view(3, batch_size_prompt, attn.heads, -1, head_dim)
            key[-1] = key[-2]
            query[-1] = query[-2]
            key = key.view(batch_size, attn.heads, -1, head_dim)
            query = query.view(batch_size, attn.heads, -1, head_dim)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def official_guided(reference, inputs: dict, i: int, *, name: str, latent, base_latent, amp: bool,
                    start: int, stop: int, attention: bool = True) -> tuple[Tensor, Tensor]:
    """One official step: ``(guided eps, eps of the third slice)``."""
    layers, xl, levels = CASES[name]
    dilation = max(math.ceil(latent[0] / base_latent[0]), math.ceil(latent[1] / base_latent[1]))
    install_official(reference, layers, i, dilation=dilation, start=start, stop=stop, xl=xl,
                     base_latent=base_latent, latent=latent, levels=levels)
    plain = {}
    if attention:
        for path, module in reference.named_modules():
            if path.endswith("attn1"):
                plain[path] = module.processor
                module.set_processor(OfficialTrainingFreeAttnProcessor(path))
    try:
        noise_pred = _run(reference, {k: _three(v) for k, v in inputs.items()})
    finally:
        for mod in reference.modules():
            mod.__dict__.pop("forward", None)
        for path, processor in plain.items():
            reference.get_submodule(path).set_processor(processor)
    noise_pred_uncond, _, noise_pred_text = noise_pred.chunk(3)
    scale = W * AMP if (i < start and amp) else W
    return noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond), noise_pred_text


def guidance_recipe(name: str, base_latent, *, amp: bool, start: int, stop: int, value: float) -> dict:
    layers, xl, _ = CASES[name]
    recipe = _recipe(layers, (base_latent[0] * 8, base_latent[1] * 8), start=start, stop=stop, value=value)
    if xl:  # FouriConvProcessor_XL's guidance branch
        for p in recipe["passes"]:
            p.update(weak_dilation_divisor=1.5, weak_scale_floor=False)
    recipe["passes"].append({"type": "fouriscale_guidance", "amp_guidance": amp, "amp_stop_step": start})
    return recipe


def pipeline_guided(out: Tensor) -> Tensor:
    """What the pipeline makes of the patched UNet's ``[uncond, cond]`` output."""
    uncond, cond = out.chunk(2)
    return uncond + W * (cond - uncond)


@pytest.mark.parametrize(
    ("name", "latent", "base_latent", "amp"),
    [("sd15", (16, 16), (4, 4), False), ("sd15", (16, 32), (8, 8), False),
     ("sdxl", (16, 16), (4, 4), False), ("sdxl", (16, 16), (4, 4), True)],
    ids=["sd15", "sd15-wide", "sdxl", "sdxl-amp"],
)
def test_guided_eps_equals_official(name: str, latent, base_latent, amp: bool) -> None:
    start, stop = 20, 35
    value = 0.6 if name == "sdxl" else 0.0
    model, reference = _models(name)
    inputs = _double(example_inputs(model, batch=2, height=latent[0] * 8, width=latent[1] * 8))
    patch = apply(model, guidance_recipe(name, base_latent, amp=amp, start=start, stop=stop, value=value),
                  unet_map=preset_map(name, "tiny"), force=True)
    patch.set_timesteps(TIMESTEPS)
    patch.set_cfg_batches(True)
    for i in (10, 27, 40):  # full dilation (and amplified), decaying, outside the window
        step = dict(inputs, timestep=torch.tensor(TIMESTEPS[i], dtype=torch.float64))
        out = _run(model, step)
        expected, eps_3 = official_guided(reference, step, i, name=name, latent=latent, base_latent=base_latent,
                                          amp=amp, start=start, stop=stop)
        torch.testing.assert_close(pipeline_guided(out), expected, rtol=0, atol=1e-6)
        assert (pipeline_guided(out) - expected).abs().max() < 1e-9
        if not (amp and i < start):  # the cond row the pipeline sees is the guidance branch's eps
            assert (out.chunk(2)[1] - eps_3).abs().max() < 1e-9
        if i < stop:  # the borrowed queries and keys matter: without them the official run differs
            weak_only, _ = official_guided(reference, step, i, name=name, latent=latent, base_latent=base_latent,
                                           amp=amp, start=start, stop=stop, attention=False)
            assert (weak_only - expected).abs().max() > 1e-5
    patch.remove()


def test_guidance_changes_fouriscale_and_leaves_other_batches_alone() -> None:
    """Inside the window the guided eps differs from FouriScale with plain CFG; without declared
    [uncond, cond] batches, and outside the window, the UNet is FouriScale's (bit for bit)."""
    model, _ = _models("sd15")
    recipe = guidance_recipe("sd15", (4, 4), amp=False, start=20, stop=35, value=0.0)
    plain_recipe = dict(recipe, passes=recipe["passes"][:-1])
    inputs = _double(example_inputs(model, batch=2, height=128, width=128))
    outputs = {}
    for label, r, cfg in (("guided", recipe, True), ("undeclared", recipe, False), ("fouriscale", plain_recipe, True)):
        patch = apply(model, r, unet_map=preset_map("sd15", "tiny"), force=True)
        patch.set_timesteps(TIMESTEPS)
        patch.set_cfg_batches(cfg)
        outputs[label] = [_run(model, dict(inputs, timestep=torch.tensor(TIMESTEPS[i], dtype=torch.float64)))
                          for i in (27, 40)]
        patch.remove()
    assert (pipeline_guided(outputs["guided"][0]) - pipeline_guided(outputs["fouriscale"][0])).abs().max() > 1e-4
    assert torch.equal(outputs["undeclared"][0], outputs["fouriscale"][0])
    assert torch.equal(outputs["guided"][1], outputs["fouriscale"][1])  # step 40: no split
    assert all(type(m).__name__ == "Linear" for n, m in model.named_modules() if n.endswith(("to_q", "to_k")))


@pytest.mark.parametrize("n", [25, 50])
def test_amplified_until_start_step_scaled_to_the_step_count(n: int) -> None:
    """``i < start_step`` with start_step in 50-step units: on 25 steps, steps 0-9 amplified, 10 not."""
    model, _ = _models("sd15")
    inputs = _double(example_inputs(model, batch=2, height=128, width=128))
    timesteps = [999.0 - i * 999.0 / (n - 1) for i in range(n)]
    last = 20 * n // 50 - 1  # the last amplified step
    deltas = {}
    for amp in (True, False):
        patch = apply(model, guidance_recipe("sd15", (4, 4), amp=amp, start=20, stop=35, value=0.0),
                      unet_map=preset_map("sd15", "tiny"), force=True)
        patch.set_timesteps(timesteps)
        patch.set_cfg_batches(True)
        for i in (last, last + 1):
            uncond, cond = _run(model, dict(inputs, timestep=torch.tensor(timesteps[i], dtype=torch.float64))).chunk(2)
            deltas[amp, i] = cond - uncond
        patch.remove()
    torch.testing.assert_close(deltas[True, last], AMP * deltas[False, last], rtol=1e-12, atol=1e-12)
    assert torch.equal(deltas[True, last + 1], deltas[False, last + 1])


def test_guidance_needs_fouriscale_and_refuses_a_second_batch_split() -> None:
    model, _ = _models("sd15")
    lone = {"name": "g", "base_resolution": [32, 32], "target_resolutions": [[64, 64]],
            "passes": [{"type": "fouriscale_guidance"}]}
    with pytest.raises(SelectionError, match="needs a fouriscale pass"):
        apply(model, lone, unet_map=preset_map("sd15", "tiny"), force=True)
    both = guidance_recipe("sd15", (4, 4), amp=False, start=20, stop=35, value=0.0)
    both["passes"].append({"type": "noise_damped_cfg", "select": {"paths": OFFICIAL_SD15_LAYERS[:2]}, "factor": 2})
    with pytest.raises(SelectionError, match="both split the batch"):
        apply(model, both, unet_map=preset_map("sd15", "tiny"), force=True)


@pytest.mark.parametrize(("scale", "stride"), [(3.0, 2), (1.5, 2), (2.5, 1)])
def test_sdxl_weak_mask_scale_is_not_floored(scale: float, stride: int) -> None:
    """FouriConvProcessor_XL builds the weak mask from ``d / stride`` without ``max(., 1)``
    (``weak_scale_floor: false``); below 1 that mask cuts harder, not less."""
    from tests.passes.test_fouriscale import official_filtered
    from unet_surgery.ops.lowpass import LowPass, lowpass_filter

    x = torch.randn(2, 3, 12, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    conv = torch.nn.Conv2d(3, 3, 3, stride=stride, padding=1)
    official = official_filtered(conv, torch.cat([x, x, x]), scale, 8, 8, 0.6, 0.6, False)[4:]
    ours = lowpass_filter(x, LowPass(scale, (8, 8), 12, 0.6, weak=True, scale_floor=False), (stride, stride))
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-12)
    floored = lowpass_filter(x, LowPass(scale, (8, 8), 12, 0.6, weak=True), (stride, stride))
    assert (floored - official).abs().max() > 1e-3 or scale / stride >= 1


def test_sdxl_4096x2048_measures_against_the_table_base() -> None:
    """configs/sdxl_4096x2048.yaml with base_size 704x1408 (the table's pick): dilation
    max(ceil(2048 / 704), ceil(4096 / 1408)) = 3; FouriConvProcessor_XL's base at the UNet's
    latent is base_size / (target / H) = (88, 176); its guidance convs run at ceil(3 / 1.5) = 2."""
    from unet_surgery.ops.lowpass import LowPass
    from unet_surgery.ops.redilate import ConvSetting
    from unet_surgery.passes.fouriscale import GUIDANCE
    from unet_surgery.presets import build_unet
    from unet_surgery.recipes import load_recipe
    from unet_surgery.runtime import MAIN, UNetCall

    patch = apply(build_unet("sdxl", size="tiny", device="meta"), load_recipe("fouriscale-sdxl-4096x2048"),
                  unet_map=preset_map("sdxl", "tiny"), force=True)
    patch.set_timesteps(TIMESTEPS)
    layer = patch.plan.layers["mid_block.resnets.0.conv1"]
    call = UNetCall(timestep=TIMESTEPS[5], latent_hw=(256, 512), batch=2, step=5)
    assert patch.layer_setting(layer, MAIN, call) == ConvSetting(3.0, False, LowPass(3.0, (88, 176), 256, 0.6))
    assert patch.layer_setting(layer, GUIDANCE, call) == ConvSetting(
        2.0, False, LowPass(3.0, (88, 176), 256, 0.6, weak=True, scale_floor=False))
    patch.remove()


def test_pipeline_runs_the_guidance_branch_while_fouriscale_acts() -> None:
    """apply_to_pipeline declares [uncond, cond] batches: conv_in sees 3 rows per guided pair
    while FouriScale's window is open (3 steps: i < 35 * 3 / 50), 1 row without CFG; removal
    restores the pipeline bit for bit."""
    from tests.pipelines import tiny_pipelines as tp
    from unet_surgery.sampling import apply_to_pipeline

    pipe, kwargs = tp.sd()  # tiny SD1.5 at 128 px: twice its 64 px base
    recipe = guidance_recipe("sd15", (8, 8), amp=False, start=20, stop=35, value=0.0)
    before = tp.run(pipe, kwargs)
    for scale, expected in ((kwargs.get("guidance_scale", 7.5), [3, 3, 3]), (1.0, [1, 1, 1])):
        args = dict(kwargs, guidance_scale=scale) if scale > 1 else dict(kwargs, guidance_scale=1.0,
                                                                         negative_prompt_embeds=None)
        with apply_to_pipeline(pipe, recipe, unet_map=preset_map("sd15", "tiny"), force=True):
            rows: list[int] = []
            handle = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a, rows=rows: rows.append(int(a[0].shape[0])))
            patched = tp.run(pipe, args)
            handle.remove()
        assert rows == expected and torch.isfinite(patched).all()
    assert torch.equal(tp.run(pipe, kwargs), before)
