"""Cost of re-dilated convolution relative to the plain conv, at SD1.5-like shapes.

Integer factors should cost what the plain conv costs (same FLOPs, only the tap spacing
changes); fractional factors pay for two bilinear resizes and a conv on a larger map.

    python benchmarks/bench_redilate.py --quick
    python benchmarks/bench_redilate.py --json bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from unet_surgery.io import atomic_path
from unet_surgery.ops.redilate import redilate_, redilated_conv

# (name, channels, side of the feature map, stride): SD1.5 level 0..3 convs and a downsampler.
FULL_SHAPES = [
    ("level0 conv", 320, 128, 1),
    ("level1 conv", 640, 64, 1),
    ("level2 conv", 1280, 32, 1),
    ("level0 downsampler", 320, 128, 2),
]
QUICK_SHAPES = [
    ("level1 conv", 640, 64, 1),
    ("level2 conv", 1280, 32, 1),
    ("level1 downsampler", 640, 64, 2),
]
FACTORS = [2, 3, 1.5, 2.5]


@dataclass
class Row:
    shape: str
    channels: int
    side: int
    stride: int
    factor: float
    plain_ms: float
    redilated_ms: float
    ratio: float
    ratio_of_min: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _paired_times(
    a: Callable[[], object], b: Callable[[], object], reps: int, warmup: int, device: torch.device
) -> tuple[list[float], list[float]]:
    """Seconds per call of ``a`` and ``b``, run alternately so drift hits both equally."""
    for _ in range(warmup):
        a()
        b()
    _sync(device)
    times_a, times_b = [], []
    for _ in range(reps):
        for fn, sink in ((a, times_a), (b, times_b)):
            start = time.perf_counter()
            fn()
            _sync(device)
            sink.append(time.perf_counter() - start)
    return times_a, times_b


def run(
    shapes: list[tuple[str, int, int, int]],
    factors: list[float],
    *,
    batch: int,
    reps: int,
    warmup: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[list[Row], float]:
    rows = []
    torch.manual_seed(0)
    for name, channels, side, stride in shapes:
        conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1).to(device, dtype)
        x = torch.randn(batch, channels, side, side, device=device, dtype=dtype)
        for factor in factors:
            with torch.inference_mode():
                plain_t, redil_t = _paired_times(
                    lambda conv=conv, x=x: conv(x),
                    lambda conv=conv, x=x, f=factor: redilated_conv(conv, x, f),
                    reps,
                    warmup,
                    device,
                )
            plain, redil = statistics.median(plain_t), statistics.median(redil_t)
            ratio_min = min(redil_t) / min(plain_t)
            row = Row(
                name,
                channels,
                side,
                stride,
                factor,
                plain * 1e3,
                redil * 1e3,
                redil / plain,
                ratio_min,
            )
            rows.append(row)
            print(f"  {name} c={channels} {side}px f={factor}: {row.ratio:.3f}x", file=sys.stderr)
    # Overhead of the class swap itself at factor 1 (reads the source, then the plain path).
    conv = nn.Conv2d(320, 320, 3, padding=1).to(device, dtype)
    swapped = nn.Conv2d(320, 320, 3, padding=1).to(device, dtype)
    swapped.load_state_dict(conv.state_dict())
    redilate_(swapped, lambda: 1.0)
    x = torch.randn(batch, 320, 32, 32, device=device, dtype=dtype)
    with torch.inference_mode():
        plain_t, swap_t = _paired_times(lambda: conv(x), lambda: swapped(x), reps, warmup, device)
    return rows, statistics.median(swap_t) / statistics.median(plain_t)


def _markdown(rows: list[Row], swap_ratio: float, header: str) -> str:
    lines = [
        header,
        "",
        "| conv | channels | map | stride | factor | plain (ms) | re-dilated (ms) | ratio "
        "(median) | ratio (min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.channels} | {r.side}x{r.side} | {r.stride} | {r.factor:g} | "
            f"{r.plain_ms:.2f} | {r.redilated_ms:.2f} | {r.ratio:.3f} | {r.ratio_of_min:.3f} |"
        )
    lines += [
        "",
        "Times are medians of paired (alternating) runs; 'ratio (min)' compares the fastest",
        "runs, which is less sensitive to other load on the machine.",
        "",
        f"Class-swapped conv at factor 1 vs plain conv (320ch, 32px): {swap_ratio:.3f}x",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    reps = args.reps or (5 if args.quick else 15)
    warmup = 1 if args.quick else 3
    rows, swap_ratio = run(
        shapes, FACTORS, batch=args.batch, reps=reps, warmup=warmup, device=device, dtype=dtype
    )
    env = (
        f"torch {torch.__version__}, {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", {torch.get_num_threads()} threads, {args.dtype}, batch {args.batch}, "
        f"median of {reps}, {platform.machine()}"
    )
    print(_markdown(rows, swap_ratio, f"Re-dilated 3x3 conv vs plain conv ({env})"))
    if args.json:
        payload = {
            "environment": env,
            "quick": args.quick,
            "rows": [asdict(r) for r in rows],
            "class_swap_factor1_ratio": swap_ratio,
        }
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
