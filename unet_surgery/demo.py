"""The demo: both shipped toy models sampled at 1x, 2x and 4x per side, plain and with automatic recipes.

The toys were trained on 32x32 images holding exactly one object. Sampled larger, a plain UNet
repeats objects. Every recipe in the demo is derived automatically from the toy's map and the
target size (:func:`unet_surgery.auto_recipe`): nothing here was tuned on the demo's seeds. It
writes a labelled PNG grid and prints, per row, how many images hold exactly one object, none,
several, and the requested class.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_surgery.graph import map_unet
from unet_surgery.recipes import Recipe
from unet_surgery.recipes.auto import auto_recipe
from unet_surgery.toy.data import SHAPES
from unet_surgery.toy.metrics import analyse_images, summarise
from unet_surgery.toy.model import TOY_NAMES, load_toy
from unet_surgery.toy.sampling import DEFAULT_GUIDANCE, sample_recipe

BASE = 32
METHODS: dict[str, str] = {
    "baseline": "the plain model",
    "scalecrafter": "auto_recipe(policy='scalecrafter'): full-ratio re-dilation, ScaleCrafter's rule",
    "auto": "auto_recipe(): self-cascade with restrained deepest-level dilation",
    "hidiffusion": "hidiffusion_recipe(): RAU-Net + MSW-MSA with the official settings",
    "fouriscale": "fouriscale_recipe(): dilation + low-pass filtering with the official settings",
    "freeu": "freeu_recipe(): FreeU with SD1.5's published factors (no high-resolution fix of its own)",
}
"""Demo methods and what each one is. Every recipe is derived from the toy's map by the
method's builder, with published settings: none is tuned on the demo's seeds."""
DEFAULT_METHODS = ("baseline", "scalecrafter", "auto")
"""What ``unet-surgery demo`` runs unless ``--methods`` says otherwise (about 2 minutes)."""


@dataclass(frozen=True)
class DemoConfig:
    toys: Sequence[str] = TOY_NAMES
    sizes: Sequence[int] = (32, 64, 128)
    methods: Sequence[str] = DEFAULT_METHODS
    seeds: Sequence[int] = tuple(range(4))
    steps: int = 10
    guidance_scale: float = DEFAULT_GUIDANCE

    def jobs(self) -> list[tuple[str, int, str]]:
        """(toy, size, method) rows in order; 1x runs only the baseline."""
        return [(t, s, m) for t in self.toys for s in self.sizes for m in self.methods
                if s != BASE or m == "baseline"]


DEFAULT = DemoConfig()
"""About 2 minutes on 2 CPU cores."""
QUICK = DemoConfig(sizes=(32, 64))
"""1x and 2x per side only (about 20 s)."""
FULL = DemoConfig(seeds=tuple(range(16)), steps=25)
"""16 seeds at the sampler's default 25 steps (about 15 minutes on 2 CPU cores)."""


@dataclass
class DemoRow:
    toy: str
    method: str
    size: int
    recipe: str | None
    images: torch.Tensor
    summary: dict[str, Any]
    seconds: float
    per_image: list[int] = field(default_factory=list)
    shapes: list[str | None] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


def recipe_for(method: str, unet_map: Any, size: int) -> Recipe | None:
    """The recipe a demo ``method`` uses at ``size`` (``None`` for the plain model)."""
    if method not in METHODS:
        raise ValueError(f"unknown demo method {method!r}; choose from {', '.join(METHODS)}")
    if method == "baseline" or size == BASE:
        return None
    if method == "hidiffusion":
        from unet_surgery.recipes.hidiffusion import hidiffusion_recipe

        return replace(hidiffusion_recipe(unet_map, BASE, size), vae_scale_factor=1)
    if method == "fouriscale":
        from unet_surgery.recipes.fouriscale import fouriscale_recipe

        return replace(fouriscale_recipe(unet_map, (BASE, BASE), (size, size)), vae_scale_factor=1)
    if method == "freeu":
        from unet_surgery.recipes.freeu import freeu_recipe

        recipe = freeu_recipe(unet_map, base=BASE, vae_scale_factor=1)
        return replace(recipe, target_resolutions=((size, size),))
    policy = "scalecrafter" if method == "scalecrafter" else "auto"
    return auto_recipe(unet_map, base=BASE, target=size, vae_scale_factor=1, policy=policy)  # type: ignore[arg-type]


def _unet_calls(recipe: Recipe | None, steps: int) -> int:
    """UNet calls a row makes: steps, plus each later cascade stage's steps after its restart."""
    if recipe is None or recipe.sampling is None:
        return steps
    from unet_surgery.sampling import restart_step_of

    restart = recipe.sampling.restart_step
    spec = replace(recipe.sampling, steps=steps, restart_step=None if restart is None else min(restart, steps - 1))
    return steps + (len(spec.stages) - 1) * (steps - restart_step_of(spec))


class _RowProgress:
    """A bar per row advanced by a forward pre-hook on the UNet (works for every sampler)."""

    def __init__(self, unet: torch.nn.Module, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, unit="call")
        self.handle = unet.register_forward_pre_hook(lambda *_: self.bar.update(1) if self.bar else None)

    def close(self) -> None:
        self.handle.remove()
        if self.bar is not None:
            self.bar.close()


RecipeFor = Callable[[str, Any, int], Recipe | None]


def run_demo(
    cfg: DemoConfig,
    *,
    progress: Callable[[str], None] = print,
    bars: bool = False,
    recipes: RecipeFor | None = None,
) -> list[DemoRow]:
    """Sample every (toy, size, method) of ``cfg``; ``bars`` shows a progress bar per row.

    ``recipes(method, unet_map, size)`` gives each row's recipe (default: :func:`recipe_for`);
    the benchmarks pass their own to compare more methods.
    """
    make_recipe = recipes or recipe_for
    rows: list[DemoRow] = []
    jobs = cfg.jobs()
    labels = torch.tensor([s % 3 for s in cfg.seeds])
    toy_cache: dict[str, tuple[Any, Any]] = {}
    for i, (toy_name, size, method) in enumerate(jobs, 1):
        if toy_name not in toy_cache:
            toy = load_toy(toy_name)
            toy_cache.clear()  # one toy in memory at a time
            toy_cache[toy_name] = (toy, map_unet(toy.unet, latent_hw=(64, 64)))
        toy, unet_map = toy_cache[toy_name]
        recipe = make_recipe(method, unet_map, size)
        desc = f"[{i}/{len(jobs)}] {toy_name} {method} {size}x{size}"
        bar = _RowProgress(toy.unet, _unet_calls(recipe, cfg.steps), desc, bars)
        t0 = time.perf_counter()
        try:
            images = sample_recipe(toy, recipe, labels, seeds=cfg.seeds, size=size, steps=cfg.steps,
                                   guidance_scale=cfg.guidance_scale, unet_map=unet_map)
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        stats = analyse_images(images)
        summary = summarise(stats, labels=labels.tolist())
        rows.append(DemoRow(toy_name, method, size, None if recipe is None else recipe.name, images,
                            summary, seconds, [s.num_objects for s in stats],
                            [getattr(s, "shape", None) for s in stats], labels.tolist()))
        progress(f"{desc:<34} {seconds:6.1f} s  one object {summary['frac_one']:.0%}, "
                 f"none {summary['frac_none']:.0%}, class kept {summary['frac_class_kept']:.0%}")
    return rows


def table(rows: list[DemoRow]) -> str:
    """Markdown table of the demo's metrics."""
    lines = [
        "| toy | size | method | exactly one | no object | several | class kept | objects / image | object size | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.summary
        lines.append(
            f"| {r.toy} | {r.size}x{r.size} | {r.method} | {s['frac_one']:.0%} | {s['frac_none']:.0%} | "
            f"{s['frac_multi']:.0%} | {s['frac_class_kept']:.0%} | {s['mean_objects']:.2f} | "
            f"{s['mean_size']:.2f} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def grid_png(rows: list[DemoRow], path: str | Path, *, tile: int = 96) -> Path:
    """One labelled row per (toy, method, size); every image shown at ``tile`` pixels.

    Each tile's corner shows its object count and shape initial, red unless it is exactly one
    object of the requested class.
    """
    from PIL import Image, ImageDraw

    label_w = 150
    n = max(len(r.images) for r in rows)
    canvas = Image.new("RGB", (label_w + n * (tile + 4), len(rows) * (tile + 4) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for i, r in enumerate(rows):
        y = 4 + i * (tile + 4)
        draw.text((6, y + tile // 2 - 24),
                  f"{r.toy}\n{r.method}\n{r.size}x{r.size}\none object: {r.summary['frac_one']:.0%}",
                  fill="black")
        for j, img in enumerate(r.images):
            arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
            im = Image.fromarray(np.ascontiguousarray(arr)).resize((tile, tile), Image.Resampling.NEAREST)
            canvas.paste(im, (label_w + j * (tile + 4), y))
            count = r.per_image[j]
            shape = (r.shapes[j] if j < len(r.shapes) else None) or ""
            wanted = SHAPES[r.labels[j]] if j < len(r.labels) else None
            ok = count == 1 and (wanted is None or shape == wanted)
            draw.text((label_w + j * (tile + 4) + 3, y + 2), f"{count}{shape[:1]}",
                      fill="white" if ok else "red")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def summary_json(rows: list[DemoRow], cfg: DemoConfig) -> dict[str, Any]:
    return {
        "seeds": list(cfg.seeds),
        "labels": [s % 3 for s in cfg.seeds],
        "steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale,
        "methods": {m: METHODS[m] for m in cfg.methods},
        "rows": [{"toy": r.toy, "method": r.method, "size": r.size, "recipe": r.recipe,
                  "seconds": round(r.seconds, 2), "objects_per_image": r.per_image,
                  "shapes": r.shapes, **{k: v for k, v in r.summary.items()}} for r in rows],
    }
