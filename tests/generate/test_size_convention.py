"""One size convention (docs/cli.md): strings are ``WIDTHxHEIGHT``, Python pairs ``(height, width)``.

One non-square size -- 128 wide, 64 high, twice the tiny SD1.5's native 64x64 in width -- goes
through every entry point; the expected shapes come from that size alone, checked on the real
image files and arrays.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unet_surgery.cli import main

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

WIDTH, HEIGHT = 128, 64


def _png(out: Path) -> tuple[np.ndarray, dict, str]:
    (file,) = sorted(out.glob("*.png"))
    with Image.open(file) as image:
        assert image.size == (WIDTH, HEIGHT)  # PIL: (width, height)
        return np.asarray(image), json.loads(image.text["unet_surgery.settings"]), image.text["parameters"]


def test_one_non_square_size_through_every_entry_point(sd15_folder: Path, tmp_path: Path) -> None:
    from unet_surgery import auto_recipe, generate, map_unet
    from unet_surgery.generation.pipeline_loader import load_pipeline
    from unet_surgery.sampling import self_cascade_sample

    common = dict(prompts="a red cube", seeds=0, steps=2, threads=1, progress=False)
    python = generate(sd15_folder, size=(HEIGHT, WIDTH), out=tmp_path / "py", **common)  # type: ignore[arg-type]
    text = generate(sd15_folder, size=f"{WIDTH}x{HEIGHT}", out=tmp_path / "text", **common)  # type: ignore[arg-type]
    assert main(["generate", str(sd15_folder), "--size", f"{WIDTH}x{HEIGHT}", "--prompt", "a red cube", "--seed", "0",
                 "--steps", "2", "--threads", "1", "--quiet", "--out", str(tmp_path / "cli")]) == 0
    arrays = []
    for folder in ("py", "text", "cli"):
        pixels, settings, parameters = _png(tmp_path / folder)
        assert pixels.shape == (HEIGHT, WIDTH, 3)
        assert (settings["request"]["width"], settings["request"]["height"]) == (WIDTH, HEIGHT)
        assert f"Size: {WIDTH}x{HEIGHT}" in parameters
        assert settings["request"]["recipe"]["name"].endswith(f"-{WIDTH}x{HEIGHT}")
        arrays.append(pixels)
    assert np.array_equal(arrays[0], arrays[1]) and np.array_equal(arrays[0], arrays[2])
    for result in (python, text):
        assert result.recipe is not None and result.recipe.target_resolutions == ((HEIGHT, WIDTH),)

    pipe = load_pipeline(sd15_folder, components=None, dtype=torch.float32, device=torch.device("cpu"))
    recipe = auto_recipe(map_unet(pipe.unet), base=64, target=(HEIGHT, WIDTH))
    assert recipe.name.endswith(f"-{WIDTH}x{HEIGHT}") and f"to {WIDTH}x{HEIGHT} (WxH" in recipe.description
    assert recipe.sampling is not None and recipe.sampling.stages[-1] == (HEIGHT, WIDTH)
    out = self_cascade_sample(pipe, recipe, prompt="a red cube", negative_prompt="blurry", height=HEIGHT, width=WIDTH,
                              num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                              output_type="np", progress=False)
    assert out.images.shape == (1, HEIGHT, WIDTH, 3)
    assert out.latents.shape[-2:] == (HEIGHT // 8, WIDTH // 8)


def test_cascade_refuses_a_size_its_recipe_does_not_reach(sd15_folder: Path) -> None:
    from unet_surgery import RecipeError, auto_recipe, map_unet
    from unet_surgery.generation.pipeline_loader import load_pipeline
    from unet_surgery.sampling import self_cascade_sample

    pipe = load_pipeline(sd15_folder, components=None, dtype=torch.float32, device=torch.device("cpu"))
    recipe = auto_recipe(map_unet(pipe.unet), base=64, target=(HEIGHT, WIDTH))
    with pytest.raises(RecipeError, match=f"cascades up to height={HEIGHT}, width={WIDTH}"):
        self_cascade_sample(pipe, recipe, prompt="x", height=WIDTH, width=HEIGHT, progress=False)


def test_cascade_steps_scale_an_explicit_restart_step() -> None:
    from unet_surgery.recipes.schema import SamplingSpec
    from unet_surgery.sampling.cascade import with_steps

    spec = SamplingSpec(stages=((64, 64), (128, 128)), steps=50, restart_step=15)
    assert with_steps(spec, 10) == SamplingSpec(stages=spec.stages, steps=10, restart_step=3)  # 15 * 10 / 50
    assert with_steps(spec, 50) is spec
