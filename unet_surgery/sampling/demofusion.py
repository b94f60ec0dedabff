"""DemoFusion (Du et al., CVPR 2024) as a sampler around a :data:`Denoiser`.

The official pipeline (PRIS-CV/DemoFusion, ``pipeline_demofusion_sdxl.py``), part by part:

* **phase 1**: plain generation at ``target / scale_num`` (``scale_num = int(target / base)``
  on the longer side);
* **progressive upscaling** to ``base * s`` for ``s = 2 .. scale_num``: bicubic upsample of the
  latents, **noise inversion** (one noise tensor added at every timestep of the schedule),
  restart from the first, most noisy one;
* **skip residual** before each step: ``x = x (1 - c1) + x_t^inv c1``, ``c1 = cos_f^cosine_scale_1``
  with ``cos_f = 0.5 (1 + cos(pi (T - t) / T))``;
* **local patches**: MultiDiffusion views of the native size (``window``) at ``stride``, with
  random jitter of up to ``(window - stride) // 4`` in a zero-padded frame, SDXL crop
  conditioning at each view's corner;
* **dilated sampling**: the ``s x s`` interleaved sub-lattices of the latent, each of the native
  size, denoised from a Gaussian-filtered copy (kernel ``2 s - 1``, sigma
  ``sigma (0.99 cos_f^cosine_scale_3 + 0.01)``, renormalised to the latent's mean and std);
* local and global results mixed with ``c2 = cos_f^cosine_scale_2`` (global weight);
* after each phase the latents are renormalised to phase 1's mean and std;
* ``view_batch_size`` views per UNet call; the **multi-decoder** decodes padded tiles
  (:func:`tiled_decode`).

The official code steps every view with the scheduler and averages the stepped latents; we
average the model outputs with the same weights and step the whole latent once, which is the
same number for schedulers whose step is affine in the model output (DDIM, Euler, DPM-Solver)
and keeps one scheduler state per latent (the official per-view ``_init_step_index`` scales
later view batches with the next step's sigma under Euler; we scale every view with its own
step's). The cosine factor and the Gaussian kernel are computed with the official tensor
operations, so their float32 rounding (the timestep is an integer tensor) is the official one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from unet_surgery.recipes.schema import DemoFusionSpec
from unet_surgery.sampling.cascade import (
    CascadeOutput,
    CascadeStage,
    Denoiser,
    _progress,
    _randn,
    _step_kwargs,
    initial_latents,
)
from unet_surgery.sampling.patchwise import (
    LocalViews,
    PatchError,
    ViewExecutor,
    ViewStage,
    batched,
    check_window,
    fuse_views,
    jitter_views,
    view_grid,
)


@dataclass(frozen=True)
class Phase:
    """One phase of DemoFusion: its scale number and its size in pixels and latent pixels."""

    scale: int
    height: int
    width: int
    latent_hw: tuple[int, int]


def phases(height: int, width: int, base: int, vae_scale_factor: int) -> list[Phase]:
    """The official phase sizes for a ``height x width`` target from a square ``base`` (pixels)."""
    if max(height, width) < base:
        raise PatchError(f"demofusion: target {height}x{width} is smaller than the base {base}x{base}")
    hs, ws = height / base, width / base
    scale_num = int(max(hs, ws))
    if scale_num < 2:
        raise PatchError(
            f"demofusion: target {height}x{width} is less than twice the base {base}x{base} on its longer "
            "side; DemoFusion upscales by whole factors of the base"
        )
    aspect = min(hs, ws) / max(hs, ws)
    h1, w1 = height // scale_num, width // scale_num
    out = [Phase(1, h1, w1, (h1 // vae_scale_factor, w1 // vae_scale_factor))]
    for s in range(2, scale_num + 1):
        ch = cw = base * s
        if height > width:
            cw = int(cw * aspect)
        else:
            ch = int(ch * aspect)
        out.append(Phase(s, ch, cw, (int(ch / vae_scale_factor), int(cw / vae_scale_factor))))
    return out


def cosine_factor(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """``0.5 (1 + cos(pi (T - t) / T))`` with the official tensor operations (float32 for integer t)."""
    T = num_train_timesteps
    return (0.5 * (1 + torch.cos(torch.pi * (T - t) / T))).cpu()


def gaussian_kernel(kernel_size: int, sigma: Any, channels: int) -> torch.Tensor:
    """The official separable Gaussian, ``(channels, 1, k, k)``, normalised per axis."""
    x = torch.arange(kernel_size)
    g1 = torch.exp(-((x - (kernel_size - 1) / 2) ** 2) / (2 * sigma**2))
    g1 = g1 / g1.sum()
    return (g1[:, None] * g1[None, :])[None, None].repeat(channels, 1, 1, 1)


def gaussian_filter(latents: torch.Tensor, kernel_size: int, sigma: Any) -> torch.Tensor:
    """Depthwise Gaussian blur with zero padding ``kernel_size // 2`` (the official filter)."""
    channels = latents.shape[1]
    kernel = gaussian_kernel(kernel_size, sigma, channels).to(latents.device, latents.dtype)
    return F.conv2d(latents, kernel, padding=kernel_size // 2, groups=channels)


def tiled_decode(decode: Any, latents: torch.Tensor, window: int, vae_scale_factor: int) -> torch.Tensor:
    """DemoFusion's multi-decoder: tiles of ``window // 4`` latents, each decoded with
    ``window // 8 * 3`` latents of context on every side (zeros beyond the border), centres kept.

    ``decode(z)`` maps a tile of UNet latents to an image (dividing by the VAE's scaling factor).
    Every decode sees ``window // 4 + 2 * (window // 8 * 3)`` latents a side, whatever the
    image size, so the decoder's peak memory stays flat.
    """
    core, pad = window // 4, window // 8 * 3
    height, width = int(latents.shape[-2]), int(latents.shape[-1])
    views = view_grid(height, width, core, core, check=False)
    padded = F.pad(latents, (pad, pad, pad, pad), "constant", 0)
    f = vae_scale_factor
    image: torch.Tensor | None = None
    count: torch.Tensor | None = None
    for h0, h1, w0, w1 in views:
        tile = decode(padded[:, :, h0 : h1 + 2 * pad, w0 : w1 + 2 * pad])
        if image is None or count is None:
            image = torch.zeros(latents.shape[0], tile.shape[1], height * f, width * f,
                                dtype=tile.dtype, device=tile.device)
            count = torch.zeros_like(image)
        inner = tile[:, :, pad * f : tile.shape[2] - pad * f, pad * f : tile.shape[3] - pad * f]
        image[:, :, h0 * f : h1 * f, w0 * f : w1 * f] += inner
        count[:, :, h0 * f : h1 * f, w0 * f : w1 * f] += 1
    assert image is not None and count is not None  # view_grid returns at least one view
    return image / count


def demofusion(
    denoise: Denoiser,
    scheduler: Any,
    spec: DemoFusionSpec,
    *,
    height: int,
    width: int,
    base: int,
    latent_channels: int,
    batch_size: int = 1,
    vae_scale_factor: int = 8,
    generator: torch.Generator | None = None,
    jitter_seed: int = 0,
    latents: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    executor: ViewExecutor | None = None,
    patch: Any = None,
    progress: bool = True,
) -> CascadeOutput:
    """Run DemoFusion to ``height x width`` pixels from a square ``base`` and return each phase's latents.

    ``denoise(model_input, t, stage)`` returns the guided model output for a batch of views
    (:class:`ViewStage`: ``stage.crops`` holds each local view's top-left corner in pixels,
    for SDXL's crop conditioning; empty for phase 1 and dilated views). ``latents`` is phase
    1's starting noise (else drawn from ``generator``); the noise inversion of each later phase
    is drawn from ``generator`` too, and the jitter from ``random.Random(jitter_seed)``. Pixel
    models (the toys) pass ``vae_scale_factor=1``. ``executor`` spreads view batches over
    processes (:class:`~unet_surgery.sampling.patchwise.SplitViews`).
    """
    plan = phases(height, width, base, vae_scale_factor)
    window = base // vae_scale_factor
    stride = spec.stride if spec.stride is not None else window // 2
    for ph in plan[1:]:
        check_window(*ph.latent_hw, window, stride)
    runner: ViewExecutor = executor if executor is not None else LocalViews()
    if latents is not None:
        device = latents.device if device is None else device
        dtype = latents.dtype if dtype is None else dtype
    device = torch.device(device if device is not None else "cpu")
    dtype = dtype if dtype is not None else torch.float32
    T = int(scheduler.config.num_train_timesteps)
    step_kwargs = _step_kwargs(scheduler, generator)
    rng = random.Random(jitter_seed)
    B = batch_size

    def set_timesteps() -> torch.Tensor:
        scheduler.set_timesteps(spec.steps, device=device)
        if patch is not None:
            patch.set_timesteps(scheduler.timesteps)
        return scheduler.timesteps

    results: list[torch.Tensor] = []
    with torch.no_grad():
        # --- phase 1: plain generation at target / scale_num
        first = plan[0]
        x = initial_latents((B, latent_channels, *first.latent_hw), latents, generator, device, dtype,
                            what="phase 1", error=PatchError)
        timesteps = set_timesteps()
        x = x * scheduler.init_noise_sigma
        stage1 = ViewStage(0, first.height, first.width, first.latent_hw, 0)
        for t in _progress(timesteps, progress, f"phase 1 {first.height}x{first.width}", len(timesteps)):
            out = denoise(scheduler.scale_model_input(x, t), t, stage1)
            x = scheduler.step(out, t, x, **step_kwargs, return_dict=False)[0]
        results.append(x)
        anchor_mean, anchor_std = x.mean(), x.std()

        # --- phases 2..scale_num
        for index, ph in enumerate(plan[1:], start=1):
            s = ph.scale
            hl, wl = ph.latent_hw
            x = F.interpolate(x, size=(hl, wl), mode="bicubic")
            timesteps = set_timesteps()
            noise = _randn(tuple(x.shape), generator, device, x.dtype)
            inverted = [scheduler.add_noise(x, noise, t.unsqueeze(0)) for t in timesteps]
            x = inverted[0]
            stage = CascadeStage(index, ph.height, ph.width, ph.latent_hw, 0)
            r = (window - stride) // 4
            for i, t in enumerate(_progress(timesteps, progress, f"phase {s} {ph.height}x{ph.width}", len(timesteps))):
                cf = cosine_factor(t, T)
                c1 = cf**spec.cosine_scale_1
                x = x * (1 - c1) + inverted[i] * c1
                model_input = scheduler.scale_model_input(x, t)

                # local patches (MultiDiffusion with jitter, in a frame padded by r)
                grid = view_grid(hl, wl, window, stride, check=False)
                if spec.jitter:
                    local = jitter_views(grid, hl, wl, window, stride, rng)
                else:
                    local = [(h0 + r, h1 + r, w0 + r, w1 + r) for h0, h1, w0, w1 in grid]
                padded = F.pad(model_input, (r, r, r, r), "constant", 0)
                local_batches = batched(local, spec.view_batch_size)

                def run_local(views: list[tuple[int, int, int, int]], padded: torch.Tensor = padded,
                              t: torch.Tensor = t, stage: CascadeStage = stage) -> torch.Tensor:
                    rows = torch.cat([padded[:, :, a:b, c:d] for a, b, c, d in views])
                    crops = tuple((a * vae_scale_factor, c * vae_scale_factor) for a, b, c, d in views)
                    st = ViewStage(stage.index, stage.height, stage.width, (window, window), 0,
                                   views=tuple(views), crops=crops)
                    return denoise(rows, t, st)

                outs = runner.run(local_batches, run_local)
                shape = (B, int(outs[0].shape[1]), hl + 2 * r, wl + 2 * r)
                value_l, count_l = fuse_views(outs, local_batches, shape, B)
                eps_local = (value_l / count_l)[:, :, r : r + hl, r : r + wl]

                # dilated sampling from a Gaussian-filtered copy
                h_pad, w_pad = (s - hl % s) % s, (s - wl % s) % s
                x_ = F.pad(x, (w_pad, 0, h_pad, 0), "constant", 0)
                c3 = 0.99 * cf**spec.cosine_scale_3 + 1e-2
                std_, mean_ = x_.std(), x_.mean()
                blurred = gaussian_filter(x_, kernel_size=2 * s - 1, sigma=spec.sigma * c3)
                blurred = (blurred - blurred.mean()) / blurred.std() * std_ + mean_
                blurred = scheduler.scale_model_input(blurred, t)
                lattice = [(h, w) for h in range(s) for w in range(s)]
                global_batches = batched(lattice, spec.view_batch_size)
                sub_hw = ((hl + h_pad) // s, (wl + w_pad) // s)

                def run_global(views: list[tuple[int, int]], blurred: torch.Tensor = blurred,
                               t: torch.Tensor = t, stage: CascadeStage = stage, s: int = s,
                               sub_hw: tuple[int, int] = sub_hw) -> torch.Tensor:
                    rows = torch.cat([blurred[:, :, h::s, w::s] for h, w in views])
                    st = ViewStage(stage.index, stage.height, stage.width, sub_hw, 0)
                    return denoise(rows, t, st)

                outs_g = runner.run(global_batches, run_global)
                value_g = torch.zeros((B, int(outs_g[0].shape[1]), hl + h_pad, wl + w_pad),
                                      dtype=outs_g[0].dtype, device=outs_g[0].device)
                for views_g, out_g in zip(global_batches, outs_g, strict=True):
                    for (h, w), part in zip(views_g, out_g.split(B), strict=True):
                        value_g[:, :, h::s, w::s] += part
                eps_global = value_g[:, :, h_pad:, w_pad:]

                # mixed with the official weights and counts, then one step of the whole latent
                c2 = cf**spec.cosine_scale_2
                value = eps_local * (1 - c2)
                count = torch.ones_like(eps_local) * (1 - c2)
                value = value + eps_global * c2
                count = count + torch.ones_like(eps_global) * c2
                eps = torch.where(count > 0, value / count, value)
                x = scheduler.step(eps, t, x, **step_kwargs, return_dict=False)[0]
            x = (x - x.mean()) / x.std() * anchor_std + anchor_mean
            results.append(x)
    return CascadeOutput(latents=results[-1], stage_latents=results)


def view_counts(height: int, width: int, base: int, vae_scale_factor: int,
                spec: DemoFusionSpec) -> list[tuple[int, int]]:
    """``(views, batches)`` of every list of UNet calls a step makes: local and dilated, per phase."""
    window = base // vae_scale_factor
    stride = spec.stride if spec.stride is not None else window // 2
    counts = []
    for ph in phases(height, width, base, vae_scale_factor)[1:]:
        for n in (len(view_grid(*ph.latent_hw, window, stride)), ph.scale * ph.scale):
            counts.append((n, len(batched(range(n), spec.view_batch_size))))
    return counts


DEMOFUSION_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def demofusion_sample(
    pipe: Any,
    recipe: Any,
    *,
    height: int | None = None,
    width: int | None = None,
    prompt: str | list[str] | None = None,
    negative_prompt: str | list[str] | None = None,
    guidance_scale: float = 5.0,
    generator: torch.Generator | None = None,
    jitter_seed: int = 0,
    latents: torch.Tensor | None = None,
    output_type: str = "latent",
    executor: ViewExecutor | None = None,
    progress: bool = True,
    force: bool = False,
) -> CascadeOutput:
    """DemoFusion with an SD1.5/SD2.1 or SDXL pipeline (``recipe.demofusion``; its passes applied too).

    The size defaults to the recipe's first target; the base is the UNet's native size. SDXL is
    conditioned on the target as original and target size, and each local view on its corner as
    crop, as the official pipeline does; SD1.5 runs the same sampler without size conditioning
    (the community ports). ``guidance_scale`` defaults to the official 5.0. With ``output_type``
    other than ``"latent"`` the last phase is decoded, in tiles when ``multi_decoder`` is on.
    The recipe must fit the UNet (structure, family, base size: ``check_fit``), passes or not,
    unless ``force``.
    """
    from unet_surgery.errors import RecipeError
    from unet_surgery.patching.patch import current_patch
    from unet_surgery.recipes.library import load_recipe
    from unet_surgery.sampling.cascade import _module_dtype, vae_decode
    from unet_surgery.sampling.pipelines import (
        _pipeline_denoiser,
        _supported_class,
        apply_to_pipeline,
    )

    name = _supported_class(pipe, DEMOFUSION_PIPELINES)
    recipe = load_recipe(recipe)
    spec = recipe.demofusion
    if spec is None:
        raise RecipeError(f"recipe {recipe.name!r} has no demofusion section")
    height = height if height is not None else recipe.target_resolutions[0][0]
    width = width if width is not None else recipe.target_resolutions[0][1]
    unet = pipe.unet
    sample = unet.config.sample_size
    window = int(sample if isinstance(sample, int) else min(sample))
    vsf = int(pipe.vae_scale_factor)
    device = getattr(pipe, "_execution_device", None) or unet.device
    owned = None
    patch = current_patch(unet)
    if patch is None and recipe.passes:
        owned = apply_to_pipeline(pipe, recipe, force=force)
        patch = owned.patch
    elif patch is None:
        from unet_surgery.graph import map_unet
        from unet_surgery.recipes.fit import check_fit

        check_fit(recipe, map_unet(unet), unet, force=force)
    try:
        denoise = _pipeline_denoiser(pipe, name, device, unet.dtype, (height, width), guidance_scale, prompt,
                                     negative_prompt, None, None, None, None)
        out = demofusion(
            denoise, pipe.scheduler, spec, height=height, width=width, base=window * vsf,
            latent_channels=unet.config.in_channels, batch_size=denoise.batch, vae_scale_factor=vsf,
            generator=generator, jitter_seed=jitter_seed, latents=latents, device=device, dtype=unet.dtype,
            executor=executor, patch=patch, progress=progress,
        )
        if output_type != "latent":
            vae = pipe.vae
            with torch.no_grad():
                if spec.multi_decoder:
                    scale = vae.config.scaling_factor

                    def decode(z: torch.Tensor) -> torch.Tensor:
                        return vae.decode(z.to(_module_dtype(vae)) / scale, return_dict=False)[0]

                    image = tiled_decode(decode, out.latents, window, vsf)
                else:
                    image = vae_decode(vae, out.latents)
            out.images = pipe.image_processor.postprocess(image, output_type=output_type)
        return out
    finally:
        if owned is not None:
            owned.remove()
