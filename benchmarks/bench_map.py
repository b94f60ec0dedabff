"""Cold map time (symbolic export vs static-first) and apply time cold vs cached, side by side.

Every measurement runs in a fresh subprocess (no import, memory cache or warm-up shared), on
the full-size preset built on the meta device:

* ``map``: ``map_unet(model, cache=False)``, by the symbolic-size export (the mapper before
  static-first) and by the default static-first export, with peak RSS;
* ``apply``: ``apply(model, recipe)`` with a shipped recipe, cold (``UNET_SURGERY_NO_MAP_CACHE=1``:
  it maps), from the maps shipped with the package, and from the user's cache folder.

    python benchmarks/bench_map.py                        # SD1.5 and SDXL
    python benchmarks/bench_map.py --presets sd15 --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

RECIPES = {"sd15": "scalecrafter-sd15-2048x2048", "sdxl": "scalecrafter-sdxl-2048x2048"}

_CHILD = r"""
import json, os, resource, shutil, sys, time
from unet_surgery.presets import build_unet
from unet_surgery.graph import cache, map_unet, mapper
preset, kind, mode, recipe = sys.argv[1:5]
model = build_unet(preset, size="full", device="meta")
if kind == "map":
    if mode == "symbolic":  # the mapper without its static-first export
        mapper._static_first = lambda *args: None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    unet_map = map_unet(model, cache=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": peak / 1024, "baseline_rss_mb": base / 1024, "method": unet_map.method,
           "convs": len(unet_map.convs), "attentions": len(unet_map.attentions)}
else:
    from unet_surgery import apply
    if mode == "user":  # the entry sits in the user's folder (looked up before the shipped ones)
        # the shipped entry stays: the user folder is looked up first
        key = cache.map_key(model, mapper.DEFAULT_PROBE)
        cache.cache_dir().mkdir(parents=True, exist_ok=True)
        shutil.copy(cache.shipped_dir() / f"{key}.json", cache.cache_dir() / f"{key}.json")
    t0 = time.perf_counter()
    patch = apply(model, recipe)
    seconds = time.perf_counter() - t0
    out = {"method": patch.unet_map.method, "layers": len(patch.plan.layers) if hasattr(patch.plan, "layers") else None}
print(json.dumps({"seconds": seconds, **out}))
"""

ROWS = [
    ("map", "symbolic", "cold map, symbolic-size export (before)"),
    ("map", "static-first", "cold map, static-first export (now)"),
    ("apply", "cold", "apply, no map cache (maps)"),
    ("apply", "shipped", "apply, shipped map"),
    ("apply", "user", "apply, user cache folder"),
]


def measure(preset: str, kind: str, mode: str) -> dict:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as folder:
        env["UNET_SURGERY_CACHE"] = folder  # never the user's own cache
        env.pop("UNET_SURGERY_NO_MAP_CACHE", None)
        if mode == "cold":
            env["UNET_SURGERY_NO_MAP_CACHE"] = "1"
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, preset, kind, mode, RECIPES[preset]],
            check=True, capture_output=True, text=True, env=env,
        ).stdout
    return json.loads(out.strip().splitlines()[-1])


def markdown(machine: str, rows: list[dict], wall: float) -> str:
    lines = [f"machine: {machine}; every row a fresh subprocess, full-size presets on meta; {wall:.0f} s in all", ""]
    lines += ["| preset | measurement | time (s) | mapped by | peak RSS (MB) |", "|---|---|---|---|---|"]
    for r in rows:
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else ""
        lines.append(f"| {r['preset']} | {r['label']} | {r['seconds']:.2f} | {r['method']} | {rss} |")
    lines.append("")
    for preset in dict.fromkeys(r["preset"] for r in rows):
        by = {(r["kind"], r["mode"]): r["seconds"] for r in rows if r["preset"] == preset}
        if ("map", "symbolic") in by and ("map", "static-first") in by:
            lines.append(f"- {preset}: cold map {by['map', 'symbolic'] / by['map', 'static-first']:.1f}x faster "
                         f"({by['map', 'symbolic']:.1f} s -> {by['map', 'static-first']:.1f} s)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["sd15", "sdxl"], choices=sorted(RECIPES))
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = []
    for preset in args.presets:
        for kind, mode, label in ROWS:
            rows.append({"preset": preset, "kind": kind, "mode": mode, "label": label,
                         "recipe": RECIPES[preset] if kind == "apply" else None, **measure(preset, kind, mode)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    report = markdown(machine, rows, time.perf_counter() - start)
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
