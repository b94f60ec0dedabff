"""``unet-surgery inspect MODEL``: print the UNet map of a preset, folder or checkpoint."""

from __future__ import annotations

import argparse
import json
from importlib import resources


def preset_names() -> list[str]:
    """The presets of ``architectures/presets.json``, read without importing torch (for --help)."""
    text = resources.files("unet_surgery.architectures").joinpath("presets.json").read_text("utf-8")
    return list(json.loads(text)["presets"])


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="print the layer map of a UNet",
        description="Map a UNet (preset name, diffusers UNet or pipeline folder, or a single-file "
        "checkpoint) and print its levels, stages, attention roles and skip connections.",
    )
    parser.add_argument(
        "model", metavar="MODEL",
        help="preset name (one of: " + ", ".join(preset_names()) + "), diffusers UNet or pipeline folder, "
        "or checkpoint file",
    )
    parser.add_argument("--json", action="store_true", help="print the full map as JSON")
    parser.add_argument("--layers", action="store_true", help="list every conv and attention op")
    parser.add_argument("--method", choices=("auto", "export", "probe"), default="auto",
                        help="how to capture the model: export (torch.export dataflow: levels, stages, "
                        "skips), probe (forward hooks; stages and skips unknown, printed as ?), or auto "
                        "(default: export, falling back to probe)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from unet_surgery.graph import map_unet
    from unet_surgery.loading import describe, resolve_model

    resolved = resolve_model(args.model, device="meta")
    unet_map = map_unet(resolved.model, method=args.method)
    if args.json:
        print(json.dumps({"source": describe(resolved), **unet_map.to_dict()}, indent=2))
    else:
        print(f"source: {resolved.description}")
        print(unet_map.table(layers=args.layers))
    return 0
