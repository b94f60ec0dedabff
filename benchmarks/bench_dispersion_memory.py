"""Memory of dispersion: our in-place kernels against the published deep copies.

The published ScaleCrafter code builds dispersed UNets as two deep copies of the UNet. Here
the dispersed 5x5 kernels (non-persistent buffers on the listed convs) are the only new
tensors. Sizes are exact byte counts of the tensors each approach allocates, read off the
full-size models built on the meta device (no weights needed).

    python benchmarks/bench_dispersion_memory.py --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch

from unet_surgery import apply
from unet_surgery.presets import build_unet

RECIPES = {
    "sd15": "scalecrafter-sd15-2048x2048-disperse-active",
    "sd21": "scalecrafter-sd21-2048x2048-disperse-active",
    "sdxl": "scalecrafter-sdxl-4096x4096-disperse-active",
}


def nbytes(tensors, dtype: torch.dtype) -> int:
    return sum(t.numel() for t in tensors) * torch.empty((), dtype=dtype).element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for preset, recipe in RECIPES.items():
        model = build_unet(preset, device="meta")
        params = nbytes(model.parameters(), dtype)
        with apply(model, recipe) as patch:
            convs = [model.get_submodule(p) for p in patch.plan.entries("disperse")]
            dispersed = [b for conv in convs for b in conv._buffers.values()]
            ours = nbytes(dispersed, dtype)
            # Each published copy is the whole UNet with the listed 3x3 kernels replaced by 5x5.
            copy = params - nbytes((c.weight for c in convs), dtype) + ours
        rows.append({"preset": preset, "recipe": recipe, "dispersed_convs": len(convs), "unet_bytes": params,
                     "published_bytes": 2 * copy, "ours_bytes": ours, "ratio": ours / (2 * copy)})
    print(f"dtype: {args.dtype}\n")
    print("| preset | dispersed convs | UNet | published (2 deep copies) | ours (dispersed kernels) | ours / published |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['dispersed_convs']} | {r['unet_bytes'] / 2**20:.0f} MiB | "
              f"{r['published_bytes'] / 2**20:.0f} MiB | {r['ours_bytes'] / 2**20:.1f} MiB | {r['ratio']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
