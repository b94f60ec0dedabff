"""Sample the shipped toy model, print the object-count metrics, optionally save a grid PNG.

    python scripts/toy_grid.py --size 32 --n 32 --out docs/img/toy_samples_1x.png
    python scripts/toy_grid.py --size 128 --n 16          # 4x per side: baseline repetition

Labels cycle through the classes (disc, square, triangle); seeds are 0..n-1 (plus --seed-offset),
so every number printed here is reproducible.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from unet_surgery.toy import NUM_CLASSES, analyse_images, load_toy, sample, summarise
from unet_surgery.toy.sampling import DEFAULT_ETA, DEFAULT_GUIDANCE


def save_grid(images: torch.Tensor, path: Path, cols: int, counts: list[int] | None = None) -> None:
    """Tile ``(N, 3, H, W)`` images in [-1, 1] into one PNG (1 px gap), with object counts if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, _, h, w = images.shape
    rows = -(-n // cols)
    grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, 3), dtype=np.float32)
    pix = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = pix[i]
    scale = max(1.0, 96 / h)  # upscale small images so the PNG is legible
    fig = plt.figure(figsize=(grid.shape[1] * scale / 100, grid.shape[0] * scale / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(grid, interpolation="nearest")
    if counts is not None:
        for i, k in enumerate(counts):
            r, c = divmod(i, cols)
            ax.text(
                2 + c * (w + 1),
                1 + r * (h + 1) + h * 0.12,
                str(k),
                color="white",
                fontsize=7,
                bbox={"facecolor": "black", "pad": 0.5, "lw": 0},
            )
    ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=32, help="height = width in pixels")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--eta", type=float, default=DEFAULT_ETA, help="0 = deterministic DDIM")
    p.add_argument("--seed-offset", type=int, default=0)
    p.add_argument("--batch", type=int, default=16, help="samples per UNet call (memory)")
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--counts", action="store_true", help="print the object count on each tile")
    p.add_argument("--out", type=Path, default=None, help="grid PNG path")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    toy = load_toy()
    seeds = [args.seed_offset + i for i in range(args.n)]
    labels = [s % NUM_CLASSES for s in seeds]
    t0 = time.perf_counter()
    chunks = [
        sample(
            toy,
            labels[i : i + args.batch],
            seeds=seeds[i : i + args.batch],
            height=args.size,
            width=args.size,
            steps=args.steps,
            guidance_scale=args.guidance,
            eta=args.eta,
        )
        for i in range(0, args.n, args.batch)
    ]
    images = torch.cat(chunks)
    stats = analyse_images(images)
    summary = {
        "size": args.size,
        "steps": args.steps,
        "guidance": args.guidance,
        "eta": args.eta,
        **summarise(stats),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary))
    if args.out is not None:
        save_grid(
            images, args.out, args.cols, [s.num_objects for s in stats] if args.counts else None
        )
        print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
