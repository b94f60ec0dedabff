"""The demo command end to end on a reduced configuration (the full one is the README's job)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from PIL import Image

from unet_surgery.cli import main
from unet_surgery.demo import (
    DEFAULT,
    METHODS,
    QUICK,
    DemoConfig,
    _unet_calls,
    crop_grid_png,
    grid_png,
    recipe_for,
    run_demo,
    table,
)
from unet_surgery.recipes.schema import Recipe, SamplingSpec


def test_demo_uses_derived_recipes_only() -> None:
    # Every non-baseline row is built from the toy's map by a method's builder: no shipped
    # (tuned) recipe is named. The command line knows the same methods without importing torch.
    from unet_surgery.cli.demo_cmd import DEFAULT_TOYS as CLI_DEFAULT_TOYS
    from unet_surgery.cli.demo_cmd import METHODS as CLI_METHODS
    from unet_surgery.cli.demo_cmd import TOYS as CLI_TOYS
    from unet_surgery.toy.model import TOY_NAMES

    assert tuple(METHODS) == CLI_METHODS == (
        "baseline", "bicubic", "hires-0.1", "hires-0.2", "hires-0.3", "hires-0.5", "hires-0.7", "scalecrafter",
        "auto", "hidiffusion", "fouriscale", "freeu", "demofusion", "multidiffusion")
    assert CLI_TOYS == TOY_NAMES
    assert DEFAULT.methods == ("baseline", "bicubic", "scalecrafter", "auto")
    assert DEFAULT.toys == CLI_DEFAULT_TOYS == ("toy-detail", "toy4") and QUICK.sizes == (32, 64)
    assert len(DEFAULT.jobs()) == 2 * (1 + 2 * 4)  # per toy: 1x baseline, 2 sizes x 4 methods


@pytest.mark.parametrize("method", ["hidiffusion", "fouriscale", "freeu"])
def test_other_methods_get_a_recipe_of_their_own_passes_on_both_toys(method: str) -> None:
    from unet_surgery.graph import map_unet
    from unet_surgery.passes import make_plan
    from unet_surgery.toy.model import load_toy
    from unet_surgery.toy.sampling import sample_recipe

    own = {"hidiffusion": {"rau_net", "msw_msa"}, "fouriscale": {"fouriscale", "fouriscale_guidance"},
           "freeu": {"freeu"}}[method]
    for name in ("toy", "toy4"):
        toy = load_toy(name)
        unet_map = map_unet(toy.unet, latent_hw=(64, 64))
        assert recipe_for(method, unet_map, 32) is None  # 1x is always the plain model
        recipe = recipe_for(method, unet_map, 64)
        assert {type(c).type for c in recipe.passes} == own and recipe.vae_scale_factor == 1
        assert make_plan(recipe, unet_map).layers  # selects layers of the toy
        # and samples (two steps: both inside the methods' windows) without a shape error
        plain = sample_recipe(toy, None, torch.tensor([1]), seeds=[5], size=64, steps=2)
        patched = sample_recipe(toy, recipe, torch.tensor([1]), seeds=[5], size=64, steps=2, unet_map=unet_map)
        assert patched.shape == plain.shape == (1, 3, 64, 64) and not patched.equal(plain)


def test_demo_rows_table_and_grid(tmp_path) -> None:
    cfg = DemoConfig(toys=("toy",), sizes=(32, 64), methods=("baseline", "auto"), seeds=(0, 1), steps=4)
    calls: list[int] = []
    rows = run_demo(cfg, progress=calls.append)
    assert [(r.toy, r.method, r.size) for r in rows] == [("toy", "baseline", 32), ("toy", "baseline", 64),
                                                          ("toy", "auto", 64)]
    assert len(calls) == 3  # one progress line per row
    assert rows[0].recipe is None and rows[2].recipe.startswith("auto-")
    assert all(r.images.shape == (2, 3, r.size, r.size) for r in rows)
    assert not rows[1].images.equal(rows[2].images)  # the recipe acts
    assert all(r.detail is None for r in rows)  # a flat toy: no detail columns
    text = table(rows)
    assert text.count("\n") == 4 and "no object" in text.splitlines()[0]
    assert text.splitlines()[2].split(" | ")[9] == "n/a"  # native detail
    grid = Image.open(grid_png(rows, tmp_path / "grid.png", tile=32))
    assert grid.size == (150 + 2 * 36, 3 * 36 + 4)


def test_upscaler_rows_start_from_the_1x_row(tmp_path) -> None:
    import torch.nn.functional as F

    cfg = DemoConfig(toys=("toy-detail",), sizes=(64,), methods=("bicubic", "hires-0.5"),
                     seeds=(0, 1), steps=4)
    assert cfg.jobs() == [("toy-detail", 32, "baseline"), ("toy-detail", 64, "bicubic"),
                          ("toy-detail", 64, "hires-0.5")]
    small, bicubic, hires = run_demo(cfg, progress=lambda _: None)
    expected = F.interpolate(small.images, size=(64, 64), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert torch.equal(bicubic.images, expected)
    assert bicubic.seconds >= small.seconds  # an upscaler's time includes the 1x sample's
    assert not hires.images.equal(bicubic.images)
    # the detail metric on a textured toy: the reference is the 1x row itself
    assert small.detail is not None and small.detail["contrast_vs_1x"] == 1.0
    assert bicubic.detail is not None and bicubic.detail["native_detail"] == 0.0
    crops = Image.open(crop_grid_png([small, bicubic, hires], tmp_path / "crops.png", crop=16, zoom=2))
    assert crops.size == (150 + 2 * 36, 2 * 36 + 4)  # the largest size's two rows, two images


def test_progress_counts_every_unet_call_of_a_cascade() -> None:
    # 10 steps, restart int(0.3 * 10) = 3: stage 1 runs 10 calls, each later stage 7.
    cascade = Recipe(name="c", base_resolution=(32, 32), target_resolutions=((128, 128),), passes=(),
                     sampling=SamplingSpec(stages=((32, 32), (64, 64), (128, 128)), steps=50))
    assert _unet_calls(cascade, 10) == 10 + 7 + 7
    assert _unet_calls(None, 10) == 10


def test_row_progress_matches_the_unet_calls_made(monkeypatch) -> None:
    import unet_surgery.demo as demo

    seen: list[int] = []

    class Bar:
        def __init__(self, unet: torch.nn.Module, total: int, desc: str, enabled: bool) -> None:
            self.total, self.count = total, 0
            self.handle = unet.register_forward_pre_hook(lambda *_: setattr(self, "count", self.count + 1))

        def close(self) -> None:
            self.handle.remove()
            seen.append(self.total - self.count)

    monkeypatch.setattr(demo, "_RowProgress", Bar)
    cfg = DemoConfig(toys=("toy",), sizes=(128,), methods=("auto", "bicubic", "hires-0.3"), seeds=(0,), steps=5)
    run_demo(cfg, progress=lambda _: None)
    assert seen == [0, 0, 0, 0]  # the 1x row, the cascade, bicubic (none), hires (int(5 * 0.3) = 1)
    seen.clear()
    cfg = DemoConfig(toys=("toy",), sizes=(64,), methods=("multidiffusion", "demofusion"), seeds=(0,), steps=3)
    run_demo(cfg, progress=lambda _: None)
    assert seen == [0, 0, 0]


def test_patchwise_progress_counts_views_by_hand() -> None:
    # 64x64 pixels, window 32, stride 16: 3 x 3 views, one per call. DemoFusion at 128 from 32
    # runs every whole scale: phase 2 (64x64) 9 local + 2*2 dilated views, phase 3 (96x96)
    # 5*5 local + 3*3 dilated, phase 4 (128x128) 7*7 local + 4*4 dilated, in batches of 16:
    # 1 + 1 + 2 + 1 + 4 + 1 calls per step, plus phase 1's single call.
    multi = recipe_for("multidiffusion", None, 64)
    assert _unet_calls(multi, 10) == 9 * 10
    demo = recipe_for("demofusion", None, 128)
    assert _unet_calls(demo, 10) == 10 + 10 * (1 + 1 + 2 + 1 + 4 + 1)


def test_demo_cli_rejects_bad_arguments(capsys) -> None:
    code = main(["demo", "--seeds", "0"])
    _, err = capsys.readouterr()
    assert code == 2 and "--seeds must be between 1 and 1000, got 0" in err


def test_demo_json_is_written(tmp_path, monkeypatch, capsys) -> None:
    import unet_surgery.demo as demo

    small = DemoConfig(toys=("toy4",), sizes=(32,), methods=("baseline",), seeds=(0, 1), steps=4)
    monkeypatch.setattr(demo, "QUICK", small)
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("unet-surgery demo: loading")  # a line before any heavy import
    data = json.loads((tmp_path / "demo_quick.json").read_text())
    assert data["seeds"] == [0, 1] and data["rows"][0]["method"] == "baseline"
    assert data["rows"][0]["toy"] == "toy4" and len(data["rows"][0]["objects_per_image"]) == 2
    assert (tmp_path / "demo_grid_quick.png").stat().st_size > 0
    assert (tmp_path / "demo_crops_quick.png").stat().st_size > 0


def test_demo_modes_write_different_files(tmp_path, monkeypatch, capsys) -> None:
    """A --quick run next to a default run leaves the default run's grid and summary alone."""
    import unet_surgery.demo as demo

    small = DemoConfig(toys=("toy4",), sizes=(32,), methods=("baseline",), seeds=(0,), steps=2)
    monkeypatch.setattr(demo, "QUICK", small)
    monkeypatch.setattr(demo, "DEFAULT", small)
    assert main(["demo", "--out", str(tmp_path)]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"demo_grid.png", "demo.json", "demo_crops.png"}
    assert main(["demo", "--quick", "--seeds", "2", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {
        *before, "demo_grid_quick.png", "demo_quick.json", "demo_crops_quick.png"}
    assert all((tmp_path / name).read_bytes() == data for name, data in before.items())


def test_a_failing_row_is_recorded_and_rows_resume_from_the_cache(tmp_path) -> None:
    def sampled(method, unet_map, size):  # a recipe whose sampling raises (its cascade ends elsewhere)
        recipe = recipe_for(method, unet_map, size)
        if recipe is None:
            return None
        return replace(recipe, sampling=SamplingSpec(stages=((8, 8),)))

    cfg = DemoConfig(toys=("toy4",), sizes=(32, 64), methods=("baseline", "auto"), seeds=(0,), steps=2)
    rows = run_demo(cfg, progress=lambda _: None, recipes=sampled, keep_going=True)
    bad = rows[-1]
    assert bad.method == "auto" and bad.error is not None and bad.error.startswith("ValueError")
    assert bad.summary["frac_one"] == 0.0 and "crashed" in table(rows).splitlines()[-1]
    with pytest.raises(ValueError):
        run_demo(cfg, progress=lambda _: None, recipes=sampled)

    cache = tmp_path / "rows"
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="1x row is not in the cache"):
        run_demo(cfg, progress=lines.append, row_cache=cache, cached_only=True)
    first = run_demo(cfg, progress=lines.append, row_cache=cache)
    calls: list[int] = []
    toy_unet_hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda *_: calls.append(1))
    try:
        again = run_demo(cfg, progress=lines.append, row_cache=cache)
    finally:
        toy_unet_hook.remove()
    assert calls == []  # nothing sampled the second time
    assert all(torch.equal(a.images, b.images) for a, b in zip(first, again, strict=True))
    assert [a.summary for a in first] == [b.summary for b in again]
    assert lines[-1].endswith("(cached)")
    more = replace(cfg, methods=("baseline", "auto", "scalecrafter"))  # scalecrafter never ran
    report = run_demo(more, progress=lines.append, row_cache=cache, cached_only=True)
    assert [(r.size, r.method) for r in report] == [(32, "baseline"), (64, "baseline"), (64, "auto")]


def test_a_cached_row_is_not_reused_for_a_recipe_with_other_settings(tmp_path) -> None:
    cfg = DemoConfig(toys=("toy4",), sizes=(32, 64), methods=("baseline", "auto"), seeds=(0,), steps=2)
    cache = tmp_path / "rows"
    run_demo(cfg, progress=lambda _: None, row_cache=cache)

    def other(method, unet_map, size):  # same name, later restart: other images
        recipe = recipe_for(method, unet_map, size)
        return None if recipe is None else replace(recipe, sampling=replace(recipe.sampling, restart_step=0))

    lines: list[str] = []
    run_demo(cfg, progress=lines.append, recipes=other, row_cache=cache)
    assert lines[0].endswith("(cached)") and not lines[-1].endswith("(cached)")


def test_the_cascade_eta_is_part_of_a_cached_rows_key_and_of_its_images(tmp_path) -> None:
    cfg = DemoConfig(toys=("toy4",), sizes=(32, 64), methods=("baseline", "auto"), seeds=(0,), steps=2)
    cache = tmp_path / "rows"
    first = run_demo(cfg, progress=lambda _: None, row_cache=cache)
    lines: list[str] = []
    stochastic = run_demo(replace(cfg, cascade_eta=1.0), progress=lines.append, row_cache=cache)
    assert not any(line.endswith("(cached)") for line in lines)  # eta 0's rows are not reused
    assert torch.equal(first[0].images, stochastic[0].images)  # the plain 1x row ignores it
    assert not torch.equal(first[-1].images, stochastic[-1].images)  # the cascade's stages do not
    lines.clear()
    run_demo(cfg, progress=lines.append, row_cache=cache)  # eta 0 keeps its rows (and old keys)
    assert all(line.endswith("(cached)") for line in lines)
