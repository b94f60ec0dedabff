"""Export then load gives bit-identical outputs to the in-memory patched model, every format.

Tiny presets with real random weights: SD1.5 and SDXL with dispersed kernels (computed on the
fly; the adapter stores their transform R), AnimateDiff (a video UNet) with the automatic recipe.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import preset_map
from unet_surgery import apply, auto_recipe
from unet_surgery.export import (
    Pt2Runner,
    export_pt2,
    load_patch,
    load_patched,
    save_patch,
    save_patched_pretrained,
)
from unet_surgery.export.adapter import TENSORS_FILE
from unet_surgery.patching.patch import Patch
from unet_surgery.presets import build_unet, example_inputs

RECIPES = {
    "sd15": "scalecrafter-sd15-2048x2048-disperse-active",
    "sdxl": "scalecrafter-sdxl-4096x4096-disperse-active",
    "animatediff": None,  # auto recipe at 2x
}
# Steps giving two phases each (exports dominate the run time): the progressive recipes use
# factors 4 then 2 over 2 steps (dispersed in both); the auto recipe is on, on, then off.
PT2_STEPS = {"sd15": 2, "sdxl": 2, "animatediff": 3}


def run(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)


@functools.cache
def patched(name: str) -> tuple[Patch, dict[str, Any], torch.Tensor]:
    """(patch, inputs at twice the tiny size, the patched output). Shared, never mutated."""
    model = build_unet(name, size="tiny", device="cpu")
    unet_map = preset_map(name, "tiny")
    recipe = RECIPES[name] or auto_recipe(unet_map, base=(64, 64), target=(128, 128), policy="scalecrafter")
    patch = apply(model, recipe, unet_map=unet_map, force=True)
    inputs = example_inputs(model, height=128, width=128)
    return patch, inputs, run(model, inputs)


@pytest.mark.parametrize("name", list(RECIPES))
def test_adapter_round_trip_is_bit_exact(name: str, tmp_path: Path) -> None:
    patch, inputs, expected = patched(name)
    save_patch(patch, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert meta["recipe"] == patch.recipe.name and meta["model_class"] == type(patch.model).__name__
    if patch.plan.entries("disperse"):
        from safetensors import safe_open

        with safe_open(str(tmp_path / "adapter" / TENSORS_FILE), framework="pt") as f:
            keys = set(f.keys())
        # Format 3: no kernels, one R per distinct transform (both recipes: the published 3 -> 5, s=2, n=3, eta=0.05)
        assert keys == {"dispersion_R/3-5-2-3-0.05"}
    fresh = build_unet(name, size="tiny", device="cpu")
    reloaded = load_patch(fresh, tmp_path / "adapter", unet_map=preset_map(name, "tiny"))
    assert reloaded.plan.rows() == patch.plan.rows()
    assert torch.equal(run(fresh, inputs), expected)
    reloaded.remove()
    assert not torch.equal(run(fresh, inputs), expected)  # the adapter really acts


@pytest.mark.parametrize("name", list(RECIPES))
def test_patched_diffusers_folder_round_trip_is_bit_exact(name: str, tmp_path: Path) -> None:
    patch, inputs, expected = patched(name)
    out = tmp_path / "patched"
    save_patched_pretrained(patch, out)
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    model, reloaded = load_patched(out, unet_map=preset_map(name, "tiny"))
    assert type(model) is type(patch.model) and reloaded.active
    assert torch.equal(run(model, inputs), expected)
    # The weights file is a plain UNet: same keys as the unpatched model, unchanged values.
    reloaded.remove()
    base = build_unet(name, size="tiny", device="cpu")
    assert model.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", list(RECIPES))
def test_pt2_phases_equal_the_eager_model_at_every_step(name: str, tmp_path: Path) -> None:
    patch, inputs, _ = patched(name)
    steps = PT2_STEPS[name]
    export_pt2(patch, tmp_path / "pt2", height=128, width=128, num_steps=steps)
    runner = Pt2Runner(tmp_path / "pt2")
    manifest = runner.manifest
    assert manifest["num_steps"] == steps and len(manifest["step_phase"]) == steps
    assert runner.num_phases == len(set(manifest["step_phase"])) == 2
    assert manifest["resolution"] == [128, 128] and manifest["latent_hw"] == [16, 16]
    patch.set_timesteps(runner.timesteps)
    try:
        extra = {k: v for k, v in inputs.items() if k not in ("sample", "timestep", "encoder_hidden_states")}
        outputs = []
        for step, t in enumerate(runner.timesteps):
            eager = run(patch.model, {**inputs, "timestep": torch.full((1,), int(t))})
            frozen = runner(inputs["sample"], torch.tensor(int(t)), inputs["encoder_hidden_states"], **extra)
            assert torch.equal(frozen, eager), f"step {step}"
            outputs.append(eager)
        # Different phases really compute different things.
        first = {manifest["step_phase"].index(k) for k in range(runner.num_phases)}
        assert len({outputs[i].sum().item() for i in first}) == runner.num_phases
    finally:
        patch.set_timesteps(None)
