"""A dispersed kernel replaces the re-dilated one whenever factor / scale >= 1, boundary included.

The reference is a literal transcription: the published transform ``R`` (R20to1_new.mat) maps
the 3x3 kernel to 5x5, which runs with dilation ``factor / scale`` and padding
``2 * dilation`` ("same" output size); no code of the library is used to compute it.
"""

from __future__ import annotations

import pytest
import scipy.io
import torch
import torch.nn.functional as F

from tests.conftest import preset_map, reference_path
from unet_surgery import apply
from unet_surgery.presets import build_unet, example_inputs

PATH = "down_blocks.1.resnets.0.conv1"


def _recipe(factor: float) -> dict:
    return {
        "name": "disperse-boundary",
        "base_resolution": [64, 64],
        "target_resolutions": [[128, 128]],
        "passes": [
            {"type": "redilate", "select": {"paths": [PATH]}, "factor": factor},
            {"type": "disperse", "select": {"paths": [PATH]}},  # published transform: 3 -> 5, scale 2
        ],
    }


def _captured(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}

    def hook(module, args, out):
        seen["x"], seen["y"] = args[0], out

    handle = model.get_submodule(PATH).register_forward_hook(hook)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen["x"], seen["y"]


@pytest.mark.parametrize("factor", [2.0, 4.0])  # factor / scale == 1 (the boundary) and 2
def test_dispersed_kernel_runs_at_factor_over_scale(factor: float) -> None:
    model = build_unet("sd15", size="tiny", device="cpu", dtype=torch.float64)
    inputs = example_inputs(model, height=128, width=128, dtype=torch.float64)
    conv = model.get_submodule(PATH)
    R = torch.tensor(scipy.io.loadmat(reference_path("scalecrafter", "transforms", "R20to1_new.mat"))["R"])
    w3 = conv.weight.detach()
    w5 = (w3.reshape(-1, 9) @ R.T).reshape(*w3.shape[:2], 5, 5)
    d = int(factor / 2)
    with apply(model, _recipe(factor), unet_map=preset_map("sd15", "tiny")):
        x, y = _captured(model, inputs)
    dispersed = F.conv2d(x, w5, conv.bias, padding=2 * d, dilation=d)
    redilated = F.conv2d(x, w3, conv.bias, padding=int(factor), dilation=int(factor))
    assert not torch.allclose(dispersed, redilated, atol=1e-3)
    torch.testing.assert_close(y, dispersed, rtol=1e-8, atol=1e-8)
