"""``unet-surgery generate MODEL --size WxH (--prompt TEXT | --prompts FILE) [--recipe R|auto]``.

Writes one PNG per prompt x seed with its settings in the text chunks, and ``manifest.jsonl``.
The same command under ``accelerate launch`` splits the list between processes.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from unet_surgery.cli.export_cmd import DTYPES
from unet_surgery.cli.options import bounded_int, finite_float
from unet_surgery.generation.schedulers import SCHEDULERS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images with a recipe from an SD/SDXL pipeline folder (resumable, multi-process)",
        description="Generate every prompt x seed at --size with a recipe, one PNG each (settings in its "
        "text chunks) and a manifest.jsonl. Files already written with the same settings are skipped. "
        "Under `accelerate launch` the list is split between the processes; the files are the same.",
    )
    parser.add_argument("model", metavar="MODEL",
                        help="diffusers pipeline folder (SD1.5, SD2.1, SDXL), or a UNet folder (a patched one "
                        "from `apply --out` runs with its own recipe) or single-file UNet checkpoint with --components")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", "-p", action="append", metavar="TEXT", help="a prompt (repeatable)")
    prompt.add_argument("--prompts", metavar="FILE", help="text file, one prompt a line (# comments)")
    parser.add_argument("--size", "-s", required=True, metavar="WxH", help="image size WIDTHxHEIGHT, e.g. 2048x1024 (2048 wide), or one side")
    parser.add_argument("--recipe", "-r", default="auto",
                        help="auto (derived from the UNet's map and the size; default; a patched MODEL's own "
                        "recipe), none, a shipped recipe name, a recipe file or an adapter folder "
                        "(`export --format adapter`)")
    parser.add_argument("--negative", "-n", default=None, metavar="TEXT", help="negative prompt")
    parser.add_argument("--steps", type=bounded_int, default=50, help="denoising steps (per cascade stage; default 50)")
    parser.add_argument("--guidance", type=finite_float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--seed", default="0", metavar="SEEDS",
                        help="seeds: 42, 0,5,9 or 0-7 (inclusive); every prompt gets every seed (default 0)")
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), default=None,
                        help="sampler (default: the pipeline folder's own)")
    parser.add_argument("--out", "-o", default="outputs", metavar="DIR", help="output folder (default outputs)")
    parser.add_argument("--init-image", default=None, metavar="PATH",
                        help="image-to-image: start from this image, resized to --size (upscaling)")
    parser.add_argument("--strength", type=finite_float, default=0.6,
                        help="with --init-image: how much of the schedule is re-run (0-1, default 0.6)")
    parser.add_argument("--mask", default=None, metavar="PATH",
                        help="inpainting, with --init-image: repaint the mask's white part, keep its black part")
    parser.add_argument("--controlnet", default=None, metavar="DIR",
                        help="a diffusers ControlNet folder for MODEL's UNet (with --control-image)")
    parser.add_argument("--control-image", default=None, metavar="PATH",
                        help="the ControlNet's condition image (edges, depth...), resized to --size")
    parser.add_argument("--control-scale", type=finite_float, default=None,
                        help="ControlNet conditioning scale (0-10, default 1)")
    parser.add_argument("--control-end", type=finite_float, default=None,
                        help="the ControlNet acts on the first part of the steps up to this fraction "
                        "(control_guidance_end; default 0.6 with a HiDiffusion recipe, as published, else 1)")
    parser.add_argument("--components", default=None, metavar="DIR",
                        help="pipeline folder for the other components when MODEL is a UNet folder or file")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1... (default: the process's accelerate device)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="weights and compute precision (default float16 on CUDA, float32 on CPU)")
    tiling = parser.add_mutually_exclusive_group()
    tiling.add_argument("--vae-tiling", dest="vae_tiling", action="store_true", default=None,
                        help="always decode in tiles (default: when the decode would not fit)")
    tiling.add_argument("--no-vae-tiling", dest="vae_tiling", action="store_false",
                        help="never decode in tiles")
    parser.add_argument("--threads", type=bounded_int, default=None,
                        help="CPU threads per process (on the CPU the last bits depend on it: give the "
                        "same value to runs that must agree byte for byte)")
    parser.add_argument("--overwrite", action="store_true",
                        help="regenerate files that exist (default: keep those with the same settings, "
                        "refuse those with other settings)")
    parser.add_argument("--split", choices=["images", "patches"], default="images",
                        help="under accelerate launch: share the list of images between processes (default), "
                        "or the views of every image (patch-wise and DemoFusion recipes; same bytes)")
    parser.add_argument("--force", action="store_true",
                        help="apply a recipe made for another UNet structure, family or base size (default: refuse it)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from unet_surgery.generation import generate

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = generate(
            args.model, prompts=args.prompt, prompts_file=args.prompts, size=args.size, recipe=args.recipe,
            negative_prompt=args.negative, steps=args.steps, guidance=args.guidance, seeds=args.seed,
            scheduler=args.scheduler, out=args.out, init_image=args.init_image, strength=args.strength,
            mask=args.mask, controlnet=args.controlnet, control_image=args.control_image,
            control_scale=args.control_scale, control_end=args.control_end,
            components=args.components, device=args.device, dtype=args.dtype, vae_tiling=args.vae_tiling,
            threads=args.threads, overwrite=args.overwrite, progress=not args.quiet, split=args.split,
            force=args.force,
        )
    if result.manifest is not None:  # the main process speaks for the run
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        print(f"wrote {len(result.written)}, kept {len(result.skipped)} (this process); "
              f"manifest {result.manifest}")
    return 0
