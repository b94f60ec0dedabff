"""Peak memory of one denoising step and of the decode, whole latent vs patch-wise.

For SD1.5 and SDXL at 1024, 2048 and 4096 px, each point in a fresh child process: one DDIM step
(classifier-free guidance, a batch of two UNet rows) on the whole latent, and the same step with
``patchwise_denoiser`` (window = the native size, stride half of it, one view per call); then the
VAE decode of the result, whole and with DemoFusion's multi-decoder (``tiled_decode``). Measured:
the growth of the process's peak RSS during the step / decode (sampled every millisecond), CPU.

``--config tiny`` (the default) uses the tiny test UNets and the tiny VAE at the same ratio of
target to native size as the full models (SD1.5: 512 px native, SDXL: 1024 px; the tiny ones
are 64 and 128 px), so the curve has the full models' shape in views and latent sizes, not
their bytes. ``--config full`` builds the full-size UNets with random weights and, for the
decode, the published SD/SDXL VAE architecture (minutes per point on a CPU: pick the points
with ``--layouts``, ``--targets``, ``--modes`` and ``--decode-max-px``). The full VAE decodes
only the whole-latent rows: DemoFusion's multi-decoder at 1024 px is 64 decodes of a 512 px
tile, hours on one CPU thread.

    python benchmarks/bench_patchwise_memory.py --json benchmarks/patchwise_memory.json \
        --markdown benchmarks/patchwise_memory.md
    python benchmarks/bench_patchwise_memory.py --config full --layouts sd15 --targets 1024 2048 \
        --decode-max-px 1024 --json benchmarks/patchwise_memory_full.json \
        --markdown benchmarks/patchwise_memory_full.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_dispersion_memory import (  # run as a script: benchmarks/ is on the path
    PeakRss,
    rss_bytes,
)

NATIVE_PX = {"sd15": 512, "sdxl": 1024}
TARGETS = (1024, 2048, 4096)
MODES = ("whole", "patches")
MiB = 2**20
# The published VAE of SD1.5, SD2.1 and SDXL (one architecture; SDXL's scaling factor differs).
FULL_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32}
SCALING_FACTOR = {"sd15": 0.18215, "sdxl": 0.13025}


def full_vae(layout: str) -> Any:
    """The full-size VAE with random weights (the decode's memory does not depend on them)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**FULL_VAE, scaling_factor=SCALING_FACTOR[layout]).eval()


def point(layout: str, config: str, target_px: int, mode: str, decode_max_px: int) -> dict[str, Any]:
    """One step (and one decode up to ``decode_max_px``) at ``target_px``; run in a child process."""
    from diffusers import DDIMScheduler

    from unet_surgery.generation.tiny_pipeline import tiny_vae
    from unet_surgery.presets import build_unet
    from unet_surgery.sampling.cascade import cfg_denoiser
    from unet_surgery.sampling.demofusion import tiled_decode
    from unet_surgery.sampling.patchwise import ViewStage, num_view_batches, patchwise_denoiser

    torch.set_num_threads(1)
    unet = build_unet(layout, size=config, device="cpu")
    native = int(unet.config.sample_size)  # latents
    latent = native * target_px // NATIVE_PX[layout]
    dim = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 77, dim, generator=g), torch.randn(1, 77, dim, generator=g)
    added = None
    if layout == "sdxl":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        ids = torch.tensor([[target_px, target_px, 0, 0, target_px, target_px]], dtype=torch.float32)
        added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.cat([ids, ids])}
    denoise = cfg_denoiser(unet, cond, uncond, guidance_scale=7.5, added_cond_kwargs=added)
    views = None
    if mode == "patches":
        views = num_view_batches(latent, latent, native, native // 2, 1)[0]
        denoise = patchwise_denoiser(denoise, window=native, stride=native // 2, view_batch_size=1)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[0]
    x = torch.randn(1, 4, latent, latent, generator=g)
    stage = ViewStage(0, target_px, target_px, (latent, latent), 0)
    with torch.no_grad():  # warm-up at the native size: one-time allocations out of the measurement
        cfg_denoiser(unet, cond, uncond, guidance_scale=7.5, added_cond_kwargs=added)(
            torch.randn(1, 4, native, native, generator=g), t, stage)
    base = rss_bytes()
    with torch.no_grad(), PeakRss() as peak:
        t0 = time.perf_counter()
        out = denoise(x, t, stage)
        x = scheduler.step(out, t, x, return_dict=False)[0]
        seconds = time.perf_counter() - t0
    step_growth, process_peak = peak.peak - base, peak.peak
    del out
    decode_growth = None
    if target_px <= decode_max_px and (config == "tiny" or mode == "whole"):
        vae = tiny_vae() if config == "tiny" else full_vae(layout)

        def decode(z: torch.Tensor) -> torch.Tensor:
            return vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]

        with torch.no_grad():  # warm-up on one tile's size
            decode(torch.zeros(1, 4, native, native))
        before = rss_bytes()
        with torch.no_grad(), PeakRss() as dpeak:
            image = tiled_decode(decode, x, native, 8) if mode == "patches" else decode(x)
        decode_growth = dpeak.peak - before
        del image
    return {"layout": layout, "config": config, "target_px": target_px, "mode": mode, "latent": latent,
            "window": native if mode == "patches" else None, "views": views, "seconds": seconds,
            "step_peak_growth_bytes": step_growth, "process_peak_bytes": process_peak,
            "decode_peak_growth_bytes": decode_growth}


def run_point(layout: str, config: str, target_px: int, mode: str, decode_max_px: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_point", layout, config, str(target_px), mode, str(decode_max_px)]
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072"}  # freed blocks leave the RSS
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def render(data: dict[str, Any]) -> str:
    full = data["config"] == "full"
    lines = [
        "# Patch-wise memory: one denoising step and the decode, whole latent vs patch-wise",
        "",
        f"`{data.get('command', 'python benchmarks/bench_patchwise_memory.py --config ' + data['config'])}` on "
        f"{data['machine']}, torch {data['torch']}, one CPU thread, each point in a fresh process. Peak RSS growth "
        "during one DDIM step with classifier-free guidance (two UNet rows), and during the VAE decode of its "
        "result (whole, or DemoFusion's multi-decoder tiles for the patch-wise rows).",
        "",
    ]
    if full:
        lines += [
            "Full-size configs with random weights (fp32; the bytes do not depend on the weights): the "
            "published UNet and, for the decode, the published VAE architecture. The process peak is the "
            "whole process (weights included) during the step. Only the whole-latent rows were decoded "
            "(the multi-decoder at 1024 px is 64 decodes of a 512 px tile, hours on one CPU thread; its "
            "flat peak is shown by the tiny-config report, `benchmarks/patchwise_memory.md`). Points "
            "missing from the table were not run: SD1.5 at 4096 px is 225 views a step with patches, "
            "and a full SDXL view is a 1024 px SDXL call, hours for the curve on the shared 2-core "
            "machine. The seconds are wall time with two other jobs on its two cores.",
            "",
        ]
    else:
        lines += [
            "Tiny configs (the test UNets and the 8-channel tiny VAE), at the full models' ratio of "
            "target to native size: SD1.5's 512 px native is the tiny UNet's 8 latents, SDXL's 1024 px "
            "its 16 latents. The columns say which full-size image each row stands for; the bytes are "
            "the tiny models', so read the shape of the curve, not the numbers. Full-size points: "
            "`benchmarks/patchwise_memory_full.md`.",
            "",
        ]
    absolute = all("process_peak_bytes" in r for r in data["points"])
    lines += ["| model | image" + ("" if full else " (full-size equivalent)") + " | latent" + ("" if full else " (tiny)")
              + " | mode | views | step peak MiB | " + ("process peak MiB | " if absolute else "")
              + "decode peak MiB | step s |", "|---|---|---|---|---|---|---|" + ("---|" if absolute else "") + "---|"]
    for r in data["points"]:
        decode = "" if r["decode_peak_growth_bytes"] is None else f"{r['decode_peak_growth_bytes'] / MiB:.1f}"
        process = f" {r['process_peak_bytes'] / MiB:.0f} |" if absolute else ""
        lines.append(
            f"| {r['layout']} | {r['target_px']}x{r['target_px']} | {r['latent']}x{r['latent']} | {r['mode']} | "
            f"{r['views'] or 1} | {r['step_peak_growth_bytes'] / MiB:.1f} |{process} {decode} | {r['seconds']:.2f} |"
        )
    lines += [
        "", data["summary"], "",
        "With patches the UNet's activations are those of one view, whatever the size; what still grows "
        "is the latent itself, the fused sums (a few floats per latent pixel) and, in the decode, the "
        "output image and its count (2 x 3 x H x W floats: 6 MiB at 512 px). The whole-latent "
        "rows grow with the token count (the attention maps) and the decoder's full-size feature maps.",
        "",
    ]
    return "\n".join(lines)


def summary(points: list[dict[str, Any]]) -> str:
    parts = []
    for layout in NATIVE_PX:
        for mode in MODES:
            rows = [r for r in points if r["layout"] == layout and r["mode"] == mode]
            if len(rows) < 2:
                continue
            lo, hi = rows[0]["step_peak_growth_bytes"], rows[-1]["step_peak_growth_bytes"]
            parts.append(f"{layout} {mode}: step peak x{hi / max(lo, 1):.1f} from {rows[0]['target_px']} to "
                         f"{rows[-1]['target_px']} px")
    if not parts:
        return "No model and mode has two sizes: no growth to state."
    return "Growth of the step's peak over the sizes: " + "; ".join(parts) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--from-json", type=Path, help="render --markdown from an earlier --json, measuring nothing")
    parser.add_argument("--layouts", nargs="+", choices=list(NATIVE_PX), default=list(NATIVE_PX))
    parser.add_argument("--targets", nargs="+", type=int, choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--decode-max-px", type=int, default=max(TARGETS),
                        help="decode only the points up to this size (the full VAE at 4096 px takes hours on a CPU)")
    parser.add_argument("--_point", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        if args.markdown:
            args.markdown.write_text(render(data))
        print(render(data))
        return
    if args._point:
        layout, config, px, mode, decode_max_px = args._point
        print(json.dumps(point(layout, config, int(px), mode, int(decode_max_px))))
        return
    command = "python benchmarks/bench_patchwise_memory.py " + " ".join(sys.argv[1:])
    points: list[dict[str, Any]] = []
    data: dict[str, Any] = {}
    for layout in args.layouts:
        for mode in args.modes:
            for px in sorted(args.targets):
                points.append(run_point(layout, args.config, px, mode, args.decode_max_px))
                print(json.dumps(points[-1]), flush=True)
                data = {"config": args.config, "command": command, "machine": platform.machine(),
                        "torch": torch.__version__.split("+")[0], "points": points, "summary": summary(points)}
                if args.json:  # after every point: a stopped run keeps what it measured
                    args.json.write_text(json.dumps(data, indent=1) + "\n")
    text = render(data)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
