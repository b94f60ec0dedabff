"""``unet-surgery apply --recipe R [--out DIR] MODEL``: apply a recipe and print what changed.

With ``--out`` the checkpoint's real weights are loaded and the patched model is written as a
patched diffusers folder (``unet_surgery.load_patched`` reloads it in one call).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from unet_surgery.cli.export_cmd import add_weights_arguments, check_out, load_weights


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "apply",
        help="apply a recipe to a UNet and print what changed",
        description="Map MODEL, apply the recipe and print every changed layer with its op, "
        "factor and schedule, and any listed layer the model does not have.",
    )
    parser.add_argument("model", metavar="MODEL", help="preset name, diffusers folder or checkpoint file")
    parser.add_argument("--recipe", "-r", required=True, help="shipped recipe name or recipe file")
    parser.add_argument("--out", "-o", metavar="DIR", default=None,
                        help="write the patched model as a diffusers folder with its adapter "
                        "(MODEL must then be a checkpoint file or folder)")
    add_weights_arguments(parser)
    parser.set_defaults(func=run)


def _apply(model: Any, recipe: str, force: bool = False) -> Any:
    """apply(), with its warnings (passes that cannot act) printed as ``warning:`` lines."""
    from unet_surgery.patching.patch import apply

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch = apply(model, recipe, force=force)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return patch


def run(args: argparse.Namespace) -> int:
    if args.out:
        from unet_surgery.export import save_patched_pretrained

        check_out(args.out, args.model, args.recipe, args.overwrite)  # before loading weights
        patch = _apply(load_weights(args.model, args.dtype), args.recipe, args.force)
        print(patch.report())
        save_patched_pretrained(patch, args.out, show_progress=not args.quiet, overwrite=args.overwrite)
        print(f"wrote patched diffusers folder {args.out}")
        return 0
    from unet_surgery.loading import resolve_model

    resolved = resolve_model(args.model, device="meta")
    patch = _apply(resolved.model, args.recipe, args.force)
    print(f"source: {resolved.description}")
    print(patch.report())
    patch.remove()
    return 0
