"""A recipe knows what it is for: its structure (map signature), family and base size.

The expected signatures are read off each preset's ``config.json`` (levels = block widths,
attention levels = the cross-attention down blocks plus the mid block), never from the mapper.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import preset_map
from unet_surgery import RecipeError, apply, auto_recipe, list_recipes, load_recipe
from unet_surgery.cli import main
from unet_surgery.patching.patch import current_patch
from unet_surgery.presets import PRESETS, build_unet, preset_config
from unet_surgery.recipes.fit import RecipeMismatchError, map_signature

SDXL_RECIPE = "scalecrafter-sdxl-2048x2048"


def config_signature(name: str) -> str:
    """The signature of a diffusers image preset from its config alone."""
    cfg = preset_config(name)
    levels = len(cfg["block_out_channels"])
    attention = [i for i, kind in enumerate(cfg["down_block_types"]) if "CrossAttn" in kind]
    if "CrossAttn" in (cfg.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        attention.append(levels - 1)
    spans = sorted(set(attention))
    text = f"{spans[0]}-{spans[-1]}" if spans == list(range(spans[0], spans[-1] + 1)) else ",".join(map(str, spans))
    return f"{levels} levels, attention {text}, image"


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_signature_is_read_off_the_architecture(name: str) -> None:
    expected = config_signature(name)
    assert map_signature(preset_map(name)) == expected
    assert map_signature(preset_map(name, "tiny")) == expected  # widths do not matter
    if name != "sdxl":
        assert map_signature(preset_map(f"ldm_{name}")) == expected  # nor the layout


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_states_its_family_and_structure(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.model and recipe.signature
    if recipe.model in PRESETS and recipe.model in ("sd15", "sd21", "sdxl"):
        assert recipe.signature == config_signature(recipe.model)
    if recipe.model in PRESETS:
        assert recipe.signature == map_signature(preset_map(recipe.model))
    else:  # a toy: its shipped model's map
        assert recipe.signature == toy_signature(recipe.model)


@functools.cache
def toy_signature(name: str) -> str:
    from unet_surgery.graph import map_unet
    from unet_surgery.toy.model import load_toy

    return map_signature(map_unet(load_toy(name).unet))


def test_sdxl_recipe_on_sd15_is_refused_in_one_line_naming_both() -> None:
    model = build_unet("sd15", device="meta")
    with pytest.raises(RecipeMismatchError) as caught:
        apply(model, SDXL_RECIPE, unet_map=preset_map("sd15"))
    message = str(caught.value)
    assert "\n" not in message and SDXL_RECIPE in message and "sdxl" in message
    assert config_signature("sdxl") in message and config_signature("sd15") in message and "force" in message
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = apply(model, SDXL_RECIPE, unet_map=preset_map("sd15"), force=True)
    assert patch.plan.layers  # forced: the same-named layers are changed, as before
    patch.remove()


def test_auto_recipe_carries_the_structure_of_its_map() -> None:
    recipe = auto_recipe(preset_map("sdxl"), base=1024, target=2048)
    assert recipe.signature == config_signature("sdxl")
    with pytest.raises(RecipeError, match="made for"):
        apply(build_unet("sd15", device="meta"), recipe, unet_map=preset_map("sd15"))


def test_a_recipe_without_signature_is_checked_through_its_model_preset() -> None:
    from dataclasses import replace

    recipe = replace(load_recipe(SDXL_RECIPE), signature=None)
    with pytest.raises(RecipeMismatchError, match="made for sdxl"):
        apply(build_unet("sd15", device="meta"), recipe, unet_map=preset_map("sd15"))


def test_another_stated_base_size_is_refused_unless_forced() -> None:
    tiny = build_unet("sd15", size="tiny")  # config.sample_size 8 x VAE factor 8: a 64x64 model
    recipe = "scalecrafter-sd15-2048x2048"  # published for SD1.5 at 512x512
    with pytest.raises(RecipeMismatchError) as caught:
        apply(tiny, recipe, unet_map=preset_map("sd15", "tiny"))
    message = str(caught.value)
    assert "\n" not in message and "at 512x512" in message and "at 64x64" in message
    assert "another base size" in message and "structure" not in message.split(":")[-1]
    assert current_patch(tiny) is None  # refused before anything was installed
    patch = apply(tiny, recipe, unet_map=preset_map("sd15", "tiny"), force=True)
    assert patch.plan.layers
    patch.remove()


def test_another_family_of_the_same_structure_and_size_is_refused() -> None:
    """SD1.5 and SD2.1 share levels, attention levels and 512x512: only the family tells them apart."""
    model = build_unet("sd21", device="meta")
    assert map_signature(preset_map("sd21")) == map_signature(preset_map("sd15"))
    with pytest.raises(RecipeMismatchError, match=r"made for sd15 .* not this sd21 .*another family;"):
        apply(model, "scalecrafter-sd15-2048x2048", unet_map=preset_map("sd21"))
    apply(model, "scalecrafter-sd21-2048x2048", unet_map=preset_map("sd21")).remove()


def test_an_untagged_model_is_told_by_its_config() -> None:
    """A diffusers UNet built from SD2.1's config without the preset tag (as `from_pretrained` gives)."""
    import diffusers

    from unet_surgery.recipes.fit import model_family

    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel.from_config(preset_config("sd21"))
    assert not hasattr(model, "unet_surgery_preset") and model_family(model) == "sd21"
    with pytest.raises(RecipeMismatchError, match="another family"):
        apply(model, "scalecrafter-sd15-2048x2048", unet_map=preset_map("sd21"))


def test_recipes_validate_with_model_refuses_the_other_family(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The issue's example: `recipes validate sdxl.yaml --model sd15` printed `ok`."""
    file = tmp_path / "sdxl.yaml"
    assert main(["recipes", "show", SDXL_RECIPE]) == 0
    file.write_text(capsys.readouterr().out)
    assert main(["recipes", "validate", str(file), "--model", "sd15"]) == 2
    out, err = capsys.readouterr()
    assert "ok" not in out and err.count("\n") == 1 and "made for sdxl" in err
    assert main(["recipes", "validate", str(file), "--model", "sdxl"]) == 0
    assert ": ok (" in capsys.readouterr().out
    assert main(["recipes", "validate", str(file), "--model", "sd15", "--force"]) == 0


def test_apply_cli_refuses_and_forces(capsys: pytest.CaptureFixture) -> None:
    assert main(["apply", "--recipe", SDXL_RECIPE, "sd15"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unet-surgery apply: error: recipe 'scalecrafter-sdxl-2048x2048' was made for sdxl")
    assert main(["apply", "--recipe", SDXL_RECIPE, "--force", "sd15"]) == 0
    assert "change(s)" in capsys.readouterr().out
