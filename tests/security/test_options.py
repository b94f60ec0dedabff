"""Every command-line option is checked, and recipe values that overflowed are refused (issue 23).

Numbers typed on the command line are bounded before conversion (a 5000-digit ``--steps`` is
refused without being converted or echoed), floats are finite, and each option a run cannot
use ends in one line naming it before any model is loaded; the pt2 export checks its options
before tracing. Recipe values that overflowed inside the old documented range (a redilate
``factor: 1.0e-15`` asked for a 10**15-pixel side; FreeU ``b1: 1e15`` gave NaN; a level of
31 digits validated) are outside the narrowed ranges now.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unet_surgery.cli import main
from unet_surgery.errors import RecipeError
from unet_surgery.recipes.library import load_recipe


def argparse_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """argparse's own refusal: exit 2, its usage text and one ``error:`` line, the last."""
    with pytest.raises(SystemExit) as info:
        main(list(args))
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[0].startswith("usage:") and [line for line in err if "error:" in line] == err[-1:], err
    return err[-1]


def one_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(list(args)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


GENERATE = ["generate", "nowhere", "--prompt", "x", "--size", "64"]


@pytest.mark.parametrize(("option", "value", "refusal"), [
    ("--steps", "9" * 5000, "argument --steps: an integer of 5000 digits is out of range"),
    ("--guidance", "nan", "argument --guidance: 'nan' is not a finite number"),
    ("--guidance", "inf", "argument --guidance: 'inf' is not a finite number"),
    ("--guidance", "1e999", "argument --guidance: '1e999' is not a finite number"),
    ("--strength", "nan", "argument --strength: 'nan' is not a finite number"),
    ("--control-scale", "nan", "argument --control-scale: 'nan' is not a finite number"),
    ("--control-end", "1e999", "argument --control-end: '1e999' is not a finite number"),
    ("--threads", "²", "argument --threads: '²' is not an integer"),
])
def test_numbers_are_bounded_and_finite_before_conversion(option: str, value: str, refusal: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    line = argparse_error(capsys, *GENERATE, option, value)
    assert line.endswith(f"error: {refusal}") and len(line) < 300, line


@pytest.mark.parametrize(("args", "refusal"), [
    (["--size", "²"], "--size: '²' is not WIDTHxHEIGHT (e.g. 1024x768) or a single side"),
    (["--size", "9" * 5000], "--size: '" + "9" * 40 + "'... (5000 characters) is not WIDTHxHEIGHT (e.g. 1024x768) or a single side"),
    (["--size", "99999x64"], "--size: '99999x64' has a side over 16384 pixels"),
    (["--steps", "2000"], "--steps: 2000 is not a number of steps from 1 to 1000"),
    (["--steps", "0"], "--steps: 0 is not a number of steps from 1 to 1000"),
    (["--guidance", "101"], "--guidance: 101.0 is not a finite scale from 0 to 100.0"),
    (["--device", "bogus"], "--device: 'bogus' is not a device (cpu, cuda, cuda:1, mps...)"),
    (["--threads", "0"], "--threads: 0 is not a number of threads from 1 to 1024"),
    (["--seed", "9" * 5000], "--seed: '" + "9" * 40 + "'... (5000 characters) is not a seed (use 42, 0,5,9 or 0-7)"),
    (["--mask", "m.png"], "--mask: inpainting needs --init-image, the image whose white mask part is repainted"),
    (["--controlnet", "cn", "--control-image", "c.png", "--control-end", "1.5"], "--control-end: 1.5 is not in (0, 1]"),
    (["--controlnet", "cn", "--control-image", "c.png", "--control-scale", "-1"], "--control-scale: -1.0 is not in [0, 10]"),
    # second hostile run: two ranges each under the bound used to be expanded whole
    (["--seed", "0-999999,1000000-1000001"], "--seed: '0-999999,1000000-1000001' holds more than a million seeds"),
    # diffusers' image-to-image runs int(steps x strength) steps: 0 raised deep inside the pipeline
    (["--init-image", "x.png", "--steps", "1", "--strength", "0.6"],
     "--steps 1 with --strength 0.6 leaves no denoising step (image-to-image runs int(steps x strength) = 0); "
     "raise --steps or --strength"),
])
def test_generate_options_are_one_line_before_the_model_is_read(args: list[str], refusal: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error(capsys, *GENERATE[:-2], *(["--size", "64"] if "--size" not in args else []), *args)
    assert line == f"unet-surgery generate: error: {refusal}"  # MODEL 'nowhere' would be the next error


def test_prompts_times_seeds_is_bounded_before_the_jobs_are_built(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """100 000 prompts x 100 000 seeds used to build a list of 10**10 jobs (a hang, then memory)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n" * 100_000)
    line = one_error(capsys, "generate", "nowhere", "--prompts", str(prompts), "--size", "64", "--seed", "0-99999")
    assert line == ("unet-surgery generate: error: 100000 prompt(s) x 100000 seed(s) is 10000000000 images, "
                    "more than 1000000 in one run; split the prompts or seeds between runs")


def test_a_size_below_what_the_unet_can_halve_is_refused(sd15_folder: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    levels = len(json.loads((sd15_folder / "unet" / "config.json").read_text())["block_out_channels"])
    smallest = 8 * 2 ** (levels - 1)  # the VAE's factor 8, halved levels - 1 times
    line = one_error(capsys, "generate", str(sd15_folder), "--prompt", "x", "--size", "8x8", "-q", "-o", str(tmp_path / "o"))
    assert line == (f"unet-surgery generate: error: --size: 8x8 is below this model's smallest size, {smallest} px a side "
                    f"(its latent is halved {levels - 1} times)")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unet_surgery.presets import build_unet

    folder = tmp_path_factory.mktemp("tiny") / "unet"
    build_unet("sd15", size="tiny", device="cpu").save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize(("args", "refusal"), [
    (["--batch", "0"], "batch: 0 is not between 1 and 64"),
    (["--resolution", "0x0"], "resolution: height 0 must be a multiple of 8 from 8 to 16384"),
    (["--steps", "2000"], "steps: 2000 is not between 1 and 1000 (the model's training timesteps)"),
    (["--frames", "-1"], "frames: UNet2DConditionModel is not a video UNet; frames apply to video UNets only"),
    (["--resolution", "9" * 5000 + "x8"], "--resolution must look like WIDTHxHEIGHT (e.g. 2048x1024), got '"
     + "9" * 40 + "'... (5002 characters)"),
])
def test_pt2_export_options_are_checked(args: list[str], refusal: str, tiny_unet: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error(capsys, "export", "-q", "--force", "-f", "pt2", "-r", "scalecrafter-sd15-1024x1024", "-o", str(tmp_path / "o"),
                     *args, str(tiny_unet))
    assert line == f"unet-surgery export: error: {refusal}"
    assert not (tmp_path / "o").exists()


GOOD = """name: ok
base_resolution: [512, 512]
target_resolutions: [[1024, 1024]]
passes:
- PASS
"""


@pytest.mark.parametrize(("pass_text", "refusal"), [
    ("{type: redilate, select: {op: conv2d, kernel: 3}, factor: 1.0e-15}",
     "passes[0].factor: factor must be between 1 and 64, got 1e-15"),
    ("{type: redilate, select: {op: conv2d, kernel: 3}, factor: 1.0e+15}",
     "passes[0].factor: factor must be between 1 and 64, got 1e+15"),
    ("{type: freeu, b1: 1.0e+15}", "passes[0].b1: must be between 0 and 10, got 1e+15"),
    ("{type: fouriscale, select: {op: conv2d, kernel: 3}, dilation: 1.0e+15}", "passes[0].dilation: dilation must be between 1 and 64, got 1e+15"),
    ("{type: redilate, select: {op: conv2d, level: '1" + "0" * 30 + "..'}, factor: 2}",
     "passes[0].select.level: expected int or range, got '1" + "0" * 30 + "..'"),
    ("{type: redilate, select: {op: conv2d, level: '1..99'}, factor: 2}",
     "passes[0].select.level: levels go from 0 to 64, got '1..99'"),
])
def test_recipe_values_that_overflowed_are_refused(pass_text: str, refusal: str, tmp_path: Path) -> None:
    file = tmp_path / "r.yaml"
    file.write_text(GOOD.replace("PASS", pass_text))
    with pytest.raises(RecipeError) as info:
        load_recipe(file)
    assert str(info.value) == f"{file}: {refusal}"


def test_freeu_at_the_top_of_its_range_stays_finite() -> None:
    """b = s = 10 (the new bound) on the tiny SD1.5 UNet: every output value finite."""
    import torch

    import unet_surgery
    from unet_surgery.presets import build_unet, example_inputs

    torch.manual_seed(0)
    model = build_unet("sd15", size="tiny", device="cpu")
    recipe = load_recipe({"name": "x", "base_resolution": [64, 64], "target_resolutions": [[128, 128]],
                          "passes": [{"type": "freeu", "b1": 10.0, "b2": 10.0, "s1": 10.0, "s2": 10.0}]})
    patch = unet_surgery.apply(model, recipe)
    with torch.no_grad():
        out = model(**example_inputs(model))
    patch.remove()
    assert bool(torch.isfinite(out.sample if hasattr(out, "sample") else out[0]).all())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e15])
def test_a_builder_gets_the_bounds_a_recipe_file_gets(value: float) -> None:
    """Found by the second hostile run: `freeu_recipe(map, b1=nan)` built a recipe no file could
    state (the parser refuses NaN, and FreeU scales above 10); builders now go through it."""
    from tests.conftest import preset_map
    from unet_surgery.recipes.freeu import freeu_recipe

    with pytest.raises(RecipeError, match=r"^passes\[0\]\.b1: "):
        freeu_recipe(preset_map("sd15", "tiny"), base=64, b1=value)
    assert freeu_recipe(preset_map("sd15", "tiny"), base=64, b1=1.5).passes[0].b1 == 1.5
