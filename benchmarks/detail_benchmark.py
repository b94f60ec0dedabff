"""Generating detail vs upsampling: every method side by side on the toys, held-out seeds.

For each toy, size and method, samples one image per seed (class = seed % 3) and measures

* the object columns of :mod:`unet_surgery.toy.metrics` (exactly one object, empty, several,
  class kept, object scale), and
* on the textured toys (``texture_period`` in ``toy_config.json``), the detail columns of
  :mod:`unet_surgery.toy.detail`: native detail (the stripes' period within 20 % of the
  training period *in output pixels*, with at least 70 % of the 1x samples' contrast), the
  median period and the texture contrast relative to 1x.

Methods: ``baseline``, the plain model at the target size; ``bicubic`` (a 1x sample blown up); ``hires-S``
(the "hires fix": a 1x sample, bicubic upsample, img2img with the plain model at strength S);
``cascade`` (FreeScale's self-cascade without dilation); ``auto`` (``auto_recipe`` alone);
``scalecrafter``; ``freescale`` (cascade + scale-fusion attention); ``hidiffusion``;
``fouriscale``; ``demofusion`` and ``multidiffusion`` (the patch-wise samplers,
``auto_recipe(policy=...)``) and ``auto-patches`` (the automatic policy with its stages denoised
in native-size views: the memory-flat variant). The 1x row (the plain model at 32 px) gives the
reference contrast.

A row whose sampling raises is recorded as a failure in every column (``crashed: ...``), not
dropped. The report is rewritten after every row, and each row's images are kept in
``<out>/.rows`` (``--cache``; not committed), so a stopped run resumes where it stopped, and
``--cached-only`` writes the report of whatever the cache holds.

The seeds 9500-9515 were used for nothing else: no setting of any method was chosen on them.
The seeds 9700-9707 measured only ``auto`` with ``--cascade-eta 0`` and ``1`` (chosen on the
design seeds 200-207).
The row loop is the demo's (:func:`unet_surgery.demo.run_demo`), with two more methods.

    python benchmarks/detail_benchmark.py --toys toy-detail --out benchmarks/detail/toy-detail  # a committed report
    python benchmarks/detail_benchmark.py --toys toy-detail --sizes 64 --seeds 9500-9503 --methods baseline auto
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from unet_surgery.demo import METHODS as DEMO_METHODS
from unet_surgery.demo import (
    UPSCALERS,
    DemoConfig,
    DemoRow,
    crop_grid_png,
    grid_png,
    recipe_for,
    run_demo,
    table,
)
from unet_surgery.recipes import Recipe
from unet_surgery.recipes.auto import auto_recipe, cascade_recipe
from unet_surgery.recipes.schema import PatchSpec
from unet_surgery.toy.model import TOY_NAMES
from unet_surgery.toy.sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS

BASE = 32
HELD_OUT = tuple(range(9500, 9516))
DESIGN = tuple(range(200, 208))

EXTRA = {
    "cascade": lambda m, size: cascade_recipe(m, base=BASE, target=size, vae_scale_factor=1,
                                              dilate_fraction=0.0),
    "freescale": lambda m, size: cascade_recipe(m, base=BASE, target=size, vae_scale_factor=1,
                                                scale_fusion=True),
    "auto-patches": lambda m, size: replace(auto_recipe(m, base=BASE, target=size, vae_scale_factor=1),
                                            patches=PatchSpec()),
}
EXTRA_DESCRIPTIONS = {
    "cascade": "FreeScale's self-cascade without dilation (cascade_recipe(dilate_fraction=0))",
    "freescale": "FreeScale: self-cascade, restrained dilation and scale-fusion attention",
    "auto-patches": "auto_recipe() with a patches section: every stage in native-size views (memory-flat)",
}
METHODS: tuple[str, ...] = ("baseline", *UPSCALERS, "cascade", "auto", "scalecrafter",
                            "freescale", "hidiffusion", "fouriscale", "demofusion", "multidiffusion",
                            "auto-patches")


def recipe(method: str, unet_map: Any, size: int) -> Recipe | None:
    if method in EXTRA and size != BASE:
        return EXTRA[method](unet_map, size)
    return recipe_for(method, unet_map, size)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``heldout`` (9500-9515), ``design`` (200-207), ``A-B`` (inclusive) or a comma list."""
    if text == "heldout":
        return HELD_OUT
    if text == "design":
        return DESIGN
    if "-" in text and "," not in text:
        lo, hi = (int(v) for v in text.split("-"))
        return tuple(range(lo, hi + 1))
    return tuple(int(v) for v in text.split(","))


def row_json(r: DemoRow) -> dict[str, Any]:
    return {"toy": r.toy, "size": r.size, "method": r.method, "recipe": r.recipe,
            "seconds": round(r.seconds, 1), "objects_per_image": r.per_image, "shapes": r.shapes,
            **r.summary, "detail": r.detail, "error": r.error}


ROW_FIELDS = ("toy", "size", "method", "recipe", "seconds", "objects_per_image", "shapes", "detail", "error")


def merge_reports(paths: list[Path], out: Path) -> list[DemoRow]:
    """One report from several runs over the same seeds, steps and guidance: rows in method
    order, a later report's row replacing an earlier one's (a re-run after a fix). Each row
    keeps the command of the run that measured it (``"run"``)."""
    reports = [json.loads(path.read_text(encoding="utf-8")) for path in paths]
    key = ("seeds", "steps", "guidance", "base", "cascade_eta")
    for report in reports:
        report.setdefault("cascade_eta", 0.0)  # reports from before the option
    for path, report in zip(paths[1:], reports[1:], strict=True):
        if any(report[k] != reports[0][k] for k in key):
            raise SystemExit(f"{path}: other {', '.join(key)} than {paths[0]}; reports of different runs cannot merge")
    rows: dict[tuple[str, int, str], dict[str, Any]] = {}
    methods: dict[str, str] = {}
    for report in reports:
        methods.update(report["methods"])
        for row in report["rows"]:
            rows[(row["toy"], row["size"], row["method"])] = {**row, "run": row.get("run", report["command"])}
    order = {m: i for i, m in enumerate(("baseline", *METHODS))}
    merged = sorted(rows.values(), key=lambda r: (r["toy"], r["size"], order.get(r["method"], len(order))))
    out.mkdir(parents=True, exist_ok=True)
    combined = {**{k: reports[0][k] for k in (*key, "labels")}, "merged_from": [str(p) for p in paths],
                "methods": methods, "rows": merged}
    (out / "report.json").write_text(json.dumps(combined, indent=1) + "\n", encoding="utf-8")
    demo_rows = [DemoRow(r["toy"], r["method"], r["size"], r["recipe"], torch.empty(0),
                         {k: v for k, v in r.items() if k not in (*ROW_FIELDS, "run")}, r["seconds"],
                         detail=r["detail"], error=r.get("error")) for r in merged]
    (out / "report.md").write_text(table(demo_rows) + "\n", encoding="utf-8")
    return demo_rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toys", nargs="+", default=list(TOY_NAMES), choices=TOY_NAMES)
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", default="heldout", help="heldout (9500-9515), design (200-207), A-B or a,b,c")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--cascade-eta", type=float, default=0.0,
                   help="DDIM eta of the self-cascade's stages (default 0, deterministic; the plain rows use "
                   "the toys' stochastic eta 1)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/detail"))
    p.add_argument("--cache", type=Path, default=None,
                   help="folder of the resumable rows (default <out>/.rows); runs with other --out may share one")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="REPORT_JSON",
                   help="sample nothing: merge these report.json files (same seeds) into <out>/report.{json,md}, "
                   "later rows replacing earlier ones")
    p.add_argument("--cached-only", action="store_true",
                   help="sample nothing: the report of the rows <out>/.rows holds (a stopped run's), the others left out")
    args = p.parse_args(argv)
    if args.merge:
        print(table(merge_reports(args.merge, args.out)))
        return 0
    seeds = parse_seeds(args.seeds)
    command = "python benchmarks/detail_benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"{command}\n{len(seeds)} seeds ({seeds[0]}..{seeds[-1]}), {args.steps} steps", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[DemoRow] = []

    def write_report(done: list[DemoRow]) -> None:
        report = {"command": command, "seeds": list(seeds), "labels": [s % 3 for s in seeds],
                  "steps": args.steps, "guidance": args.guidance, "base": BASE, "cascade_eta": args.cascade_eta,
                  "methods": {m: DEMO_METHODS.get(m) or EXTRA_DESCRIPTIONS[m] for m in args.methods},
                  "rows": [row_json(r) for r in done]}
        (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        (args.out / "report.md").write_text(table(done) + "\n", encoding="utf-8")

    for toy_name in args.toys:  # one toy in memory at a time
        cfg = DemoConfig(toys=(toy_name,), sizes=tuple(args.sizes), methods=tuple(args.methods),
                         seeds=seeds, steps=args.steps, guidance_scale=args.guidance,
                         cascade_eta=args.cascade_eta)
        rows += run_demo(cfg, progress=lambda line: print(line, flush=True), recipes=recipe, keep_going=True,
                         row_cache=args.cache or args.out / ".rows", cached_only=args.cached_only, on_row=lambda own, before=list(rows): write_report(before + own))
        own = [r for r in rows if r.toy == toy_name]
        grid_png(own, args.out / f"grid_{toy_name}.png", tile=64)
        crop_grid_png([r for r in own if r.method in ("baseline", "bicubic", "hires-0.5", "auto")],
                      args.out / f"crops_{toy_name}.png")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
