"""``unet-surgery demo``: the textured toys at 1x, 2x and 4x, plain, blown up and with automatic recipes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unet_surgery.cli.options import bounded_int
from unet_surgery.errors import SurgeryError

# kept here so --help needs no torch import: toy.model.TOY_NAMES, demo.DEFAULT_TOYS, demo.METHODS
TOYS = ("toy", "toy4", "toy-detail", "toy-eps")
DEFAULT_TOYS = ("toy-detail", "toy4")
METHODS = ("baseline", "bicubic", "hires-0.1", "hires-0.2", "hires-0.3", "hires-0.5", "hires-0.7", "scalecrafter",
           "auto", "hidiffusion", "fouriscale", "freeu", "demofusion", "multidiffusion")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="sample the shipped toy models above their training size, with and without automatic recipes",
        description="Load two toy diffusion models (trained at 32x32, one object per image; "
        "'toy-detail' with stripes of a 4-px period, 3 levels; 'toy4' flat, 4 levels; 'toy-eps' "
        "textured, epsilon with SD's schedule, with --toys), sample fixed seeds at 1x, 2x and 4x per side: "
        "the plain model, the 1x sample blown up (bicubic), ScaleCrafter's full-ratio re-dilation "
        "rule and the automatic policy (both from auto_recipe, nothing tuned on these seeds). "
        "Writes a labelled PNG grid and a grid of zoomed crops, and prints, per row, images with "
        "exactly one object, none, several, the requested class, and native detail (the stripes "
        "drawn at the output resolution). Default: 4 seeds, 10 steps, about 2 minutes on 2 CPU cores.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="32x32 and 64x64 only (about 20 s); writes demo_grid_quick.png and demo_quick.json")
    size.add_argument("--full", action="store_true",
                      help="16 seeds at 25 steps (about 15 minutes on 2 CPU cores); writes demo_grid_full.png "
                      "and demo_full.json")
    parser.add_argument("--toys", nargs="+", choices=TOYS, help=f"toys to run (default: {' '.join(DEFAULT_TOYS)})")
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, "all"], metavar="METHOD",
                        help=f"methods to compare: {', '.join(METHODS)} or all "
                        "(default: baseline bicubic scalecrafter auto)")
    parser.add_argument("--out", type=Path, default=Path("unet-surgery-demo"),
                        help="output folder (default: %(default)s)")
    parser.add_argument("--seeds", type=bounded_int, help="number of seeds, 0..N-1 (default 4, --full 16)")
    parser.add_argument("--steps", type=bounded_int, help="sampling steps (default 10, --full 25)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def output_names(args: argparse.Namespace) -> tuple[str, str, str]:
    """(grid PNG, summary JSON, crops PNG) names: one set per mode, so ``--quick`` never replaces
    the default run's."""
    suffix = "_quick" if args.quick else "_full" if args.full else ""
    return f"demo_grid{suffix}.png", f"demo{suffix}.json", f"demo_crops{suffix}.png"


def run(args: argparse.Namespace) -> int:
    for name in ("seeds", "steps"):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= 1000:
            raise SurgeryError(f"--{name} must be between 1 and 1000, got {value}")
    print("unet-surgery demo: loading torch, diffusers and the toy models ...", flush=True)
    from dataclasses import replace

    from unet_surgery import demo

    cfg = demo.QUICK if args.quick else demo.FULL if args.full else demo.DEFAULT
    if args.seeds is not None:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    if args.toys:
        cfg = replace(cfg, toys=tuple(args.toys))
    if args.methods:
        methods = tuple(demo.METHODS) if "all" in args.methods else tuple(dict.fromkeys(args.methods))
        cfg = replace(cfg, methods=("baseline", *(m for m in methods if m != "baseline")))
    print(f"{len(cfg.jobs())} rows: toys {', '.join(cfg.toys)}; sizes {', '.join(map(str, cfg.sizes))}; "
          f"methods {', '.join(cfg.methods)}; {len(cfg.seeds)} seeds, {cfg.steps} steps", flush=True)
    bars = not args.no_progress and sys.stderr.isatty()
    rows = demo.run_demo(cfg, progress=lambda line: print(line, flush=True), bars=bars)
    grid_name, json_name, crops_name = output_names(args)
    grid = demo.grid_png(rows, args.out / grid_name)
    crops = demo.crop_grid_png(rows, args.out / crops_name)
    (args.out / json_name).write_text(json.dumps(demo.summary_json(rows, cfg), indent=2))
    print()
    print(demo.table(rows))
    print(f"\nwrote {grid}, {crops} (zoomed crops) and {args.out / json_name}")
    return 0
