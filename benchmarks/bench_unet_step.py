"""Patched vs unpatched UNet step at the same size, SD1.5 architecture with random weights.

The patched UNet re-dilates the layers of a ScaleCrafter recipe; the unpatched one runs the
same input. Both run in one process, interleaved, so the ratio is robust to machine noise.

    python benchmarks/bench_unet_step.py               # full SD1.5, 1024x1024 (128x128 latent)
    python benchmarks/bench_unet_step.py --quick       # full SD1.5 at 512x512 (64x64 latent)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from unet_surgery import apply
from unet_surgery.presets import build_unet, example_inputs


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--recipe", default="scalecrafter-sd15-1024x1024")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pixels = 512 if args.quick else 1024
    model = build_unet("sd15", size=args.size, device=device, dtype=dtype)
    inputs = example_inputs(model, height=pixels, width=pixels, device=device, dtype=dtype)
    inputs["timestep"] = torch.tensor([999], device=device)  # inside every re-dilation window

    def step() -> None:
        with torch.no_grad():
            model(**inputs)
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up, unpatched
    proxy = args.size == "tiny"  # the tiny variant runs full-size recipes as a scaled-down proxy
    patch = apply(model, args.recipe, force=proxy)
    step()  # warm-up, patched
    plain, patched = [], []
    for _ in range(args.repeat):  # interleaved so drift hits both
        patch.remove()
        plain += timed(step, 1)
        patch = apply(model, args.recipe, unet_map=patch.unet_map, force=proxy)
        patched += timed(step, 1)
    changed = len(patch.plan.paths("convs"))
    patch.remove()
    row = {
        "model": f"sd15 ({args.size})",
        "resolution": pixels,
        "recipe": args.recipe,
        "changed_convs": changed,
        "plain_s": statistics.median(plain),
        "patched_s": statistics.median(patched),
        "ratio": statistics.median(patched) / statistics.median(plain),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "dtype": str(dtype).replace("torch.", ""),
    }
    print(f"device: {row['device']}, {row['dtype']}\n")
    print("| model | resolution | recipe | convs changed | plain step (s) | patched step (s) | patched / plain |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {row['model']} | {pixels}x{pixels} | {args.recipe} | {changed} | {row['plain_s']:.3f} | "
          f"{row['patched_s']:.3f} | {row['ratio']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)


if __name__ == "__main__":
    main()
