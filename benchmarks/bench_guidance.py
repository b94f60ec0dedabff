"""Cost per step of noise-damped guidance: one batched call vs the published four evaluations.

ScaleCrafter's noise-damped guidance needs eps_v(x, u) (UNet re-dilated by the vanilla table)
and eps_d(x, u), eps_d(x, c) (main table). The published loop runs two batch-2 UNet calls per
step, one per table, and throws the vanilla cond half away. The patch runs the three needed
rows in one batch-3 call, each re-dilated conv splitting its batch per table (BatchSplit).

Measured in the same run, per denoising step inside both windows (step 0 of 50):

* ``fused``      -- the pipeline's batch-2 [u, c] call through the patch with noise-damped
                    guidance on (3 rows inside);
* ``published``  -- a batch-2 call with the main table + a batch-2 call with the vanilla table;
* ``plain-cfg``  -- an unpatched batch-2 call (ordinary CFG at this size), for scale.

Model: SD1.5's UNet layout (levels, blocks, attention, 768-d context) with the channel widths
halved (160/320/640/640, about 1/4 of the parameters), random weights, float32 on the CPU,
at a 32x32 latent (``--latent``), with the published tables of ``scalecrafter-sd15-2048x2048``. A full-size
SD1.5 at the recipe's 256x256 latent takes minutes per call on a CPU (two shared cores here); per-layer factors do not
depend on the width or the latent size, so the ratio is what this measures.

    python benchmarks/bench_guidance.py
    python benchmarks/bench_guidance.py --reps 5 --json guidance.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from unet_surgery import apply, load_recipe, map_unet
from unet_surgery.io import atomic_path
from unet_surgery.presets import preset_config
from unet_surgery.recipes.schema import NoiseDampedCFGPass, Recipe, RedilatePass

RECIPE = "scalecrafter-sd15-2048x2048"
WIDTHS = (160, 320, 640, 640)
TARGET = 0.8


def build_model() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in preset_config("sd15").items() if not k.startswith("_")}
    cfg["block_out_channels"] = list(WIDTHS)
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(cfg).eval()


def split_tables(recipe: Recipe) -> tuple[Recipe, Recipe]:
    """The main table alone, and the vanilla (damped) table as an ordinary re-dilation."""
    main = [p for p in recipe.passes if isinstance(p, RedilatePass)]
    damped = [p for p in recipe.passes if isinstance(p, NoiseDampedCFGPass)]
    vanilla = [RedilatePass(select=p.select, factor=p.factor, factors=p.factors, schedule=p.schedule,
                            on_missing=p.on_missing) for p in damped]
    return (dataclasses.replace(recipe, name=recipe.name + "-main", passes=tuple(main)),
            dataclasses.replace(recipe, name=recipe.name + "-vanilla", passes=tuple(vanilla)))


def run(latent: int, reps: int) -> dict[str, Any]:
    from diffusers import DDIMScheduler

    model = build_model()
    unet_map = map_unet(model)
    recipe = load_recipe(RECIPE)
    main, vanilla = split_tables(recipe)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[0]  # step 0: both windows open (tau 35)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, latent, latent, generator=g).repeat(2, 1, 1, 1)  # [u, c] share x
    context = torch.randn(2, 77, 768, generator=g)

    def call() -> torch.Tensor:
        return model(x, t, encoder_hidden_states=context).sample

    def timed(setup: Callable[[], Any], fn: Callable[[], Any]) -> float:
        patch = setup()
        try:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        finally:
            if patch is not None:
                patch.remove()

    def fused_setup() -> Any:
        patch = apply(model, recipe, unet_map=unet_map)
        patch.set_timesteps(scheduler.timesteps)
        patch.enable_noise_damped_cfg()
        return patch

    def table_setup(r: Recipe) -> Callable[[], Any]:
        def setup() -> Any:
            patch = apply(model, r, unet_map=unet_map)
            patch.set_timesteps(scheduler.timesteps)
            return patch

        return setup

    rows: dict[str, list[float]] = {"fused": [], "main": [], "vanilla": [], "plain-cfg": []}
    rows_seen: list[int] = []
    with torch.inference_mode():
        # warm-up (kernels, thread pools), and proof that the fused call runs 3 rows
        patch = fused_setup()
        handle = model.conv_in.register_forward_pre_hook(lambda m, a: rows_seen.append(a[0].shape[0]))
        call()
        handle.remove()
        patch.remove()
        call()
        for _ in range(reps):  # interleaved, so drift hits every variant alike
            rows["fused"].append(timed(fused_setup, call))
            rows["main"].append(timed(table_setup(main), call))
            rows["vanilla"].append(timed(table_setup(vanilla), call))
            rows["plain-cfg"].append(timed(lambda: None, call))
    med = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
    best = {k: min(v) * 1e3 for k, v in rows.items()}  # least disturbed by other load on the machine
    published = med["main"] + med["vanilla"]
    params = sum(p.numel() for p in model.parameters())
    return {
        "recipe": RECIPE,
        "model": f"SD1.5 layout, widths {list(WIDTHS)}, {params / 1e6:.0f}M parameters, random weights",
        "latent": [latent, latent],
        "reps": reps,
        "fused_rows": int(rows_seen[0]),
        "ms": {"fused": med["fused"], "published": published, "published_main": med["main"],
               "published_vanilla": med["vanilla"], "plain_cfg": med["plain-cfg"]},
        "ms_min": {"fused": best["fused"], "published": best["main"] + best["vanilla"],
                   "plain_cfg": best["plain-cfg"]},
        "ratio_fused_over_published": med["fused"] / published,
        "ratio_fused_over_published_min": best["fused"] / (best["main"] + best["vanilla"]),
        "target_ratio": TARGET,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }


def markdown(res: dict[str, Any]) -> str:
    ms = res["ms"]
    lines = [
        f"{res['model']}, latent {res['latent'][0]}x{res['latent'][1]}, recipe {res['recipe']}, "
        f"step 0 of 50, median of {res['reps']}, {res['threads']} threads, torch {res['torch']}",
        "",
        "| variant | UNet calls | rows evaluated | ms / step | vs published |",
        "|---|---|---|---|---|",
        f"| fused (patch, noise-damped guidance) | 1 | {res['fused_rows']} | {ms['fused']:.0f} | "
        f"{ms['fused'] / ms['published']:.2f}x |",
        f"| published (main table + vanilla table) | 2 | 4 | {ms['published']:.0f} | 1.00x |",
        f"| ordinary CFG, unpatched | 1 | 2 | {ms['plain_cfg']:.0f} | {ms['plain_cfg'] / ms['published']:.2f}x |",
        "",
        f"ratio fused / published = {res['ratio_fused_over_published']:.2f} on medians, "
        f"{res['ratio_fused_over_published_min']:.2f} on minima (target <= {res['target_ratio']})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32, help="latent side (default 32)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(args.latent, args.reps)
    print(markdown(res))
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
