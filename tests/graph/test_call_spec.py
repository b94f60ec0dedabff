"""One call spec per UNet class: presets, probe inputs, .pt2 example inputs and the tracker agree."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import preset_map
from unet_surgery import SurgeryError, apply
from unet_surgery.export.pt2 import default_inputs
from unet_surgery.graph.inputs import CALL_SPECS, call_spec, probe_spec
from unet_surgery.presets import PRESETS, build_unet, example_inputs, get_preset
from unet_surgery.runtime import UNetCallTracker


def _shapes(inputs: dict) -> dict:
    return {k: _shapes(v) if isinstance(v, dict) else tuple(v.shape) for k, v in inputs.items() if v is not None}


@pytest.mark.parametrize("name", PRESETS)
def test_untagged_models_get_the_presets_input_layout(name: str) -> None:
    """.pt2 export needs no preset tag: the call spec and the model's config suffice."""
    model = build_unet(name, size="tiny", device="meta")
    expected = _shapes(example_inputs(model, batch=2, height=128, width=64, num_frames=3, device="meta"))
    del model.unet_surgery_preset, model.unet_surgery_size
    got = _shapes(default_inputs(model, 128, 64, batch=2, num_frames=3))
    assert got == expected
    spec = call_spec(model)
    assert spec is CALL_SPECS[get_preset(name).model_class]
    probe = probe_spec(model, latent_hw=(16, 8), frames=3)
    assert probe.sample_key == spec.sample and probe.spatial_dims == spec.spatial_dims
    sample = probe.kwargs[spec.sample]
    assert (sample.shape[spec.spatial_dims[0]], sample.shape[spec.spatial_dims[1]]) == (16, 8)


def test_video_layouts() -> None:
    assert CALL_SPECS["UNetSpatioTemporalConditionModel"].layout == "BFCHW"
    assert CALL_SPECS["UNetMotionModel"].context_per_frame
    assert not CALL_SPECS["UNet3DConditionModel"].context_per_frame


def test_tracker_reads_positional_timesteps_and_refuses_unbindable_calls(tiny_sd15) -> None:
    tracker = UNetCallTracker()
    inputs = example_inputs(tiny_sd15, height=128, width=64)
    tracker.record(tiny_sd15, (inputs["sample"], torch.tensor([500])), {"encoder_hidden_states": inputs["encoder_hidden_states"]})
    assert tracker.current is not None
    assert (tracker.current.timestep, tracker.current.latent_hw, tracker.current.batch) == (500.0, (16, 8), 1)
    patch = apply(tiny_sd15, "scalecrafter-sd15-2048x2048", unet_map=preset_map("sd15", "tiny"), force=True)
    with pytest.raises(SurgeryError, match="cannot read this UNet2DConditionModel call"):
        tiny_sd15(inputs["sample"], 500, inputs["encoder_hidden_states"], None, None, None, None, None, None,
                  None, None, None, None, None, "one too many")
    patch.remove()
