"""Train the toy class-conditional pixel diffusion model shipped in ``unet_surgery/toy/weights``.

Reproducible: one seed drives the initial weights, the data stream, the timesteps, the noise and
the label dropout. The loss is v-prediction with low-noise steps down-weighted (a truncated form of
min-SNR-gamma weighting, Hang et al. 2023), which converges much faster than plain eps-MSE here. Saves EMA weights only (fp16 on
disk, fp32 in memory), atomically, plus ``toy_config.json`` holding everything ``load_toy`` and the
metrics need. Periodic checkpoints go to the same files, so an interrupted run still leaves a
loadable model.

    # the shipped toys, two stages each (docs/toy.md has the record and timings)
    python scripts/train_toy.py --arch toy --steps 800 --seed 0 --lr 1e-3 --weighting min-snr --max-minutes 48
    cp -r unet_surgery/toy/weights/toy /tmp/stage1_toy
    python scripts/train_toy.py --arch toy --init-from /tmp/stage1_toy --steps 340 --seed 2 --lr 5e-4 --warmup 10
    python scripts/train_toy.py --steps 20 --out /tmp/toy_smoke
    # the textured toys (stripes of texture_period px): toy-detail starts from toy's weights
    python scripts/train_toy.py --arch toy-detail --init-from unet_surgery/toy/weights/toy --steps 300 --lr 5e-4 --warmup 10
    python scripts/train_toy.py --arch toy-eps --steps 700 --lr 1e-3

An epsilon toy (``toy-eps``) is trained on the noise with the weight min(1, gamma / snr), the
epsilon form of min-SNR-gamma; the v toys as described below.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from unet_surgery.io import atomic_path, atomic_write_text
from unet_surgery.toy.data import NUM_CLASSES, TEXTURE_AMPLITUDE, make_batch
from unet_surgery.toy.metrics import DEFAULT_METRIC_PARAMS
from unet_surgery.toy.model import (
    CONFIG_NAME,
    TEXTURED_TOYS,
    TOY_ARCHITECTURES,
    WEIGHTS_NAME,
    build_toy,
    make_ddpm_scheduler,
    scheduler_config_for,
    toy_metadata,
)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "unet_surgery" / "toy" / "weights"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", choices=sorted(TOY_ARCHITECTURES), default="toy")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay floor")
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--p-uncond", type=float, default=0.12, help="label dropout for CFG")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--snr-gamma", type=float, default=5.0, help="gamma of the loss weighting")
    p.add_argument(
        "--weighting",
        choices=("truncated", "min-snr", "uniform"),
        default="truncated",
        help="loss weight: truncated min(1, gamma / (snr + 1)), min-SNR min(snr, gamma) / (snr + 1) "
        "(v; for eps min(1, gamma / snr)), or uniform 1 (plain MSE: full weight on the low-noise "
        "steps that draw fine texture)",
    )
    p.add_argument(
        "--texture-period",
        type=float,
        default=None,
        help="stripe period (px) of the textured data (default: the arch's, none for flat toys)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's, all cores; 1 is faster on a core shared with other jobs)",
    )
    p.add_argument(
        "--max-minutes", type=float, default=None, help="stop early (and save) after this long"
    )
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--out", type=Path, default=None, help="default: the package's weights/ARCH")
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="directory with a toy_unet.safetensors to continue from (stage-2 training)",
    )
    return p.parse_args(argv)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` (few steps: decay helps EMA)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.min_lr_ratio
    return args.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """EMA with the usual warm-up ``min(decay, (1+s)/(10+s))`` so early weights fade quickly."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm, 1 - d)


def save(ema: torch.nn.Module, out: Path, config: dict) -> None:
    """Write EMA weights and config atomically (temp file + os.replace)."""
    out.mkdir(parents=True, exist_ok=True)
    # fp16 on disk keeps both shipped toys under the package's size budget; loaded as fp32.
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in ema.state_dict().items()}
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "dtype": "float16", "ema": "true"})
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        os.chmod(out / name, 0o644)  # mkstemp creates 0600; these are package data


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.out is None:
        args.out = WEIGHTS_DIR / args.arch
    torch.manual_seed(args.seed)
    unet_config = TOY_ARCHITECTURES[args.arch]
    if args.texture_period is None:
        args.texture_period = TEXTURED_TOYS.get(args.arch)
    model = build_toy(unet_config, NUM_CLASSES)
    stages: list[dict] = []
    if args.init_from is not None:
        from safetensors.torch import load_file

        state = load_file(str(args.init_from / WEIGHTS_NAME))
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        previous = json.loads((args.init_from / CONFIG_NAME).read_text(encoding="utf-8"))
        if previous["scheduler"] != scheduler_config_for(args.arch):
            raise SystemExit(f"--init-from {args.init_from} was trained on another schedule")
        stages = [
            *previous.get("training_stages", []),
            {**previous["training"], "name": previous["name"],
             "texture_period": previous.get("texture_period")},
        ]
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    scheduler_config = scheduler_config_for(args.arch)
    epsilon = scheduler_config["prediction_type"] == "epsilon"
    scheduler = make_ddpm_scheduler(scheduler_config)
    alpha_bar = scheduler.alphas_cumprod
    snr = alpha_bar / (1 - alpha_bar)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    data_gen = torch.Generator().manual_seed(args.seed)
    noise_gen = torch.Generator().manual_seed(args.seed + 1)
    print(f"params {n_params / 1e6:.2f}M, steps {args.steps}, batch {args.batch_size}", flush=True)

    config = {
        "name": args.arch,
        "unet": unet_config,
        "num_classes": NUM_CLASSES,
        "empty_class": NUM_CLASSES,
        **toy_metadata(),
        "label": "shape",
        "texture_period": args.texture_period,
        "texture_amplitude": None if args.texture_period is None else TEXTURE_AMPLITUDE,
        "scheduler": scheduler_config,
        "metrics": DEFAULT_METRIC_PARAMS,
        "num_parameters": n_params,
        "training": {},
        "training_stages": stages,
    }

    t0 = time.perf_counter()
    smooth: float | None = None
    for step in range(args.steps):
        images, labels = make_batch(args.batch_size, data_gen, texture_period=args.texture_period)
        b = images.shape[0]
        drop = torch.rand(b, generator=noise_gen) < args.p_uncond
        labels = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=noise_gen)
        noise = torch.randn(images.shape, generator=noise_gen)
        noisy = scheduler.add_noise(images, noise, t)

        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        target = noise if epsilon else scheduler.get_velocity(images, noise, t)
        # Truncated SNR weighting of the v loss: min(1, gamma / (snr + 1)). Easy low-noise steps
        # (snr + 1 > gamma) are down-weighted as in min-SNR-gamma, but high-noise steps keep the
        # full v weight: min-SNR's min(snr, gamma) / (snr + 1) goes to 0 there, and a first
        # run with it (stage 1 of the shipped toys, --weighting min-snr) left a fifth of the
        # samples at 10 steps without a committed object.
        if args.weighting == "uniform":
            weight = torch.ones_like(snr[t])
        elif epsilon:  # min-SNR-gamma for an eps target: min(snr, gamma) / snr
            weight = torch.clamp(args.snr_gamma / snr[t], max=1.0)
        elif args.weighting == "truncated":
            weight = torch.clamp(args.snr_gamma / (snr[t] + 1), max=1.0)
        else:
            weight = torch.clamp(snr[t], max=args.snr_gamma) / (snr[t] + 1)
        per_sample = F.mse_loss(model(noisy, t, labels), target, reduction="none").mean(dim=(1, 2, 3))
        loss = (weight * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        ema_update(ema, model, step, args.ema_decay)

        value = loss.item()
        smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            elapsed = time.perf_counter() - t0
            print(
                f"step {done:5d} loss {value:.4f} smooth {smooth:.4f} "
                f"lr {lr_at(step, args):.2e} {elapsed / done:.2f}s/step elapsed {elapsed:.0f}s",
                flush=True,
            )
        out_of_time = (
            args.max_minutes is not None and time.perf_counter() - t0 > 60 * args.max_minutes
        )
        if done % args.save_every == 0 or done == args.steps or out_of_time:
            config["training"] = {
                **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "out": None,
                "init_from": None if args.init_from is None else str(args.init_from),
                "steps_done": done,
                "final_loss_smoothed": round(smooth, 5),
                "wall_time_s": round(time.perf_counter() - t0, 1),
                "ema_weights": True,
                "command": "python scripts/train_toy.py " + " ".join(argv or []),
            }
            save(ema, args.out, config)
        if out_of_time:
            print(f"time budget reached after {done} steps", flush=True)
            break
    print(f"saved {args.out / WEIGHTS_NAME} after {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
