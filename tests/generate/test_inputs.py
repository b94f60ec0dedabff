"""Bad input to ``unet-surgery generate``: one ``error:`` line naming the argument, exit 2, no
traceback, nothing written; and the pure helpers (seeds, sizes, job names, the VAE rule)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unet_surgery.cli import main

pytest.importorskip("accelerate")
pytest.importorskip("diffusers")
from unet_surgery.generation import (
    GenerationError,
    make_jobs,
    parse_seeds,
    parse_size,
    read_prompts,
)
from unet_surgery.generation.vae_memory import decode_peak_bytes, needs_tiling


def one_error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("unet-surgery generate: error: ")
    return err[0]


def test_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = one_error_line(capsys, ["generate", str(tmp_path / "nowhere"), "--size", "64", "--prompt", "x",
                                   "--out", str(tmp_path / "out")])
    assert "MODEL" in line and "nowhere" in line and "does not exist" in line
    assert not (tmp_path / "out").exists()


def test_folder_without_model_index(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = one_error_line(capsys, ["generate", str(tmp_path), "--size", "64", "--prompt", "x"])
    assert "MODEL" in line and "model_index.json" in line


def test_single_file_without_components(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "unet.safetensors"
    checkpoint.write_bytes(b"not read")
    line = one_error_line(capsys, ["generate", str(checkpoint), "--size", "64", "--prompt", "x"])
    assert "--components" in line


@pytest.mark.parametrize(("size", "words"), [
    ("100x64", ["--size", "width 100", "multiple of 8", "try 96"]),
    ("64x36", ["--size", "height 36", "multiple of 8"]),
    ("64by64", ["--size", "WIDTHxHEIGHT"]),
    ("0x64", ["--size", "positive"]),
])
def test_wrong_size(sd15_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, size: str,
                    words: list[str]) -> None:
    line = one_error_line(capsys, ["generate", str(sd15_folder), "--size", size, "--prompt", "x",
                                   "--out", str(tmp_path / "out")])
    for word in words:
        assert word in line
    assert not (tmp_path / "out").exists()


def test_unknown_recipe(sd15_folder: Path, capsys: pytest.CaptureFixture) -> None:
    line = one_error_line(capsys, ["generate", str(sd15_folder), "--size", "64", "--prompt", "x",
                                   "--recipe", "scalecrafter-sd15-2048x2049"])
    assert "--recipe" in line and "unknown recipe" in line and "scalecrafter-sd15-2048x2048" in line


def test_missing_recipe_file(sd15_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = one_error_line(capsys, ["generate", str(sd15_folder), "--size", "64", "--prompt", "x",
                                   "--recipe", str(tmp_path / "mine.yaml")])
    assert "--recipe" in line and "mine.yaml" in line


@pytest.mark.parametrize(("content", "words"), [
    (None, ["--prompts", "cannot read", "No such file"]),
    (b"a cat\x00\x01", ["--prompts", "not a text file"]),
    (b"\xff\xfe\xfa", ["--prompts", "not UTF-8"]),
    (b"# only a comment\n\n", ["--prompts", "holds no prompt"]),
])
def test_unreadable_prompt_file(sd15_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                content: bytes | None, words: list[str]) -> None:
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    line = one_error_line(capsys, ["generate", str(sd15_folder), "--size", "64", "--prompts", str(path)])
    for word in words:
        assert word in line


def test_unreadable_init_image(sd15_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = tmp_path / "init.png"
    image.write_text("not an image")
    line = one_error_line(capsys, ["generate", str(sd15_folder), "--size", "64", "--prompt", "x",
                                   "--init-image", str(image)])
    assert "--init-image" in line and "init.png" in line


def test_cascade_recipe_size_must_be_its_last_stage(sd15_folder: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "cascade.yaml"
    recipe.write_text(
        "name: mine\nbase_resolution: [64, 64]\ntarget_resolutions: [[128, 128]]\n"
        "passes: [{type: freeu, select: {stage: [up]}, b1: 1.1, b2: 1.2, s1: 0.6, s2: 0.4}]\nsampling: {stages: [[64, 64], [128, 128]], steps: 2}\n"
    )
    line = one_error_line(capsys, ["generate", str(sd15_folder), "--size", "192x128", "--prompt", "x",
                                   "--recipe", str(recipe), "--quiet", "--out", str(tmp_path / "out")])
    assert "--size" in line and "128x128" in line and "192x128" in line


def test_seeds() -> None:
    assert parse_seeds("42") == [42]
    assert parse_seeds("0,5,9") == [0, 5, 9]
    assert parse_seeds("1,4-6") == [1, 4, 5, 6]
    assert parse_seeds(7) == [7]
    for bad in ("-1", "a", "5-3", "1,,2"):
        with pytest.raises(GenerationError, match="--seed"):
            parse_seeds(bad)
    with pytest.raises(GenerationError, match="repeat"):
        make_jobs(["x"], [1, 1])


def test_jobs_are_prompt_major_and_named_by_index_and_seed() -> None:
    jobs = make_jobs(["a", "b"], [9, 1234567])
    assert [(j.prompt, j.seed) for j in jobs] == [("a", 9), ("a", 1234567), ("b", 9), ("b", 1234567)]
    assert [j.file_name for j in jobs] == ["p0000-s000009.png", "p0000-s1234567.png",
                                           "p0001-s000009.png", "p0001-s1234567.png"]


def test_sizes() -> None:
    assert parse_size("1024x768") == (1024, 768)  # width first, as written
    assert parse_size((768, 1024)) == (1024, 768)  # a Python pair is (height, width), as pipe(height=, width=)
    assert parse_size("512") == (512, 512)
    assert parse_size("96x64", multiple=32) == (96, 64)
    with pytest.raises(GenerationError, match="multiple of 64"):
        parse_size("96x64", multiple=64)


def test_prompt_file_skips_blank_lines_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("\ufeff# header\n  first  \n\nsecond, with ünïcode\n#third\n", encoding="utf-8")
    assert read_prompts(path) == ["first", "second, with ünïcode"]


def test_vae_decode_peak_rule() -> None:
    """SD's VAE (128, 256, 512, 512): the widest full-resolution map is the last up block's input,
    256 channels at 1024x1024; four of them in fp16 are 2 GiB."""
    sd_vae = (128, 256, 512, 512)
    assert decode_peak_bytes(sd_vae, 1024, 1024, torch.float16) == 4 * 256 * 1024 * 1024 * 2
    assert decode_peak_bytes(sd_vae, 4096, 2048, torch.float32) == 4 * 256 * 4096 * 2048 * 4
    # a deep level can be the widest: one level, 8 channels; two levels (8, 64): 64 x (H/2) x (W/2)
    assert decode_peak_bytes((8,), 64, 64, torch.float32) == 4 * 8 * 64 * 64 * 4
    assert decode_peak_bytes((8, 64), 64, 64, torch.float32) == 4 * 64 * 64 * 64 * 4
    assert needs_tiling(2 * 2**30, 3 * 2**30) and not needs_tiling(2 * 2**30, 5 * 2**30)


def test_vae_tiling_switch(sd15_folder: Path, tmp_path: Path) -> None:
    """``--vae-tiling`` forces tiled decoding; the default at 64x64 leaves it off."""
    from unet_surgery.generation import generate

    common = {"prompts": "x", "size": 64, "steps": 1, "progress": False, "threads": 1}
    assert generate(sd15_folder, out=tmp_path / "a", vae_tiling=True, **common).vae_tiling
    assert not generate(sd15_folder, out=tmp_path / "b", **common).vae_tiling


def test_cascade_steps_replace_the_recipe_steps(tmp_path: Path) -> None:
    """``--steps 20`` on a cascade written for 50 steps restarting at 15: 20 steps restarting at
    round(15 * 20 / 50) = 6 (the documented proportional rule)."""
    from unet_surgery.generation.recipe_choice import check_recipe, resolve_recipe

    path = tmp_path / "cascade.yaml"
    path.write_text(
        "name: mine\nbase_resolution: [64, 64]\ntarget_resolutions: [[128, 128]]\n"
        "passes: [{type: freeu, select: {stage: [up]}, b1: 1.1, b2: 1.2, s1: 0.6, s2: 0.4}]\n"
        "sampling: {stages: [[64, 64], [128, 128]], steps: 50, restart_step: 15}\n"
    )
    recipe, _ = resolve_recipe(check_recipe(str(path)), None, height=128, width=128, steps=20, init_image=False)
    assert recipe is not None and recipe.sampling is not None
    assert (recipe.sampling.steps, recipe.sampling.restart_step) == (20, 6)
    assert recipe.sampling.stages == ((64, 64), (128, 128))
    same, _ = resolve_recipe(check_recipe(str(path)), None, height=128, width=128, steps=50, init_image=False)
    assert same is not None and same.sampling is not None and same.sampling.restart_step == 15
    upscale, _ = resolve_recipe(check_recipe(str(path)), None, height=128, width=128, steps=20, init_image=True)
    assert upscale is not None and upscale.sampling is None and upscale.passes == recipe.passes
