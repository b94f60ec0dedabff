"""torch.compile of a patched UNet: compilations over a schedule, and compiled patched vs compiled plain steps.

A patched UNet resolves every layer's setting in an eager pre-hook, so a compiled graph
guards on the settings only: one compilation per distinct phase of the schedule. This script
runs a sampling schedule through ``torch.compile(unet, fullgraph=True)`` and reports

* the compilations dynamo made (``unique_graphs``) against the distinct phases of the schedule;
* one step's time, compiled, for the plain UNet and for the patched one at an integer factor
  (the re-dilated phase) and in its plain phase, timed alternately (median of ``--repeat``),
  so a loaded machine shifts both sides alike.

    python benchmarks/bench_compile.py --json out.json
    python benchmarks/bench_compile.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
from torch._dynamo.utils import counters

from unet_surgery import apply
from unet_surgery.graph import map_unet
from unet_surgery.presets import build_unet, example_inputs

STEPS = 10
TAU = 25  # of 50 published steps: the first half of the schedule is re-dilated


def _recipe(tau: float | None) -> dict:
    return {
        "name": "bench-compile",
        "base_resolution": [64, 64],
        "target_resolutions": [[128, 128]],
        "passes": [{"type": "redilate", "select": {"kernel": 3, "level": "1.."}, "factor": 2, "schedule": {"tau": tau}}],
    }


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(preset: str, pixels: int, repeat: int) -> dict:
    model = build_unet(preset, size="tiny", device="cpu").eval()
    unet_map = map_unet(model, cache=True)
    inputs = example_inputs(model, height=pixels, width=pixels)
    timesteps = [999 - 111 * i for i in range(STEPS)]

    def call(m, t: float) -> None:
        with torch.no_grad():
            m(**{**inputs, "timestep": torch.tensor(float(t))})

    # 1. compilations over a schedule with two phases (dilated for i < TAU * STEPS / 50, then plain)
    plain_model = copy.deepcopy(model)  # same weights, never patched
    torch._dynamo.reset()
    counters.clear()
    patch = apply(model, _recipe(TAU), unet_map=unet_map)
    patch.set_timesteps(timesteps)
    compiled = torch.compile(model, fullgraph=True)
    compile_s = sum(_timed(lambda t=t: call(compiled, t)) for t in timesteps)
    graphs = counters["stats"]["unique_graphs"]
    phases = len({i < TAU * STEPS / 50 for i in range(STEPS)})
    # 2. step times, alternating: compiled plain vs compiled patched (dilated phase, plain phase)
    dilated_t, plain_phase_t = timesteps[0], timesteps[-1]
    plain_compiled = torch.compile(plain_model, fullgraph=True)
    call(plain_compiled, dilated_t)
    patched_dilated, patched_plain_phase, plain = [], [], []
    for _ in range(repeat):
        patched_dilated.append(_timed(lambda: call(compiled, dilated_t)))
        plain.append(_timed(lambda: call(plain_compiled, dilated_t)))
        patched_plain_phase.append(_timed(lambda: call(compiled, plain_phase_t)))
    patch.remove()
    recompiles_after_warmup = counters["stats"]["unique_graphs"] - graphs - 1  # minus the plain model's one
    med = statistics.median
    return {
        "preset": f"{preset} (tiny)", "pixels": pixels, "steps": STEPS, "phases": phases,
        "compilations": graphs, "schedule_wall_s": compile_s,
        "plain_ms": 1e3 * med(plain), "patched_dilated_ms": 1e3 * med(patched_dilated),
        "patched_plain_phase_ms": 1e3 * med(patched_plain_phase),
        "ratio_dilated": med(patched_dilated) / med(plain),
        "ratio_plain_phase": med(patched_plain_phase) / med(plain),
        "recompiles_while_timing": recompiles_after_warmup,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model, fewer repeats")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--pixels", type=int, default=256, help="image side (latent = pixels / 8)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    repeat = args.repeat or (5 if args.quick else 15)
    cases = [("sd15", args.pixels)] if args.quick else [("sd15", args.pixels), ("sdxl", args.pixels)]
    rows = [measure(preset, pixels, repeat) for preset, pixels in cases]
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"torch.compile(unet, fullgraph=True), inductor, {machine}, float32, batch 1, median of {repeat}\n")
    print("| UNet | image | steps | phases | compilations | plain (ms) | patched, dilated phase (ms) | ratio | patched, plain phase (ms) | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['pixels']} px | {r['steps']} | {r['phases']} | {r['compilations']} | "
              f"{r['plain_ms']:.1f} | {r['patched_dilated_ms']:.1f} | {r['ratio_dilated']:.3f} | "
              f"{r['patched_plain_phase_ms']:.1f} | {r['ratio_plain_phase']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "repeat": repeat, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
