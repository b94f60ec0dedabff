"""Why does full-ratio re-dilation wash the object out on the toy model? Measure it.

Recomputes every number and figure of docs/analysis.md on the shipped toy
(``unet_surgery.toy.load_toy("toy")``), sampled at 32x32 (its training size), 64x64 and 128x128,
baseline and with ScaleCrafter's automatic rule
(``auto_recipe(unet_map, base=32, target=size, vae_scale_factor=1, policy="scalecrafter")``):

1. per block (down_blocks[i], mid_block, up_blocks[j]): statistics of the block's output on the
   conditional half of the CFG batch (std, spatial std, energy fraction at low spatial
   frequency, energy fraction inside 2x2 cells, the cond - uncond difference);
2. the deepest level's attention: self-attention entropy (normalised by log #keys) and mean
   query-key distance; cross-attention share of the residual stream (one class token, so its
   softmax has one key and its entropy is 0 by construction);
3. the predicted x0 at every step (x0 = sqrt(ab) x_t - sqrt(1 - ab) v from the guided v):
   its object contrast over steps, and strips of x0 images;
4. ablations on the same seeds: which levels / stages / upsampler convs, and which step window.

Writes PNG figures and ``analysis.json`` into ``docs/img/analysis/`` (``--out``)::

    OMP_NUM_THREADS=2 python scripts/analyse_redilation.py            # the documented run
    OMP_NUM_THREADS=1 python scripts/analyse_redilation.py --quick    # a smoke run (4 seeds)

Seeds 100-115 (the tuning seeds; class = seed % 3). Seeds >= 9000 are held out and never used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import unet_surgery  # noqa: E402
from unet_surgery.recipes.auto import auto_recipe  # noqa: E402
from unet_surgery.toy import load_toy  # noqa: E402
from unet_surgery.toy.metrics import analyse_images, summarise  # noqa: E402
from unet_surgery.toy.model import make_ddim_scheduler  # noqa: E402
from unet_surgery.toy.sampling import DEFAULT_GUIDANCE, sample  # noqa: E402

BLOCKS = ("down0", "down1", "down2", "mid", "up0", "up1", "up2")
BLOCK_LEVEL = {"down0": 0, "down1": 1, "down2": 2, "mid": 2, "up0": 2, "up1": 1, "up2": 0}
"""Level each block computes at (an up block's output is one level finer, after its upsampler)."""
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def load_toy_retry(name: str = "toy", tries: int = 10):
    for attempt in range(tries):
        try:
            return load_toy(name)
        except Exception as exc:  # a checkpoint being rewritten: try again shortly
            if attempt == tries - 1:
                raise
            log(f"load_toy failed ({type(exc).__name__}: {exc}); retrying")
            time.sleep(5)
    raise RuntimeError("unreachable")


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
def map_stats(h: torch.Tensor) -> dict[str, float]:
    """Statistics of a (B, C, H, W) feature map, averaged over the batch."""
    h = h.float()
    hh, ww = h.shape[-2:]
    centred = h - h.mean(dim=(2, 3), keepdim=True)
    spec = torch.fft.fft2(centred).abs().pow(2)
    fy = torch.fft.fftfreq(hh).abs() * hh  # cycles per map side
    fx = torch.fft.fftfreq(ww).abs() * ww
    low = (fy[:, None] ** 2 + fx[None, :] ** 2) <= 2.0**2
    low_frac = (spec[..., low].sum(-1) / spec.sum(dim=(2, 3)).clamp_min(1e-12)).mean()
    # energy inside 2x2 cells: what is left after replacing each cell by its mean
    he, we = hh - hh % 2, ww - ww % 2
    x = centred[..., :he, :we]
    cells = torch.nn.functional.avg_pool2d(x, 2)
    within = (x - torch.nn.functional.interpolate(cells, scale_factor=2, mode="nearest")).pow(2)
    cell_frac = (within.sum(dim=(2, 3)) / x.pow(2).sum(dim=(2, 3)).clamp_min(1e-12)).mean()
    return {
        "mean": float(h.mean()),
        "std": float(h.std(dim=(1, 2, 3)).mean()),
        "spatial_std": float(centred.pow(2).mean(dim=(2, 3)).sqrt().mean()),
        "low_freq_frac": float(low_frac),
        "cell_frac": float(cell_frac),
    }


def x0_stats(x0: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample object contrast of predicted clean images (B, 3, H, W), clamped to [-1, 1].

    ``contrast``: 95th percentile of the RGB distance from the border-median background (as in
    the object counter); ``fg_frac``: fraction of pixels farther than the counter's threshold 0.5;
    ``sat``: mean over the 10% most saturated pixels of (max - min) over RGB / 2.
    """
    x = x0.float().clamp(-1, 1)
    b, _, h, w = x.shape
    ring = torch.ones(h, w, dtype=torch.bool)
    ring[2 : h - 2, 2 : w - 2] = False
    bg = x[:, :, ring].median(dim=2).values  # (B, 3)
    dist = (x - bg[:, :, None, None]).pow(2).sum(1).sqrt().reshape(b, -1)
    sat = (x.max(1).values - x.min(1).values).reshape(b, -1) / 2
    k = max(1, int(0.1 * sat.shape[1]))
    return {
        "contrast": torch.quantile(dist, 0.95, dim=1).numpy(),
        "fg_frac": (dist > 0.5).float().mean(1).numpy(),
        "sat": sat.topk(k, dim=1).values.mean(1).numpy(),
    }


# --------------------------------------------------------------------------------------------
# one sampling run, with probes
# --------------------------------------------------------------------------------------------
class Probe:
    """Forward hooks that record per-step statistics during one ``sample`` call."""

    def __init__(self, toy, steps: int, trace: bool, strip: int, attn_samples: int = 4):
        self.toy, self.steps, self.trace, self.strip = toy, steps, trace, strip
        self.attn_samples = attn_samples
        self.step = 0
        self.handles: list = []
        sched = make_ddim_scheduler(toy.scheduler_config)
        self.alphas = sched.alphas_cumprod.double()
        self.x0: dict[str, list] = {"contrast": [], "fg_frac": [], "sat": [], "guide": []}
        self.x0_strip: list[np.ndarray] = []
        self.blocks: dict[str, list[dict]] = {b: [] for b in BLOCKS}
        self.class_sig: dict[str, list[float]] = {b: [] for b in BLOCKS}
        self.attn: dict[str, list[dict]] = {}
        self.factors: list[float] = []

    def callback(self, i: int, t: int) -> None:
        self.step = i

    def install(self) -> None:
        unet = self.toy.unet
        self.handles.append(unet.register_forward_hook(self._unet_hook, with_kwargs=True))
        if not self.trace:
            return
        mods = {
            "down0": unet.down_blocks[0], "down1": unet.down_blocks[1], "down2": unet.down_blocks[2],
            "mid": unet.mid_block, "up0": unet.up_blocks[0], "up1": unet.up_blocks[1],
            "up2": unet.up_blocks[2],
        }
        for name, mod in mods.items():
            self.handles.append(mod.register_forward_hook(self._block_hook(name)))
        for name, mod in unet.named_modules():
            if name.endswith("transformer_blocks.0"):
                block, rest = name.split(".attentions.")
                short = block.replace("_blocks.", "").replace("_block", "") + f".attn{rest.split('.')[0]}"
                self.attn[short] = []
                self.handles.append(mod.register_forward_pre_hook(self._tb_hook(short), with_kwargs=True))
                self.handles.append(mod.attn1.register_forward_pre_hook(self._self_hook(short), with_kwargs=True))
                self.handles.append(mod.attn2.register_forward_hook(self._cross_hook(short)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # hooks ---------------------------------------------------------------------------------
    def _unet_hook(self, module, args, kwargs, output) -> None:
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        v = output.sample if hasattr(output, "sample") else output[0]
        vu, vc = v.float().chunk(2)
        guided = vu + DEFAULT_GUIDANCE * (vc - vu)
        xt = x.float().chunk(2)[1]
        ab = float(self.alphas[int(t)])
        x0 = math.sqrt(ab) * xt - math.sqrt(1 - ab) * guided
        st = x0_stats(x0)
        for k, val in st.items():
            self.x0[k].append(val)
        diff = (vc - vu).pow(2).mean(dim=(1, 2, 3)).sqrt() / vu.pow(2).mean(dim=(1, 2, 3)).sqrt().clamp_min(1e-8)
        self.x0["guide"].append(diff.numpy())
        if self.strip:
            self.x0_strip.append(x0[: self.strip].clamp(-1, 1).numpy().astype(np.float16))

    def _block_hook(self, name: str):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            hu, hc = h.chunk(2)
            self.blocks[name].append(map_stats(hc))
            d = (hc - hu).float().pow(2).mean().sqrt() / hc.float().pow(2).mean().sqrt().clamp_min(1e-8)
            self.class_sig[name].append(float(d))

        return hook

    def _tb_hook(self, name: str):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            rec = {"resid_rms": float(h.chunk(2)[1].float().pow(2).mean().sqrt())}
            self._pending = (name, rec)

        return hook

    def _self_hook(self, name: str):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            hc = h.chunk(2)[1][: self.attn_samples].float()
            n = hc.shape[1]
            side = round(math.sqrt(n))
            heads = module.heads
            q = module.to_q(hc).reshape(hc.shape[0], n, heads, -1).transpose(1, 2)
            k = module.to_k(hc).reshape(hc.shape[0], n, heads, -1).transpose(1, 2)
            p = torch.softmax(q @ k.transpose(-1, -2) * module.scale, dim=-1)  # (B, h, N, N)
            ent = -(p * p.clamp_min(1e-30).log()).sum(-1) / math.log(n)
            yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
            pos = torch.stack([yy.flatten(), xx.flatten()], 1).float()
            dist = torch.cdist(pos, pos) / side  # fraction of the map side
            mean_dist = (p * dist).sum(-1)
            _, rec = self._pending
            rec.update(self_entropy=float(ent.mean()), self_dist=float(mean_dist.mean()),
                       self_max=float(p.max(-1).values.mean()), tokens=n)

        return hook

    def _cross_hook(self, name: str):
        def hook(module, args, output):
            oc = output.chunk(2)[1].float()
            _, rec = self._pending
            rec.update(cross_rms=float(oc.pow(2).mean().sqrt()),
                       cross_token_std=float(oc.std(dim=1).mean()), cross_keys=1)
            rec["cross_share"] = rec["cross_rms"] / max(rec["resid_rms"], 1e-8)
            self.attn[name].append(rec)

        return hook


def run(toy, um, *, size, labels, seeds, steps, recipe=None, late_start=None,
        trace=False, strip=0):
    """Sample with ``sample`` (the toy's own loop) under ``recipe``; returns a result dict.

    ``late_start`` (a fraction of the steps)
    switches every factor to 1 before that step, so ``tau`` and ``late_start`` give a window.
    """
    probe = Probe(toy, steps, trace, strip)
    scheduler = make_ddim_scheduler(toy.scheduler_config)
    scheduler.set_timesteps(steps)
    probe.install()
    patch = None
    try:
        if recipe is not None:
            patch = unet_surgery.apply(toy.unet, recipe, unet_map=um)
            patch.set_timesteps(scheduler.timesteps)
            orig = patch.factor_now
            if late_start is not None:
                lo = late_start * steps

                def gated(fp, call, _orig=orig, _lo=lo):
                    f = _orig(fp, call)
                    return f if call is None or call.step is None or call.step >= _lo else 1.0

                patch.factor_now = gated
            plans = [cp.redilate for cp in patch.plan.convs.values() if cp.redilate is not None]
            factor_of = patch.factor_now

            # runs after the patch's own pre-hook, which records the call (step, size)
            def factor_hook(module, args, kwargs, _plans=plans, _p=patch):
                call = _p.tracker.current
                probe.factors.append(max((factor_of(fp, call) for fp in _plans), default=1.0))

            probe.handles.append(toy.unet.register_forward_pre_hook(factor_hook, with_kwargs=True))
        images = sample(toy, labels, seeds=seeds, height=size, width=size, steps=steps,
                        callback=probe.callback)
    finally:
        if patch is not None:
            patch.remove()
        probe.remove()
    stats = analyse_images(images, labels)
    summary = summarise(stats, labels)
    out = {
        "size": size,
        "summary": summary,
        "counts": [s.num_objects for s in stats],
        "class_kept": [bool(s.class_kept) for s in stats],
        "factors": probe.factors[: steps] if recipe is not None else [1.0] * steps,
        "x0": {k: np.stack(v, 0) for k, v in probe.x0.items()},  # (steps, B)
        "images": images,
    }
    if strip:
        out["x0_strip"] = np.stack(probe.x0_strip, 0)  # (steps, strip, 3, H, W)
    if trace:
        out["blocks"] = probe.blocks
        out["class_sig"] = probe.class_sig
        out["attn"] = probe.attn
    return out


# --------------------------------------------------------------------------------------------
# the experiment
# --------------------------------------------------------------------------------------------
def with_tau(recipe, frac: float):
    """``recipe`` with every pass's window set to the first ``frac`` of the steps."""
    passes = tuple(replace(p, schedule=replace(p.schedule, tau=round(frac * p.schedule.steps, 6)))
                   for p in recipe.passes)
    return replace(recipe, passes=passes)


def subset_recipe(recipe, um, keep):
    """``recipe`` restricted to the convs ``keep(path)`` accepts (passes left empty are dropped)."""
    from unet_surgery.passes import make_plan
    from unet_surgery.recipes.schema import Selector

    passes = []
    for p in recipe.passes:
        paths = tuple(path for path in make_plan(replace(recipe, passes=(p,)), um).layers if keep(path))
        if not paths:
            continue
        factors = {k: v for k, v in p.factors.items() if k in paths}
        passes.append(replace(p, select=Selector(paths=paths), factors=factors))
    return replace(recipe, passes=tuple(passes))


def groups(um):
    """Layer groups for the level / stage / upsampler ablations (by the map's records)."""
    rec = {c.path: c for c in um.convs}

    def is_up(p):
        return ".upsamplers." in p

    return {
        "level 1 only": lambda p: rec[p].level == 1 and not is_up(p),
        "level 2 only": lambda p: rec[p].level == 2,
        "levels 1+2, no upsamplers": lambda p: rec[p].level in (1, 2) and not is_up(p),
        "down + mid only": lambda p: rec[p].stage in ("down", "mid"),
        "up only (with upsamplers)": lambda p: rec[p].stage == "up",
    }


_WORKER: dict = {}


def _init_worker(threads: int, toy, um) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(toy=toy, um=um)


def _do_job(job: tuple) -> tuple:
    key, kw = job
    t = time.perf_counter()
    r = run(_WORKER["toy"], _WORKER["um"], **kw)
    r["seconds"] = time.perf_counter() - t
    return key, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "analysis")
    ap.add_argument("--seeds", default="100-115", help="inclusive range, e.g. 100-115")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--seeds-128", type=int, default=4, help="first N seeds at 128x128 (0: all)")
    ap.add_argument("--quick", action="store_true", help="4 seeds (2 at 128 px), 10 steps, fewer ablations")
    ap.add_argument("--small", action="store_true",
                    help="8 seeds, 64x64 only, four ablations (what fits a heavily loaded 2-core machine)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes, one torch thread each")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop waiting after this long and write what finished (the five main runs come first)")
    args = ap.parse_args()
    lo, hi = (int(v) for v in args.seeds.split("-"))
    seeds = list(range(lo, hi + 1))
    steps = args.steps
    if args.quick:
        seeds, steps, args.seeds_128 = seeds[:4], 10, 2
    if args.small:
        seeds = seeds[:8]
    if any(s >= 9000 for s in seeds):
        raise SystemExit("seeds >= 9000 are held out for the final evaluation")
    seeds128 = seeds[: args.seeds_128] if args.seeds_128 else seeds
    args.out.mkdir(parents=True, exist_ok=True)

    toy = load_toy_retry("toy")
    um = unet_surgery.map_unet(toy.unet)
    training = toy.config.get("training", {})
    digest = hashlib.sha256(b"".join(v.detach().numpy().tobytes() for v in toy.state_dict().values())).hexdigest()
    training = {**training, "weights_sha256": digest}
    log(f"weights sha256 {digest[:16]} (the workers get this very model, not a re-read)")
    log(f"toy: {training.get('steps_done')} training steps; {args.jobs} worker(s); seeds {seeds[0]}-{seeds[-1]} "
        f"({len(seeds)}), at 128 px {seeds128[0]}-{seeds128[-1]} ({len(seeds128)}); {steps} DDIM steps")
    sc = {s: auto_recipe(um, base=32, target=s, vae_scale_factor=1, policy="scalecrafter") for s in (64, 128)}
    strip = min(4, len(seeds))
    jobs: list[tuple[str, dict]] = []

    def job(key, size, **kw):
        sd = seeds128 if size == 128 else seeds
        jobs.append((key, dict(size=size, labels=[s % 3 for s in sd], seeds=sd, steps=steps, **kw)))

    # main runs, traced (most expensive first, for the pool)
    if not args.small:
        job("128 baseline", 128, trace=True, strip=strip)
        job("128 scalecrafter", 128, recipe=sc[128], trace=True, strip=strip)
    job("32 baseline", 32, trace=True, strip=strip)
    job("64 baseline", 64, trace=True, strip=strip)
    job("64 scalecrafter", 64, recipe=sc[64], trace=True, strip=strip)
    g = groups(um)
    # 64x64: layers (the recipe's window), then windows (all the recipe's layers)
    small = args.quick or args.small
    for name in (list(g) if not small else ["level 1 only", "level 2 only"]):
        job(f"64 {name}", 64, recipe=subset_recipe(sc[64], um, g[name]))
    windows = [("first 10%", 0.1, None), ("first 30%", 0.3, None), ("first 100%", 1.0, None),
               ("steps 30-60%", 0.6, 0.3), ("steps 60-100%", 1.0, 0.6)]
    for name, tau, start in (windows if not small else [windows[1], windows[4]]):
        job(f"64 window {name}", 64, recipe=with_tau(sc[64], tau), late_start=start)
    if not small:  # 128x128: the deepest level alone
        job("128 level 2 only", 128, recipe=subset_recipe(sc[128], um, g["level 2 only"]))

    log(f"{len(jobs)} runs")
    results: dict[str, dict] = {}

    def report(key, r):
        s = r["summary"]
        log(f"{key:<32} one {s['frac_one']:.2f} empty {s['frac_none']:.2f} several {s['frac_multi']:.2f} "
            f"class {s['frac_class_kept']:.2f} counts {r['counts']} ({r['seconds']:.0f}s)")

    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init_worker, initargs=(1, toy, um)) as pool:
            futures = [pool.submit(_do_job, j) for j in jobs]
            deadline = None if args.max_minutes is None else T0 + 60 * args.max_minutes
            try:
                for fut in as_completed(futures, timeout=None if deadline is None else deadline - time.perf_counter()):
                    key, r = fut.result()
                    results[key] = r
                    report(key, r)
            except TimeoutError:
                missing = [k for k, _ in jobs if k not in results]
                log(f"--max-minutes reached: writing without {missing}")
                for f in futures:
                    f.cancel()
                for proc in list(getattr(pool, "_processes", {}).values()):
                    proc.terminate()
    else:
        _WORKER.update(toy=toy, um=um)
        for j in jobs:
            if args.max_minutes is not None and time.perf_counter() - T0 > 60 * args.max_minutes:
                log(f"--max-minutes reached: writing without {[k for k, _ in jobs if k not in results]}")
                break
            key, r = _do_job(j)
            results[key] = r
            report(key, r)
    results = {k: results[k] for k in sorted(results, key=_display_order)}
    write_outputs(args.out, results, seeds, seeds128, steps, training, sc, um)
    log(f"done: {args.out}")


def _display_order(key: str) -> tuple:
    size, rest = key.split(" ", 1)
    rank = 0 if rest == "baseline" else 1 if rest == "scalecrafter" else 2 if rest.startswith("window") else 3
    return (int(size), rank, rest)


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------
def write_outputs(out: Path, results, seeds, seeds128, steps, training, sc, um) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main_keys = [k for k in ("32 baseline", "64 baseline", "64 scalecrafter", "128 baseline", "128 scalecrafter")
                 if k in results]
    colours = {"32 baseline": "k", "64 baseline": "tab:blue", "64 scalecrafter": "tab:red",
               "128 baseline": "tab:cyan", "128 scalecrafter": "tab:orange"}
    # windows in which each scalecrafter run dilates: compare every run over the same steps
    win = {s: np.array(results[f"{s} scalecrafter"]["factors"]) > 1 for s in (64, 128)
           if f"{s} scalecrafter" in results}
    win[32] = win[64]

    def over_window(key, series):
        size = results[key]["size"]
        m = win[size]
        a = np.asarray(series, dtype=float)
        return float(a[m].mean()) if m.any() else float(a.mean())

    data: dict = {
        "command": "python scripts/analyse_redilation.py " + " ".join(sys.argv[1:]),
        "toy_training_steps": training.get("steps_done"),
        "toy_training_command": training.get("command"),
        "toy_weights_sha256": training.get("weights_sha256"),
        "seeds": seeds, "seeds_128": seeds128, "labels": "seed % 3", "steps": steps,
        "guidance": DEFAULT_GUIDANCE,
        "recipes": {str(s): {"description": r.description,
                             "factors_per_step": results[f"{s} scalecrafter"]["factors"]}
                    for s, r in sc.items() if f"{s} scalecrafter" in results},
        "runs": {}, "blocks": {}, "attention": {}, "x0": {},
        "x0_by_outcome": {},
    }
    for key, r in results.items():
        data["runs"][key] = {"size": r["size"], "summary": r["summary"], "counts": r["counts"],
                             "factors": r["factors"], "seconds": round(r["seconds"], 1)}
        x0 = r["x0"]
        data["x0"][key] = {k: [float(v) for v in x0[k].mean(1)] for k in x0}
    for key in main_keys:
        r = results[key]
        data["blocks"][key] = {
            b: {**{s: over_window(key, [d[s] for d in r["blocks"][b]])
                   for s in ("mean", "std", "spatial_std", "low_freq_frac", "cell_frac")},
                "class_signal": over_window(key, r["class_sig"][b]),
                "per_step": {s: [d[s] for d in r["blocks"][b]] for s in ("std", "low_freq_frac", "cell_frac")}
                | {"class_signal": r["class_sig"][b]}}
            for b in BLOCKS
        }
        data["attention"][key] = {
            a: {**{s: over_window(key, [d[s] for d in recs])
                   for s in ("self_entropy", "self_dist", "self_max", "cross_share", "resid_rms", "cross_rms",
                             "cross_token_std")},
                "tokens": recs[0]["tokens"], "cross_keys": 1,
                "per_step": {s: [d[s] for d in recs] for s in ("self_entropy", "self_dist", "cross_share")}}
            for a, recs in r["attn"].items()
        }
        # x0 contrast by final outcome
        counts = np.array(r["counts"])
        c = r["x0"]["contrast"]
        data["x0_by_outcome"][key] = {
            name: ([float(v) for v in c[:, mask].mean(1)] if mask.any() else None)
            for name, mask in (("empty", counts == 0), ("one", counts == 1), ("several", counts > 1))
        }
    (out / "analysis.json").write_text(json.dumps(data, indent=1) + "\n")

    # 1. outcomes ------------------------------------------------------------------------------
    keys = list(results)
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(keys) + 1.2))
    y = np.arange(len(keys))[::-1]
    one = np.array([results[k]["summary"]["frac_one"] for k in keys])
    none = np.array([results[k]["summary"]["frac_none"] for k in keys])
    multi = np.array([results[k]["summary"]["frac_multi"] for k in keys])
    ax.barh(y, none, color="0.6", label="empty")
    ax.barh(y, one, left=none, color="tab:green", label="exactly one")
    ax.barh(y, multi, left=none + one, color="tab:red", label="several")
    ax.set_yticks(y, keys, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"fraction of images (seeds {seeds[0]}-{seeds[-1]}; 128 px: {seeds128[0]}-{seeds128[-1]})")
    ax.legend(loc="lower right", fontsize=8, ncol=3)
    ax.set_title("Outcome per run (all recipe rows are the automatic ScaleCrafter rule or a part of it)")
    fig.tight_layout()
    fig.savefig(out / "outcomes.png", dpi=110)
    plt.close(fig)

    # 2. block statistics ----------------------------------------------------------------------
    stats = [("std", "output std"), ("spatial_std", "spatial std (contrast)"),
             ("low_freq_frac", "energy fraction <= 2 cycles/side"), ("cell_frac", "energy fraction inside 2x2 cells"),
             ("class_signal", "cond - uncond (relative)")]
    fig, axes = plt.subplots(1, len(stats), figsize=(16, 3.4))
    for ax, (s, title) in zip(axes, stats, strict=True):
        for key in main_keys:
            vals = [data["blocks"][key][b][s] for b in BLOCKS]
            ax.plot(range(len(BLOCKS)), vals, "o-", color=colours[key], label=key, ms=3)
        ax.set_xticks(range(len(BLOCKS)), BLOCKS, fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("Block outputs, conditional half, mean over the steps the recipe dilates", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "block_stats.png", dpi=110)
    plt.close(fig)

    # 3. block stats over steps (deep blocks) ------------------------------------------------------
    fig, axes = plt.subplots(2, 4, figsize=(15, 6), sharex=True)
    for col, b in enumerate(("down1", "down2", "mid", "up0")):
        for row, s in enumerate(("cell_frac", "class_signal")):
            ax = axes[row, col]
            for key in main_keys:
                ax.plot(data["blocks"][key][b]["per_step"][s], color=colours[key], label=key)
            ax.set_title(f"{b}: {s}", fontsize=9)
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "block_steps.png", dpi=110)
    plt.close(fig)

    # 4. attention -------------------------------------------------------------------------------
    names = list(data["attention"][main_keys[0]])
    fig, axes = plt.subplots(3, len(names), figsize=(4 * len(names), 8), sharex=True)
    for col, a in enumerate(names):
        for row, (s, title) in enumerate((("self_entropy", "self-attn entropy / log N"),
                                          ("self_dist", "mean query-key distance / side"),
                                          ("cross_share", "cross-attn out / residual rms"))):
            ax = axes[row, col]
            for key in main_keys:
                ax.plot(data["attention"][key][a]["per_step"][s], color=colours[key], label=key)
            ax.set_title(f"{a}: {title}", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "attention.png", dpi=110)
    plt.close(fig)

    # 5. x0 over steps ---------------------------------------------------------------------------
    fig, axes = plt.subplots(1, 4, figsize=(19, 3.8))
    for key in main_keys:
        axes[0].plot(data["x0"][key]["contrast"], color=colours[key], label=key)
        axes[1].plot(data["x0"][key]["fg_frac"], color=colours[key], label=key)
        axes[3].plot(data["x0"][key]["guide"], color=colours[key], label=key)
    axes[3].set_title("class signal: rms(v_cond - v_uncond) / rms(v_uncond)", fontsize=9)
    for key, ls in (("64 scalecrafter", "-"), ("128 scalecrafter", "--")):
        if key not in results:
            continue
        for name, col in (("empty", "0.5"), ("one", "tab:green"), ("several", "tab:red")):
            v = data["x0_by_outcome"][key][name]
            if v is not None:
                axes[2].plot(v, ls, color=col, label=f"{key}: ends {name}")
    for key in ("64 baseline",):
        axes[2].plot(data["x0"][key]["contrast"], ":", color=colours[key], label=key)
    axes[0].set_title("x0 contrast (95th pct. distance from background)", fontsize=9)
    axes[1].set_title("x0 foreground fraction (distance > 0.5)", fontsize=9)
    axes[2].set_title("x0 contrast by final outcome", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "x0_contrast.png", dpi=110)
    plt.close(fig)

    # 6. x0 contrast for the window ablations ------------------------------------------------------
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for key in results:
        if key.startswith("64 window") or key in ("64 baseline", "64 scalecrafter"):
            s = results[key]["summary"]
            ax.plot(data["x0"][key]["contrast"], label=f"{key} (empty {s['frac_none']:.2f})")
    ax.set_xlabel("step")
    ax.set_title("64x64: x0 contrast, dilation windows", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "x0_windows.png", dpi=110)
    plt.close(fig)

    # 7. x0 strips and final samples ----------------------------------------------------------------
    def to_img(a):
        return np.clip((np.asarray(a, dtype=np.float32).transpose(1, 2, 0) + 1) / 2, 0, 1)

    for size in (64, 128):
        if f"{size} scalecrafter" not in results:
            continue
        rows = [(k, i) for k in (f"{size} baseline", f"{size} scalecrafter") for i in range(results[k]["x0_strip"].shape[1])]
        cols = [*range(0, steps, max(1, steps // 8)), steps - 1]
        cols = sorted(set(cols))
        fig, axes = plt.subplots(len(rows), len(cols) + 1, figsize=(1.3 * (len(cols) + 1), 1.35 * len(rows)))
        for ri, (k, i) in enumerate(rows):
            strip_ = results[k]["x0_strip"]
            for ci, st in enumerate(cols):
                ax = axes[ri, ci]
                ax.imshow(to_img(strip_[st, i]))
                ax.set_xticks([])
                ax.set_yticks([])
                if ri == 0:
                    f = results[f"{size} scalecrafter"]["factors"][st]
                    ax.set_title(f"step {st}\nf={f:g}", fontsize=7)
            ax = axes[ri, -1]
            ax.imshow(to_img(results[k]["images"][i]))
            ax.set_xticks([])
            ax.set_yticks([])
            if ri == 0:
                ax.set_title("final", fontsize=7)
            axes[ri, 0].set_ylabel(f"{k.split(' ', 1)[1][:8]}\nseed {seeds[i]}\nn={results[k]['counts'][i]}", fontsize=7)
        fig.suptitle(f"{size}x{size}: predicted x0 over steps (f = re-dilation factor of the deep convs)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"x0_strip_{size}.png", dpi=100)
        plt.close(fig)

    fig, axes = plt.subplots(len(main_keys), len(seeds), figsize=(0.95 * len(seeds), 1.05 * len(main_keys)))
    axes = np.atleast_2d(axes)
    for ri, k in enumerate(main_keys):
        imgs = results[k]["images"]
        for ci in range(len(seeds)):
            ax = axes[ri, ci]
            ax.set_xticks([])
            ax.set_yticks([])
            if ci < len(imgs):
                ax.imshow(to_img(imgs[ci]))
                ax.set_title(str(results[k]["counts"][ci]), fontsize=6, pad=1)
            else:
                ax.axis("off")
        axes[ri, 0].set_ylabel(k.replace(" ", "\n", 1), fontsize=6)
    fig.suptitle("Final samples (number = objects counted)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
