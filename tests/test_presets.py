"""Presets: real full-size architectures on meta, tiny seeded variants that actually run."""

from __future__ import annotations

import functools
import sys

import pytest
import torch

from unet_surgery.errors import PresetError, SurgeryError
from unet_surgery.presets import (
    PRESETS,
    Preset,
    build_unet,
    example_inputs,
    expected_output_shape,
    get_preset,
    list_presets,
    preset_config,
    randomize_zero_init_,
)

pytest.importorskip("diffusers")

# Published UNet parameter counts. SD1.5 / SD2.1 / SDXL are the widely quoted totals of the
# hub checkpoints (e.g. diffusers' `unet.num_parameters()` on the loaded models); the video
# ones equal the hub safetensors sizes / 2 bytes in fp16, and AnimateDiff is SD1.5 plus the
# 453,209,280 parameters of the v1-5-2 motion adapter. The LDM UNetModel is the same network
# as SD1.5 / SD2.1 in another layout, hence the same totals.
FULL_PARAM_COUNTS = {
    "sd15": 859_520_964,
    "sd21": 865_910_724,
    "sdxl": 2_567_463_684,
    "animatediff": 1_312_730_244,
    "modelscope_t2v": 1_411_233_860,
    "svd": 1_524_623_082,
    "ldm_sd15": 859_520_964,
    "ldm_sd21": 865_910_724,
}
MOTION_ADAPTER_V152_PARAMS = 453_209_280


def _needs_ldm(name: str) -> None:
    if name.startswith("ldm_"):
        pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _forward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


def test_list_presets_matches_constant() -> None:
    assert list_presets() == list(PRESETS)
    assert {"sd15", "sd21", "sdxl", "animatediff", "modelscope_t2v", "svd", "ldm_sd15"} <= set(
        PRESETS
    )


@pytest.mark.parametrize("name", PRESETS)
def test_full_size_on_meta_has_published_param_count(name: str) -> None:
    _needs_ldm(name)
    model = build_unet(name)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert _n_params(model) == FULL_PARAM_COUNTS[name]
    assert get_preset(name).full_param_count == FULL_PARAM_COUNTS[name]


def test_full_sdxl_on_meta_allocates_nothing() -> None:
    # Speed is measured in benchmarks/, never asserted; what makes meta builds cheap is that
    # no parameter or buffer holds storage.
    model = build_unet("sdxl")
    assert type(model).__name__ == "UNet2DConditionModel"
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.is_meta for t in tensors)


def test_motion_adapter_config_is_v152() -> None:
    diffusers = pytest.importorskip("diffusers")
    cfg = preset_config("animatediff")
    assert set(cfg) == {"unet", "motion_adapter"}
    adapter_cfg = {k: v for k, v in cfg["motion_adapter"].items() if not k.startswith("_")}
    with torch.device("meta"):
        adapter = diffusers.MotionAdapter.from_config(adapter_cfg)
    assert _n_params(adapter) == MOTION_ADAPTER_V152_PARAMS
    assert adapter_cfg["use_motion_mid_block"] is True


def test_sdxl_config_details() -> None:
    cfg = preset_config("sdxl")
    assert cfg["block_out_channels"] == [320, 640, 1280]
    assert cfg["transformer_layers_per_block"] == [1, 2, 10]
    assert cfg["down_block_types"][0] == "DownBlock2D"
    assert cfg["cross_attention_dim"] == 2048
    assert cfg["projection_class_embeddings_input_dim"] == 2816
    assert cfg["addition_embed_type"] == "text_time"
    assert cfg["sample_size"] == 128


@pytest.mark.parametrize(
    ("name", "cls", "levels", "hw", "frames", "in_ch", "ctx"),
    [
        ("sd15", "UNet2DConditionModel", 4, (512, 512), None, 4, 768),
        ("sd21", "UNet2DConditionModel", 4, (512, 512), None, 4, 1024),
        ("sdxl", "UNet2DConditionModel", 3, (1024, 1024), None, 4, 2048),
        ("animatediff", "UNetMotionModel", 4, (512, 512), 16, 4, 768),
        ("modelscope_t2v", "UNet3DConditionModel", 4, (256, 256), 16, 4, 1024),
        ("svd", "UNetSpatioTemporalConditionModel", 4, (576, 1024), 14, 8, 1024),
        ("ldm_sd15", "UNetModel", 4, (512, 512), None, 4, 768),
        ("ldm_sd21", "UNetModel", 4, (512, 512), None, 4, 1024),
    ],
)
def test_preset_records(name, cls, levels, hw, frames, in_ch, ctx) -> None:
    p = get_preset(name)
    assert isinstance(p, Preset)
    assert (p.model_class, p.levels, p.base_resolution, p.num_frames) == (cls, levels, hw, frames)
    assert (p.in_channels, p.latent_channels, p.cross_attention_dim) == (in_ch, 4, ctx)
    assert p.is_video == (frames is not None)
    assert p.family == ("ldm" if name.startswith("ldm_") else "diffusers")
    assert p.vae_scale_factor == 8
    with pytest.raises(AttributeError):
        p.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize("name", PRESETS)
def test_tiny_keeps_level_structure(name: str) -> None:
    full, tiny = preset_config(name), preset_config(name, size="tiny")
    if name.startswith("ldm_"):
        full, tiny = full["params"], tiny["params"]
        keys = ["num_res_blocks", "attention_resolutions", "transformer_depth", "in_channels"]
        assert len(full["channel_mult"]) == len(tiny["channel_mult"])
    else:
        full, tiny = full.get("unet", full), tiny.get("unet", tiny)
        keys = [
            "down_block_types",
            "up_block_types",
            "layers_per_block",
            "in_channels",
            "out_channels",
            "use_linear_projection",
            "addition_embed_type",
        ]
        assert len(full["block_out_channels"]) == len(tiny["block_out_channels"])
        tl_full = full.get("transformer_layers_per_block", 1)
        tl_tiny = tiny.get("transformer_layers_per_block", 1)
        if isinstance(tl_full, list):
            # Same shape of the pattern (levels with 1 vs >1 layers), capped depth.
            assert [x > 1 for x in tl_full] == [x > 1 for x in tl_tiny]
    for key in keys:
        assert full.get(key) == tiny.get(key), key


@functools.cache
def _tiny(name: str, seed: int = 0) -> torch.nn.Module:
    """Tiny models are reused across tests; nothing here mutates them."""
    return build_unet(name, size="tiny", device="cpu", seed=seed)


@pytest.mark.parametrize("name", PRESETS)
def test_tiny_forward_shape_and_determinism(name: str) -> None:
    _needs_ldm(name)
    rng_before = torch.get_rng_state()
    model = _tiny(name)
    assert torch.equal(torch.get_rng_state(), rng_before), "build_unet must not touch global RNG"
    assert _n_params(model) < 10_000_000
    inputs = example_inputs(model, seed=0)
    out = _forward(model, inputs)
    assert tuple(out.shape) == expected_output_shape(model, inputs)
    assert torch.isfinite(out).all()
    assert out.std() > 0

    again = build_unet(name, size="tiny", device="cpu", seed=0)
    assert torch.equal(out, _forward(again, inputs))

    other = dict(build_unet(name, size="tiny", device="cpu", seed=1).named_parameters())
    for key, value in model.named_parameters():
        assert not torch.equal(value, other[key]), f"{key} does not depend on the seed"


@pytest.mark.parametrize("name", PRESETS)
def test_tiny_has_no_all_zero_or_constant_parameter(name: str) -> None:
    _needs_ldm(name)
    for pname, param in _tiny(name).named_parameters():
        flat = param.detach().reshape(-1)
        assert flat.any(), f"{pname} is all zeros"
        if flat.numel() > 1:
            assert not (flat == flat[0]).all(), f"{pname} is constant"


def test_example_inputs_layouts() -> None:
    ad = example_inputs("animatediff", size="tiny", batch=2, num_frames=3)
    assert ad["sample"].shape == (2, 4, 3, 8, 8)
    assert ad["encoder_hidden_states"].shape == (2 * 3, 77, 32)  # repeated per frame
    ms = example_inputs("modelscope_t2v", size="tiny", batch=2, num_frames=3)
    assert ms["sample"].shape == (2, 4, 3, 8, 8)
    assert ms["encoder_hidden_states"].shape == (2, 77, 64)
    svd = example_inputs("svd", batch=2, device="meta")
    assert svd["sample"].shape == (2, 14, 8, 72, 128)
    assert svd["encoder_hidden_states"].shape == (2, 1, 1024)
    assert svd["added_time_ids"].shape == (2, 3)
    xl = example_inputs("sdxl", device="meta")
    assert xl["sample"].shape == (1, 4, 128, 128)
    assert xl["encoder_hidden_states"].shape == (1, 77, 2048)
    assert xl["added_cond_kwargs"]["text_embeds"].shape == (1, 1280)
    assert xl["added_cond_kwargs"]["time_ids"].shape == (1, 6)
    ldm = example_inputs("ldm_sd15", height=768, width=512, device="meta")
    assert set(ldm) == {"x", "timesteps", "context"}
    assert ldm["x"].shape == (1, 4, 96, 64)
    with pytest.raises(PresetError):
        example_inputs("sd15", height=500)


def test_example_inputs_are_seeded() -> None:
    a = example_inputs("sd15", size="tiny", seed=3)
    b = example_inputs("sd15", size="tiny", seed=3)
    c = example_inputs("sd15", size="tiny", seed=4)
    assert torch.equal(a["sample"], b["sample"])
    assert not torch.equal(a["sample"], c["sample"])


def test_full_sdxl_meta_forward_traces() -> None:
    model = build_unet("sdxl")
    inputs = example_inputs(model, device="meta")
    out = _forward(model, inputs)
    assert out.device.type == "meta"
    assert tuple(out.shape) == (1, 4, 128, 128)


def test_tiny_ldm_forward_batch2_and_autocast() -> None:
    pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    model = build_unet("ldm_sd15", size="tiny", device="cpu")
    inputs = example_inputs(model, batch=2)
    out = _forward(model, inputs)
    assert out.shape == (2, 4, 8, 8)
    assert not torch.equal(out[0], out[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _forward(model, inputs)
    assert low.shape == out.shape
    # Half-precision weights cannot run the original LDM code: refuse early.
    with pytest.raises(PresetError, match="float32"):
        build_unet("ldm_sd15", size="tiny", device="cpu", dtype=torch.float16)
    assert build_unet("ldm_sd15", dtype=torch.float16).dtype == torch.float16  # meta is fine


def test_tiny_ldm_sd15_matches_tiny_diffusers_sd15_sizes() -> None:
    """Same widths/heads in both layouts, so checkpoint converters can be tested tiny."""
    pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    ldm = build_unet("ldm_sd15", size="tiny", device="meta")
    dif = build_unet("sd15", size="tiny", device="meta")
    assert _n_params(ldm) == _n_params(dif)


def test_randomize_zero_init_targets_only_zero_params() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    torch.nn.init.zeros_(model[0].weight)
    kept = model[0].bias.detach().clone()
    touched = randomize_zero_init_(model, seed=0)
    assert touched == ["0.weight", "1.bias"]
    assert model[0].weight.any() and model[1].bias.any()
    assert model[0].weight.abs().max() < 0.2
    assert torch.equal(model[0].bias, kept)
    assert torch.equal(model[1].weight, torch.ones(4))  # constant, but not asked to jitter
    randomize_zero_init_(model, seed=0, include_constant=True)
    assert not torch.equal(model[1].weight, torch.ones(4))


def test_zero_init_trap_exists_in_ldm() -> None:
    """Documents why randomisation is needed: LDM zero-initialises its output layers."""
    openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    params = preset_config("ldm_sd15", size="tiny")["params"]
    model = openaimodel.UNetModel(**params)
    zero = {n for n, p in model.named_parameters() if not p.any()}
    assert {"out.2.weight", "input_blocks.1.0.out_layers.3.weight"} <= zero
    assert "input_blocks.1.1.proj_out.weight" in zero
    built = build_unet("ldm_sd15", size="tiny", device="cpu")
    assert all(p.any() for p in built.parameters())


@pytest.mark.parametrize("bad", ["sd16", "SDXL-base", "nope"])
def test_unknown_preset_raises_with_valid_names(bad: str) -> None:
    with pytest.raises(PresetError) as info:
        build_unet(bad)
    message = str(info.value)
    for name in PRESETS:
        assert name in message
    assert isinstance(info.value, SurgeryError)


def test_unknown_preset_suggests_closest() -> None:
    with pytest.raises(PresetError, match="Did you mean 'sd15'"):
        preset_config("sd16")
    with pytest.raises(PresetError, match="Did you mean 'modelscope_t2v'"):
        get_preset("modelscope")


def test_bad_size_and_untagged_model() -> None:
    with pytest.raises(PresetError, match="size"):
        build_unet("sd15", size="small")
    with pytest.raises(PresetError, match="build_unet"):
        example_inputs(torch.nn.Linear(2, 2))


def test_preset_config_returns_copies() -> None:
    cfg = preset_config("sd15")
    cfg["block_out_channels"].append(1)
    assert preset_config("sd15")["block_out_channels"] == [320, 640, 1280, 1280]
    assert preset_config("SD15")["_class_name"] == "UNet2DConditionModel"


def test_missing_optional_packages_raise_preset_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(PresetError, match=r"unet-surgery\[diffusers\]"):
        build_unet("sd15")
    monkeypatch.setitem(sys.modules, "ldm.modules.diffusionmodules.openaimodel", None)
    with pytest.raises(PresetError, match="--no-deps stable-diffusion-sdkit"):
        build_unet("ldm_sd15")
