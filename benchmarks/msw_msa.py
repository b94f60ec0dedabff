"""MSW-MSA (HiDiffusion's windowed self-attention) against global self-attention.

One diffusers ``Attention`` layer with a realistic top-level width -- SD1.5 level 0 (C=320,
8 heads) and SDXL level 1 (C=640, 10 heads) -- on a token grid of 4x and 16x the training
token count (training grid 64x64 tokens for both: 512 px / 8 for SD1.5, 1024 px / 16 for
SDXL level 1). Both variants run the same layer on the same tokens, interleaved, median of
several repeats: ``global`` is the plain layer; ``msw_msa`` is the layer class-swapped by the
``msw_msa`` pass's op (2x2 windows, random shift), i.e. four attention calls of a quarter of
the tokens each, batched. Attention cost grows with N^2, so windows cut it about 4x.

    python benchmarks/msw_msa.py                      # full sizes (long on a small CPU)
    python benchmarks/msw_msa.py --base-grid 16       # training grid 16x16: minutes on 2 cores
    python benchmarks/msw_msa.py --device cuda

Writes ``benchmarks/msw_msa/results.json`` and ``results.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention

from unet_surgery.ops import rewrite
from unet_surgery.ops.hidiffusion import WindowSetting, window_attention_

LAYERS = {"sd15-level0": (320, 8), "sdxl-level1": (640, 10)}
AREAS = {"4x": 2, "16x": 4}  # area factor -> side factor


@dataclass
class Row:
    layer: str
    area: str
    tokens: int
    global_ms: float
    msw_msa_ms: float
    speedup: float


def _time(fn, repeats: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


@torch.no_grad()
def measure(base_grid: int, repeats: int, device: torch.device, dtype: torch.dtype) -> list[Row]:
    rows = []
    for layer, (channels, heads) in LAYERS.items():
        attn = Attention(channels, heads=heads, dim_head=channels // heads).to(device, dtype).eval()
        for area, side in AREAS.items():
            grid = (base_grid * side, base_grid * side)
            tokens = torch.randn(1, grid[0] * grid[1], channels, device=device, dtype=dtype)
            windowed = WindowSetting(latent_hw=grid)  # the layer's grid is the latent grid here

            def run_global(attn: Attention = attn, tokens: torch.Tensor = tokens) -> None:
                rewrite.set_source(attn, None)
                attn(tokens)

            def run_windowed(attn: Attention = attn, tokens: torch.Tensor = tokens, setting: WindowSetting = windowed) -> None:
                rewrite.set_source(attn, setting)
                attn(tokens)

            window_attention_(attn, None)
            run_global(), run_windowed()  # warm-up
            g, w = [], []
            for _ in range(repeats):  # interleaved, so load changes hit both sides
                g += _time(run_global, 1, device)
                w += _time(run_windowed, 1, device)
            rewrite.restore(attn)
            gm, wm = statistics.median(g), statistics.median(w)
            rows.append(Row(layer, area, grid[0] * grid[1], round(gm, 2), round(wm, 2), round(gm / wm, 2)))
            print(f"{layer:12s} {area:4s} {grid[0] * grid[1]:6d} tokens  global {gm:9.1f} ms  msw_msa {wm:9.1f} ms  x{gm / wm:.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-grid", type=int, default=64, help="training token grid side (64 = published sizes)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "msw_msa")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = measure(args.base_grid, args.repeats, device, dtype)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "base_grid": args.base_grid,
        "repeats": args.repeats,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    lines = [
        "# MSW-MSA vs global self-attention",
        "",
        f"One attention layer, {meta['device']} ({meta['threads']} threads), torch {meta['torch']}, {meta['dtype']}, "
        f"training grid {args.base_grid}x{args.base_grid} tokens, median of {args.repeats} interleaved runs. "
        "Command: `python benchmarks/msw_msa.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in (("base_grid", args.base_grid), ("repeats", args.repeats),
                                                                 ("device", args.device), ("dtype", args.dtype)))
        + "`.",
        "",
        "| layer | area | tokens | global ms | MSW-MSA ms | global / MSW-MSA |",
        "|---|---|---|---|---|---|",
        *(f"| {r.layer} | {r.area} | {r.tokens} | {r.global_ms} | {r.msw_msa_ms} | {r.speedup} |" for r in rows),
        "",
    ]
    (args.out / "results.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
