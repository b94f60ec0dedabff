"""``unet-surgery demo``: the toy model at 1x, 2x and 4x, baseline and with recipes."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from unet_surgery.demo import QUICK, DemoConfig, grid_png, run_demo, summary_json, table
from unet_surgery.errors import SurgeryError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="sample the shipped toy model above its training size, with and without recipes",
        description="Load the toy diffusion model (trained at 32x32, one object per image), sample "
        "a fixed set of seeds at 1x, 2x and 4x per side, baseline and with re-dilation, "
        "re-dilation plus noise-damped guidance, and a FreeScale-style cascade; write a "
        "labelled PNG grid and print objects per image.",
    )
    parser.add_argument("--quick", action="store_true", help="1x and 2x only, 6 seeds, 12 steps (about a minute)")
    parser.add_argument("--out", type=Path, default=Path("unet-surgery-demo"), help="output folder (default: %(default)s)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 6)")
    parser.add_argument("--steps", type=int, help="sampling steps (default 14, quick 12)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("seeds", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SurgeryError(f"--{name} must be at least 1, got {value}")
    cfg = QUICK if args.quick else DemoConfig()
    if args.seeds is not None:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    rows = run_demo(cfg)
    grid = grid_png(rows, args.out / "demo_grid.png")
    (args.out / "demo.json").write_text(json.dumps(summary_json(rows, cfg), indent=2))
    print()
    print(table(rows))
    print(f"\nwrote {grid} and {args.out / 'demo.json'}")
    return 0
