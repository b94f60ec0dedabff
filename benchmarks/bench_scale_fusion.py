"""Cost of scale-fusion self-attention: windows batched into a few calls vs one call per window.

SD1.5-like level-1 attention (C=640, 10 heads, training grid 32x32 tokens) at 2x and 4x area.
Every variant computes the same output (global attention, window-averaged local attention,
blur); they differ only in how the windows reach the attention:

* ``loop``       -- one attention call per window, accumulated into value/count maps
                    (the published code's scheme);
* ``fused``      -- :func:`scale_fusion` default: windows stacked into the batch dim, in chunks
                    of at most the global call's token count;
* ``fused-all``  -- every window in a single call (``chunk_size`` = number of windows);
* ``global``     -- the plain global attention alone, for scale.

Peak memory is the growth of the process's peak RSS (``ru_maxrss``) over one call, each variant
in a fresh subprocess (glibc told to mmap large blocks, so freed memory leaves the RSS) so the
high-water marks do not mix.

    python benchmarks/bench_scale_fusion.py --quick
    python benchmarks/bench_scale_fusion.py --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from unet_surgery.io import atomic_path
from unet_surgery.ops.scale_fusion import (
    fusion_kernel_size,
    gaussian_blur,
    scale_fusion,
    window_starts,
)

CHANNELS, HEADS, WINDOW = 640, 10, (32, 32)
CASES = {"2x": (64, 32), "4x": (64, 64)}
VARIANTS = ("global", "loop", "fused", "fused-all")


@dataclass
class Row:
    case: str
    grid: str
    windows: int
    variant: str
    attend_calls: int
    ms: float
    peak_mib: float


def _loop_fusion(attend: Callable[[Tensor], Tensor], x: Tensor, grid, window) -> Tensor:
    """Scale fusion with one ``attend`` call per window (same maths as :func:`scale_fusion`)."""
    b, n, c = x.shape
    (gh, gw), (wh, ww) = grid, window
    xs = x.reshape(b, gh, gw, c)
    value = torch.zeros_like(xs)
    count = xs.new_zeros(gh, gw, 1)
    for h0 in window_starts(gh, wh):
        for w0 in window_starts(gw, ww):
            tokens = xs[:, h0 : h0 + wh, w0 : w0 + ww].reshape(b, wh * ww, c)
            value[:, h0 : h0 + wh, w0 : w0 + ww] += attend(tokens).reshape(b, wh, ww, c)
            count[h0 : h0 + wh, w0 : w0 + ww] += 1
    local = (value / count).reshape(b, n, c)
    glob = attend(x)
    k = fusion_kernel_size((gh / wh, gw / ww))
    return glob + gaussian_blur(local - glob, grid, k)


def _child(case: str, variant: str, batch: int, reps: int) -> dict[str, float]:
    """Run one variant in this (fresh) process: peak-RSS growth of one call, then timings."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    grid = CASES[case]
    attn = Attention(CHANNELS, heads=HEADS, dim_head=CHANNELS // HEADS).eval()
    x = torch.randn(batch, grid[0] * grid[1], CHANNELS)
    calls = [0]

    def attend(t: Tensor) -> Tensor:
        calls[0] += 1
        return attn(t)

    num_windows = len(window_starts(grid[0], WINDOW[0])) * len(window_starts(grid[1], WINDOW[1]))
    fns: dict[str, Callable[[], Tensor]] = {
        "global": lambda: attend(x),
        "loop": lambda: _loop_fusion(attend, x, grid, WINDOW),
        "fused": lambda: scale_fusion(attend, x, grid, WINDOW),
        "fused-all": lambda: scale_fusion(attend, x, grid, WINDOW, chunk_size=num_windows),
    }
    fn = fns[variant]
    with torch.inference_mode():
        attn(torch.randn(batch, 16, CHANNELS))  # initialise kernels and thread pools
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        calls[0] = 0
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        n_calls = calls[0]
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return {
        "ms": statistics.median(times) * 1e3,
        "peak_mib": (peak - before) / 1024,  # ru_maxrss is in KiB on Linux
        "attend_calls": n_calls,
        "windows": num_windows,
    }


def run(cases: list[str], *, batch: int, reps: int) -> list[Row]:
    rows = []
    for case in cases:
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", case, variant, str(batch), str(reps)]
            # glibc serves large blocks from mmap and returns them on free: the peak RSS is then
            # the peak of live memory, not of the allocator's caching (else +-30 MiB noise).
            env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            res = json.loads(out.strip().splitlines()[-1])
            grid = CASES[case]
            row = Row(
                case,
                f"{grid[0]}x{grid[1]}",
                int(res["windows"]),
                variant,
                int(res["attend_calls"]),
                res["ms"],
                res["peak_mib"],
            )
            rows.append(row)
            print(f"  {case} {variant}: {row.ms:.0f} ms, +{row.peak_mib:.0f} MiB", file=sys.stderr)
    return rows


def _markdown(rows: list[Row], header: str) -> str:
    lines = [
        header,
        "",
        "| area | grid (tokens) | windows | variant | attention calls | time (ms) | "
        "time vs loop | peak RSS growth (MiB) |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    loop = {r.case: r for r in rows if r.variant == "loop"}
    for r in rows:
        rel = r.ms / loop[r.case].ms
        lines.append(
            f"| {r.case} | {r.grid} | {r.windows} | {r.variant} | {r.attend_calls} | "
            f"{r.ms:.0f} | {rel:.2f} | {r.peak_mib:.0f} |"
        )
    lines += [
        "",
        "Times are medians; peak RSS growth is one cold call in a fresh process (after a tiny",
        "warm-up call, MALLOC_MMAP_THRESHOLD_=131072), so it counts every temporary the variant",
        "holds at its peak, including the global attention call all fusion variants make.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        case, variant, batch, reps = argv[1], argv[2], int(argv[3]), int(argv[4])
        print(json.dumps(_child(case, variant, batch, reps)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1, fewer repetitions")
    parser.add_argument("--batch", type=int, default=None, help="default 2 (CFG), 1 with --quick")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per variant")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    args = parser.parse_args(argv)

    batch = args.batch or (1 if args.quick else 2)
    reps = args.reps or (2 if args.quick else 5)
    rows = run(args.cases, batch=batch, reps=reps)
    env = (
        f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads, float32, "
        f"batch {batch}, C={CHANNELS}, {HEADS} heads, window {WINDOW[0]}x{WINDOW[1]}, "
        f"median of {reps}, {platform.machine()}"
    )
    print(_markdown(rows, f"Scale fusion: batched windows vs one call per window ({env})"))
    if args.json:
        payload = {"environment": env, "quick": args.quick, "rows": [asdict(r) for r in rows]}
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
