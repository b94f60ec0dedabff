"""The map of every shipped architecture agrees with what its layer names say it should be.

The map is derived from dataflow alone; these tests check it against independent oracles:
the diffusers naming scheme, the published ScaleCrafter list of SD1.5 convolutions, and the
LDM layout of the same architecture.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from tests.conftest import preset_map, reference_path
from unet_surgery.graph import ConvRecord, UNetMap

DIFFUSERS_PRESETS = ("sd15", "sd21", "sdxl", "animatediff", "modelscope_t2v", "svd")
TEMPORAL_MODULES = re.compile(r"(motion_modules|temp_attentions|temp_convs|transformer_in|temporal_transformer_blocks|temporal_res_block)")


def kxk(unet_map: UNetMap) -> list[ConvRecord]:
    return [c for c in unet_map.convs if c.axis != "temporal" and max(c.spatial_kernel) > 1]


def name_oracle(path: str, num_levels: int) -> tuple[int, str]:
    """(level, stage) of a spatial kxk conv from its diffusers name."""
    if path == "conv_in":
        return 0, "down"
    if path == "conv_out":
        return 0, "up"
    if m := re.match(r"down_blocks\.(\d+)\.", path):
        return int(m.group(1)), "down"
    if path.startswith("mid_block."):
        return num_levels - 1, "mid"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|upsamplers)", path):
        level = num_levels - 1 - int(m.group(1))
        # an upsampler's conv runs after the 2x upsampling: one level shallower
        return (level - 1 if m.group(2) == "upsamplers" else level), "up"
    raise AssertionError(f"unexpected conv {path}")


@pytest.mark.parametrize("size", ["full", "tiny"])
@pytest.mark.parametrize("name", DIFFUSERS_PRESETS)
def test_every_spatial_kxk_conv_has_the_level_and_stage_its_name_implies(name: str, size: str) -> None:
    unet_map = preset_map(name, size)
    assert unet_map.method == "export"
    assert unet_map.num_levels == 4 if name != "sdxl" else unet_map.num_levels == 3
    convs = kxk(unet_map)
    assert convs, "no spatial convolution mapped"
    for conv in convs:
        assert (conv.level, conv.stage) == name_oracle(conv.path, unet_map.num_levels), conv


def test_sd15_full_size_counts_per_level_and_stage() -> None:
    unet_map = preset_map("sd15")
    stride1 = Counter((c.level, c.stage) for c in kxk(unet_map) if c.spatial_stride == (1, 1))
    assert stride1 == {
        (0, "down"): 5, (0, "up"): 8,
        (1, "down"): 4, (1, "up"): 7,
        (2, "down"): 4, (2, "up"): 7,
        (3, "down"): 4, (3, "mid"): 4, (3, "up"): 6,
    }
    stride2 = Counter((c.level, c.stage) for c in kxk(unet_map) if c.spatial_stride == (2, 2))
    assert stride2 == {(0, "down"): 1, (1, "down"): 1, (2, "down"): 1}
    assert len(unet_map.convs) == 98
    assert Counter(a.kind for a in unet_map.attentions) == {"self": 16, "cross": 16}
    # 12 skip concatenations, channel splits as in SD1.5's up path (hidden + skip)
    splits = [(s.level, s.hidden_channels, s.skip_channels) for s in unet_map.skips]
    assert splits == [
        (3, 1280, 1280), (3, 1280, 1280), (3, 1280, 1280),
        (2, 1280, 1280), (2, 1280, 1280), (2, 1280, 640),
        (1, 1280, 640), (1, 640, 640), (1, 640, 320),
        (0, 640, 320), (0, 320, 320), (0, 320, 320),
    ]
    assert not any(s.skip_first for s in unet_map.skips)


def test_sd15_kxk_convs_are_exactly_scalecrafters_valid_convs() -> None:
    valid = reference_path("scalecrafter", "assets", "dilate_settings", "all_valid_convs.txt").read_text().split()
    mapped = {c.path for c in kxk(preset_map("sd15"))} - {"conv_in", "conv_out"}
    assert mapped == set(valid)


@pytest.mark.parametrize(("ldm", "diffusers"), [("ldm_sd15", "sd15"), ("ldm_sd21", "sd21")])
def test_ldm_layout_maps_like_its_diffusers_twin_level_by_level(ldm: str, diffusers: str) -> None:
    a, b = preset_map(ldm), preset_map(diffusers)
    assert a.num_levels == b.num_levels

    def profile(m: UNetMap) -> Counter:
        return Counter(
            (c.level, c.stage, c.kernel, c.stride, c.in_channels, c.out_channels) for c in m.convs
        )

    assert profile(a) == profile(b)
    attn = lambda m: Counter((x.level, x.stage, x.kind, x.axis, x.query_dim) for x in m.attentions)  # noqa: E731
    assert attn(a) == attn(b)
    skips = lambda m: [(s.level, s.hidden_channels, s.skip_channels) for s in m.skips]  # noqa: E731
    assert skips(a) == skips(b)
    assert all(c.path.startswith(("input_blocks.", "middle_block.", "output_blocks.", "out.")) for c in a.convs)


@pytest.mark.parametrize("size", ["full", "tiny"])
@pytest.mark.parametrize("name", DIFFUSERS_PRESETS)
def test_attention_roles_and_temporal_layers(name: str, size: str) -> None:
    unet_map = preset_map(name, size)
    for conv in unet_map.convs:
        if TEMPORAL_MODULES.search(conv.path) and max(conv.kernel[:1]) > 1 and conv.op == "conv3d":
            assert conv.axis == "temporal", conv
        if conv.op == "conv3d" and conv.kernel[0] > 1 and max(conv.kernel[1:]) == 1:
            assert conv.axis == "temporal", conv
        if conv.axis != "temporal":
            assert not TEMPORAL_MODULES.search(conv.path) or max(conv.kernel) == 1, conv
    assert unet_map.attentions
    for attn in unet_map.attentions:
        temporal = bool(TEMPORAL_MODULES.search(attn.path))
        assert attn.axis == ("temporal" if temporal else "spatial"), attn
        if attn.path.endswith("attn1"):
            expected = "self"
        elif temporal and name in ("animatediff", "modelscope_t2v"):
            expected = "self"  # motion modules and temporal transformers never see the text
        else:
            expected = "cross"
        assert attn.kind == expected, attn
    assert unet_map.unknown_fields == []


def test_video_presets_have_temporal_layers() -> None:
    assert any(c.axis == "temporal" for c in preset_map("modelscope_t2v").convs)
    assert any(c.axis == "temporal" for c in preset_map("svd").convs)
    for name in ("animatediff", "modelscope_t2v", "svd"):
        assert any(a.axis == "temporal" for a in preset_map(name).attentions), name
