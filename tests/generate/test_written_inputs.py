"""Everything the tool writes, the tool reads: ``generate`` runs a patched folder written by
``apply --out`` (with its own recipe, also given as its weights file with ``--components``) and
takes an adapter folder from ``export --format adapter`` as ``--recipe``.

Each run is compared with the same recipe given as a plain file: same pixels, same recipe name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unet_surgery.cli import main

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

SIZE = "128x128"


def _image(out: Path) -> tuple[np.ndarray, str | None]:
    (file,) = sorted(out.glob("*.png"))
    with Image.open(file) as image:
        recipe = json.loads(image.text["unet_surgery.settings"])["request"]["recipe"]
        return np.asarray(image), None if recipe is None else recipe["name"]


def _generate(model: Path, out: Path, *extra: str) -> int:
    return main(["generate", str(model), "--size", SIZE, "--prompt", "a red cube", "--seed", "0", "--steps", "2",
                 "--threads", "1", "--quiet", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def recipe_file(sd15_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unet_surgery import auto_recipe, map_unet
    from unet_surgery.loading import load_unet
    from unet_surgery.recipes.library import dump_recipe

    recipe = auto_recipe(map_unet(load_unet(sd15_folder / "unet")), base=64, target=128, policy="scalecrafter",
                         name="tiny-redilate-128")
    file = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    file.write_text(dump_recipe(recipe))
    return file


def test_patched_folder_and_adapter_run_with_their_own_recipe(sd15_folder: Path, recipe_file: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    assert _generate(sd15_folder, tmp_path / "plain", "--recipe", str(recipe_file)) == 0
    reference, name = _image(tmp_path / "plain")
    assert name == "tiny-redilate-128"

    patched = tmp_path / "patched"
    assert main(["apply", "--recipe", str(recipe_file), "--out", str(patched), "--quiet", str(sd15_folder / "unet")]) == 0
    assert _generate(patched, tmp_path / "folder", "--components", str(sd15_folder)) == 0
    weights = patched / "diffusion_pytorch_model.safetensors"
    assert _generate(weights, tmp_path / "file", "--components", str(sd15_folder)) == 0

    adapter = tmp_path / "adapter"
    assert main(["export", "--format", "adapter", "--recipe", str(recipe_file), "-o", str(adapter), "--quiet",
                 str(sd15_folder / "unet")]) == 0
    assert _generate(sd15_folder, tmp_path / "adapter-run", "--recipe", str(adapter)) == 0
    for run in ("folder", "file", "adapter-run"):
        pixels, used = _image(tmp_path / run)
        assert used == "tiny-redilate-128", run
        assert np.array_equal(pixels, reference), run

    capsys.readouterr()
    assert _generate(patched, tmp_path / "other", "--components", str(sd15_folder), "--recipe", "freeu-sd15") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "carries its own recipe" in err
    assert _generate(patched, tmp_path / "unpatched", "--components", str(sd15_folder), "--recipe", "none") == 0
    pixels, used = _image(tmp_path / "unpatched")
    assert used is None and not np.array_equal(pixels, reference)  # the recipe did change the image


def test_a_unet_folder_without_components_is_one_line(sd15_folder: Path, capsys: pytest.CaptureFixture,
                                                      tmp_path: Path) -> None:
    assert _generate(sd15_folder / "unet", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a UNet folder; give --components" in err


def test_generate_refuses_a_recipe_made_for_another_unet(sd15_folder: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    assert _generate(sd15_folder, tmp_path / "x", "--recipe", "scalecrafter-sdxl-2048x2048") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was made for sdxl" in err and "--force" in err
    assert not list((tmp_path / "x").glob("*.png"))
