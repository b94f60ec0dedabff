"""The toys at their training size: one object, the class, the scale and the texture period, on held-out seeds.

Issue bars: ``toy-detail`` >= 95 % exactly one object and >= 95 % the texture period reproduced
(dominant period within 20 % of ``texture_period``); ``toy-eps`` >= 95 % one object at 25 steps.
Class = seed % 3, the sampler's defaults (guidance 3, stochastic DDIM, eta 1) unless ``--steps``
or ``--eta``. ``--eta 1 0`` also samples with deterministic DDIM, the sampler of the self-cascade's
first stage on the toys: it tells whether a cascade's miss was already drawn at the base size.
The flat toys (no ``texture_period``) report no period.

    python benchmarks/toy_1x_check.py --seeds 9600-9647 --steps 25 50
    python benchmarks/toy_1x_check.py --toys toy toy4 toy-detail toy-eps --seeds 9500-9507 --eta 1 0
"""

from __future__ import annotations

import argparse

import numpy as np

from unet_surgery.toy.detail import analyse_detail, texture_contrast
from unet_surgery.toy.metrics import analyse_images, summarise
from unet_surgery.toy.model import TOY_NAMES, load_toy
from unet_surgery.toy.sampling import DEFAULT_ETA, sample


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toys", nargs="+", default=["toy-detail", "toy-eps"], choices=TOY_NAMES)
    p.add_argument("--seeds", default="9600-9647", help="A-B, inclusive")
    p.add_argument("--steps", nargs="+", type=int, default=[25])
    p.add_argument("--eta", nargs="+", type=float, default=[DEFAULT_ETA],
                   help="DDIM eta (1: the toys' stochastic default; 0: deterministic)")
    args = p.parse_args(argv)
    lo, hi = (int(v) for v in args.seeds.split("-"))
    seeds = list(range(lo, hi + 1))
    labels = [s % 3 for s in seeds]
    n = len(seeds)
    for name in args.toys:
        toy = load_toy(name)
        period = toy.config.get("texture_period")
        for steps in args.steps:
            for eta in args.eta:
                images = sample(toy, labels, seeds=seeds, steps=steps, eta=eta)
                stats = analyse_images(images, labels)
                summary = summarise(stats, labels, size_range=toy.config.get("size_range"))
                line = (f"{name} {steps} steps, eta {eta:g}, seeds {lo}-{hi}: exactly one object "
                        f"{sum(s.num_objects == 1 for s in stats)}/{n}, empty {sum(s.num_objects == 0 for s in stats)}/{n}, "
                        f"class kept {round(summary['frac_class_kept'] * n)}/{n}, "
                        f"scale in range {round(summary['frac_scale_in_range'] * n)}/{n}")
                if period is not None:
                    period = float(period)
                    reference = float(np.median([texture_contrast(im, period) for im in images]))
                    detail = [analyse_detail(im, period, reference) for im in images]
                    kept = sum(d.period is not None and abs(d.period - period) <= 0.2 * period for d in detail)
                    line += f", period reproduced {kept}/{n}"
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
