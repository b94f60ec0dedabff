"""A dispersed patch holds no extra tensors, and weight edits after apply reach the dispersed kernel.

Dispersed kernels are computed from R and the live weight on every forward that uses them, so a
patched UNet has exactly the parameters, buffers and state_dict keys of the plain one, before,
during and after a forward, with the dispersion window open or closed. The expected dispersed
output is a transcription of ScaleCrafter's ``inflate_kernels`` with the published R.
"""

from __future__ import annotations

import math

import pytest
import scipy.io
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch import nn

from tests.conftest import preset_map, reference_path
from unet_surgery import apply
from unet_surgery.ops.redilate import current_setting, dispersion_of
from unet_surgery.presets import build_unet, example_inputs

RECIPE = "scalecrafter-sd15-2048x2048-disperse-active"
# The published SD1.5 2048x2048 disperse list (assets/disperse_settings/sd1.5_2048x2048.txt).
DISPERSED = "assets/disperse_settings/sd1.5_2048x2048.txt"


def held(model: nn.Module) -> tuple[int, set[str]]:
    """Bytes of every parameter and buffer, and the state_dict keys."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors), set(model.state_dict())


def published_paths() -> list[str]:
    return reference_path("scalecrafter", *DISPERSED.split("/")).read_text().split()


def test_full_size_sd15_on_meta_holds_no_extra_bytes() -> None:
    model = build_unet("sd15", device="meta")
    plain = held(model)
    with apply(model, RECIPE, unet_map=preset_map("sd15")):
        assert held(model) == plain
        transforms = {id(dispersion_of(model.get_submodule(p))) for p in published_paths()}
        assert len(transforms) == 1 and None not in {dispersion_of(model.get_submodule(p)) for p in published_paths()}
    assert held(model) == plain


def test_tiny_sd15_holds_no_extra_bytes_in_or_out_of_the_window() -> None:
    model = build_unet("sd15", size="tiny", device="cpu")
    plain = held(model)
    paths = published_paths()
    seen: list[tuple[int, set[str]]] = []
    dispersed: list[bool] = []

    def record(module: nn.Module, args: object, out: object) -> None:
        seen.append(held(model))
        dispersed.append(current_setting(module).use_dispersed)

    hooks = [model.get_submodule(p).register_forward_hook(record) for p in paths]
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(50)
    inputs = example_inputs(model, height=128, width=128)
    with apply(model, RECIPE, unet_map=preset_map("sd15", "tiny"), force=True) as patch:
        patch.set_timesteps(scheduler.timesteps)
        assert held(model) == plain
        with torch.no_grad():
            for step in (0, 40):  # dispersion window open (step < 35), then closed
                model(**{**inputs, "timestep": scheduler.timesteps[step]})
                assert held(model) == plain
    for h in hooks:
        h.remove()
    assert len(seen) == 2 * len(paths) and all(s == plain for s in seen)  # during each forward too
    assert all(dispersed[: len(paths)]) and not any(dispersed[len(paths):])  # the window was open, then closed
    assert held(model) == plain


def official_inflate(weight: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """ScaleCrafter's inflate_kernels, transcribed: vec(W5) = R @ vec(W3) per (out, in) pair."""
    i, o = weight.shape[:2]
    k = int(math.sqrt(R.shape[0]))
    return torch.einsum("mn,ion->iom", R.to(dtype=weight.dtype), weight.reshape(i, o, -1)).reshape(i, o, k, k)


PATH = "down_blocks.3.resnets.0.conv1"


@pytest.mark.parametrize("edit", ["in place", "parameter data replaced"])
def test_weight_edits_after_apply_reach_the_dispersed_kernel(edit: str) -> None:
    model = build_unet("sd15", size="tiny", device="cpu", dtype=torch.float64)
    inputs = example_inputs(model, height=128, width=128, dtype=torch.float64)
    recipe = {
        "name": "disperse-lora",
        "base_resolution": [64, 64],
        "target_resolutions": [[128, 128]],
        "passes": [
            {"type": "redilate", "select": {"paths": [PATH]}, "factor": 2},
            {"type": "disperse", "select": {"paths": [PATH]}},  # published transform 3 -> 5, scale 2
        ],
    }
    R = torch.tensor(scipy.io.loadmat(reference_path("scalecrafter", "transforms", "R20to1_new.mat"))["R"])
    conv = model.get_submodule(PATH)
    seen = {}
    hook = conv.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    with apply(model, recipe, unet_map=preset_map("sd15", "tiny")):
        old = conv.weight.detach().clone()
        out, rank = old.shape[0], 2
        delta = (torch.randn(out, rank, dtype=torch.float64) @ torch.randn(rank, old[0].numel(), dtype=torch.float64))
        new = old + 0.05 * delta.reshape(old.shape)  # a merged LoRA update
        with torch.no_grad():
            if edit == "in place":
                conv.weight.copy_(new)
            else:
                conv.weight.data = new.clone()
            model(**inputs)
    hook.remove()
    # factor 2 on a scale-2 transform: the 5x5 kernel runs undilated with padding 2
    expected = F.conv2d(seen["x"], official_inflate(new, R), conv.bias, padding=2)
    stale = F.conv2d(seen["x"], official_inflate(old, R), conv.bias, padding=2)
    torch.testing.assert_close(seen["y"], expected, rtol=1e-8, atol=1e-8)
    assert not torch.allclose(seen["y"], stale, atol=1e-4)
