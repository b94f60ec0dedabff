"""Every shipped recipe on its preset's tiny UNet, at small and odd sizes the plain model runs.

A patched model must run every call the plain model runs, or refuse it with one clear error
(issue 14). For each shipped recipe (toy recipes excepted) and each size, the plain model runs
first; then the patched model runs an early and a late step. Counts: ran, clean errors
(``SurgeryError``), tracebacks (anything else), sizes the plain model itself cannot run.

    python scripts/sweep_recipe_sizes.py
"""

from __future__ import annotations

import warnings

import torch

from unet_surgery import apply, load_recipe
from unet_surgery.errors import SurgeryError
from unet_surgery.graph import map_unet
from unet_surgery.presets import build_unet, example_inputs
from unet_surgery.recipes.library import list_recipes

SIZES = [(24, 24), (40, 56), (72, 40), (136, 72)]  # pixels: 3x3, 5x7, 9x5 and 17x9 latents
VIDEO = ("svd", "animatediff", "modelscope_t2v")


def main() -> None:
    warnings.simplefilter("ignore")
    counts = {"ran": 0, "clean_error": 0, "traceback": 0, "plain_fails": 0}
    models: dict[str, tuple[torch.nn.Module, object]] = {}
    for name in list_recipes():
        recipe = load_recipe(name)
        preset = recipe.model
        if preset is None or preset.startswith("toy"):
            continue
        if preset not in models:
            model = build_unet(preset, size="tiny", device="cpu")
            models[preset] = (model, map_unet(model, cache=True))
        model, unet_map = models[preset]
        for hw in SIZES:
            extra = {"num_frames": 2} if preset in VIDEO else {}
            inputs = example_inputs(model, height=hw[0], width=hw[1], **extra)
            key = "timestep" if "timestep" in inputs else "timesteps"
            try:
                with torch.no_grad():
                    model(**inputs)
            except Exception:
                counts["plain_fails"] += 1
                continue
            try:
                # the tiny variant (64x64) as a scaled-down proxy of the recipe's full-size preset
                with apply(model, recipe, unet_map=unet_map, force=True) as patch:
                    patch.set_timesteps([999, 500, 1])
                    for t in (999, 1):
                        with torch.no_grad():
                            model(**{**inputs, key: torch.tensor(float(t))})
                counts["ran"] += 1
            except SurgeryError as exc:
                counts["clean_error"] += 1
                print(f"clean error: {name} {hw}: {exc}")
            except Exception as exc:
                counts["traceback"] += 1
                print(f"TRACEBACK: {name} {hw}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    print(counts)


if __name__ == "__main__":
    main()
