"""Checkpoints in: LDM single files (exact key conversion), diffusers folders in every layout,
half precision, and architecture recognition of the full-size models from shapes alone."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from unet_surgery.errors import CheckpointError
from unet_surgery.loading import (
    LDM_PREFIX,
    convert_ldm_unet,
    detect_architecture,
    ldm_to_diffusers_key,
    load_unet,
)
from unet_surgery.loading.weights import _fit_shapes
from unet_surgery.presets import build_unet, example_inputs


@functools.cache
def tiny_ldm() -> nn.Module:
    return build_unet("ldm_sd15", size="tiny", device="cpu")


def write_ldm_file(path: Path, model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    state = {LDM_PREFIX + k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in model.state_dict().items()}
    extra = {"first_stage_model.decoder.conv_in.weight": torch.ones(2), "cond_stage_model.x": torch.zeros(1)}
    save_file({**state, **extra}, str(path))
    return state


def ldm_vs_diffusers(ldm: nn.Module, unet: nn.Module) -> float:
    inputs = example_inputs(tiny_ldm(), height=64, width=64) if ldm is tiny_ldm() else ldm.test_inputs
    with torch.no_grad():
        a = ldm(**inputs)
        b = unet(sample=inputs["x"], timestep=inputs["timesteps"], encoder_hidden_states=inputs["context"]).sample
    return float((a - b).abs().max())


@pytest.mark.requires_ldm
def test_ldm_single_file_loads_the_exact_weights_of_its_diffusers_twin(tmp_path: Path) -> None:
    ldm = tiny_ldm()
    state = write_ldm_file(tmp_path / "sd15-ldm.safetensors", ldm)
    unet = load_unet(tmp_path / "sd15-ldm.safetensors")
    assert type(unet).__name__ == "UNet2DConditionModel"
    assert (unet.unet_surgery_preset, unet.unet_surgery_size) == ("sd15", "tiny")
    loaded = unet.state_dict()
    assert len(loaded) == len(state)  # VAE / text-encoder keys are ignored
    for key, value in state.items():
        assert torch.equal(loaded[ldm_to_diffusers_key(key[len(LDM_PREFIX):], 2)], value), key
    # Same architecture as the tiny sd15 preset, and the same function as the LDM model.
    twin = build_unet("sd15", size="tiny", device="meta")
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in loaded.items()}
    assert ldm_vs_diffusers(ldm, unet) < 1e-5


@pytest.mark.requires_ldm
def test_half_precision_and_pickle_free_ckpt(tmp_path: Path) -> None:
    ldm = tiny_ldm()
    half = write_ldm_file(tmp_path / "half.safetensors", ldm, torch.float16)
    unet = load_unet(tmp_path / "half.safetensors")
    assert all(p.dtype == torch.float16 for p in unet.parameters())
    assert all(torch.equal(unet.state_dict()[ldm_to_diffusers_key(k[len(LDM_PREFIX):], 2)], v) for k, v in half.items())
    as_float = load_unet(tmp_path / "half.safetensors", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in as_float.parameters())
    # A .ckpt with the usual {"state_dict": ...} wrapper, read with weights_only=True.
    torch.save({"state_dict": {LDM_PREFIX + k: v for k, v in ldm.state_dict().items()}}, tmp_path / "m.ckpt")
    from_ckpt = load_unet(tmp_path / "m.ckpt")
    reference = load_unet(tmp_path / "half.safetensors", dtype=torch.float32)
    assert from_ckpt.state_dict().keys() == reference.state_dict().keys()
    assert ldm_vs_diffusers(ldm, from_ckpt) < 1e-5


def test_diffusers_folders_plain_sharded_fp16_variant_and_pipeline(tmp_path: Path) -> None:
    model = build_unet("sd15", size="tiny", device="cpu")
    inputs = example_inputs(model)
    with torch.no_grad():
        expected = model(**inputs).sample
    model.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    model.save_pretrained(tmp_path / "pipe" / "unet")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.half().save_pretrained(tmp_path / "variant", variant="fp16")  # in place: last
    for folder in ("plain", "sharded", "pipe"):
        loaded = load_unet(tmp_path / folder)
        with torch.no_grad():
            assert torch.equal(loaded(**inputs).sample, expected), folder
    variant = load_unet(tmp_path / "variant")
    assert all(p.dtype == torch.float16 for p in variant.parameters())
    assert all(torch.equal(v, state[k].half()) for k, v in variant.state_dict().items())


@pytest.mark.requires_ldm
def test_sdxl_shaped_ldm_unet_converts_exactly(tmp_path: Path) -> None:
    """SDXL's layout (three levels, the first without attention, linear projections; deeper
    transformers: the sdkit LDM code only runs depth 1) against a diffusers model from a config."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    from unet_surgery.presets import randomize_zero_init_

    torch.manual_seed(0)
    ldm = UNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2,
                    attention_resolutions=[2, 4], channel_mult=(1, 2, 2), num_head_channels=16,
                    use_spatial_transformer=True, transformer_depth=1, context_dim=64,
                    use_linear_in_transformer=True, legacy=False).eval()
    randomize_zero_init_(ldm, 0, include_constant=True)
    config = {
        "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "block_out_channels": [32, 64, 64], "layers_per_block": 2, "cross_attention_dim": 64,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [2, 4, 4], "transformer_layers_per_block": 1, "use_linear_projection": True,
    }
    write_ldm_file(tmp_path / "xl.safetensors", ldm)
    unet = load_unet(tmp_path / "xl.safetensors", config=config)
    ldm.test_inputs = {"x": torch.randn(1, 4, 16, 16), "timesteps": torch.tensor([500]), "context": torch.randn(1, 7, 64)}
    assert ldm_vs_diffusers(ldm, unet) < 1e-5
    assert ldm_to_diffusers_key("label_emb.0.0.weight", 2) == "add_embedding.linear_1.weight"
    assert ldm_to_diffusers_key("label_emb.0.2.bias", 2) == "add_embedding.linear_2.bias"


@pytest.mark.parametrize(("ldm_name", "diffusers_name"), [("ldm_sd15", "sd15"), ("ldm_sd21", "sd21")])
def test_full_size_ldm_keys_and_shapes_convert_exactly(ldm_name: str, diffusers_name: str) -> None:
    ldm_state = {LDM_PREFIX + k: v for k, v in build_unet(ldm_name, device="meta").state_dict().items()}
    assert detect_architecture({k: tuple(v.shape) for k, v in ldm_state.items()}) == ("ldm", diffusers_name)
    target = {k: v.shape for k, v in build_unet(diffusers_name, device="meta").state_dict().items()}
    fitted = _fit_shapes(convert_ldm_unet(ldm_state, 2), target, "test")  # raises on any mismatch
    assert {k: v.shape for k, v in fitted.items()} == target


def test_full_size_sdxl_is_recognised_from_shapes() -> None:
    shapes = {k: tuple(v.shape) for k, v in build_unet("sdxl", device="meta").state_dict().items()}
    assert detect_architecture(shapes) == ("diffusers", "sdxl")


@pytest.mark.requires_ldm
def test_unknown_or_mismatched_checkpoints_are_refused(tmp_path: Path) -> None:
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(tmp_path / "bert.safetensors"))
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_unet(tmp_path / "bert.safetensors")
    state = {LDM_PREFIX + k: v.contiguous() for k, v in tiny_ldm().state_dict().items()}
    del state[LDM_PREFIX + "out.2.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=r"fit no shipped architecture.*missing"):
        load_unet(tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_unet(tmp_path / "nope.safetensors")
