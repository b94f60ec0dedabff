"""The textured toys at their training size: one object and the texture period, on held-out seeds.

Issue bars: ``toy-detail`` >= 95 % exactly one object and >= 95 % the texture period reproduced
(dominant period within 20 % of ``texture_period``); ``toy-eps`` >= 95 % one object at 25 steps.
Class = seed % 3, the sampler's defaults (guidance 3, stochastic DDIM) unless ``--steps``.

    python benchmarks/toy_1x_check.py --seeds 9600-9647 --steps 25 50
"""

from __future__ import annotations

import argparse

import numpy as np

from unet_surgery.toy.detail import analyse_detail, texture_contrast
from unet_surgery.toy.metrics import analyse_images
from unet_surgery.toy.model import load_toy
from unet_surgery.toy.sampling import sample


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toys", nargs="+", default=["toy-detail", "toy-eps"])
    p.add_argument("--seeds", default="9600-9647", help="A-B, inclusive")
    p.add_argument("--steps", nargs="+", type=int, default=[25])
    args = p.parse_args(argv)
    lo, hi = (int(v) for v in args.seeds.split("-"))
    seeds = list(range(lo, hi + 1))
    n = len(seeds)
    for name in args.toys:
        toy = load_toy(name)
        period = float(toy.config["texture_period"])
        for steps in args.steps:
            images = sample(toy, [s % 3 for s in seeds], seeds=seeds, steps=steps)
            one = sum(s.num_objects == 1 for s in analyse_images(images))
            reference = float(np.median([texture_contrast(im, period) for im in images]))
            detail = [analyse_detail(im, period, reference) for im in images]
            kept = sum(d.period is not None and abs(d.period - period) <= 0.2 * period for d in detail)
            print(f"{name} {steps} steps, seeds {lo}-{hi}: exactly one object {one}/{n}, "
                  f"period reproduced {kept}/{n}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
