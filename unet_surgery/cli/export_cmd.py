"""``unet-surgery export --format adapter|diffusers|pt2 --recipe R -o OUT MODEL``.

Loads MODEL with its real weights (a diffusers folder, a pipeline folder or a single-file
checkpoint), applies the recipe and writes one export format (see docs/export.md).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

from unet_surgery.cli.options import bounded_int
from unet_surgery.errors import CheckpointError, SurgeryError
from unet_surgery.io import excerpt

if TYPE_CHECKING:
    from torch import nn

FORMATS = ("adapter", "diffusers", "pt2")
DTYPES = ("float32", "float16", "bfloat16")  # names of torch dtypes: --help imports no torch


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="cast the weights on load (default: keep the stored precision)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export with other content (default: keep one with the "
                        "same files, refuse one with other content)")
    parser.add_argument("--force", action="store_true",
                        help="apply a recipe made for another UNet structure, family or base size (default: refuse it)")


def check_out(out: str, model: str, recipe: str, overwrite: bool) -> None:
    """Refuse an --out that is the input, holds it or lies in it, a folder we may not replace,
    or (without --overwrite) an export made with another recipe: before any weights load."""
    from unet_surgery.export.staging import check_export_target
    from unet_surgery.recipes.library import load_recipe

    check_export_target(Path(out), source=Path(model), recipe_name=load_recipe(recipe).name, overwrite=overwrite)


def load_weights(spec: str, dtype: str | None) -> nn.Module:
    """MODEL with real weights; a preset name is refused (presets have no trained weights)."""
    import torch

    from unet_surgery.loading import load_unet
    from unet_surgery.presets import PRESETS

    if not Path(spec).exists():
        if spec in PRESETS:
            raise CheckpointError(f"{spec!r} is a preset (an architecture without weights); give a checkpoint file or folder")
        raise CheckpointError(f"checkpoint not found: {spec}")
    return load_unet(spec, dtype=getattr(torch, dtype) if dtype else None)


def parse_resolution(text: str) -> tuple[int, int]:
    """``(height, width)`` from ``WIDTHxHEIGHT``, the order of every size string (docs/cli.md)."""
    match = re.fullmatch(r"\s*([0-9]{1,6})\s*[xX]\s*([0-9]{1,6})\s*", text)
    if not match:
        raise SurgeryError(f"--resolution must look like WIDTHxHEIGHT (e.g. 2048x1024), got {excerpt(text)}")
    return int(match.group(2)), int(match.group(1))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="apply a recipe to a checkpoint and export the patched model",
        description="Load MODEL's weights, apply the recipe and write an adapter (recipe + "
        "dispersion transforms + base fingerprint), a patched diffusers folder, or one frozen "
        "torch.export program per schedule phase (.pt2) with a manifest.",
    )
    parser.add_argument("model", metavar="MODEL", help="diffusers UNet/pipeline folder or single-file checkpoint")
    parser.add_argument("--format", "-f", choices=FORMATS, required=True, help="what to write")
    parser.add_argument("--recipe", "-r", required=True, help="shipped recipe name or recipe file")
    parser.add_argument("--out", "-o", required=True, metavar="OUT", help="output folder")
    parser.add_argument("--resolution", metavar="WxH", default=None,
                        help="pt2: pixel resolution (default: the recipe's first target)")
    parser.add_argument("--steps", type=bounded_int, default=50, help="pt2: sampling steps (default 50)")
    parser.add_argument("--batch", type=bounded_int, default=1, help="pt2: batch size frozen into the programs")
    parser.add_argument("--frames", type=bounded_int, default=None, help="pt2: frames, for video UNets")
    add_weights_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from unet_surgery.export import save_patch, save_patched_pretrained
    from unet_surgery.export.pt2 import export_pt2
    from unet_surgery.patching.patch import apply

    resolution = parse_resolution(args.resolution) if args.resolution else None
    check_out(args.out, args.model, args.recipe, args.overwrite)  # before loading gigabytes
    model = load_weights(args.model, args.dtype)
    patch = apply(model, args.recipe, force=args.force)
    print(patch.report())
    show = not args.quiet
    if args.format == "adapter":
        save_patch(patch, args.out, overwrite=args.overwrite)
    elif args.format == "diffusers":
        save_patched_pretrained(patch, args.out, show_progress=show, overwrite=args.overwrite)
    else:
        height, width = resolution or patch.recipe.target_resolutions[0]
        export_pt2(patch, args.out, height=height, width=width, num_steps=args.steps, batch=args.batch,
                   num_frames=args.frames, show_progress=show, overwrite=args.overwrite)
    print(f"wrote {args.format} export to {args.out}")
    return 0
