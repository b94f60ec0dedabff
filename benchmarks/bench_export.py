"""Export and load times of each format, and the adapter's size against the full checkpoint.

Random weights (sizes and times do not depend on the values). ``--size full`` builds the real
SD1.5 architecture (859.5M parameters; 1.7 GB in fp16, 3.4 GB in fp32) on the CPU; the map is
taken on ``meta`` so mapping time is not counted. ``.pt2`` programs embed the weights, so that
format costs one checkpoint per phase; its export time is mostly tracing.

    python benchmarks/bench_export.py --size tiny
    python benchmarks/bench_export.py --size full --dtype float16 --formats adapter diffusers --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from unet_surgery.export import (
    Pt2Runner,
    export_pt2,
    load_patch,
    load_patched,
    save_patch,
    save_patched_pretrained,
)
from unet_surgery.graph import map_unet
from unet_surgery.io import atomic_write_text
from unet_surgery.loading import load_unet
from unet_surgery.patching.patch import apply
from unet_surgery.presets import build_unet

RECIPE = "scalecrafter-sd15-2048x2048-disperse-active"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--formats", nargs="+", choices=("adapter", "diffusers", "pt2"), default=["adapter", "diffusers", "pt2"])
    parser.add_argument("--steps", type=int, default=2, help="pt2: steps (2 gives two phases with this recipe)")
    parser.add_argument("--resolution", type=int, default=None, help="pt2: square pixel size (default 2x base)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    dtype = DTYPES[args.dtype]

    unet_map = map_unet(build_unet("sd15", size=args.size, device="meta"))
    build_s, model = timed(lambda: build_unet("sd15", size=args.size, device="cpu", dtype=dtype))
    params = sum(p.numel() for p in model.parameters())
    patch = apply(model, RECIPE, unet_map=unet_map, force=args.size == "tiny")  # tiny: a scaled-down proxy
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    rows: list[dict[str, Any]] = []
    try:
        base = work / "base"
        model.save_pretrained(base)  # the plain checkpoint, for the size comparison
        checkpoint_bytes = folder_bytes(base)
        if "adapter" in args.formats:
            save_s, _ = timed(lambda: save_patch(patch, work / "adapter"))
            fresh = load_unet(base)
            load_s, p2 = timed(lambda: load_patch(fresh, work / "adapter", unet_map=unet_map))
            p2.remove()
            del fresh
            rows.append({"format": "adapter", "export_s": save_s, "load_s": load_s, "bytes": folder_bytes(work / "adapter"),
                         "note": "load = fingerprint + apply + kernel check, on an already loaded base"})
        if "diffusers" in args.formats:
            save_s, _ = timed(lambda: save_patched_pretrained(patch, work / "diffusers"))
            load_s, (m2, p2) = timed(lambda: load_patched(work / "diffusers", unet_map=unet_map))
            p2.remove()
            del m2
            rows.append({"format": "diffusers", "export_s": save_s, "load_s": load_s, "bytes": folder_bytes(work / "diffusers"),
                         "note": "load = weights + fingerprint + apply"})
        if "pt2" in args.formats:
            side = args.resolution or (1024 if args.size == "full" else 128)
            save_s, _ = timed(lambda: export_pt2(patch, work / "pt2", height=side, width=side, num_steps=args.steps))
            runner = Pt2Runner(work / "pt2")
            load_s, _ = timed(lambda: [runner.program(k) for k in range(runner.num_phases)])
            rows.append({"format": f"pt2 ({runner.num_phases} phases, {side}x{side})", "export_s": save_s, "load_s": load_s,
                         "bytes": folder_bytes(work / "pt2"), "note": "load = torch.export.load + .module() of every phase"})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"SD1.5 {args.size} ({params:,} parameters, {args.dtype}), recipe {RECIPE}; build {build_s:.1f} s")
    print(f"plain checkpoint: {checkpoint_bytes / 1e6:,.2f} MB; {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| format | export (s) | load (s) | size (MB) | size / checkpoint |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['format']} | {r['export_s']:.2f} | {r['load_s']:.2f} | {r['bytes'] / 1e6:,.3f} | {r['bytes'] / checkpoint_bytes:.4f} |")
    if args.json:
        atomic_write_text(args.json, json.dumps({"size": args.size, "dtype": args.dtype, "params": params, "recipe": RECIPE,
                                                 "checkpoint_bytes": checkpoint_bytes, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
