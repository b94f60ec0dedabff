"""The demo: the textured toy models sampled at 1x, 2x and 4x per side, plain, blown up and with automatic recipes.

The toys were trained on 32x32 images holding exactly one object. Sampled larger, a plain UNet
repeats objects; blowing up a 1x sample (bicubic, or a "hires fix") keeps one object but its
detail is the small image's, stretched. The textured toys carry stripes of a fixed pixel period,
so each row says both: how many images hold exactly one object of the requested class, and how
many have *native detail* (:mod:`unet_surgery.toy.detail`). Every recipe is derived
automatically from the toy's map and the target size (:func:`unet_surgery.auto_recipe`):
nothing here was tuned on the demo's seeds. It writes a labelled PNG grid and a grid of zoomed
crops.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unet_surgery.graph import map_unet
from unet_surgery.recipes import Recipe, SamplingSpec
from unet_surgery.recipes.auto import auto_recipe
from unet_surgery.toy.data import SHAPES
from unet_surgery.toy.detail import analyse_detail, summarise_detail, texture_contrast
from unet_surgery.toy.metrics import analyse_images, summarise
from unet_surgery.toy.model import load_toy
from unet_surgery.toy.sampling import DEFAULT_GUIDANCE, sample, sample_recipe

BASE = 32
UPSCALERS: dict[str, float | None] = {"bicubic": None, "hires-0.1": 0.1, "hires-0.2": 0.2, "hires-0.3": 0.3,
                                      "hires-0.5": 0.5, "hires-0.7": 0.7}
"""Methods that start from the 1x sample: a bicubic upsample (``None``), or the "hires fix":
upsample, then img2img with the plain model at that strength."""
METHODS: dict[str, str] = {
    "baseline": "the plain model",
    "bicubic": "the 1x sample upsampled (bicubic): one object, but blown-up detail",
    "hires-0.1": "hires fix: the 1x sample upsampled, then img2img with the plain model, strength 0.1",
    "hires-0.2": "hires fix at strength 0.2",
    "hires-0.3": "hires fix at strength 0.3",
    "hires-0.5": "hires fix at strength 0.5",
    "hires-0.7": "hires fix at strength 0.7",
    "scalecrafter": "auto_recipe(policy='scalecrafter'): full-ratio re-dilation, ScaleCrafter's rule",
    "auto": "auto_recipe(): self-cascade with restrained deepest-level dilation",
    "hidiffusion": "hidiffusion_recipe(): RAU-Net + MSW-MSA with the official settings",
    "fouriscale": "fouriscale_recipe(): dilation + low-pass filtering with the official settings",
    "freeu": "freeu_recipe(): FreeU with SD1.5's published factors (no high-resolution fix of its own)",
    "demofusion": "auto_recipe(policy='demofusion'): DemoFusion's sampler with the official settings",
    "multidiffusion": "auto_recipe(policy='multidiffusion'): overlapping native-size views, averaged",
}
"""Demo methods and what each one is. Every recipe is derived from the toy's map by the
method's builder, with published settings: none is tuned on the demo's seeds."""
DEFAULT_METHODS = ("baseline", "bicubic", "scalecrafter", "auto")
"""What ``unet-surgery demo`` runs unless ``--methods`` says otherwise (about 2 minutes)."""
DEFAULT_TOYS = ("toy-detail", "toy4")
"""The textured design toy and the flat four-level check toy (about 2 minutes together);
``toy-eps``, whose attention at the 64x64-token level makes 128x128 rows four times slower, runs
with ``--toys``."""


@dataclass(frozen=True)
class DemoConfig:
    toys: Sequence[str] = DEFAULT_TOYS
    sizes: Sequence[int] = (32, 64, 128)
    methods: Sequence[str] = DEFAULT_METHODS
    seeds: Sequence[int] = tuple(range(4))
    steps: int = 10
    guidance_scale: float = DEFAULT_GUIDANCE
    cascade_eta: float = 0.0
    """DDIM eta of the self-cascade's stages (the plain rows use the toys' stochastic default)."""

    def jobs(self) -> list[tuple[str, int, str]]:
        """(toy, size, method) rows in order: per toy, the plain model at 1x first (the reference
        of the detail metric and the image the upscalers start from), then every larger size
        with every method."""
        return [row for t in self.toys for row in
                [(t, BASE, "baseline"),
                 *((t, s, m) for s in self.sizes if s != BASE for m in self.methods)]]


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
    detail: dict[str, Any] | None = None
    """:func:`~unet_surgery.toy.detail.summarise_detail` plus ``contrast_vs_1x`` on a textured
    toy (``None`` on the flat ones)."""
    error: str | None = None
    """Why the row's sampling failed (``run_demo(keep_going=True)``); its images are blank and
    count as failures in every column."""


def recipe_for(method: str, unet_map: Any, size: int) -> Recipe | None:
    """The recipe a demo ``method`` uses at ``size`` (``None`` for the plain model)."""
    if method not in METHODS:
        raise ValueError(f"unknown demo method {method!r}; choose from {', '.join(METHODS)}")
    if method == "baseline" or method in UPSCALERS or size == BASE:
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
    policy = method if method in ("scalecrafter", "demofusion", "multidiffusion") else "auto"
    return auto_recipe(unet_map, base=BASE, target=size, vae_scale_factor=1, policy=policy)  # type: ignore[arg-type]


def _unet_calls(recipe: Recipe | None, steps: int) -> int:
    """UNet calls a row makes: steps, plus each later cascade stage's steps after its restart;
    patch-wise stages make one call per batch of views; DemoFusion one per batch of its local and
    dilated views in every phase after the first."""
    if recipe is None:
        return steps
    if recipe.demofusion is not None:
        from unet_surgery.sampling.demofusion import view_counts

        (h, w), base = recipe.target_resolutions[0], recipe.base_resolution[0]
        phases = view_counts(h, w, base, recipe.vae_scale_factor, replace(recipe.demofusion, steps=steps))
        return steps + steps * sum(b for _, b in phases)
    from unet_surgery.sampling import restart_step_of
    from unet_surgery.sampling.patchwise import num_view_batches, patch_settings

    if recipe.sampling is None and recipe.patches is None:
        return steps
    stages = recipe.sampling.stages if recipe.sampling is not None else recipe.target_resolutions[:1]
    restart = recipe.sampling.restart_step if recipe.sampling is not None else None
    spec = SamplingSpec(stages=stages, steps=steps, restart_step=None if restart is None else min(restart, steps - 1))
    calls = 0
    for i, (h, w) in enumerate(stages):
        per_call = 1
        if recipe.patches is not None:
            window, stride = patch_settings(recipe)
            f = recipe.vae_scale_factor
            per_call = num_view_batches(h // f, w // f, window, stride, recipe.patches.view_batch_size)[1]
        calls += per_call * (steps if i == 0 else steps - restart_step_of(spec))
    return calls


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


def upscale(toy: Any, small: torch.Tensor, size: int, method: str, cfg: DemoConfig) -> torch.Tensor:
    """An upscaler row (:data:`UPSCALERS`) from the 1x images ``small`` of ``cfg.seeds``."""
    up = F.interpolate(small, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
    strength = UPSCALERS[method]
    if strength is None:
        return up
    labels = torch.tensor([s % 3 for s in cfg.seeds])
    return sample(toy, labels, seeds=cfg.seeds, height=size, width=size, steps=cfg.steps,
                  guidance_scale=cfg.guidance_scale, init_image=up, strength=strength)


def run_demo(
    cfg: DemoConfig,
    *,
    progress: Callable[[str], None] = print,
    bars: bool = False,
    recipes: RecipeFor | None = None,
    keep_going: bool = False,
    row_cache: Path | None = None,
    on_row: Callable[[list[DemoRow]], None] | None = None,
    cached_only: bool = False,
) -> list[DemoRow]:
    """Sample every (toy, size, method) of ``cfg``; ``bars`` shows a progress bar per row.

    ``recipes(method, unet_map, size)`` gives each row's recipe (default: :func:`recipe_for`);
    the benchmarks pass their own to compare more methods. Upscaler rows start from the toy's
    1x row, and their time includes it. On a textured toy every row also gets the detail metric,
    against the 1x row's median texture contrast.

    ``keep_going`` records a row whose sampling raises as a failed row (:attr:`DemoRow.error`)
    and goes on; ``row_cache`` (a folder) keeps each successful row's images and time and reuses them when
    the same row (toy, size, method, every recipe setting, seeds, steps, guidance) is asked again, so a long
    benchmark can be resumed; ``cached_only`` samples nothing and leaves out the rows the cache
    lacks (a report of what a stopped run measured); ``on_row(rows so far)`` runs after every
    row (e.g. to write a report as the run goes).
    """
    make_recipe = recipes or recipe_for
    rows: list[DemoRow] = []
    jobs = cfg.jobs()
    labels = torch.tensor([s % 3 for s in cfg.seeds])
    toy_cache: dict[str, tuple[Any, Any]] = {}
    small: DemoRow | None = None
    reference: float | None = None
    for i, (toy_name, size, method) in enumerate(jobs, 1):
        if toy_name not in toy_cache:
            toy = load_toy(toy_name)
            toy_cache.clear()  # one toy in memory at a time
            toy_cache[toy_name] = (toy, map_unet(toy.unet, latent_hw=(64, 64)))
        toy, unet_map = toy_cache[toy_name]
        period = toy.config.get("texture_period")
        recipe = None if method in UPSCALERS else make_recipe(method, unet_map, size)
        desc = f"[{i}/{len(jobs)}] {toy_name} {method} {size}x{size}"
        if method in UPSCALERS:  # bicubic: no UNet call; hires: img2img's int(steps * strength)
            strength = UPSCALERS[method]
            calls = 0 if strength is None else int(cfg.steps * strength)
        else:
            calls = _unet_calls(recipe, cfg.steps)
        recipe_name = None if recipe is None else recipe.name
        digest = None if recipe is None else _digest(repr(recipe))  # every setting, not only the name
        cached = _cached_row(row_cache, cfg, toy_name, size, method, recipe_name, digest)
        error: str | None = None
        if cached is not None:
            images, seconds = cached
        elif cached_only:
            if size == BASE and method == "baseline":
                raise RuntimeError(f"{toy_name}: the 1x row is not in the cache {row_cache}")
            continue
        else:
            bar = _RowProgress(toy.unet, calls, desc, bars)
            t0 = time.perf_counter()
            try:
                if method in UPSCALERS:
                    assert small is not None and small.toy == toy_name  # jobs() puts 1x first
                    images = upscale(toy, small.images, size, method, cfg)
                else:
                    images = sample_recipe(toy, recipe, labels, seeds=cfg.seeds, size=size,
                                           steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                                           unet_map=unet_map, cascade_eta=cfg.cascade_eta)
            except Exception as exc:
                if not keep_going:
                    raise
                error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300].replace("|", "/")
                images = torch.zeros((len(cfg.seeds), 3, size, size))
            finally:
                bar.close()
            seconds = time.perf_counter() - t0
            if method in UPSCALERS and small is not None:
                seconds += small.seconds
            if error is None:  # a failed row is tried again next time
                _store_row(row_cache, cfg, toy_name, size, method, recipe_name, digest, images, seconds)
        stats = analyse_images(images)
        summary = summarise(stats, labels=labels.tolist(), size_range=toy.config.get("size_range"))
        detail = None
        if period is not None:
            if size == BASE and method == "baseline":
                reference = float(np.median([texture_contrast(im, period) for im in images]))
            details = [analyse_detail(im, period, reference) for im in images]
            detail = {**summarise_detail(details),
                      "contrast_vs_1x": float(np.median([d.contrast for d in details])) / reference
                      if reference else None}
        row = DemoRow(toy_name, method, size, recipe_name, images,
                      summary, seconds, [s.num_objects for s in stats],
                      [getattr(s, "shape", None) for s in stats], labels.tolist(), detail, error)
        rows.append(row)
        if size == BASE and method == "baseline":
            if error is not None:
                raise RuntimeError(f"{toy_name}: the 1x row failed ({error}); every other row starts from it")
            small = row
        native = "" if detail is None else f", native detail {detail['native_detail']:.0%}"
        outcome = (f"CRASHED {error}" if error is not None else
                   f"one object {summary['frac_one']:.0%}, none {summary['frac_none']:.0%}, "
                   f"class kept {summary['frac_class_kept']:.0%}{native}")
        progress(f"{desc:<34} {seconds:6.1f} s  {outcome}{' (cached)' if cached is not None else ''}")
        if on_row is not None:
            on_row(rows)
    return rows


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _row_key(cfg: DemoConfig, toy: str, size: int, method: str, recipe: str | None) -> str:
    """A file name for one row's cache entry: the row, its recipe's name, seeds, steps, guidance."""
    what = repr((toy, size, method, recipe, tuple(cfg.seeds), cfg.steps, cfg.guidance_scale,
                 *((cfg.cascade_eta,) if cfg.cascade_eta else ())))  # rows from before the option keep their keys
    return f"{toy}-{size}-{method}-{_digest(what)}"


def _cached_row(cache: Path | None, cfg: DemoConfig, toy: str, size: int, method: str, recipe: str | None,
                digest: str | None) -> tuple[torch.Tensor, float] | None:
    """``(images, seconds)`` of a row stored by :func:`_store_row`, or ``None`` (also when
    the stored recipe's settings differ from ``digest``'s)."""
    if cache is None:
        return None
    path = Path(cache) / f"{_row_key(cfg, toy, size, method, recipe)}.pt"
    if not path.is_file():
        return None
    entry = torch.load(path, weights_only=True)
    if entry.get("recipe_digest", digest) != digest:
        return None
    return entry["images"], float(entry["seconds"])


def _store_row(cache: Path | None, cfg: DemoConfig, toy: str, size: int, method: str, recipe: str | None,
               digest: str | None, images: torch.Tensor, seconds: float) -> None:
    if cache is None:
        return
    Path(cache).mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {"images": images.detach().cpu(), "seconds": seconds}
    if digest is not None:
        entry["recipe_digest"] = digest
    torch.save(entry, Path(cache) / f"{_row_key(cfg, toy, size, method, recipe)}.pt")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def table(rows: list[DemoRow]) -> str:
    """Markdown table of the demo's metrics (detail columns "n/a" on the flat toys)."""
    lines = [
        "| toy | size | method | exactly one | no object | several | class kept | object scale | "
        "scale in range | native detail | period (px) | contrast vs 1x | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error is not None:
            lines.append(f"| {r.toy} | {r.size}x{r.size} | {r.method} | 0% (crashed: {r.error}) | n/a | n/a | 0% | "
                         f"n/a | 0% | 0% | n/a | n/a | {r.seconds:.1f} |")
            continue
        s, d = r.summary, r.detail or {}
        period = d.get("median_period")
        ratio = d.get("contrast_vs_1x")
        lines.append(
            f"| {r.toy} | {r.size}x{r.size} | {r.method} | {s['frac_one']:.0%} | {s['frac_none']:.0%} | "
            f"{s['frac_multi']:.0%} | {_pct(s['frac_class_kept'])} | {s['mean_scale']:.2f} | "
            f"{_pct(s.get('frac_scale_in_range'))} | {_pct(d.get('native_detail'))} | {'n/a' if period is None else f'{period:.1f}'} | "
            f"{'n/a' if ratio is None else f'{ratio:.2f}'} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def crop_grid_png(rows: list[DemoRow], path: str | Path, *, crop: int = 32, zoom: int = 4,
                  images: int = 4) -> Path:
    """Zoomed centre crops of each toy's largest size, a row per method: native stripes are
    fine and sharp, blown-up ones wide and soft. ``crop`` output pixels are shown ``zoom``x."""
    from PIL import Image, ImageDraw

    chosen = [r for r in rows if r.size == max(q.size for q in rows if q.toy == r.toy)]
    tile, label_w = crop * zoom, 150
    n = min(images, max(len(r.images) for r in chosen))
    canvas = Image.new("RGB", (label_w + n * (tile + 4), len(chosen) * (tile + 4) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for i, r in enumerate(chosen):
        y = 4 + i * (tile + 4)
        side = min(crop, r.size)
        lo = (r.size - side) // 2
        native = "" if r.detail is None else f"\nnative detail {r.detail['native_detail']:.0%}"
        draw.text((6, y + tile // 2 - 24), f"{r.toy}\n{r.method}\n{r.size}x{r.size}, centre {side}px"
                  f"{native}", fill="black")
        for j, img in enumerate(r.images[:n]):
            part = img[:, lo : lo + side, lo : lo + side]
            arr = ((part.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
            im = Image.fromarray(np.ascontiguousarray(arr)).resize((tile, tile), Image.Resampling.NEAREST)
            canvas.paste(im, (label_w + j * (tile + 4), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


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
                  f"{r.toy}\n{r.method}\n{r.size}x{r.size}\none object: {r.summary['frac_one']:.0%}"
                  + ("" if r.detail is None else f"\nnative detail: {r.detail['native_detail']:.0%}"),
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
                  "shapes": r.shapes, **{k: v for k, v in r.summary.items()},
                  "detail": r.detail} for r in rows],
    }
