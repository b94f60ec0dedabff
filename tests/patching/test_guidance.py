"""Noise-damped guidance: the pipeline's own CFG combination comes out as
eps_v(x, u) + w * (eps_d(x, c) - eps_d(x, u)) from one batched UNet call."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import preset_map, published_config, published_table
from unet_surgery import SurgeryError, apply
from unet_surgery.ops import redilated_conv
from unet_surgery.presets import build_unet, example_inputs

RECIPE = {
    "name": "ndcfg-test",
    "base_resolution": [64, 64],
    "target_resolutions": [[128, 128]],
    "passes": [
        {"type": "redilate", "select": {"kernel": 3, "level": "1.."}, "factor": 2, "schedule": {"tau": 30}},
        {"type": "noise_damped_cfg", "select": {"kernel": 3, "level": "2.."}, "factor": 3,
         "schedule": {"tau": 20}},
    ],
}


def hand_redilated(model, paths_to_factor):
    handles = []
    for path, f in paths_to_factor.items():
        conv = model.get_submodule(path)
        handles.append(conv.register_forward_hook(lambda m, a, o, f=f: redilated_conv(m, a[0], f)))
    return handles


def unet_out(model, inputs, return_dict=True):
    with torch.no_grad():
        if return_dict:
            return model(**inputs).sample
        out = model(**inputs, return_dict=False)  # what pipelines call
        assert isinstance(out, tuple)
        return out[0]


def published_factor(f: float, tau: float, step: int, progressive: bool) -> float:
    """ScaleCrafter's schedule, transcribed: max(ceil(f * (tau - i) / tau), 2) inside the window."""
    if step >= tau:
        return 1.0
    return float(max(math.ceil(f * (tau - step) / tau), 2)) if progressive else f


def halves(inputs, batch):
    """Split a [u, c] batch of inputs into the u-only and c-only inputs."""
    def pick(v, part):
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] % batch == 0:
            n = v.shape[0] // 2
            return v[:n] if part == 0 else v[n:]
        if isinstance(v, dict):
            return {k: pick(x, part) for k, x in v.items()}
        return v
    return [{k: pick(v, p) for k, v in inputs.items()} for p in (0, 1)]


PUBLISHED = {"sd15": "scalecrafter-sd15-2048x2048", "sdxl": "scalecrafter-sdxl-4096x4096"}


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
# t=999: step 0 of the 50-step trajectory, both windows open, full factors; t=600: step 20,
# progressive factors decayed; t=100: step 45, both windows closed (plain CFG, no dilation).
@pytest.mark.parametrize(
    ("timestep", "step", "return_dict"), [(999, 0, True), (999, 0, False), (600, 20, False), (100, 45, False)]
)
def test_pipeline_combination_equals_the_published_formula(name, timestep, step, return_dict) -> None:
    """Reference from the published config and tables only (never from ``patch.plan``)."""
    w = 7.5
    recipe = PUBLISHED[name]
    cfg = published_config(recipe)
    # float64, so that batching [u, u, c] into one call cannot move the result by rounding.
    model = build_unet(name, size="tiny", device="cpu", dtype=torch.float64)
    inputs = example_inputs(model, batch=2, height=128, width=128, seed=3, dtype=torch.float64)
    inputs["sample"] = inputs["sample"][:1].repeat(2, 1, 1, 1)  # same x for u and c
    inputs["timestep"] = torch.tensor([timestep, timestep])
    assert math.floor(50 * (1 - timestep / 1000)) == step
    patch = apply(model, recipe, unet_map=preset_map(name, "tiny"), force=True)
    patch.enable_noise_damped_cfg()
    out = unet_out(model, inputs, return_dict)
    combined = out[:1] + w * (out[1:] - out[:1])
    patch.remove()

    progressive = cfg["progressive"]
    main = {p: published_factor(f, cfg["dilate_tau"], step, progressive)
            for p, f in published_table(cfg["dilate_settings"]).items()}
    vanilla = {p: published_factor(f, cfg["ndcfg_tau"], step, progressive)
               for p, f in published_table(cfg["ndcfg_dilate_settings"]).items()}
    # The tiny SDXL lacks some of the published layers (the recipe reports them as missing).
    modules = dict(model.named_modules())
    main = {p: f for p, f in main.items() if p in modules}
    vanilla = {p: f for p, f in vanilla.items() if p in modules}
    assert main and vanilla and main != vanilla
    main = {p: f for p, f in main.items() if f != 1}
    vanilla = {p: f for p, f in vanilla.items() if f != 1}
    damped = bool(vanilla)

    u_inputs, c_inputs = halves(inputs, 2)
    handles = hand_redilated(model, main)
    eps_d_u, eps_d_c = unet_out(model, u_inputs), unet_out(model, c_inputs)
    for h in handles:
        h.remove()
    if damped:
        handles = hand_redilated(model, vanilla)
        eps_v_u = unet_out(model, u_inputs)
        for h in handles:
            h.remove()
        reference = eps_v_u + w * (eps_d_c - eps_d_u)
    else:
        reference = eps_d_u + w * (eps_d_c - eps_d_u)  # ordinary CFG after the window
    torch.testing.assert_close(combined, reference, rtol=1e-5, atol=1e-5)


def test_odd_batch_is_refused(tiny_sd15) -> None:
    patch = apply(tiny_sd15, RECIPE, unet_map=preset_map("sd15", "tiny"))
    patch.enable_noise_damped_cfg()
    inputs = example_inputs(tiny_sd15, batch=3, height=128, width=128)
    with pytest.raises(SurgeryError, match="even size"):
        unet_out(tiny_sd15, inputs)
    patch.remove()


def test_recipe_without_ndcfg_pass_cannot_enable_it(tiny_sd15) -> None:
    patch = apply(tiny_sd15, "scalecrafter-sd15-1024x1024", unet_map=preset_map("sd15", "tiny"), force=True)
    with pytest.raises(SurgeryError, match="has no noise_damped_cfg pass"):
        patch.enable_noise_damped_cfg()
    patch.remove()
