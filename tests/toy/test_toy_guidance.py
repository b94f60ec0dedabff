"""Guidance passes act in the toy sampler: it batches ``[uncond, cond]`` and says so to the patch."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from unet_surgery.demo import recipe_for
from unet_surgery.graph import map_unet
from unet_surgery.toy.model import load_toy
from unet_surgery.toy.sampling import sample_recipe

pytestmark = pytest.mark.filterwarnings("ignore")


@torch.no_grad()
def test_fouriscale_guidance_changes_the_toy_images():
    toy = load_toy("toy4")
    unet_map = map_unet(toy.unet, latent_hw=(64, 64))
    recipe = recipe_for("fouriscale", unet_map, 64)
    assert recipe is not None
    types = [p.type for p in recipe.passes]
    assert "fouriscale_guidance" in types  # the official scripts guide with the third branch
    without = replace(recipe, passes=tuple(p for p in recipe.passes if p.type != "fouriscale_guidance"))
    kwargs = {"seeds": [3], "size": 64, "steps": 4, "unet_map": unet_map}
    guided = sample_recipe(toy, recipe, [0], **kwargs)
    plain = sample_recipe(toy, without, [0], **kwargs)
    assert float((guided - plain).abs().max()) > 1e-3
