"""Time and peak memory of mapping a full-size preset on the meta device.

Each measurement runs in a fresh subprocess so peak RSS belongs to that mapping alone.

    python benchmarks/bench_map.py                 # SDXL: export map and hook probe
    python benchmarks/bench_map.py --preset sd15 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

import torch

_CHILD = r"""
import json, resource, sys, time
from unet_surgery.presets import build_unet
from unet_surgery.graph import map_unet
preset, method = sys.argv[1], sys.argv[2]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
model = build_unet(preset, size="full", device="meta")
t1 = time.perf_counter()
unet_map = map_unet(model, method=method)
t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"build_s": t1 - t0, "map_s": t2 - t1, "peak_rss_mb": peak / 1024,
                  "baseline_rss_mb": base / 1024, "method": unet_map.method,
                  "convs": len(unet_map.convs), "attentions": len(unet_map.attentions)}))
"""


def measure(preset: str, method: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, preset, method], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sdxl")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    rows = []
    for method in ("export", "probe"):
        runs = [measure(args.preset, method) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["map_s"])
        rows.append({"preset": args.preset, "requested": method, **best})
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"machine: {machine}\n")
    print("| preset | method | build (s) | map (s) | peak RSS (MB) | convs | attention ops |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['method']} | {r['build_s']:.2f} | {r['map_s']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['convs']} | {r['attentions']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
