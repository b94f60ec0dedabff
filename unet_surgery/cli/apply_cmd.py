"""``unet-surgery apply --recipe R MODEL``: apply a recipe and print what changed."""

from __future__ import annotations

import argparse

from unet_surgery.loading import resolve_model
from unet_surgery.patching.patch import apply


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "apply",
        help="apply a recipe to a UNet and print what changed",
        description="Map MODEL, apply the recipe and print every changed layer with its op, "
        "factor and schedule, and any listed layer the model does not have.",
    )
    parser.add_argument("model", metavar="MODEL", help="preset name, diffusers folder or checkpoint file")
    parser.add_argument("--recipe", "-r", required=True, help="shipped recipe name or recipe file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    resolved = resolve_model(args.model, device="meta")
    patch = apply(resolved.model, args.recipe)
    print(f"source: {resolved.description}")
    print(patch.report())
    patch.remove()
    return 0
