"""Shipped DemoFusion recipes carry the official settings; the sections' bad values are one line.

Reference values, typed from PRIS-CV/DemoFusion: ``__call__`` defaults (view_batch_size 16,
stride 64, cosine scales 3/1/1, multi_decoder True, 50 steps) and the README's examples (sigma
0.8). SDXL's native window is 128 latents; SD1.5's 64, with the same stride/window ratio (32).
"""

from __future__ import annotations

import pytest

from unet_surgery.errors import RecipeError
from unet_surgery.recipes import load_recipe, parse_recipe
from unet_surgery.recipes.auto import auto_recipe

OFFICIAL = {"steps": 50, "view_batch_size": 16, "cosine_scale_1": 3.0, "cosine_scale_2": 1.0,
            "cosine_scale_3": 1.0, "sigma": 0.8, "jitter": True, "multi_decoder": True}
SHIPPED = {
    "demofusion-sdxl-2048x2048": (1024, 2048, 64),
    "demofusion-sdxl-3072x3072": (1024, 3072, 64),
    "demofusion-sdxl-4096x4096": (1024, 4096, 64),
    "demofusion-sd15-1024x1024": (512, 1024, 32),
    "demofusion-sd15-2048x2048": (512, 2048, 32),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipe_has_the_official_settings(name: str) -> None:
    base, target, stride = SHIPPED[name]
    recipe = load_recipe(name)
    assert recipe.base_resolution == (base, base)
    assert recipe.target_resolutions == ((target, target),)
    assert recipe.passes == () and recipe.sampling is None
    spec = recipe.demofusion
    assert spec is not None and spec.stride == stride
    assert {k: getattr(spec, k) for k in OFFICIAL} == OFFICIAL


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_auto_policy_gives_the_shipped_settings(name: str) -> None:
    base, target, _ = SHIPPED[name]
    auto = auto_recipe(None, base=base, target=target, policy="demofusion")  # type: ignore[arg-type]
    assert auto.demofusion == load_recipe(name).demofusion
    assert auto.base_resolution == (base, base) and auto.target_resolutions == ((target, target),)


def test_auto_policy_refuses_a_target_below_twice_the_base() -> None:
    with pytest.raises(RecipeError, match="less than twice the base"):
        auto_recipe(None, base=1024, target=1536, policy="demofusion")  # type: ignore[arg-type]


BASE = {"name": "x", "base_resolution": [512, 512], "target_resolutions": [[1024, 1024]], "passes": []}


@pytest.mark.parametrize(("extra", "message"), [
    ({"patches": {"window": 8, "stride": 9}}, "patches.stride: 9 is larger than the window 8"),
    ({"patches": {"window": 0}}, "patches.window: must be >= 1"),
    ({"patches": {"view_batch_size": 0}}, "patches.view_batch_size: must be >= 1"),
    ({"demofusion": {"sigma": 0}}, "demofusion.sigma: must be > 0"),
    ({"demofusion": {}, "target_resolutions": [[768, 768]]}, "less than twice the base 512x512"),
    ({"demofusion": {}, "sampling": {"stages": [[512, 512], [1024, 1024]]}}, "not both"),
    ({"demofusion": {}, "patches": {}}, "DemoFusion brings its own local patches"),
    ({}, "a recipe needs at least one pass"),
])
def test_bad_sections_are_one_clear_line(extra: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message) as info:
        parse_recipe({**BASE, **extra})
    assert "\n" not in str(info.value)
