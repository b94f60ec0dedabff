"""``generate --split patches``: one image's views shared by two CPU processes (gloo), same bytes.

Tiny random SD1.5 pipeline (8x8-latent UNet, 64 px native). DemoFusion to 128x128 with two views
per UNet call: each step has 5 batches of local views and 2 of dilated views to share, so both
processes compute and every step is gathered. The PNG and the manifest must equal, byte for
byte, those of one process. Bad inputs end in one line, with nothing written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.generate.conftest import accelerate_command, generate_command, run

pytest.importorskip("accelerate")

RECIPE = """name: demofusion-tiny-128
base_resolution: [64, 64]
target_resolutions: [[128, 128]]
passes: []
demofusion: {steps: 1, stride: 4, view_batch_size: 2}
"""
PATCHES = """name: patches-tiny-128x64
base_resolution: [64, 64]
target_resolutions: [[64, 128]]
passes: []
patches: {window: 8, stride: 4}
"""


def test_two_processes_split_the_views_of_one_image(sd15_folder: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "demofusion.yaml"
    recipe.write_text(RECIPE, encoding="utf-8")
    args = ["--size", "128x128", "--prompt", "a red cube", "--seed", "3", "--steps", "1", "--quiet",
            "--threads", "1", "--recipe", str(recipe)]
    one = run(generate_command(str(sd15_folder), *args, "--out", str(tmp_path / "one")), timeout=900)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run(accelerate_command(2, str(sd15_folder), *args, "--split", "patches", "--out", str(tmp_path / "two")),
              timeout=900)
    assert two.returncode == 0, two.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(names) == 2 and "manifest.jsonl" in names
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert [line for line in two.stdout.splitlines() if line.startswith("wrote")] == [
        "wrote 1, kept 0 (this process); manifest " + str(tmp_path / "two" / "manifest.jsonl")]


def test_plain_patchwise_text_to_image(sd15_folder: Path, tmp_path: Path) -> None:
    """A patches-only recipe runs at 128x64 (three 8x8 views a step) and writes one PNG."""
    recipe = tmp_path / "patches.yaml"
    recipe.write_text(PATCHES, encoding="utf-8")
    result = run(generate_command(str(sd15_folder), "--size", "128x64", "--prompt", "x", "--steps", "2",
                                  "--quiet", "--recipe", str(recipe), "--out", str(tmp_path / "out")))
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


@pytest.mark.parametrize(("size", "recipe", "extra", "message"), [
    ("64x64", RECIPE, [], "--size: demofusion: target 64x64 is less than twice the base 64x64"),
    # a target under the base is under the UNet's smallest size too: that check comes first
    ("32x32", RECIPE, [], "--size: 32x32 is below this model's smallest size, 64 px a side"),
    ("128x64", PATCHES.replace("window: 8", "window: 16"), [], "patches.window: 16 is larger than the 8x16 latent"),
    ("128x128", RECIPE.replace("view_batch_size: 2", "view_batch_size: 16"), ["--split", "patches"], None),
])
def test_bad_inputs_are_one_line_and_write_nothing(sd15_folder: Path, tmp_path: Path, size, recipe, extra,
                                                   message) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(recipe, encoding="utf-8")
    out = tmp_path / "out"
    args = [str(sd15_folder), "--size", size, "--prompt", "x", "--steps", "1", "--quiet", "--recipe", str(path),
            *extra, "--out", str(out)]
    if message is None:  # 16 views a call: one batch per step, nothing for a second process
        result = run(accelerate_command(2, *args))
        message = "--split patches: 2 processes but at most 1 batch(es) of views"
    else:
        result = run(generate_command(*args))
    assert result.returncode != 0
    assert message in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors and all("\n" not in e for e in errors)
    assert not out.exists() or not any(out.iterdir())
