"""The demo command end to end on a reduced configuration (the full one is the README's job)."""

from __future__ import annotations

import json

from PIL import Image

from unet_surgery.cli import main
from unet_surgery.demo import DemoConfig, grid_png, run_demo, table


def test_demo_rows_table_and_grid(tmp_path) -> None:
    cfg = DemoConfig(sizes=(32, 64), methods=("baseline", "redilate"), seeds=(0, 1, 2, 3), steps=8)
    rows = run_demo(cfg, progress=lambda _: None)
    assert [(r.method, r.size) for r in rows] == [("baseline", 32), ("baseline", 64), ("redilate", 64)]
    assert rows[2].recipe == "toy-redilate-64-tuned"
    assert all(r.images.shape == (4, 3, r.size, r.size) for r in rows)
    assert not rows[1].images.equal(rows[2].images)  # the recipe acts
    assert rows[0].summary["frac_one"] >= 0.75  # the toy is a real model at 1x
    text = table(rows)
    assert text.count("\n") == 4 and "toy-redilate-64-tuned" in text
    grid = Image.open(grid_png(rows, tmp_path / "grid.png", tile=32))
    assert grid.size == (190 + 4 * 36, 3 * 36 + 4)


def test_demo_cli_rejects_bad_arguments(capsys) -> None:
    code = main(["demo", "--seeds", "0"])
    _, err = capsys.readouterr()
    assert code == 2 and "--seeds must be at least 1" in err


def test_demo_json_is_written(tmp_path, monkeypatch) -> None:
    import unet_surgery.cli.demo_cmd as demo_cmd

    small = DemoConfig(sizes=(32,), methods=("baseline",), seeds=(0, 1), steps=4)
    monkeypatch.setattr(demo_cmd, "QUICK", small)
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "demo.json").read_text())
    assert data["seeds"] == [0, 1] and data["rows"][0]["method"] == "baseline"
    assert len(data["rows"][0]["objects_per_image"]) == 2
    assert (tmp_path / "demo_grid.png").stat().st_size > 0
