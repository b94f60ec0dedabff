"""Held-out evaluation of the automatic recipe policies on both shipped toys.

For each toy, size and method, samples one image per seed (class = seed % 3), counts objects
and checks the class with :mod:`unet_surgery.toy.metrics`, and writes a JSON report, a markdown
table and a grid per toy. The default seeds (9000-9031) were never used to choose any setting:
the ``auto`` policy was designed on ``toy`` with the tuning seeds 100-115 (``--seeds tune``)
and is only *checked* on ``toy4``.

    python benchmarks/toy_policy.py                       # held-out, 32 seeds, ~25 min on 2 cores
    python benchmarks/toy_policy.py --seeds tune --steps 15 --toys toy   # what the design used
    python benchmarks/toy_policy.py --methods baseline auto --sizes 64 --seeds 9000-9003
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unet_surgery.demo import DemoConfig, DemoRow, grid_png, run_demo
from unet_surgery.recipes import Recipe
from unet_surgery.recipes.auto import auto_recipe, cascade_recipe
from unet_surgery.toy.model import TOY_NAMES
from unet_surgery.toy.sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS

BASE = 32
HELD_OUT = tuple(range(9000, 9032))
TUNING = tuple(range(100, 116))

# name -> recipe builder (None = the plain model). The first three are what users get;
# the others are the variants the design compared on the tuning seeds.
MethodBuilder = Callable[[Any, int], Recipe | None]
METHODS: dict[str, MethodBuilder] = {
    "baseline": lambda m, size: None,
    "auto": lambda m, size: auto_recipe(m, base=BASE, target=size, vae_scale_factor=1),
    "scalecrafter": lambda m, size: auto_recipe(m, base=BASE, target=size, vae_scale_factor=1,
                                                policy="scalecrafter"),
    "cascade-only": lambda m, size: cascade_recipe(m, base=BASE, target=size, vae_scale_factor=1,
                                                   dilate_fraction=0.0),
    "auto+fusion": lambda m, size: cascade_recipe(m, base=BASE, target=size, vae_scale_factor=1,
                                                  scale_fusion=True),
    "auto-tau100": lambda m, size: cascade_recipe(m, base=BASE, target=size, vae_scale_factor=1,
                                                  dilate_fraction=1.0),
    "auto-cos1": lambda m, size: cascade_recipe(m, base=BASE, target=size, vae_scale_factor=1,
                                                cosine_scale=1.0),
}


def parse_seeds(text: str) -> tuple[int, ...]:
    """``tune``, ``heldout``, ``A-B`` (inclusive) or a comma list."""
    if text == "tune":
        return TUNING
    if text == "heldout":
        return HELD_OUT
    if "-" in text and "," not in text:
        lo, hi = (int(v) for v in text.split("-"))
        return tuple(range(lo, hi + 1))
    return tuple(int(v) for v in text.split(","))


def evaluate(toys: list[str], sizes: list[int], methods: list[str], seeds: tuple[int, ...],
             steps: int, guidance: float, log: Callable[[str], None] = print) -> list[DemoRow]:
    """The demo's row loop (:func:`unet_surgery.demo.run_demo`) with this script's methods."""
    cfg = DemoConfig(toys=tuple(toys), sizes=tuple(sizes), methods=tuple(methods), seeds=seeds,
                     steps=steps, guidance_scale=guidance)
    return run_demo(cfg, progress=log,
                    recipes=lambda method, unet_map, size: None if size == BASE else METHODS[method](unet_map, size))


def table(rows: list[DemoRow]) -> str:
    lines = ["| toy | size | method | exactly one | empty | several | merged | class kept | objects / image | object scale | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.summary
        lines.append(
            f"| {r.toy} | {r.size} | {r.method} | {s['frac_one']:.0%} | {s['frac_none']:.0%} | "
            f"{s['frac_multi']:.0%} | {s['frac_merged']:.0%} | {s['frac_class_kept']:.0%} | "
            f"{s['mean_objects']:.2f} | {s['mean_scale']:.2f} | {r.seconds:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toys", nargs="+", default=list(TOY_NAMES), choices=TOY_NAMES)
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 128])
    p.add_argument("--methods", nargs="+", default=["baseline", "auto", "scalecrafter"], choices=sorted(METHODS))
    p.add_argument("--seeds", default="heldout", help="heldout (9000-9031), tune (100-115), A-B or a,b,c")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--out", type=Path, default=Path("benchmarks/toy_policy"))
    args = p.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    print(f"toys {args.toys}, sizes {args.sizes}, methods {args.methods}, {len(seeds)} seeds "
          f"({seeds[0]}..{seeds[-1]}), {args.steps} steps, guidance {args.guidance}", flush=True)
    rows = evaluate(args.toys, args.sizes, args.methods, seeds, args.steps, args.guidance,
                    log=lambda line: print(line, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"seeds": list(seeds), "steps": args.steps, "guidance": args.guidance,
              "command": "python benchmarks/toy_policy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": [{"toy": r.toy, "size": r.size, "method": r.method, "recipe": r.recipe,
                        "seconds": round(r.seconds, 1), "objects_per_image": r.per_image,
                        "shapes": r.shapes, **r.summary} for r in rows]}
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (args.out / "report.md").write_text(table(rows) + "\n", encoding="utf-8")
    for toy_name in args.toys:
        grid_png([r for r in rows if r.toy == toy_name], args.out / f"grid_{toy_name}.png", tile=64)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
