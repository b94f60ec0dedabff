"""``unet-surgery toy export DIR [--toy NAME]``: the shipped toy as a diffusers UNet folder.

The toy is the only trained model a fresh install holds; written as a standard diffusers folder
it lets a user try ``inspect FOLDER``, ``apply --out`` and ``export`` on real weights offline.
"""

from __future__ import annotations

import argparse

DEFAULT_TOY = "toy"  # unet_surgery.toy.model.DEFAULT_TOY, kept here so --help imports no torch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "toy",
        help="the shipped toy diffusion models (export as a diffusers folder)",
        description="Work with the toy diffusion models shipped in the package (trained here, "
        "32x32 pixel space, one object per image).",
    )
    actions = parser.add_subparsers(dest="toy_command", metavar="ACTION", required=True)
    export = actions.add_parser(
        "export",
        help="write a toy's UNet as a diffusers folder, with its class tokens and schedule",
        description="Write the toy's UNet as a standard diffusers UNet folder (config.json + "
        "diffusion_pytorch_model.safetensors, as save_pretrained writes them) plus toy.json and "
        "class_embedding.safetensors, which unet_surgery.toy.load_toy_folder needs to sample it "
        "again. DIR must be new, empty or an earlier toy export: the same export is kept, one with "
        "other content (another toy) is replaced only with --overwrite.",
    )
    export.add_argument("out", metavar="DIR", help="output folder")
    export.add_argument("--toy", default=DEFAULT_TOY, metavar="NAME",
                        help=f"which shipped toy, e.g. toy or toy4 (default {DEFAULT_TOY}; "
                        "an unknown name lists them)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an earlier toy export with other content (default: refuse it)")
    # ``command`` names the error line: "unet-surgery toy export: error: ..."
    export.set_defaults(func=run_export, command="toy export")


def run_export(args: argparse.Namespace) -> int:
    from unet_surgery.toy.export import export_toy

    # A bad name is checked by export_toy (one error line) rather than argparse choices, whose
    # error prints the whole usage block.
    folder = export_toy(args.toy, args.out, overwrite=args.overwrite)
    print(f"wrote toy {args.toy!r} as a diffusers UNet folder to {folder} "
          "(config.json, diffusion_pytorch_model.safetensors, class_embedding.safetensors, toy.json)")
    print(f"next: unet-surgery inspect {folder}")
    return 0
