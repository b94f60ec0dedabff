"""``unet-surgery disperse``: solve a dispersion transform and write it as safetensors."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from unet_surgery.cli.options import bounded_int, finite_float
from unet_surgery.errors import TransformError


def register(subparsers: Any) -> None:
    """Add the ``disperse`` sub-command."""
    parser = subparsers.add_parser(
        "disperse",
        help="solve ScaleCrafter's dispersion transform R (large² x small²) and save it",
        description=(
            "Solve the least-squares problem mapping a small kernel to a large one "
            "(ScaleCrafter's dispersed convolution) and write R as safetensors, with its "
            "parameters in the metadata."
        ),
    )
    parser.add_argument("--small", type=bounded_int, default=3, help="small kernel size (odd, default 3)")
    parser.add_argument("--large", type=bounded_int, default=5, help="large kernel size (odd, default 5)")
    parser.add_argument("--scale", type=bounded_int, default=2, help="upsampling scale (default 2)")
    parser.add_argument("--eta", type=finite_float, default=0.05, help="pixel-term weight (default 0.05)")
    parser.add_argument(
        "--input-size", type=bounded_int, default=3, help="side of the probe input (default 3)"
    )
    parser.add_argument("-o", "--output", required=True, help="output .safetensors path")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output holding something else (default: refuse it)")
    parser.set_defaults(func=run)


def _may_write(target: Path, transform: Any, params: Any, *, overwrite: bool) -> bool:
    """The one overwrite rule (:func:`unet_surgery.io.may_replace`): an existing file holding
    this very transform is kept, anything else (another transform, a file of the user's) is
    refused unless ``overwrite``."""
    import numpy as np

    from unet_surgery.io import may_replace
    from unet_surgery.ops.dispersion import load_transform

    if not target.exists() or target.is_dir():  # a folder is the OS's "Is a directory" on write
        return True
    try:
        old, old_params = load_transform(target)
    except TransformError:  # not a transform: a file of the user's
        return may_replace(target, same=False, overwrite=overwrite, error=TransformError,
                           what="a file that is not a dispersion transform", prefix="--output: ")
    same = old_params == params and old.shape == transform.shape and bool(np.array_equal(old, transform))
    what = "another transform"
    return may_replace(target, same=same, overwrite=overwrite, error=TransformError, what=what,
                       prefix="--output: ")


def run(args: argparse.Namespace) -> int:
    """Solve, write atomically, print a one-line summary."""
    import numpy as np

    from unet_surgery.ops.dispersion import TransformParams, dispersion_transform, save_transform

    if not str(args.output).endswith(".safetensors"):
        raise TransformError(f"output must end in .safetensors, got {args.output!r}")
    params = TransformParams(args.small, args.large, args.scale, args.input_size, args.eta)
    transform = dispersion_transform(
        params.small, params.large, params.scale, params.input_size, params.eta
    )
    if not _may_write(Path(args.output), transform, params, overwrite=args.overwrite):
        print(f"kept {args.output}: it already holds this transform")
        return 0
    save_transform(args.output, transform, params)
    dc_gain = float(np.sum(transform))
    print(
        f"wrote {args.output}: R {transform.shape[0]}x{transform.shape[1]} "
        f"({params.small}x{params.small} -> {params.large}x{params.large}, scale {params.scale}, "
        f"input {params.input_size}, eta {params.eta:g}), DC gain {dc_gain:.4f}"
    )
    return 0
