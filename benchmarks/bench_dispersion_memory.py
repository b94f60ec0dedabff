"""Dispersion memory: kernels computed on the fly vs stored kernels vs plain, and adapter sizes.

Since adapter format 3 a dispersed conv holds only the shared transform R (25x9 float64, one
object per distinct transform, a plain attribute) and computes its kernel ``R @ w`` from the
live weight on each forward that uses it. The former way -- one stored 5x5 kernel per
dispersed conv, a non-persistent buffer -- is reproduced here by computing those kernels
(``disperse_kernel``) and attaching them with ``redilate_(dispersed_weight=...)``; no old code
is kept in the library. Three parts, side by side:

(a) bytes held while patched, exact, from full-size SD1.5 / SD2.1 / SDXL on ``meta``:
    parameters + buffers (window closed and open: nothing is attached during a forward, see
    tests/patching/test_dispersion_memory.py), the shared R, and the transient working set of
    the largest on-the-fly kernel (freed when its conv returns);
(b) one patched UNet step (a CFG batch of 2 inside the dispersion window), time and peak-RSS
    growth, each variant in a fresh subprocess: tiny SD1.5 and, with ``--sd15-step``, the
    full SD1.5 UNet at 64x64 latents in float32 (measured once; minutes on a CPU);
(c) adapter bytes of every shipped recipe, written by ``save_patch`` for the recipe's preset
    at full size on ``meta``. The base fingerprint needs real weights, so it is replaced by a
    constant of the same length *in this benchmark only*: an adapter's size does not depend on
    the weights (recipe + R's + adapter.json with a fixed-length fingerprint). Format 2 sizes
    are estimated as the kernels it stored (in --dtype) plus one R per layer.

    python benchmarks/bench_dispersion_memory.py --json out.json --markdown out.md [--sd15-step]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unet_surgery import apply
from unet_surgery.ops import rewrite
from unet_surgery.ops.dispersion import disperse_kernel, transform_tensor
from unet_surgery.ops.redilate import dispersed_weight, dispersion_of, redilate_
from unet_surgery.presets import build_unet, example_inputs

RECIPES = {
    "sd15": "scalecrafter-sd15-2048x2048-disperse-active",
    "sd21": "scalecrafter-sd21-2048x2048-disperse-active",
    "sdxl": "scalecrafter-sdxl-4096x4096-disperse-active",
}
MiB = 2**20


def held_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def dispersed_convs(patch: Any) -> dict[str, nn.Module]:
    return {p: patch.model.get_submodule(p) for p in patch.plan.entries("disperse")}


def store_kernels(patch: Any) -> None:
    """The former way: compute every dispersed kernel once and attach it as a buffer."""
    for path, conv in dispersed_convs(patch).items():
        entry = patch.plan.layers[path].entry("disperse")
        with torch.no_grad():
            kernel = disperse_kernel(conv.weight, transform_tensor(entry.transform))
        redilate_(conv, rewrite.source(conv), dispersed_weight=kernel,
                  dispersed_factor_scale=1.0 / entry.transform.scale, replace=True)


# --------------------------------------------------------------------------------------------
# (a) bytes held
# --------------------------------------------------------------------------------------------


def bytes_rows(dtype: torch.dtype) -> list[dict[str, Any]]:
    rows = []
    elem = torch.empty((), dtype=dtype).element_size()
    for preset, recipe in RECIPES.items():
        model = build_unet(preset, device="meta", dtype=dtype)
        plain = held_bytes(model)
        with apply(model, recipe) as patch:
            convs = dispersed_convs(patch)
            on_the_fly = held_bytes(model) - plain
            transforms = {id(dispersion_of(c)): dispersion_of(c) for c in convs.values()}
            r_bytes = sum(r.numel() * r.element_size() for r in transforms.values() if r is not None)
            # CPU working set of one on-the-fly kernel: float64 copy of w + float64 product, then
            # float64 product + result in the weights' dtype (the copy is freed before the cast)
            transient = max(c.weight.numel() * max(8 + 8 * 25 / 9, 8 * 25 / 9 + elem * 25 / 9) for c in convs.values())
            store_kernels(patch)
            stored = held_bytes(model) - plain
        rows.append({
            "preset": preset, "recipe": recipe, "dispersed_convs": len(convs), "plain_bytes": plain,
            "on_the_fly_extra_bytes_closed": on_the_fly, "on_the_fly_extra_bytes_open": on_the_fly,
            "shared_R_bytes": r_bytes, "distinct_R": len(transforms), "on_the_fly_transient_bytes": int(transient),
            "stored_extra_bytes_closed": stored, "stored_extra_bytes_open": stored,
            # each published deep copy: the UNet with the listed 3x3 kernels replaced by 5x5
            "published_copies_bytes": 2 * (plain + stored - sum(c.weight.numel() for c in convs.values()) * elem),
        })
    return rows


# --------------------------------------------------------------------------------------------
# (b) one step, each variant in a fresh subprocess
# --------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak RSS while the block runs, sampled every millisecond by a thread."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def step_variant(size: str, variant: str, pixels: int) -> dict[str, Any]:
    """Build, patch as ``variant``, run one step inside the dispersion window; report.

    The tiny UNet is warmed up and timed three times (median); the full one runs once.
    """
    from diffusers import DDIMScheduler

    model = build_unet("sd15", size=size, device="cpu")
    inputs = example_inputs(model, batch=2, height=pixels, width=pixels)  # [uncond, cond]
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(50)
    inputs["timestep"] = scheduler.timesteps[0].repeat(2)  # step 0: dispersion window open
    base_rss = rss_bytes()
    patch = None
    if variant != "plain":
        patch = apply(model, RECIPES["sd15"], force=size == "tiny")  # tiny: a scaled-down proxy
        patch.set_timesteps(scheduler.timesteps)
        if variant == "stored":
            store_kernels(patch)
    held = rss_bytes() - base_rss
    repeat = 3 if size == "tiny" else 1
    with torch.no_grad():
        if size == "tiny":
            model(**inputs)  # warm-up
        times = []
        before = rss_bytes()
        with PeakRss() as peak:
            for _ in range(repeat):
                t0 = time.perf_counter()
                model(**inputs)
                times.append(time.perf_counter() - t0)
        # what on the fly adds per UNet call inside the window: every dispersed kernel computed once
        kernels_s = None
        if variant == "on-the-fly":
            t0 = time.perf_counter()
            for conv in dispersed_convs(patch).values():
                dispersed_weight(conv)
            kernels_s = time.perf_counter() - t0
    return {"size": size, "variant": variant, "pixels": pixels, "latent": pixels // 8,
            "seconds": statistics.median(times), "runs": repeat, "kernels_seconds": kernels_s,
            "held_rss_bytes": held, "step_peak_growth_bytes": peak.peak - before,
            "peak_above_plain_model_bytes": peak.peak - base_rss, "params_buffers_bytes": held_bytes(model)}


def run_step(size: str, variant: str, pixels: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_step", size, variant, str(pixels)]
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072"}  # freed blocks leave the RSS
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# (c) adapter bytes of every shipped recipe
# --------------------------------------------------------------------------------------------

PRESET_OF = {"toy": None, "toy4": None}  # toys are not presets: built from their shipped config


def model_for(name: str) -> nn.Module:
    if name in PRESET_OF:
        from diffusers import UNet2DConditionModel

        from unet_surgery.toy.model import TOY_ARCHITECTURES

        with torch.device("meta"):
            return UNet2DConditionModel(**TOY_ARCHITECTURES[name])
    return build_unet(name, device="meta")


def adapter_rows(dtype: torch.dtype) -> list[dict[str, Any]]:
    import unet_surgery.export.adapter as adapter_module
    from unet_surgery.export import save_patch
    from unet_surgery.recipes.library import list_recipes, load_recipe

    stub = "sha256:" + "0" * 64  # same length as a real fingerprint; real weights are not built here
    real_fingerprint = adapter_module.fingerprint
    adapter_module.fingerprint = lambda model: stub  # type: ignore[assignment]
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []
    try:
        for name in list_recipes():
            recipe = load_recipe(name)
            model = model_for(recipe.model)
            with apply(model, recipe) as patch, tempfile.TemporaryDirectory() as tmp:
                save_patch(patch, Path(tmp) / "a")
                files = {p.name: p.stat().st_size for p in (Path(tmp) / "a").iterdir()}
                convs = dispersed_convs(patch)
                v2 = sum(c.weight.numel() * 25 // 9 * elem + 25 * 9 * 8 for c in convs.values())
            rows.append({"recipe": name, "model": recipe.model, "bytes": sum(files.values()), "files": files,
                         "dispersed_convs": len(convs), "format2_estimate_bytes": v2 + sum(files.values())})
    finally:
        adapter_module.fingerprint = real_fingerprint
    return rows


# --------------------------------------------------------------------------------------------


def render(data: dict[str, Any]) -> str:
    dt = data["dtype"]
    out = [f"machine: {data['machine']}; weights in {dt} for (a) and (c)", "",
           f"### (a) bytes held while patched (full-size UNets on meta, {dt})", "",
           "| preset | dispersed convs | plain UNet | on the fly: extra (window closed / open) | shared R | "
           "on the fly: transient per conv | stored kernels: extra (closed / open) | published: 2 deep copies |",
           "|---|---|---|---|---|---|---|---|"]
    for r in data["bytes"]:
        out.append(
            f"| {r['preset']} | {r['dispersed_convs']} | {r['plain_bytes'] / MiB:.0f} MiB | "
            f"{r['on_the_fly_extra_bytes_closed']} B / {r['on_the_fly_extra_bytes_open']} B | "
            f"{r['distinct_R']} x {r['shared_R_bytes'] // max(1, r['distinct_R'])} B | "
            f"{r['on_the_fly_transient_bytes'] / MiB:.0f} MiB | "
            f"{r['stored_extra_bytes_closed'] / MiB:.1f} MiB / {r['stored_extra_bytes_open'] / MiB:.1f} MiB | "
            f"{r['published_copies_bytes'] / MiB:.0f} MiB |")
    out += ["", "### (b) one UNet step inside the dispersion window (batch 2, float32, CPU; fresh process each)", "",
            "| UNet | latent | variant | step (s) | of which: computing the kernels (s) | params + buffers | "
            "RSS held after patching | peak RSS growth in the step | peak RSS above the plain model |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in data["steps"]:
        kernels = "" if r["kernels_seconds"] is None else f"{r['kernels_seconds']:.2f}"
        out.append(f"| SD1.5 {r['size']} | {r['latent']}x{r['latent']} | {r['variant']} | {r['seconds']:.2f} | {kernels} | "
                   f"{r['params_buffers_bytes'] / MiB:.1f} MiB | {r['held_rss_bytes'] / MiB:.1f} MiB | "
                   f"{r['step_peak_growth_bytes'] / MiB:.1f} MiB | {r['peak_above_plain_model_bytes'] / MiB:.1f} MiB |")
    if not any(r["size"] == "full" for r in data["steps"]):
        out.append("\n(full-size SD1.5 step not run: pass --sd15-step)")
    out += ["", "### (c) adapter size of every shipped recipe (format 3; fingerprint stubbed, same length)", "",
            "| recipe | model | dispersed convs | adapter (format 3) | format 2 (estimate, stored kernels) |",
            "|---|---|---|---|---|"]
    for r in data["adapters"]:
        v2 = f"{r['format2_estimate_bytes'] / MiB:.1f} MiB" if r["dispersed_convs"] else "same"
        out.append(f"| {r['recipe']} | {r['model']} | {r['dispersed_convs']} | {r['bytes'] / 1000:.1f} kB | {v2} |")
    largest = max(data["adapters"], key=lambda r: r["bytes"])
    out.append(f"\nlargest adapter: {largest['recipe']}, {largest['bytes']} bytes")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--_step":
        print(json.dumps(step_variant(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--sd15-step", action="store_true", help="also time the full SD1.5 UNet at 64x64 latents")
    parser.add_argument("--quick", action="store_true", help="accepted for run_all; the default is already quick")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    data: dict[str, Any] = {"dtype": args.dtype,
                            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    data["bytes"] = bytes_rows(dtype)
    sizes = [("tiny", 256)] + ([("full", 512)] if args.sd15_step else [])
    data["steps"] = [run_step(size, v, px) for size, px in sizes for v in ("plain", "on-the-fly", "stored")]
    data["adapters"] = adapter_rows(dtype)
    text = render(data)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text("# Dispersion memory\n\n`python benchmarks/bench_dispersion_memory.py"
                                       f"{' --sd15-step' if args.sd15_step else ''}` on {time.strftime('%Y-%m-%d')}\n\n"
                                       + text + "\n")


if __name__ == "__main__":
    main()
