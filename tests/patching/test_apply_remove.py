"""apply / remove: in place, weight-sharing, bit-exact removal, and schedules that follow the
sampler's steps inside an unmodified loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.conftest import preset_map, published_config, published_table
from unet_surgery import SurgeryError, apply, auto_recipe, current_patch
from unet_surgery.ops import redilated_conv
from unet_surgery.ops.redilate import dispersed_weight
from unet_surgery.presets import build_unet, example_inputs

PRESETS = ("sd15", "sd21", "sdxl", "animatediff", "modelscope_t2v", "svd", "ldm_sd15", "ldm_sd21")


def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)


def snapshot(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", PRESETS)
def test_apply_then_remove_is_bit_exact_and_shares_weights(name: str) -> None:
    model = build_unet(name, size="tiny", device="cpu")
    inputs = example_inputs(model)
    base = run(model, inputs)
    before = snapshot(model)
    unet_map = preset_map(name, "tiny")
    h, w = inputs["x" if "x" in inputs else "sample"].shape[-2:]
    recipe = auto_recipe(unet_map, base=(h * 8, w * 8), target=(h * 16, w * 16), policy="scalecrafter")
    patch = apply(model, recipe, unet_map=unet_map, force=True)
    patched_state = model.state_dict()
    assert patched_state.keys() == before.keys()
    assert all(patched_state[k].data_ptr() == before[k][0] for k in before)  # no copies
    patched = run(model, inputs)
    assert not torch.equal(patched, base)  # the recipe really acts
    # A forward that raises (wrong channel count) must not leave anything behind.
    bad = dict(inputs)
    key = "x" if "x" in bad else "sample"
    bad[key] = torch.cat([bad[key], bad[key]], dim=1 if name != "svd" else 2)
    with pytest.raises(RuntimeError):
        run(model, bad)
    patch.remove()
    patch.remove()  # twice is a no-op
    assert current_patch(model) is None
    assert torch.equal(run(model, inputs), base)
    after = model.state_dict()
    assert all(after[k].data_ptr() == before[k][0] and torch.equal(after[k], before[k][1]) for k in before)
    assert {type(m) for m in model.modules()} == {type(m) for m in build_unet(name, size="tiny", device="meta").modules()}


def test_apply_twice_is_refused_and_with_form_removes(tiny_sd15) -> None:
    unet_map = preset_map("sd15", "tiny")
    inputs = example_inputs(tiny_sd15)
    base = run(tiny_sd15, inputs)
    with apply(tiny_sd15, "scalecrafter-sd15-1024x1024", unet_map=unet_map, force=True):
        with pytest.raises(SurgeryError, match="already patched with recipe 'scalecrafter-sd15-1024x1024'"):
            apply(tiny_sd15, "scalecrafter-sd15-2048x2048", unet_map=unet_map)
        assert not torch.equal(run(tiny_sd15, inputs), base)
    assert torch.equal(run(tiny_sd15, inputs), base)


def test_dtype_change_while_patched(tiny_sd15) -> None:
    unet_map = preset_map("sd15", "tiny")
    inputs = example_inputs(tiny_sd15, height=128, width=128)
    patch = apply(tiny_sd15, "scalecrafter-sd15-2048x2048-disperse-active", unet_map=unet_map, force=True)
    fp32 = run(tiny_sd15, inputs)
    tiny_sd15.to(torch.float64)
    conv = tiny_sd15.get_submodule("down_blocks.3.resnets.0.conv1")
    assert not conv._buffers  # the dispersed kernel is computed per forward, in the weight's dtype
    assert dispersed_weight(conv).dtype == torch.float64
    fp64 = run(tiny_sd15, {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
    torch.testing.assert_close(fp64.float(), fp32, rtol=1e-4, atol=1e-4)
    patch.remove()
    assert not conv._buffers and dispersed_weight(conv) is None
    reference = build_unet("sd15", size="tiny", device="cpu").to(torch.float64)
    double_inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    assert torch.equal(run(tiny_sd15, double_inputs), run(reference, double_inputs))


def expected_factor(f: float, tau: float, step: int) -> float:
    if step >= tau:
        return 1.0
    return float(max(math.ceil(f * (tau - step) / tau), 2))


@pytest.mark.parametrize("give_timesteps", [True, False])
def test_schedule_matches_hand_written_redilation_at_every_step(give_timesteps: bool) -> None:
    from diffusers import DDIMScheduler

    recipe_name = "scalecrafter-sd15-2048x2048"
    patched_model = build_unet("sd15", size="tiny", device="cpu")
    manual_model = build_unet("sd15", size="tiny", device="cpu")
    unet_map = preset_map("sd15", "tiny")
    patch = apply(patched_model, recipe_name, unet_map=unet_map, force=True)
    # The expectation comes from the published settings, not from the patch's plan.
    cfg = published_config(recipe_name)
    table = published_table(cfg["dilate_settings"])
    assert cfg["progressive"] and cfg["num_inference_steps"] == 50
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(10)
    if give_timesteps:
        patch.set_timesteps(scheduler.timesteps)
    inputs = example_inputs(patched_model, height=128, width=128)
    latents = inputs["sample"]
    active_steps = 0
    for step, t in enumerate(scheduler.timesteps):
        step_inputs = {**inputs, "sample": latents, "timestep": t}
        if give_timesteps:
            tau = cfg["dilate_tau"] * 10 / 50  # the published window, rescaled to 10 steps
            position = step
        else:
            tau = cfg["dilate_tau"]  # position on the 50-step trajectory from t / T
            position = math.floor(50 * (1 - float(t) / 1000))
        handles = []
        for path, published in table.items():
            factor = expected_factor(published, tau, position)
            conv = manual_model.get_submodule(path)
            handles.append(conv.register_forward_hook(
                lambda m, args, out, f=factor: out if f == 1 else redilated_conv(m, args[0], f)
            ))
            active_steps += factor != 1
        expected = run(manual_model, step_inputs)
        for handle in handles:
            handle.remove()
        actual = run(patched_model, step_inputs)
        assert torch.equal(actual, expected), f"step {step} (t={int(t)})"
        latents = scheduler.step(actual, t, latents).prev_sample
    assert active_steps > 0
    patch.remove()
