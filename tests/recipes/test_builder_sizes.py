"""Every recipe builder takes ``base=`` and ``target=`` the same way -- pixels, an int or a
``(height, width)`` pair -- and every name and description writes sizes ``WIDTHxHEIGHT``."""

from __future__ import annotations

import re

import pytest

from tests.conftest import preset_map
from unet_surgery import list_recipes, load_recipe
from unet_surgery.cli import main
from unet_surgery.errors import RecipeError
from unet_surgery.passes.fouriscale.builder import fouriscale_recipe
from unet_surgery.passes.freeu.builder import freeu_recipe
from unet_surgery.recipes.auto import auto_recipe
from unet_surgery.recipes.hidiffusion import hidiffusion_recipe

BASE, TARGET = (512, 512), (1024, 2048)  # 2048 wide, 1024 high


@pytest.mark.parametrize("build", [
    lambda m: auto_recipe(m, base=512, target=TARGET),
    lambda m: auto_recipe(m, base=512, target=TARGET, policy="scalecrafter"),
    lambda m: hidiffusion_recipe(m, base=512, target=TARGET),
    lambda m: fouriscale_recipe(m, base=512, target=TARGET),
], ids=["auto", "scalecrafter", "hidiffusion", "fouriscale"])
def test_builders_take_base_and_target_as_keywords(build) -> None:
    recipe = build(preset_map("sd15"))
    assert recipe.base_resolution == BASE and recipe.target_resolutions == (TARGET,)
    assert recipe.name.endswith("-2048x1024")  # WIDTHxHEIGHT
    assert "2048x1024" in recipe.description and "1024x2048" not in recipe.description


def test_freeu_takes_base_and_target() -> None:
    recipe = freeu_recipe(preset_map("sd15"), base=512, target=TARGET, model="sd15")
    assert recipe.base_resolution == BASE and recipe.target_resolutions == (TARGET,)
    assert freeu_recipe(preset_map("sd15"), base=512).target_resolutions == (BASE,)


@pytest.mark.parametrize("name", [n for n in list_recipes() if re.search(r"-\d+x\d+", n)])
def test_shipped_names_are_width_by_height(name: str) -> None:
    width, height = map(int, re.search(r"-(\d+)x(\d+)", name).groups())  # type: ignore[union-attr]
    recipe = load_recipe(name)
    assert recipe.target_resolutions[-1] == (height, width)
    assert "height x width" not in recipe.description


def test_recipes_list_speaks_one_convention(capsys: pytest.CaptureFixture) -> None:
    assert main(["recipes", "list"]) == 0
    out = capsys.readouterr().out
    assert "height x width" not in out and "(width x height)" in out
    assert "video-svd-2048x1152" in out  # 2048 wide, as SVD's 1024x576 doubled


@pytest.mark.parametrize("target", [16385, (512, 10**7), 10**5000], ids=["16385", "tall", "5000-digits"])
@pytest.mark.parametrize("policy", ["auto", "scalecrafter", "demofusion", "multidiffusion"])
def test_a_target_over_the_largest_side_is_refused_in_one_line(policy, target) -> None:
    """16384 px a side is the toolkit's limit (generate's --size, pt2 exports): a builder used to
    return a 19-stage cascade to 10**7 px without a word."""
    with pytest.raises(RecipeError, match="a side over 16384 pixels") as info:
        auto_recipe(preset_map("sd15"), base=512, target=target, policy=policy)
    assert len(str(info.value)) < 200 and "\n" not in str(info.value)


def test_a_recipe_file_over_the_largest_side_is_refused() -> None:
    from unet_surgery.recipes import parse_recipe

    data = {"name": "big", "base_resolution": [512, 512], "target_resolutions": [[512, 20000]],
            "passes": [{"type": "redilate", "select": {"level": "1..3"}, "factor": 2}]}
    with pytest.raises(RecipeError, match=r"target_resolutions\[0\].*a side over 16384 pixels: 20000x512"):
        parse_recipe(data)
    data["target_resolutions"] = [[512, 16384]]
    assert parse_recipe(data).target_resolutions == ((512, 16384),)
    data["sampling"] = {"stages": [[512, 512], [512, 16385]]}
    with pytest.raises(RecipeError, match=r"sampling.stages\[1\].*a side over 16384 pixels"):
        parse_recipe(data)
