"""The demo: the shipped toy model sampled at 1x, 2x and 4x per side, with and without recipes.

The toy was trained on 32x32 images holding exactly one object. Sampled larger, a plain UNet
repeats objects; the recipes should keep one. The demo writes a labelled PNG grid and prints a
table of objects per image (connected components of the foreground), the fraction with exactly
one object, and the object size, for every method and scale.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_surgery.graph import UNetMap, map_unet
from unet_surgery.patching.patch import apply
from unet_surgery.recipes import Recipe, load_recipe
from unet_surgery.toy.metrics import analyse_images, summarise
from unet_surgery.toy.model import ToyDiffusion, load_toy, make_ddim_scheduler
from unet_surgery.toy.sampling import DEFAULT_GUIDANCE, initial_noise, sample

BASE = 32
METHODS = ("baseline", "redilate", "redilate+ndcfg", "cascade+fusion")
# Shipped recipes per method and side length (see recipes/toy/).
RECIPES: dict[tuple[str, int], str] = {
    ("redilate", 64): "toy-redilate-64-tuned",
    ("redilate", 128): "toy-redilate-128",
    ("redilate+ndcfg", 64): "toy-redilate-ndcfg-64",
    ("redilate+ndcfg", 128): "toy-redilate-ndcfg-128",
    ("cascade+fusion", 64): "toy-freescale-64",
    ("cascade+fusion", 128): "toy-freescale-128",
}


@dataclass(frozen=True)
class DemoConfig:
    sizes: Sequence[int] = (32, 64, 128)
    methods: Sequence[str] = METHODS
    seeds: Sequence[int] = tuple(range(6))
    steps: int = 14
    guidance_scale: float = DEFAULT_GUIDANCE


QUICK = DemoConfig(sizes=(32, 64), seeds=tuple(range(6)), steps=12)


@dataclass
class DemoRow:
    method: str
    size: int
    recipe: str | None
    images: torch.Tensor
    summary: dict[str, float]
    seconds: float
    per_image: list[int] = field(default_factory=list)


def _labels(seeds: Sequence[int], num_classes: int) -> torch.Tensor:
    return torch.tensor([s % num_classes for s in seeds])


def _sample_plain(toy: ToyDiffusion, cfg: DemoConfig, size: int, recipe: Recipe | None,
                  unet_map: UNetMap, ndcfg: bool) -> torch.Tensor:
    labels = _labels(cfg.seeds, toy.num_classes)
    if recipe is None:
        return sample(toy, labels, seeds=cfg.seeds, height=size, width=size, steps=cfg.steps,
                      guidance_scale=cfg.guidance_scale)
    with apply(toy.unet, recipe, unet_map=unet_map) as patch:
        scheduler = make_ddim_scheduler(toy.scheduler_config)
        scheduler.set_timesteps(cfg.steps)
        patch.set_timesteps(scheduler.timesteps)
        if ndcfg:
            patch.enable_noise_damped_cfg()
        return sample(toy, labels, seeds=cfg.seeds, height=size, width=size, steps=cfg.steps,
                      guidance_scale=cfg.guidance_scale)


def _sample_cascade(toy: ToyDiffusion, cfg: DemoConfig, recipe: Recipe, unet_map: UNetMap) -> torch.Tensor:
    from dataclasses import replace

    from unet_surgery.sampling import cfg_denoiser, self_cascade

    labels = _labels(cfg.seeds, toy.num_classes)
    cond = toy.encode(labels)
    uncond = toy.encode(torch.full_like(labels, toy.empty_class))
    spec = replace(recipe.sampling, steps=cfg.steps, restart_step=int(0.3 * cfg.steps))
    scheduler = make_ddim_scheduler(toy.scheduler_config)
    with torch.no_grad(), apply(toy.unet, recipe, unet_map=unet_map) as patch:
        out = self_cascade(
            cfg_denoiser(toy.unet, cond, uncond, guidance_scale=cfg.guidance_scale),
            scheduler,
            spec,
            latent_channels=3,
            batch_size=len(cfg.seeds),
            latents=initial_noise(cfg.seeds, BASE, BASE),
            generator=torch.Generator().manual_seed(0),
            patch=patch,
            progress=False,
        )
    return out.latents.clamp(-1, 1)


def run_demo(cfg: DemoConfig, *, progress: Callable[[str], None] = print) -> list[DemoRow]:
    """Sample every (method, size) of ``cfg``; 1x runs only the baseline."""
    torch.manual_seed(0)
    toy = load_toy()
    unet_map = map_unet(toy.unet, latent_hw=(64, 64))
    rows = []
    jobs = [(m, s) for s in cfg.sizes for m in cfg.methods if s != BASE or m == "baseline"]
    for i, (method, size) in enumerate(jobs, 1):
        name = RECIPES.get((method, size))
        if method != "baseline" and name is None:
            raise ValueError(f"no toy recipe for {method} at {size}x{size}")
        recipe = load_recipe(name) if name else None
        t0 = time.perf_counter()
        with torch.no_grad():
            if method == "cascade+fusion":
                images = _sample_cascade(toy, cfg, recipe, unet_map)  # type: ignore[arg-type]
            else:
                images = _sample_plain(toy, cfg, size, recipe, unet_map, ndcfg=method == "redilate+ndcfg")
        seconds = time.perf_counter() - t0
        stats = analyse_images(images)
        rows.append(DemoRow(method, size, name, images, summarise(stats), seconds, [s.num_objects for s in stats]))
        progress(f"[{i}/{len(jobs)}] {method:<15} {size:>3}x{size:<3} {seconds:6.1f} s  "
                 f"exactly one object: {rows[-1].summary['frac_one']:.0%}")
    return rows


def table(rows: list[DemoRow]) -> str:
    """Markdown table of the demo's metrics."""
    lines = [
        "| method | size | recipe | objects / image | exactly one | more than one | object size | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.summary
        lines.append(
            f"| {r.method} | {r.size}x{r.size} | {r.recipe or '-'} | {s['mean_objects']:.2f} | {s['frac_one']:.0%} | "
            f"{s['frac_multi']:.0%} | {s['mean_size']:.2f} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def grid_png(rows: list[DemoRow], path: str | Path, *, tile: int = 128) -> Path:
    """One labelled row per (method, size); every image shown at ``tile`` pixels."""
    from PIL import Image, ImageDraw

    label_w = 190
    n = max(len(r.images) for r in rows)
    canvas = Image.new("RGB", (label_w + n * (tile + 4), len(rows) * (tile + 4) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for i, r in enumerate(rows):
        y = 4 + i * (tile + 4)
        draw.text((6, y + tile // 2 - 18), f"{r.method}\n{r.size}x{r.size}\none object: {r.summary['frac_one']:.0%}",
                  fill="black")
        for j, img in enumerate(r.images):
            arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
            im = Image.fromarray(np.ascontiguousarray(arr)).resize((tile, tile), Image.NEAREST)
            canvas.paste(im, (label_w + j * (tile + 4), y))
            count = r.per_image[j]
            draw.text((label_w + j * (tile + 4) + 3, y + 2), str(count), fill="white" if count == 1 else "red")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def summary_json(rows: list[DemoRow], cfg: DemoConfig) -> dict[str, Any]:
    return {
        "seeds": list(cfg.seeds),
        "steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale,
        "rows": [{"method": r.method, "size": r.size, "recipe": r.recipe, "seconds": round(r.seconds, 2),
                  "objects_per_image": r.per_image, **r.summary} for r in rows],
    }
