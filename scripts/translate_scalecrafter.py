"""Translate the official ScaleCrafter configs into unet-surgery recipes.

    python scripts/translate_scalecrafter.py ../shared/reference/scalecrafter recipes/scalecrafter

Each published ``configs/*.yaml`` (with the per-layer tables it points to) becomes one recipe;
a ``*_disperse`` config becomes two: the faithful one (``inflate_tau: 0``, so dispersion never
runs, exactly as published) and an ``-active`` variant in which the dispersed kernels are used
for the whole re-dilation window. Tables are copied verbatim, including SDXL entries naming
layers SDXL does not have: those recipes say ``on_missing: warn`` so applying them reports the
absent layers instead of silently skipping them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import scipy.io
import yaml

from unet_surgery.recipes.library import dump_recipe

BASES = {"sd1.5": ("sd15", 512), "sd2.1": ("sd21", 512), "sdxl": ("sdxl", 1024)}
COMMIT = "9dc1185"


def read_table(root: Path, rel: str | None) -> dict[str, float]:
    if not rel:
        return {}
    table: dict[str, float] = {}
    for line in (root / rel).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        path, _, factor = line.partition(":")
        value = float(factor)
        table[path] = int(value) if value.is_integer() else value
    return table


def read_list(root: Path, rel: str | None) -> list[str]:
    if not rel:
        return []
    return [line.strip() for line in (root / rel).read_text().splitlines() if line.strip()]


def translate(config_path: Path, root: Path) -> list[tuple[str, str]]:
    cfg = yaml.safe_load(config_path.read_text())
    stem = config_path.stem  # e.g. sd1.5_2048x2048_disperse
    base_key, res, *_rest = stem.split("_")
    if base_key not in BASES or not cfg.get("dilate_settings"):
        return []
    preset, base = BASES[base_key]
    height, width = cfg["latent_height"] * 8, cfg["latent_width"] * 8
    steps = cfg["num_inference_steps"]
    progressive = bool(cfg["progressive"])
    on_missing = "warn" if preset == "sdxl" else "error"
    dilate = read_table(root, cfg["dilate_settings"])
    ndcfg = read_table(root, cfg.get("ndcfg_dilate_settings"))
    disperse = read_list(root, cfg.get("disperse_settings"))

    def schedule(tau: int) -> dict:
        return {"tau": tau, "steps": steps, "progressive": progressive}

    passes: list[dict] = [
        {"type": "redilate", "select": {}, "factors": dilate, "schedule": schedule(cfg["dilate_tau"]),
         "on_missing": on_missing}
    ]
    if ndcfg:
        passes.append({"type": "noise_damped_cfg", "select": {}, "factors": ndcfg,
                       "schedule": schedule(cfg["ndcfg_tau"]), "on_missing": on_missing})
    variants = [("", None)]
    if disperse:
        R = scipy.io.loadmat(root / cfg["disperse_transform"])["R"]
        assert R.shape == (25, 9), R.shape
        variants = [("-disperse", cfg["inflate_tau"]), ("-disperse-active", cfg["dilate_tau"])]
    out = []
    for suffix, inflate_tau in variants:
        name = f"scalecrafter-{preset}-{res}{suffix}"
        recipe_passes = list(passes)
        if inflate_tau is not None:
            recipe_passes.append({
                "type": "disperse",
                "select": {"paths": disperse},
                "transform": {"small": 3, "large": 5, "scale": 2, "input_size": 3, "eta": 0.05},
                "schedule": {"tau": inflate_tau, "steps": steps},
                "on_missing": on_missing,
            })
        note = ""
        if suffix == "-disperse":
            note = " Faithful to the published inflate_tau: 0, so the dispersed kernels are built but never used."
        if suffix == "-disperse-active":
            note = f" Deliberate departure: dispersed kernels are used while step < {inflate_tau} (the published config sets inflate_tau: 0)."
        if ndcfg and cfg["ndcfg_tau"] == 0:
            note += " The published ndcfg_tau is 0, so noise-damped guidance is listed but inactive."
        doc = {
            "name": name,
            "description": f"ScaleCrafter {preset} at {width}x{height} (width x height) from {base}x{base}.{note}",
            "source": f"ScaleCrafter official configs/{config_path.name} (commit {COMMIT})",
            "model": preset,
            "base_resolution": [base, base],
            "target_resolutions": [[height, width]],
            "passes": recipe_passes,
        }
        header = (
            f"# Translated by scripts/translate_scalecrafter.py from ScaleCrafter's {config_path.name}\n"
            f"# (official repository, commit {COMMIT}); per-layer tables copied verbatim.\n"
        )
        out.append((name, header + dump_recipe(doc)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="the scalecrafter reference folder")
    parser.add_argument("out", type=Path, help="folder to write recipes into")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    count = 0
    for config in sorted((args.reference / "configs").glob("*.yaml")):
        for name, text in translate(config, args.reference):
            (args.out / f"{name}.yaml").write_text(text)
            count += 1
    print(f"wrote {count} recipes to {args.out}")


if __name__ == "__main__":
    main()
