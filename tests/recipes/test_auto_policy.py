"""The automatic policy: FreeScale's published layers and defaults, stage sizes, bad inputs.

Expected layer sets and numbers come from ``shared/reference/README.md`` (FreeScale's official
scripts: restrained dilation of ``down_blocks.1.downsamplers.0.conv``,
``down_blocks.2.resnets.{0,1}.conv{1,2}`` and ``mid_block.resnets.{0,1}.conv{1,2}`` on SDXL;
``dilate_tau`` 35 of 50; restart at ``int(0.3 * steps)``; ``cosine_scale`` 2.0;
``resolutions_list`` [[1024,1024],[2048,2048],[4096,4096]]) or from arithmetic identities.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.conftest import preset_map
from unet_surgery import RecipeError, auto_recipe
from unet_surgery.passes import make_plan
from unet_surgery.recipes.auto import cascade_stages
from unet_surgery.recipes.schema import RedilatePass, ScaleFusionPass

FREESCALE_SDXL_DILATED = {
    "down_blocks.1.downsamplers.0.conv",
    *(f"down_blocks.2.resnets.{i}.conv{j}" for i in (0, 1) for j in (1, 2)),
    *(f"mid_block.resnets.{i}.conv{j}" for i in (0, 1) for j in (1, 2)),
}


@pytest.mark.slow
def test_auto_policy_dilates_exactly_freescales_sdxl_layers() -> None:
    unet_map = preset_map("sdxl")
    recipe = auto_recipe(unet_map, base=1024, target=4096)
    plan = make_plan(recipe, unet_map)
    redilated = plan.entries("redilate")
    assert set(redilated) == FREESCALE_SDXL_DILATED
    assert all(e.factor == "auto" for e in redilated.values())
    assert not plan.entries("scale_fusion")  # scale fusion is off in the automatic policy


def test_auto_policy_uses_freescales_published_sampling_defaults() -> None:
    unet_map = preset_map("sdxl")
    recipe = auto_recipe(unet_map, base=1024, target=4096)
    assert recipe.sampling.stages == ((1024, 1024), (2048, 2048), (4096, 4096))
    assert recipe.sampling.cosine_scale == 2.0
    assert recipe.sampling.restart_step is None  # the sampler's default: int(0.3 * steps)
    for p in recipe.passes:
        assert isinstance(p, RedilatePass)
        assert (p.schedule.tau, p.schedule.steps, p.schedule.progressive) == (35, 50, False)
    assert not any(isinstance(p, ScaleFusionPass) for p in recipe.passes)


@pytest.mark.parametrize(("ldm", "diffusers"), [("ldm_sd15", "sd15"), ("ldm_sd21", "sd21")])
def test_auto_policy_selects_the_same_layers_on_ldm_and_diffusers(ldm: str, diffusers: str) -> None:
    pytest.importorskip("ldm")
    plans = []
    for name in (ldm, diffusers):
        unet_map = preset_map(name)
        plan = make_plan(auto_recipe(unet_map, base=512, target=2048), unet_map)
        records = {c.path: c for c in unet_map.convs}
        plans.append(Counter((records[p].level, records[p].stage, records[p].kernel, records[p].stride)
                             for p in plan.entries("redilate")))
    assert plans[0] == plans[1]
    # SD1.5/2.1: four levels; the deepest (3) has 2 down resnets (4 convs) and the mid block's
    # 2 resnets (4 convs); one strided conv downsamples level 2 into it.
    assert plans[1] == Counter({(3, "down", (3, 3), (1, 1)): 4, (3, "mid", (3, 3), (1, 1)): 4,
                                (2, "down", (3, 3), (2, 2)): 1})


def test_the_scalecrafter_policy_is_still_there_and_unknown_policies_fail() -> None:
    unet_map = preset_map("sd15")
    recipe = auto_recipe(unet_map, base=512, target=1024, policy="scalecrafter")
    assert recipe.sampling is None and all(isinstance(p, RedilatePass) for p in recipe.passes)
    with pytest.raises(RecipeError, match="unknown policy 'bogus'"):
        auto_recipe(unet_map, base=512, target=1024, policy="bogus")  # type: ignore[arg-type]


def test_auto_policy_rejects_sizes_the_unet_cannot_divide() -> None:
    unet_map = preset_map("sd15")  # 8 (VAE) x 2^3 (downsamplings) = 64 px
    with pytest.raises(RecipeError, match="not a multiple of 64"):
        auto_recipe(unet_map, base=512, target=(1000, 1024))
    with pytest.raises(RecipeError, match="not larger than base"):
        auto_recipe(unet_map, base=512, target=512)


@pytest.mark.parametrize(
    ("base", "target", "expected"),
    [
        ((32, 32), (64, 64), ((32, 32), (64, 64))),
        ((32, 32), (128, 128), ((32, 32), (64, 64), (128, 128))),
        ((1024, 1024), (4096, 4096), ((1024, 1024), (2048, 2048), (4096, 4096))),
        # ratio 3 in two equal steps of sqrt(3): 32, 96 / sqrt(3) = 55.4 -> 56, 96
        ((32, 32), (96, 96), ((32, 32), (56, 56), (96, 96))),
    ],
)
def test_cascade_stages_known_cases(base, target, expected) -> None:
    assert cascade_stages(base, target, 4 if base[0] == 32 else 64) == expected


def test_cascade_stages_never_repeat_a_size() -> None:
    """Base 32, target 24x48, multiple 8: r = sqrt(1152 / 1024) = 1.06, one stage above the
    first; the first is target / r = (22.6, 45.3), snapped to (24, 48): the target itself, so
    the cascade is that one stage, not the same size twice."""
    assert cascade_stages((32, 32), (24, 48), 8) == ((24, 48),)


def test_auto_factor_follows_the_larger_side_of_a_non_square_size() -> None:
    """FreeScale's restrained dilation: floor(max(h / h0, w / w0)), at least 1."""
    from unet_surgery.passes.base import auto_factor

    assert auto_factor((64, 128), (64, 64)) == 2.0
    assert auto_factor((128, 64), (64, 64)) == 2.0
    assert auto_factor((96, 40), (32, 32)) == 3.0
    assert auto_factor((40, 200), (64, 64)) == 3.0
    assert auto_factor((32, 32), (64, 64)) == 1.0


@settings(max_examples=200, deadline=None)
@given(
    base=st.integers(4, 16).map(lambda k: k * 64),
    target_h=st.integers(2, 128).map(lambda k: k * 64),
    target_w=st.integers(2, 128).map(lambda k: k * 64),
)
def test_cascade_stages_properties(base: int, target_h: int, target_w: int) -> None:
    assume(target_h * target_w > base * base)
    stages = cascade_stages((base, base), (target_h, target_w), 64)
    assert stages[-1] == (target_h, target_w)
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in stages)
    areas = [h * w for h, w in stages]
    assert areas == sorted(set(areas))  # strictly growing
    # at most 2x per side a stage, up to the rounding of each side to 64 px
    for (h0, w0), (h1, w1) in itertools.pairwise(stages):
        assert h1 <= 2 * h0 + 64 and w1 <= 2 * w0 + 64
    # the first stage has about the base's area: within the rounding of both sides
    h0, w0 = stages[0]
    ratio = math.sqrt(target_h * target_w / base**2)
    exact = (target_h / ratio, target_w / ratio)
    if min(exact) >= 64:
        assert abs(h0 - exact[0]) <= 32 and abs(w0 - exact[1]) <= 32
