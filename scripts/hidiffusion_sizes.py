"""Measure how far the patched HiDiffusion is from the official code over many latent sizes.

The official code forwards every skip size to its upsampler (``num_upsamplers += 12``); the
``rau_net`` pass resizes at the RAU-Net partner and, while a pair is active, at the samplers of
the levels below it (size roles). This script runs both on the float64 tiny SD1.5 and SDXL
UNets, at the official "2x" and "4x" rows, over square, non-square and odd latents and over
steps where both pairs, one pair or none act, and prints per model and row: the largest
difference, the calls where either side raised, and the same for the partner-only form (size
roles off: what the pass did before they existed).

    PYTHONPATH=. python scripts/hidiffusion_sizes.py        # about 2 minutes on one core

The official code is the hand transcription in ``tests/passes/test_hidiffusion.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from unittest import mock

import torch

from tests.conftest import preset_map
from tests.passes import test_hidiffusion as ref
from unet_surgery import apply
from unet_surgery.passes import rau_net
from unet_surgery.recipes.hidiffusion import hidiffusion_recipe

SIZES = [(16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (16, 24), (24, 40), (40, 56),
         (36, 44), (17, 23), (33, 47), (18, 30), (26, 34)]
ROWS = {  # name -> row -> (base, target, steps on a 50-step trajectory)
    "sd15": {"2x": (512, 1024, [0, 19, 20]), "4x": (512, 2048, [0, 14, 15, 34, 35])},
    "sdxl": {"2x": (1024, 2048, [0, 7, 8, 19, 20]), "4x": (1024, 4096, [0, 14, 15, 34, 35])},
}


@contextmanager
def partner_only() -> Iterator[None]:
    """The pass without size roles: no level below a pair has a downsampler to keep."""
    with mock.patch.object(rau_net, "downsampler_conv", lambda unet_map, level: None):
        yield


def measure(name: str, row: str, size_roles: bool) -> tuple[float, int, int, int, list[str]]:
    """(largest |ours - official|, calls compared, calls where ours raised, where official
    raised, the sizes where ours raised)."""
    base, target, steps = ROWS[name][row]
    ref.FOUR_X_FROM[name] = 0 if row == "4x" else 10**6
    model = ref.tiny(name)
    official = ref.apply_hidiffusion(copy.deepcopy(model), name)
    unet_map = preset_map(name, "tiny")
    worst, compared, ours_failed, official_failed = 0.0, 0, 0, 0
    failed_sizes: list[str] = []
    with nullcontext() if size_roles else partner_only():
        recipe = hidiffusion_recipe(unet_map, base, target)
        with apply(model, recipe, unet_map=unet_map) as patch:
            patch.set_timesteps(ref.TIMESTEPS)
            for hw in SIZES:
                inputs = ref.inputs_for(model, hw)
                for step in steps:
                    try:
                        expected = ref.official_out(official, inputs, step, seed=step)
                    except RuntimeError:
                        official_failed += 1
                        continue
                    try:
                        out = ref.patched_out(model, inputs, step, seed=step)
                    except RuntimeError:
                        ours_failed += 1
                        failed_sizes += [f"{hw[0]}x{hw[1]}"] * (f"{hw[0]}x{hw[1]}" not in failed_sizes)
                        continue
                    compared += 1
                    worst = max(worst, float((out - expected).abs().max()))
    return worst, compared, ours_failed, official_failed, failed_sizes


def main() -> None:
    torch.set_num_threads(1)
    print(f"{len(SIZES)} latent sizes: {', '.join(f'{h}x{w}' for h, w in SIZES)} (HxW)\n")
    print("| model | row | form | calls compared | max abs diff | ours raised (sizes) | official raised |")
    print("|---|---|---|---|---|---|---|")
    for name in ROWS:
        for row in ROWS[name]:
            for size_roles in (True, False):
                worst, compared, ours, official, sizes = measure(name, row, size_roles)
                form = "partner + size roles" if size_roles else "partner only"
                where = f" ({', '.join(sizes)})" if sizes else ""
                print(f"| {name} | {row} | {form} | {compared} | {worst:.1e} | {ours}{where} | {official} |")


if __name__ == "__main__":
    main()
