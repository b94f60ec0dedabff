"""Shipped recipes: every one loads and round-trips; the ScaleCrafter ones are the published
tables, and applying them selects exactly the published layers that exist."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.conftest import preset_map, published_config, published_table, reference_path
from unet_surgery import apply, auto_recipe, list_recipes, load_recipe
from unet_surgery.passes import make_plan
from unet_surgery.presets import build_unet
from unet_surgery.recipes import parse_recipe, to_data
from unet_surgery.recipes.library import dump_recipe

SCALECRAFTER = sorted(n for n in list_recipes() if n.startswith("scalecrafter-"))


def test_every_published_config_with_dilation_is_shipped() -> None:
    configs = [p.stem for p in reference_path("scalecrafter", "configs").glob("*.yaml") if p.stem != "sdxl_vanilla"]
    assert len(SCALECRAFTER) == len(configs) + sum(c.endswith("_disperse") for c in configs) == 18


@pytest.mark.parametrize("name", list_recipes())
def test_shipped_recipe_round_trips(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name
    assert parse_recipe(to_data(recipe)) == recipe
    assert parse_recipe(yaml.safe_load(dump_recipe(recipe))) == recipe


@pytest.mark.parametrize("name", SCALECRAFTER)
def test_scalecrafter_recipe_is_the_published_config(name: str) -> None:
    cfg, recipe = published_config(name), load_recipe(name)
    passes = {type(p).type: p for p in recipe.passes}
    dilate = passes["redilate"]
    assert dilate.factors == published_table(cfg["dilate_settings"])
    assert (dilate.schedule.tau, dilate.schedule.steps, dilate.schedule.progressive) == (
        cfg["dilate_tau"], cfg["num_inference_steps"], cfg["progressive"]
    )
    ndcfg = published_table(cfg.get("ndcfg_dilate_settings"))
    if ndcfg:
        assert passes["noise_damped_cfg"].factors == ndcfg
        assert passes["noise_damped_cfg"].schedule.tau == cfg["ndcfg_tau"]
    else:
        assert "noise_damped_cfg" not in passes
    if cfg.get("disperse_settings"):
        listed = reference_path("scalecrafter", *Path(cfg["disperse_settings"]).parts).read_text().split()
        assert list(passes["disperse"].select.paths) == listed
        expected_tau = cfg["inflate_tau"] if not name.endswith("-active") else cfg["dilate_tau"]
        assert passes["disperse"].schedule.tau == expected_tau
    assert recipe.target_resolutions == ((cfg["latent_height"] * 8, cfg["latent_width"] * 8),)


@pytest.mark.parametrize("name", SCALECRAFTER)
def test_applying_selects_exactly_the_published_layers_that_exist(name: str) -> None:
    recipe = load_recipe(name)
    model_name = recipe.model
    unet_map = preset_map(model_name)
    model = build_unet(model_name, device="meta")
    table = next(p for p in recipe.passes if type(p).type == "redilate").factors
    existing = set(unet_map.paths())
    with apply(model, recipe, unet_map=unet_map) as patch:
        redilated = {path: e.factor for path, e in patch.plan.entries("redilate").items()}
        assert redilated == {p: f for p, f in table.items() if p in existing}
        reported = {m.path for m in patch.plan.missing}
        listed = set(table)
        for p in recipe.passes:
            listed |= set(getattr(p, "factors", {})) | set(p.select.paths or ())
        assert reported == listed - existing
        if model_name == "sdxl":
            assert "down_blocks.3.resnets.0.conv1" in reported  # named by the SDXL tables
            assert "missing in model, skipped" in patch.report()
        else:
            assert not reported


@pytest.mark.parametrize(("ldm", "diffusers"), [("ldm_sd15", "sd15"), ("ldm_sd21", "sd21")])
@pytest.mark.parametrize("target", [(1024, 1024), (2048, 2048), (1024, 2048), (768, 1280)])
def test_auto_recipe_selects_the_same_layers_on_ldm_and_diffusers(ldm, diffusers, target) -> None:
    plans = []
    for name in (ldm, diffusers):
        unet_map = preset_map(name)
        recipe = auto_recipe(unet_map, base=512, target=target, policy="scalecrafter")
        plan = make_plan(recipe, unet_map)
        plans.append(Counter(
            (p.record.level, p.record.stage, p.record.kernel, p.record.stride, p.entry("redilate").factor)
            for p in plan.layers.values()
        ))
    assert plans[0] == plans[1]
    assert sum(plans[0].values()) > 0


@pytest.mark.parametrize(
    ("table", "target"),
    [("sd1.5_1024x1024", 1024), ("sd1.5_1280x1280", 1280), ("sd1.5_2048x2048", 2048), ("sd1.5_2048x1024", (1024, 2048))],
)
def test_auto_recipe_reproduces_the_published_sd15_tables(table, target) -> None:
    unet_map = preset_map("sd15")
    plan = make_plan(auto_recipe(unet_map, base=512, target=target, policy="scalecrafter"), unet_map)
    published = published_table(f"assets/dilate_settings/{table}.txt")
    auto = {path: e.factor for path, e in plan.entries("redilate").items()}
    assert auto == published


def test_recipe_reference_page_is_generated_from_the_schema() -> None:
    from unet_surgery.recipes.reference import schema_reference

    page = Path(__file__).resolve().parents[2] / "docs" / "recipe-reference.md"
    assert page.read_text() == schema_reference(), "run: python -m unet_surgery.recipes.reference > docs/recipe-reference.md"


# FreeU factors as published (shared reference notes: the official ScaleCrafter scripts for SD1.5
# and SD2.1, FreeScale's for SDXL); diffusers patches every resnet of up_blocks 0 and 1
# (resolution_idx 0 and 1), LDM the same merges in output_blocks 0-5.
FREEU_PUBLISHED = {
    "freeu-sd15": {"b1": 1.2, "b2": 1.4, "s1": 0.9, "s2": 0.2},
    "freeu-sd21": {"b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2},
    "freeu-sdxl": {"b1": 1.1, "b2": 1.2, "s1": 0.6, "s2": 0.4},
}
# Typed from the FreeU README (ChenyangSi/FreeU @ 3676d36, "Parameters"), listed with its v2 code.
FREEU_README = {
    "freeu-v2-sd15": {"b1": 1.5, "b2": 1.6, "s1": 0.9, "s2": 0.2},
    "freeu-v2-sd21": {"b1": 1.4, "b2": 1.6, "s1": 0.9, "s2": 0.2},
    "freeu-v2-sdxl": {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2},
}
FREEU_MERGES = {
    "diffusers": [f"up_blocks.{i}.resnets.{j}" for i in (0, 1) for j in range(3)],
    "ldm": [f"output_blocks.{k}.0" for k in range(6)],
}


@pytest.mark.parametrize(
    ("name", "model_name"),
    # One case per (recipe, layout): the LDM cases map an ldm_* preset, skipped without ldm.
    [(n, m) for n in sorted(FREEU_PUBLISHED) for m in (n.removeprefix("freeu-"), f"ldm_{n.removeprefix('freeu-')}")
     if m != "ldm_sdxl"],
)
def test_freeu_recipe_has_the_published_factors_and_selects_the_merges(name: str, model_name: str) -> None:
    recipe = load_recipe(name)
    (config,) = recipe.passes
    assert type(config).type == "freeu" and config.threshold == 1 and config.schedule.tau is None
    assert {k: getattr(config, k) for k in ("b1", "b2", "s1", "s2")} == FREEU_PUBLISHED[name]
    assert model_name.removeprefix("ldm_") == recipe.model
    plan = make_plan(recipe, preset_map(model_name))
    layout = "ldm" if model_name.startswith("ldm_") else "diffusers"
    assert sorted(plan.entries("freeu"), key=FREEU_MERGES[layout].index) == FREEU_MERGES[layout]


def test_every_freeu_recipe_is_listed() -> None:
    assert sorted(n for n in list_recipes() if n.startswith("freeu-")) == sorted({**FREEU_PUBLISHED, **FREEU_README})


@pytest.mark.parametrize("name", sorted(FREEU_README))
def test_freeu_v2_recipe_has_the_readme_factors_and_the_v1_selection(name: str) -> None:
    from unet_surgery.passes.freeu.builder import freeu_recipe

    recipe = load_recipe(name)
    (config,) = recipe.passes
    assert {k: getattr(config, k) for k in ("b1", "b2", "s1", "s2")} == FREEU_README[name]
    assert (config.backbone_scaling, config.threshold, config.schedule.tau) == ("structure", 1, None)
    family = name.removeprefix("freeu-v2-")
    v1 = load_recipe(f"freeu-{family}")
    assert (recipe.model, recipe.signature, recipe.base_resolution) == (family, v1.signature, v1.base_resolution)
    assert config.select == v1.passes[0].select  # the same two stages
    unet_map = preset_map(family)
    assert make_plan(recipe, unet_map).entries("freeu").keys() == make_plan(v1, unet_map).entries("freeu").keys()
    built = freeu_recipe(unet_map, base=recipe.base_resolution, backbone_scaling="structure", **FREEU_README[name])
    assert built.passes == recipe.passes


# FouriScale: the official configs (LeonHLJ/FouriScale configs/*.yaml), typed here:
# recipe -> (start_step, stop_step, latent_height, latent_width, layer list, mask floor).
FOURISCALE_CONFIGS = {
    "fouriscale-sd15-1024x1024": (10, 30, 128, 128, "sd", 0.0),
    "fouriscale-sd15-1280x1280": (10, 30, 160, 160, "sd", 0.0),
    "fouriscale-sd15-2048x1024": (20, 35, 128, 256, "sd", 0.0),
    "fouriscale-sd15-2048x2048": (20, 35, 256, 256, "sd", 0.0),
    "fouriscale-sd21-1024x1024": (10, 30, 128, 128, "sd", 0.0),
    "fouriscale-sd21-1280x1280": (10, 30, 160, 160, "sd", 0.0),
    "fouriscale-sd21-2048x1024": (20, 35, 128, 256, "sd", 0.0),
    "fouriscale-sd21-2048x2048": (20, 35, 256, 256, "sd", 0.0),
    "fouriscale-sdxl-2048x2048": (20, 35, 256, 256, "xl", 0.6),
    "fouriscale-sdxl-2560x2560": (20, 35, 320, 320, "xl", 0.6),
    "fouriscale-sdxl-4096x2048": (20, 35, 256, 512, "xl", 0.6),
    "fouriscale-sdxl-4096x4096": (20, 35, 512, 512, "xl", 0.6),
}
# text2image_xl.py: base_size = find_smallest_padding_pair(pixel_height, pixel_width,
# assets/base_settings/sdxl.txt), worked out by hand from the table: 2048^2 and 4096^2 -> 1024x1024
# (no padding); 2560^2 -> 896x1088 (r = 3, padding 128 + 704, the first of four ties in file
# order; 1024x1024 pads 512 + 512); 4096x2048 -> 704x1408 (r = 3, padding 64 + 128).
FOURISCALE_SDXL_BASE = {"fouriscale-sdxl-2560x2560": (896, 1088), "fouriscale-sdxl-4096x2048": (704, 1408)}
# text2image.py / text2image_xl.py: register_free_upblock2d(pipeline, b1, b2, s1, s2) unless --disable_freeu.
FOURISCALE_FREEU = {"sd15": (1.2, 1.4, 0.9, 0.2), "sd21": (1.1, 1.2, 0.9, 0.2), "sdxl": (1.1, 1.2, 0.6, 0.4)}


def test_every_fouriscale_recipe_is_listed() -> None:
    assert sorted(n for n in list_recipes() if n.startswith("fouriscale-")) == sorted(FOURISCALE_CONFIGS)


@pytest.mark.parametrize("name", sorted(FOURISCALE_CONFIGS))
def test_fouriscale_recipe_is_the_official_config(name: str) -> None:
    from tests.passes.test_fouriscale import OFFICIAL_SD15_LAYERS, OFFICIAL_SDXL_LAYERS

    start, stop, lh, lw, layers, value = FOURISCALE_CONFIGS[name]
    recipe = load_recipe(name)
    assert recipe.target_resolutions == ((lh * 8, lw * 8),)
    listed = OFFICIAL_SD15_LAYERS if layers == "sd" else OFFICIAL_SDXL_LAYERS
    family = name.split("-")[1]
    convs = [c for c in recipe.passes if type(c).type == "fouriscale"]
    (guidance,) = (c for c in recipe.passes if type(c).type == "fouriscale_guidance")
    (freeu,) = (c for c in recipe.passes if type(c).type == "freeu")
    assert len(recipe.passes) == len(convs) + 2
    filtered = {p for c in convs if c.filter for p in c.select.paths}
    plain = {p for c in convs if not c.filter for p in c.select.paths}
    assert filtered | plain == set(listed) and not filtered & plain
    assert plain == {p for p in listed if "upsamplers" in p}  # apply_filter=("upsamplers" not in name)
    xl = layers == "xl"
    for c in convs:
        assert (c.dilation, c.start_step, c.stop_step, c.steps, c.progressive, c.mask_value) == (
            "auto", start, stop, 50, True, value
        )
        # FouriConvProcessor_XL: weak branch at ceil(max(d / 1.5, 1)), weak scale d / stride unfloored
        assert (c.weak_dilation_divisor, c.weak_scale_floor) == ((1.5, False) if xl else (1.0, True))
        assert c.base_size == FOURISCALE_SDXL_BASE.get(name)
    assert (guidance.amp_guidance, guidance.amp_stop_step, guidance.steps) == (False, start, 50)
    assert (freeu.b1, freeu.b2, freeu.s1, freeu.s2) == FOURISCALE_FREEU[family] and recipe.model == family
    unet_map = preset_map(family, "full")
    plan = make_plan(recipe, unet_map)
    assert set(plan.entries("fouriscale")) == set(listed)
    # every attn1 gets TrainingFreeAttnProcessor (aux.py / aux_xl.py list_layers)
    attn1 = {a.path for a in unet_map.attentions if a.path.endswith("attn1")}
    assert set(plan.entries("fouriscale_guidance")) == attn1 and attn1
HIDIFFUSION = sorted(n for n in list_recipes() if n.startswith("hidiffusion-"))
# Typed from megvii-research/HiDiffusion hidiffusion.py (sd15_hidiffusion_key / sdxl_hidiffusion_key):
# the RAU-Net convs, the transformers the RAU-Net blocks pool after (attentions.0) and resize after
# (attentions.1), and the attn1 of every MSW-MSA transformer block. The official code forwards
# skip sizes to every upsampler (num_upsamplers += 12); on SD1.5 the samplers of levels 1 and 2,
# below the RAU-Net pair, keep their sizes (their downsamplers and the upsamplers into them).
HIDIFFUSION_LAYERS = {
    "sd15": {"down_blocks.0.downsamplers.0.conv", "up_blocks.2.upsamplers.0.conv",
             "down_blocks.1.downsamplers.0.conv", "down_blocks.2.downsamplers.0.conv",
             "up_blocks.0.upsamplers.0.conv", "up_blocks.1.upsamplers.0.conv",
             *(f"down_blocks.0.attentions.{a}.transformer_blocks.0.attn1" for a in (0, 1)),
             *(f"up_blocks.3.attentions.{a}.transformer_blocks.0.attn1" for a in (0, 1, 2))},
    "sdxl": {"down_blocks.1.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv",
             "down_blocks.1.attentions.0", "up_blocks.1.attentions.1",
             *(f"down_blocks.1.attentions.{a}.transformer_blocks.{t}.attn1" for a in (0, 1) for t in (0, 1)),
             *(f"up_blocks.1.attentions.{a}.transformer_blocks.{t}.attn1" for a in (0, 1, 2) for t in (0, 1))},
}


# The settings the official README runs (model, size): SD1.5/SD2.1 at 1024 and "set height = 2048",
# SDXL at 2048 and "set height = 4096", SDXL-Turbo at 1024, the SDXL ControlNet and inpainting
# examples at 2048, and Playground v2 (SDXL layout) at 2048.
def test_hidiffusion_recipes_are_shipped() -> None:
    assert HIDIFFUSION == [
        "hidiffusion-playground-2048x2048",
        "hidiffusion-sd15-1024x1024", "hidiffusion-sd15-2048x2048",
        "hidiffusion-sd21-1024x1024", "hidiffusion-sd21-2048x2048",
        "hidiffusion-sdxl-2048x2048", "hidiffusion-sdxl-4096x4096",
        "hidiffusion-sdxl-controlnet-2048x2048", "hidiffusion-sdxl-inpainting-2048x2048",
        "hidiffusion-sdxl-turbo-1024x1024",
    ]


# The SD1.5 4x setting adds the pooling pair down_blocks.1 (attentions.0) / up_blocks.2 (attentions.1).
SD15_4X = HIDIFFUSION_LAYERS["sd15"] | {"down_blocks.1.attentions.0", "up_blocks.2.attentions.1"}
HIDIFFUSION_RECIPE_LAYERS = {"hidiffusion-sd15-2048x2048": SD15_4X, "hidiffusion-sd21-2048x2048": SD15_4X}
# sdxl_turbo_hidiffusion_key has no downsampler pair, and T2 0 without the aggressive form
# (inpainting, playground at 2048) leaves it out too: its convs only keep level 1's size under
# the pooling pair (the official forwarded upsample size).
SDXL_SIZE_ONLY = {"hidiffusion-sdxl-turbo-1024x1024", "hidiffusion-sdxl-inpainting-2048x2048",
                  "hidiffusion-playground-2048x2048"}


@pytest.mark.parametrize("name", HIDIFFUSION)
def test_hidiffusion_recipe_maps_and_applies_to_the_official_layers(name: str) -> None:
    recipe = load_recipe(name)
    model = build_unet(recipe.model, device="meta")
    expected = HIDIFFUSION_RECIPE_LAYERS.get(name, HIDIFFUSION_LAYERS["sdxl" if recipe.model == "sdxl" else "sd15"])
    # SDXL-Turbo's recipe states the 512 px Turbo was distilled at; the sdxl preset states 1024
    turbo = name == "hidiffusion-sdxl-turbo-1024x1024"
    with apply(model, recipe, unet_map=preset_map(recipe.model), force=turbo) as patch:
        assert set(patch.plan.layers) == expected
        assert not patch.plan.missing
        size_only = {p for p, layer in patch.plan.layers.items()
                     if layer.entry("rau_net") and all(r.level is not None for r in layer.entry("rau_net").roles)}
    if name in SDXL_SIZE_ONLY:
        assert size_only == {"down_blocks.1.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"}
    elif recipe.model == "sdxl":
        assert size_only == set()


@pytest.mark.parametrize(("config", "target"), [("1024x1024", 1024), ("2048x2048", 2048), ("2048x1024", (1024, 2048))])
def test_auto_recipe_uses_the_published_sd15_schedule(config, target) -> None:
    """Every re-dilation pass of the scalecrafter policy runs for the published ``dilate_tau`` of
    ``num_inference_steps``, progressive where the published config is. (At 1280x1280 the
    published config re-dilates for 35 steps; the policy's rule gives 30 below 3x.)"""
    cfg = yaml.safe_load(reference_path("scalecrafter", "configs", f"sd1.5_{config}.yaml").read_text())
    recipe = auto_recipe(preset_map("sd15"), base=512, target=target, policy="scalecrafter")
    schedules = {(p.schedule.tau, p.schedule.steps, p.schedule.progressive) for p in recipe.passes}
    assert schedules == {(cfg["dilate_tau"], cfg["num_inference_steps"], cfg["progressive"])}


@pytest.mark.parametrize(("table", "target"), [("sd1.5_2048x2048", 2048), ("sd1.5_2048x1024", (1024, 2048))])
def test_auto_recipe_lists_exactly_the_published_upsampler_convs_by_path(table, target) -> None:
    """The per-path pass of the scalecrafter policy holds the upsamplers' convs with the factor
    of the level they upsample from, as the published tables give them; the other convs are in
    the level passes."""
    recipe = auto_recipe(preset_map("sd15"), base=512, target=target, policy="scalecrafter")
    (listed,) = [p.factors for p in recipe.passes if p.factors]
    published = published_table(f"assets/dilate_settings/{table}.txt")
    assert listed == {path: f for path, f in published.items() if ".upsamplers." in path}
