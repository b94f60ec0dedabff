"""``unet-surgery disperse``: solve a dispersion transform and write it as safetensors."""

from __future__ import annotations

import argparse
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
    parser.set_defaults(func=run)


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
    save_transform(args.output, transform, params)
    dc_gain = float(np.sum(transform))
    print(
        f"wrote {args.output}: R {transform.shape[0]}x{transform.shape[1]} "
        f"({params.small}x{params.small} -> {params.large}x{params.large}, scale {params.scale}, "
        f"input {params.input_size}, eta {params.eta:g}), DC gain {dc_gain:.4f}"
    )
    return 0
