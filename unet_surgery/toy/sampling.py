"""Seeded DDIM sampling with classifier-free guidance for the toy model.

The loop is written out (rather than a diffusers pipeline) so that any UNet, including a patched
one, can be passed in, and so that the two guidance branches travel in ONE UNet call per step as a
``[uncond, cond]`` batch of ``2B``: guidance wrappers that split that batch rely on the order.
All noise (initial, and per step for eta > 0) comes from one generator per seed, so sample ``i``
with seed ``s`` is the same image whether it is drawn alone or inside a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from unet_surgery.core.schema import SamplingSpec
from unet_surgery.sampling.cascade import combine_cfg
from unet_surgery.toy.model import ToyDiffusion, make_ddim_scheduler

__all__ = [
    "DEFAULT_ETA",
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "ddim_timesteps",
    "initial_noise",
    "sample",
    "sample_recipe",
]

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 3.0
DEFAULT_ETA = 1.0
"""Stochastic DDIM by default: with eta = 0 the small model's noisy x0 guesses at high t are baked
into the image and samples end grainy; fresh per-seed noise each step washes those errors out."""


def ddim_timesteps(steps: int = DEFAULT_STEPS, scheduler_config: dict[str, Any] | None = None):
    """The DDIM timesteps :func:`sample` visits (descending), e.g. for step-dependent schedules."""
    scheduler = make_ddim_scheduler(scheduler_config)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.clone()


def initial_noise(seeds: Sequence[int], height: int, width: int, channels: int = 3) -> torch.Tensor:
    """Standard-normal ``(len(seeds), C, H, W)`` noise; row ``i`` depends only on ``seeds[i]``."""
    rows = [
        torch.randn((channels, height, width), generator=torch.Generator().manual_seed(int(s)))
        for s in seeds
    ]
    return torch.stack(rows)


@torch.no_grad()
def sample(
    toy: ToyDiffusion,
    labels: torch.Tensor | Sequence[int],
    *,
    seeds: Sequence[int],
    height: int = 32,
    width: int = 32,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    unet: nn.Module | None = None,
    callback: Callable[[int, int], None] | None = None,
    eta: float = DEFAULT_ETA,
    init_image: torch.Tensor | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Generate images in [-1, 1], shape ``(B, 3, height, width)``, on the toy model's device.

    ``unet`` replaces ``toy.unet`` (e.g. a patched copy); it is called as
    ``unet(x, t, encoder_hidden_states=...)`` with a ``[uncond, cond]`` batch of ``2B``.
    ``callback(step_index, timestep)`` runs before each UNet call (hooks for step schedules).
    ``eta`` > 0 adds DDIM's stochastic term (1 = DDPM-like ancestral sampling), still per-seed.
    ``height`` and ``width`` must be multiples of ``2 ** (levels - 1)`` (4 for ``toy``, 8 for
    ``toy4``): every level halves the size.

    ``init_image`` (``(B, 3, height, width)`` in [-1, 1]) with ``strength`` in (0, 1] is
    img2img as diffusers runs it: the last ``int(steps * strength)`` steps of the schedule,
    starting from the image noised to the first of them with the seed's first noise draw. This is
    the second half of a "hires fix" (sample small, upsample, img2img).
    """
    if init_image is None and strength != 1.0:
        raise ValueError("strength needs an init_image")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    multiple = 2 ** (len(toy.unet.config.block_out_channels) - 1)
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(seeds) != labels.numel():
        raise ValueError(f"{len(seeds)} seeds for {labels.numel()} labels")
    unet = toy.unet if unet is None else unet
    weight = toy.class_embedding.weight
    device, dtype = weight.device, weight.dtype

    scheduler = make_ddim_scheduler(getattr(toy, "scheduler_config", None))
    scheduler.set_timesteps(steps)
    b = labels.numel()
    cond = toy.encode(labels.to(device))
    uncond = toy.encode(torch.full((b,), toy.empty_class, dtype=torch.long, device=device))
    context = torch.cat([uncond, cond]).to(dtype)

    # One generator per seed: the initial noise (and, with eta > 0, every step's fresh noise) of
    # sample i depends on seeds[i] only, never on its batch neighbours.
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    shape = (3, height, width)

    def per_seed_noise() -> torch.Tensor:
        rows = [torch.randn(shape, generator=g) for g in generators]
        return torch.stack(rows).to(device=device, dtype=dtype)

    x = per_seed_noise()
    start = 0
    if init_image is not None:
        if tuple(init_image.shape) != (b, *shape):
            raise ValueError(f"init_image must have shape {(b, *shape)}, got {tuple(init_image.shape)}")
        start = steps - int(steps * strength)
        if start >= steps:
            raise ValueError(f"strength {strength} leaves no step of {steps} to run")
        t0 = scheduler.timesteps[start].reshape(1)
        x = scheduler.add_noise(init_image.to(device=device, dtype=dtype), x, t0)
    for i, t in enumerate(scheduler.timesteps):
        if i < start:
            continue
        if callback is not None:
            callback(i, int(t))
        eps = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample
        eps = combine_cfg(eps, guidance_scale)
        if eta > 0:
            step = scheduler.step(eps, t, x, eta=eta, variance_noise=per_seed_noise())
        else:
            step = scheduler.step(eps, t, x)
        x = step.prev_sample
    return x.clamp(-1, 1)


@torch.no_grad()
def sample_recipe(
    toy: ToyDiffusion,
    recipe: Any,
    labels: torch.Tensor | Sequence[int],
    *,
    seeds: Sequence[int],
    size: int | tuple[int, int],
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    unet_map: Any = None,
    callback: Callable[[int, int], None] | None = None,
    cascade_eta: float = 0.0,
) -> torch.Tensor:
    """Sample the toy at ``size`` with ``recipe`` applied; the model is unpatched afterwards.

    ``recipe`` is ``None`` (the plain model), a :class:`~unet_surgery.recipes.Recipe`, a shipped
    recipe name or a file. A recipe with a ``sampling`` section runs FreeScale's self-cascade
    through its stages (``steps`` per stage, restart at ``int(0.3 * steps)`` unless the recipe
    sets one); a recipe with a guidance pass (``noise_damped_cfg``, ``fouriscale_guidance``: any
    pass whose handler works on the ``[uncond, cond]`` halves) gets those halves marked. This
    is the one place the demo, the benchmarks and the tests turn a recipe into toy samples.
    A ``patches`` section (MultiDiffusion) denoises overlapping native-size views of every stage
    (a recipe without ``sampling`` is one stage at ``size``); a ``demofusion`` section runs
    DemoFusion with ``steps`` per phase, one seed per run (its re-normalisation takes the whole
    batch's statistics), the jitter and the noise inversion seeded by the seed.
    ``callback(step_index, timestep)`` runs before each UNet call of plain (non-cascade) runs.
    Plain runs sample with the toys' stochastic DDIM (:data:`DEFAULT_ETA`); the cascade's
    stages with ``cascade_eta`` (0 by default, deterministic as FreeScale's pipelines), their
    noise from the batch's generator.
    """
    from dataclasses import replace

    from unet_surgery.patching.patch import apply
    from unet_surgery.recipes import load_recipe

    h, w = (size, size) if isinstance(size, int) else size
    if recipe is None:
        return sample(toy, labels, seeds=seeds, height=h, width=w, steps=steps,
                      guidance_scale=guidance_scale, callback=callback)
    recipe = load_recipe(recipe)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    with apply(toy.unet, recipe, unet_map=unet_map) as patch:
        if patch.wants_cfg_batches:
            patch.set_cfg_batches(True)
        if recipe.sampling is None and recipe.patches is None and recipe.demofusion is None:
            scheduler = make_ddim_scheduler(getattr(toy, "scheduler_config", None))
            scheduler.set_timesteps(steps)
            patch.set_timesteps(scheduler.timesteps)
            return sample(toy, labels, seeds=seeds, height=h, width=w, steps=steps,
                          guidance_scale=guidance_scale, callback=callback)
        from unet_surgery.sampling import cfg_denoiser, self_cascade
        from unet_surgery.sampling.patchwise import patch_settings, patchwise_denoiser

        device = toy.class_embedding.weight.device
        cond = toy.encode(labels.to(device))
        uncond = toy.encode(torch.full_like(labels, toy.empty_class).to(device))
        if recipe.demofusion is not None:
            return _demofusion(toy, recipe, cond, uncond, seeds, (h, w), steps, guidance_scale, patch)
        stages = recipe.sampling if recipe.sampling is not None else SamplingSpec(stages=((h, w),))
        final = tuple(stages.stages[-1])
        if final != (h, w):
            raise ValueError(f"recipe {recipe.name!r} ends its cascade at {final[0]}x{final[1]}, not {h}x{w}")
        first = stages.stages[0]
        restart = stages.restart_step
        spec = replace(stages, steps=steps, restart_step=None if restart is None else min(restart, steps - 1))
        denoise = cfg_denoiser(toy.unet, cond, uncond, guidance_scale=guidance_scale)
        if recipe.patches is not None:
            window, stride = patch_settings(recipe)
            denoise = patchwise_denoiser(denoise, window=window, stride=stride,
                                         view_batch_size=recipe.patches.view_batch_size)
        out = self_cascade(
            denoise,
            make_ddim_scheduler(getattr(toy, "scheduler_config", None)),
            spec,
            latent_channels=3,
            batch_size=len(seeds),
            latents=initial_noise(seeds, first[0], first[1]).to(device),
            # later stages' re-noising: one generator for the batch, seeded by its first seed
            generator=torch.Generator().manual_seed(int(seeds[0])),
            patch=patch,
            progress=False,
            eta=cascade_eta,
        )
        return out.latents.clamp(-1, 1)


def _demofusion(toy: ToyDiffusion, recipe: Any, cond: torch.Tensor, uncond: torch.Tensor, seeds: Sequence[int],
                size: tuple[int, int], steps: int, guidance_scale: float, patch: Any) -> torch.Tensor:
    """DemoFusion on the toy, one seed at a time (see :func:`sample_recipe`)."""
    from dataclasses import replace

    from unet_surgery.sampling import cfg_denoiser
    from unet_surgery.sampling.demofusion import demofusion, phases

    base = recipe.base_resolution[0]
    spec = replace(recipe.demofusion, steps=steps)
    first = phases(size[0], size[1], base, recipe.vae_scale_factor)[0].latent_hw
    images = []
    for i, seed in enumerate(seeds):
        out = demofusion(
            cfg_denoiser(toy.unet, cond[i : i + 1], uncond[i : i + 1], guidance_scale=guidance_scale),
            make_ddim_scheduler(getattr(toy, "scheduler_config", None)), spec,
            height=size[0], width=size[1], base=base, latent_channels=3, batch_size=1,
            vae_scale_factor=recipe.vae_scale_factor,
            latents=initial_noise([seed], *first).to(cond.device),
            generator=torch.Generator().manual_seed(int(seed)), jitter_seed=int(seed), patch=patch, progress=False,
        )
        images.append(out.latents)
    return torch.cat(images).clamp(-1, 1)
